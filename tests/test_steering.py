"""Key steering: exact edits on highlighted prefill keys only, identical across attention kernels and batching."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import capture_keys

from seka_lightning import ProjectionBank, encode_highlighted, steer
from seka_lightning.families import keys_view, resolve_layout
from seka_lightning.layers import parse_layers, select_bank_layers
from seka_lightning.steering import NoEditWarning, split_gains

PROMPTS = [
    "Previously the keepers carried **silver lanterns** across the north harbor. What do they carry?",
    "The **golden tower** stands in the valley.",
    "Answer **in one word**: where is the **old castle** now?",
]


def random_bank(
    layers: list[int], n_kv: int = 2, d: int = 16, rank: int = 4, seed: int = 0, neg: bool = True
) -> ProjectionBank:
    gen = torch.Generator().manual_seed(seed)

    def projectors() -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(len(layers), n_kv, d, d, generator=gen))
        u = q[..., :rank]
        return u @ u.transpose(-1, -2)

    return ProjectionBank(
        layers=layers, pos=projectors(), neg=projectors() if neg else None, metadata={"num_layers": 3}
    )


def model_inputs(enc):
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_zero_gains_are_bit_identical(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    base = tiny_model(**model_inputs(enc)).logits
    bank = random_bank([0, 1, 2])
    with (
        pytest.warns(NoEditWarning, match="SEKA steering edits nothing"),
        steer(tiny_model, bank, enc["highlight_mask"], gain_pos=0.0, gain_neg=0.0) as steerer,
    ):
        steered = tiny_model(**model_inputs(enc)).logits
    assert steerer.layer_ids == []  # nothing to do, so nothing attached
    assert torch.equal(base, steered)


def test_only_highlighted_keys_change_by_the_spec_formula(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    bank = random_bank([0, 1, 2])
    gp, gn = 1.5, 0.7
    base = capture_keys(tiny_model, model_inputs(enc))
    mask = enc["highlight_mask"]
    with steer(tiny_model, bank, mask, gain_pos=gp, gain_neg=gn, layers=[1]):
        edited = capture_keys(tiny_model, model_inputs(enc))
    assert torch.equal(base[0], edited[0])  # layer 0 not selected
    k = base[1].double()  # [B, T, H, d]
    pos, neg = bank.pos[1].double(), bank.neg[1].double()  # by layer id: layer 1 is the bank's second entry
    expected = k + (gp * torch.einsum("bthd,hde->bthe", k, pos) + gn * torch.einsum("bthd,hde->bthe", k, neg)) / 2
    assert torch.equal(edited[1][~mask], base[1][~mask])
    torch.testing.assert_close(edited[1][mask].double(), expected[mask], rtol=1e-5, atol=1e-5)
    assert (edited[1][mask] - base[1][mask]).abs().max() > 1e-3


def test_positive_only_formula_without_halving(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS[:1])
    bank = random_bank([2], neg=False)
    base = capture_keys(tiny_model, model_inputs(enc))
    with steer(tiny_model, bank, enc["highlight_mask"], gain_pos=2.0, layers="last1"):
        edited = capture_keys(tiny_model, model_inputs(enc))
    mask = enc["highlight_mask"]
    k = base[2][mask].double()
    expected = k + 2.0 * torch.einsum("mhd,hde->mhe", k, bank.pos[0].double())
    torch.testing.assert_close(edited[2][mask].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_gains_hold_the_float32_gains_to_twice_the_half_precision(dtype):
    gains = random_bank([0, 1], seed=3).pos.float() * 1.7
    split = split_gains(gains, dtype)
    d = gains.shape[-1]
    assert split.dtype == dtype and split.shape == (*gains.shape[:-2], 2 * d, d)
    rebuilt = split[..., :d, :].double() + split[..., d:, :].double()
    info = torch.finfo(dtype)  # each half rounds to within eps / 2 relative; subnormal spacing is eps * tiny
    bound = gains.double().abs() * info.eps**2 / 4 + info.eps * info.tiny / 2
    assert ((rebuilt - gains.double()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keys_are_edited_on_split_gains_within_half_an_ulp(tiny_model, tokenizer, dtype, monkeypatch):
    """With bf16/fp16 keys the edit runs as one half-precision matmul on the split gains. Its error against the exact
    edit (float64 from the same keys and the float32 gains) is within half an ulp of |k| + |k||G|, and most elements
    are the correctly rounded value."""
    from seka_lightning.steering import fused_gains

    model = tiny_model.to(dtype)
    enc = encode_highlighted(tokenizer, PROMPTS)
    bank = random_bank([0, 1, 2])
    base = capture_keys(model, model_inputs(enc))
    mask = enc["highlight_mask"]
    products: list[tuple[torch.dtype, tuple[int, ...]]] = []
    baddbmm = torch.baddbmm

    def recording(input, batch1, batch2, **kwargs):
        products.append((batch2.dtype, tuple(batch2.shape)))
        return baddbmm(input, batch1, batch2, **kwargs)

    monkeypatch.setattr(torch, "baddbmm", recording)
    with steer(model, bank, mask, gain_pos=2.5, gain_neg=0.5, layers=[1]):  # one layer: its input is unchanged
        edited = capture_keys(model, model_inputs(enc))
    monkeypatch.undo()
    heads, d = bank.pos.shape[1], bank.pos.shape[-1]
    assert products == [(dtype, (heads, 2 * d, d))]  # the split path ran, once
    gains = fused_gains(bank, gain_pos=2.5, gain_neg=0.5).double()[1]  # float32 G, as the hook gets it
    k = base[1][mask].double()
    exact = k + torch.einsum("mhd,hde->mhe", k, gains)
    got = edited[1][mask].double()
    assert torch.equal(edited[1][~mask], base[1][~mask]) and torch.equal(edited[0], base[0])
    assert (got - k).abs().max() > 0.1  # the edit is large next to the key dtype's last bit
    magnitude = k.abs() + torch.einsum("mhd,hde->mhe", k.abs(), gains.abs())  # |k| + |k||G|
    assert ((got - exact).abs() <= magnitude * torch.finfo(dtype).eps / 2).all()
    assert (edited[1][mask] == exact.to(dtype)).double().mean() > 0.98


def test_split_gains_edit_is_within_half_an_ulp_where_the_terms_cancel():
    """Random keys against G = 4 P (rank 16), where k and k G often nearly cancel: the split-gain matmul stays within
    half an ulp of |k| + |k||G| of the exact edit, as the float32 path does."""
    generator = torch.Generator().manual_seed(0)
    heads, rows, d = 4, 500, 64
    q, _ = torch.linalg.qr(torch.randn(heads, d, d, generator=generator))
    gains = 4.0 * (q[..., :16] @ q[..., :16].transpose(-1, -2))
    for dtype in (torch.bfloat16, torch.float16):
        k = torch.randn(heads, rows, d, generator=generator).to(dtype)
        exact = k.double() + k.double() @ gains.double()
        magnitude = k.double().abs() + k.double().abs() @ gains.double().abs()
        split = torch.baddbmm(k, torch.cat([k, k], dim=-1), split_gains(gains, dtype))
        wide = torch.baddbmm(k.float(), k.float(), gains).to(dtype)
        for got in (split, wide):
            assert ((got.double() - exact).abs() <= magnitude * torch.finfo(dtype).eps / 2).all()
        assert (split == exact.to(dtype)).double().mean() > 0.99


def test_sdpa_and_eager_give_the_same_steered_logits(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    bank = random_bank([0, 1, 2])
    outs = {}
    for impl in ("sdpa", "eager"):
        tiny_model.set_attn_implementation(impl)
        with steer(tiny_model, bank, enc["highlight_mask"], gain_pos=1.0, gain_neg=0.5):
            outs[impl] = tiny_model(**model_inputs(enc)).logits
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(outs["sdpa"][mask], outs["eager"][mask], rtol=1e-4, atol=1e-4)


def test_batched_generation_equals_rows_one_by_one(tiny_model, tokenizer):
    bank = random_bank([0, 1, 2])
    enc = encode_highlighted(tokenizer, PROMPTS)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with steer(tiny_model, bank, enc["highlight_mask"], gain_pos=3.0, gain_neg=1.0):
        batched = tiny_model.generate(**model_inputs(enc), **kwargs)[:, enc["input_ids"].shape[1] :]
    for i, prompt in enumerate(PROMPTS):
        one = encode_highlighted(tokenizer, [prompt])
        with steer(tiny_model, bank, one["highlight_mask"], gain_pos=3.0, gain_neg=1.0):
            alone = tiny_model.generate(**model_inputs(one), **kwargs)[:, one["input_ids"].shape[1] :]
        assert torch.equal(batched[i], alone[0]), f"row {i}"


def test_decode_steps_add_no_edit_and_cache_carries_the_prefill_edit(tiny_model, tokenizer):
    """Steered prefill + plain decode == steered prefill + steered decode: the hook leaves 1-token steps alone."""
    bank = random_bank([0, 1, 2])
    enc = encode_highlighted(tokenizer, PROMPTS[:1])
    with steer(tiny_model, bank, enc["highlight_mask"], gain_pos=4.0):
        out = tiny_model(**model_inputs(enc), use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        attention = torch.cat([enc["attention_mask"], torch.ones_like(nxt)], dim=1)
        steered_step = tiny_model(input_ids=nxt, attention_mask=attention, past_key_values=out.past_key_values).logits
    # same prefill cache, decode step without hooks
    with steer(tiny_model, bank, enc["highlight_mask"], gain_pos=4.0):
        out2 = tiny_model(**model_inputs(enc), use_cache=True)
    plain_step = tiny_model(input_ids=nxt, attention_mask=attention, past_key_values=out2.past_key_values).logits
    unsteered = tiny_model(**model_inputs(enc), use_cache=True)
    unsteered_step = tiny_model(
        input_ids=nxt, attention_mask=attention, past_key_values=unsteered.past_key_values
    ).logits
    assert torch.equal(steered_step, plain_step)
    assert not torch.allclose(plain_step, unsteered_step)  # the cached prefill edit still steers decoding


def test_hooks_removed_after_block_and_after_error(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    bank = random_bank([0, 1, 2])
    layout = resolve_layout(tiny_model)

    def hook_count() -> int:
        return sum(len(s.key_module._forward_hooks) for s in layout.layers)

    with steer(tiny_model, bank, enc["highlight_mask"]) as steerer:
        assert hook_count() == 3 and steerer.layer_ids == [0, 1, 2]
    assert hook_count() == 0
    with pytest.raises(RuntimeError, match="boom"), steer(tiny_model, bank, enc["highlight_mask"]):
        raise RuntimeError("boom")
    assert hook_count() == 0
    with pytest.raises(ValueError, match="the highlight mask covers"), steer(tiny_model, bank, enc["highlight_mask"]):
        tiny_model(input_ids=enc["input_ids"][:, :5])
    assert hook_count() == 0


def test_layer_mapping_by_id_and_positional():
    bank = random_bank([4, 5, 6, 7])
    assert select_bank_layers(bank, "all", 8, "by_id") == {4: 0, 5: 1, 6: 2, 7: 3}
    assert select_bank_layers(bank, "last2", 8, "by_id") == {6: 2, 7: 3}
    # the reference pairs the i-th stored matrix with the i-th selected layer
    assert select_bank_layers(bank, "last2", 8, "positional") == {6: 0, 7: 1}
    assert select_bank_layers(bank, "first3", 8, "positional") == {0: 0, 1: 1, 2: 2}
    with pytest.raises(ValueError, match=r"layers \[0, 1\] are not in the bank \(it covers \[4, 5, 6, 7\]\)"):
        select_bank_layers(bank, "first2", 8, "by_id")
    with pytest.raises(ValueError, match="pairs 5 selected layers with only 4 stored matrices"):
        select_bank_layers(bank, "last5", 8, "positional")
    with pytest.raises(ValueError, match="layer_mapping must be one of"):
        select_bank_layers(bank, "all", 8, "nearest")


def test_parse_layers_errors():
    assert parse_layers("last3", 5) == [2, 3, 4] and parse_layers("0, 2", 5) == [0, 2]
    with pytest.raises(ValueError, match="N must be between 1 and 5"):
        parse_layers("last9", 5)
    with pytest.raises(ValueError, match=r"ids \[7\] are outside 0..4"):
        parse_layers([1, 7], 5)
    with pytest.raises(ValueError, match="is not understood"):
        parse_layers("middle", 5)


def test_bank_that_does_not_fit_the_model_is_refused_before_running(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS[:1])
    wrong_heads = random_bank([0, 1], n_kv=4)
    with pytest.raises(ValueError, match="4 KV heads in the bank vs 2 in the model"):
        with steer(tiny_model, wrong_heads, enc["highlight_mask"]):
            pass
    wrong_dim = random_bank([0], d=8)
    with pytest.raises(ValueError, match="head dim 8 in the bank vs 16 in the model"):
        with steer(tiny_model, wrong_dim, enc["highlight_mask"]):
            pass
    deeper = ProjectionBank(layers=[0], pos=random_bank([0]).pos, metadata={"num_layers": 28, "model_id": "big-model"})
    with pytest.raises(
        ValueError, match=r"built for big-model.*built for a 28-layer model, LlamaForCausalLM has 3 layers"
    ):
        with steer(tiny_model, deeper, enc["highlight_mask"]):
            pass
    assert sum(len(s.key_module._forward_hooks) for s in resolve_layout(tiny_model).layers) == 0


def test_gain_neg_without_negative_bank_is_an_error(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS[:1])
    with pytest.raises(ValueError, match=r"gain_neg=0\.5 needs a bank with negative projectors"):
        with steer(tiny_model, random_bank([0], neg=False), enc["highlight_mask"], gain_neg=0.5):
            pass


def test_one_token_prompt_is_edited_at_prefill_only(tiny_model, tokenizer):
    """A 1-token prompt's decode steps have the prompt's length; only the first call is the prefill."""
    bank = random_bank([0, 1, 2])
    ids = torch.tensor([[tokenizer.convert_tokens_to_ids("a")]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    layout = resolve_layout(tiny_model)
    sites = layout.layers[0]

    def recorder(store: list):
        return lambda m, a, out: store.append(keys_view(out, sites, layout).detach().clone())

    seen: list[torch.Tensor] = []
    with steer(tiny_model, bank, mask, gain_pos=3.0):
        handle = sites.key_module.register_forward_hook(recorder(seen))  # after the steering hook: sees its edit
        try:
            steered = tiny_model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False
            )
        finally:
            handle.remove()
    plain: list[torch.Tensor] = []
    handle = sites.key_module.register_forward_hook(recorder(plain))
    try:
        tiny_model(input_ids=steered)  # layer-0 keys depend on the token alone
    finally:
        handle.remove()
    k = plain[0][0, 0].double()
    expected = k + 3.0 * torch.einsum("hd,hde->he", k, bank.pos[0].double())
    torch.testing.assert_close(seen[0][0, 0].double(), expected, rtol=1e-5, atol=1e-5)
    for step in (1, 2):  # decode steps: the new tokens' keys are not edited
        torch.testing.assert_close(seen[step][0, 0], plain[0][0, step])
