"""AdaSEKA hooks on the tiny Llama: per-row routing, same-pass queries, the reference's compat mode, hook hygiene."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from seka_lightning.adaseka.experts import ExpertSet
from seka_lightning.adaseka.hooks import RoutingRecord, adaptive_steer
from seka_lightning.adaseka.method import AdaSekaMethod
from seka_lightning.highlight import encode_spans
from seka_lightning.methods import HighlightMethod, position_ids_for

TEXTS = [
    "The keepers carry silver lanterns every night near the north harbor.",
    "A stone tower stands in the azure valley.",
    "Travelers guard golden wind in the old castle market.",
]
HIGHLIGHTS = ["silver lanterns", "azure valley", "old castle"]


def encode(tokenizer, rows):
    texts = [TEXTS[i] for i in rows]
    spans = [
        [(t.index(HIGHLIGHTS[i]), t.index(HIGHLIGHTS[i]) + len(HIGHLIGHTS[i]))]
        for t, i in zip(texts, rows, strict=True)
    ]
    return encode_spans(tokenizer, texts, spans)


def selector(experts, **kwargs) -> AdaSekaMethod:
    method = AdaSekaMethod({"unused": "unused"}, gain=kwargs.pop("gain", 2.0), **kwargs)
    method.expert_set = experts  # in-memory banks (loading from files is tested separately)
    return method


def as_float64(experts: ExpertSet) -> ExpertSet:
    """The same experts with float64 factors, for comparisons at float64 precision."""
    factors = {layer: (u.double(), s.double()) for layer, (u, s) in experts.factors.items()}
    return replace(experts, factors=factors)


def keys_under(method: HighlightMethod, model, enc) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Keys of every layer as the attention sees them (after the method's edit) and the next-token logits."""
    keys: list[torch.Tensor] = []
    with method.active(model, enc):
        handles = [
            layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.append(out.detach().clone()))
            for layer in model.model.layers
        ]
        try:
            out = model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                position_ids=position_ids_for(enc["attention_mask"]),
                use_cache=False,
            )
        finally:
            for handle in handles:
                handle.remove()
    return keys, out.logits[:, -1]


def test_per_row_routing_of_a_batch_equals_each_row_alone(tiny_model, tokenizer, experts):
    model = tiny_model.double()  # float64, so padding changes nothing beyond rounding
    method = selector(experts)
    batch = encode(tokenizer, [0, 1, 2])
    keys, logits = keys_under(method, model, batch)
    plain_keys, plain_logits = keys_under(HighlightMethod(), model, batch)
    assert (logits - plain_logits).abs().max() > 1e-3, "the test needs a visible edit"
    for row in range(3):
        alone = encode(tokenizer, [row])
        n = alone["input_ids"].shape[1]
        row_keys, row_logits = keys_under(method, model, alone)
        for layer in range(3):
            torch.testing.assert_close(keys[layer][row, -n:], row_keys[layer][0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(logits[row], row_logits[0], rtol=1e-9, atol=1e-9)
    # keys of tokens outside the highlight are never edited (bitwise; the first layer sees identical inputs)
    outside = ~batch["highlight_mask"]
    assert torch.equal(keys[0].view(3, batch["input_ids"].shape[1], -1)[outside], plain_keys[0][outside])


def _reference_mix(q_kv, u, s, top_k, *, reference):
    """Coefficients and P for one head, as SPEC §5 (or the reference's arithmetic) prescribes, in float64."""
    q_hat = q_kv / (q_kv.norm() + (1e-8 if reference else 0.0))
    valid = [not torch.isnan(u[m]).any() for m in range(u.shape[0])]
    raws = []
    for m in range(u.shape[0]):
        if not valid[m]:
            raws.append(float("-inf") if reference else None)
            continue
        raws.append(float(sum((q_hat @ u[m, :, j]) * s[m, j] for j in range(top_k)).detach()))
    finite = [r for r in raws if r is not None]
    if reference:
        scale = max(abs(r) for r in raws)
        c = [r / (scale + 1e-8) for r in raws]
        if any(not torch.isfinite(torch.tensor(x)) for x in c):
            c = [1.0 / len(raws)] * len(raws)
    else:
        scale = max(abs(r) for r in finite)
        c = [0.0 if r is None else r / scale for r in raws]
    p = torch.zeros(u.shape[1], u.shape[1], dtype=torch.float64)
    for m, cm in enumerate(c):
        if valid[m]:
            p += cm * u[m, :, :top_k] @ u[m, :, :top_k].T
    return p


def _append_input(store: list):
    def hook(module, args):
        store.append(args[0])

    return hook


def _steered_logits(model, enc, projections, gain):
    """Apply fixed per-row projections {layer: [B, H, d, d]} on highlighted keys and return next-token logits."""
    mask = enc["highlight_mask"]

    def make(layer):
        def hook(module, args, out):
            k = out.view(*out.shape[:2], 2, 16)
            edited = k + gain * torch.einsum("bthd,bhde->bthe", k, projections[layer].to(k.dtype))
            return torch.where(mask[:, :, None, None], edited, k).flatten(-2)

        return hook

    handles = [model.model.layers[L].self_attn.k_proj.register_forward_hook(make(L)) for L in projections]
    try:
        out = model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            position_ids=position_ids_for(enc["attention_mask"]),
            use_cache=False,
        )
    finally:
        for handle in handles:
            handle.remove()
    return out.logits[:, -1]


def test_same_pass_routing_matches_layer_by_layer_passes_with_input_queries(tiny_model, tokenizer, experts):
    model = tiny_model.double().requires_grad_(False)
    enc = encode(tokenizer, [0, 1, 2])
    gain, top_k = 2.0, 5
    projections: dict[int, torch.Tensor] = {}
    for layer in range(3):  # the query of layer L depends on the edits of layers < L: one pass per layer
        hidden: list[torch.Tensor] = []
        handle = model.model.layers[layer].register_forward_pre_hook(_append_input(hidden))
        try:
            _steered_logits(model, enc, projections, gain)
        finally:
            handle.remove()
        block = model.model.layers[layer]
        q = block.self_attn.q_proj(block.input_layernorm(hidden[0]))[:, -1].view(3, 4, 16)
        u, s = (t.double() for t in experts.factors[layer])
        p = torch.zeros(3, 2, 16, 16, dtype=torch.float64)
        for b in range(3):
            for h in range(2):
                p[b, h] = _reference_mix(q[b, 2 * h : 2 * h + 2].mean(0), u[:, h], s[:, h], top_k, reference=False)
        projections[layer] = p
    expected = _steered_logits(model, enc, projections, gain)
    _, logits = keys_under(selector(as_float64(experts), gain=gain, top_k=top_k), model, enc)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)


def test_compat_mode_reproduces_the_reference_formula(tiny_model, tokenizer, experts):
    model = tiny_model.double().requires_grad_(False)
    enc = encode(tokenizer, [1, 0, 2])  # row 0 is left-padded
    gain, top_k = 1.5, 3
    # The reference: one extra pass over input_ids only, queries from hidden_states[L + 1] of row 0.
    hidden = model(input_ids=enc["input_ids"], output_hidden_states=True, use_cache=False).hidden_states
    projections = {}
    for layer in range(3):
        block = model.model.layers[layer]
        q = block.self_attn.q_proj(block.input_layernorm(hidden[layer + 1][0, -1])).view(4, 16)
        u, s = (t.double() for t in experts.factors[layer])
        p = torch.zeros(2, 16, 16, dtype=torch.float64)
        for h in range(2):
            p[h] = _reference_mix(q[2 * h : 2 * h + 2].mean(0), u[:, h], s[:, h], top_k, reference=True)
        projections[layer] = p[None].expand(3, -1, -1, -1)
    expected = _steered_logits(model, enc, projections, gain)
    method = selector(
        as_float64(experts),
        gain=gain,
        top_k=top_k,
        compat=["row0", "output_hidden_state", "reference_coefficients"],
        layer_mapping="positional",
    )
    _, logits = keys_under(method, model, enc)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    _, default_logits = keys_under(selector(experts, gain=gain, top_k=top_k), model, enc)
    assert (default_logits - expected).abs().max() > 1e-4, "the defaults must differ from the reference's routing"


def test_decode_steps_are_untouched(tiny_model, tokenizer, experts):
    enc = encode(tokenizer, [0, 1])
    method = selector(experts)
    generated = method.generate(tiny_model, enc, max_new_tokens=4, pad_token_id=0)
    # manual: steered prefill with cache, then plain greedy decoding from that cache
    with method.active(tiny_model, enc):
        out = tiny_model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            position_ids=position_ids_for(enc["attention_mask"]),
            use_cache=True,
        )
    cache, mask, tokens = out.past_key_values, enc["attention_mask"], [out.logits[:, -1].argmax(-1)]
    positions = position_ids_for(mask)[:, -1:]
    for _ in range(3):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions + 1
        out = tiny_model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=positions, cache=cache)
        cache = out.past_key_values
        tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(generated, torch.stack(tokens, dim=1))


def test_hooks_are_removed_after_the_block_and_on_errors(tiny_model, tokenizer, experts):
    def hook_count():
        return sum(len(m._forward_hooks) for m in tiny_model.modules())

    enc = encode(tokenizer, [0, 1])
    with adaptive_steer(tiny_model, experts, enc) as steerer:
        assert hook_count() == 6 and steerer.layer_ids == [0, 1, 2]
    assert hook_count() == 0
    with pytest.raises(RuntimeError, match="boom"), adaptive_steer(tiny_model, experts, enc):
        raise RuntimeError("boom")
    assert hook_count() == 0
    wrong = {**enc, "highlight_mask": enc["highlight_mask"][:, 1:]}
    with pytest.raises(ValueError, match="the highlight mask covers"), adaptive_steer(tiny_model, experts, wrong):
        tiny_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert hook_count() == 0


def test_routing_record_and_option_errors(tiny_model, tokenizer, experts):
    enc = encode(tokenizer, [0, 1])
    record = RoutingRecord()
    with adaptive_steer(tiny_model, experts, enc, layers="1,2", record=record):
        tiny_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert sorted(record.coefficients) == [1, 2] and record.coefficients[1].shape == (2, 2, 3)
    with pytest.raises(ValueError, match=r"compat options \['rows'\] are unknown"):
        AdaSekaMethod("x.json", compat=["rows"])
    with pytest.raises(ValueError, match=r"ids \[5\] are outside 0..2"):
        with adaptive_steer(tiny_model, experts, enc, layers="5"):
            pass


def test_length_adaptive_strength_scales_each_rows_edit(tiny_model, tokenizer, experts):
    """With ``length_reference``, a row with n highlighted tokens gets min(1, (ref / n) ** p) of the full-strength
    edit (float64, first layer, whose inputs no edit has touched); a reference >= every n changes nothing."""
    model = tiny_model.double()
    batch = encode(tokenizer, [0, 1, 2])
    counts = batch["highlight_mask"].sum(1).double()
    assert counts.min() >= 2 and len(set(counts.tolist())) > 1  # visible, and different per row
    plain, _ = keys_under(HighlightMethod(), model, batch)
    full, _ = keys_under(selector(as_float64(experts)), model, batch)
    scaled, _ = keys_under(selector(as_float64(experts), length_reference=1, length_power=0.5), model, batch)
    rows = batch["input_ids"].shape[0]
    edit = lambda keys: (keys[0] - plain[0]).view(rows, -1)  # noqa: E731
    assert edit(full).abs().max() > 1e-3
    strength = (1.0 / counts.float()).pow(0.5).double()  # ref 1 < n: every row scaled (s in float32, as SEKA)
    torch.testing.assert_close(edit(scaled), strength[:, None] * edit(full), rtol=1e-9, atol=1e-12)
    middle = int(counts.sort().values[1])  # a reference between the shortest and the longest highlight
    mixed, _ = keys_under(selector(as_float64(experts), length_reference=middle), model, batch)
    strength = (middle / counts.float()).clamp(max=1.0).double()
    assert (strength == 1).any() and (strength < 1).any()
    torch.testing.assert_close(edit(mixed), strength[:, None] * edit(full), rtol=1e-9, atol=1e-12)
    longest = int(counts.max())
    same, _ = keys_under(selector(as_float64(experts), length_reference=longest), model, batch)
    torch.testing.assert_close(same[0], full[0], rtol=0, atol=0)
    method = selector(experts, length_reference=8, length_power=0.5)
    assert method.describe() == {**selector(experts).describe(), "length_reference": 8, "length_power": 0.5}
    with pytest.raises(ValueError, match=r"^length_reference must be an integer >= 1"):
        selector(experts, length_reference=0)
    with pytest.raises(ValueError, match=r"^length_power must be a finite number > 0"):
        selector(experts, length_reference=8, length_power=float("nan"))
