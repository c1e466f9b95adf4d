"""PASTA attention steering: exactness against an independent float64 attention that reweights probabilities."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers import AttentionInterface, Gemma3ForCausalLM, Gemma3TextConfig

from seka_lightning.baselines.pasta import PASTA_ATTENTION, PastaMethod, attention_bias, key_bias, read_heads
from seka_lightning.highlight import encode_highlighted
from seka_lightning.methods import HighlightMethod, position_ids_for

ALPHA = 0.01
PROMPTS = [
    "The keepers carry **silver lanterns** north of the river.",
    "A **tower** stands in the valley.",
    "Question: what grows in the **golden orchard** under the moon?",
]
REFERENCE = "pasta_test_reference"


def reference_attention(heads: dict[int, list[int]], key_weight: torch.Tensor) -> Callable:
    """Float64 attention that multiplies the post-softmax weights of the chosen heads by ``key_weight[b, j]`` and
    renormalises (PASTA's effect stated on probabilities), with its own causal, padding and sliding-window mask."""

    def attention(module, query, key, value, attention_mask, *, scaling, sliding_window=None, **kwargs):
        query, key, value = query.double(), key.double(), value.double()
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        t = query.shape[2]
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        allowed = (j <= i) & reference_attention.padding[:, None, None, :]  # [B, 1, T, T]
        if sliding_window is not None:
            allowed = allowed & (i - j < sliding_window)
        probs = (query @ key.transpose(-1, -2) * scaling).masked_fill(~allowed, -math.inf).softmax(-1)
        probs = probs.nan_to_num(0.0)  # padding queries see no key
        rows = heads.get(module.layer_idx, [])
        if rows:
            weighted = probs[:, rows] * key_weight[:, None, None, :]
            probs[:, rows] = weighted / weighted.sum(-1, keepdim=True).clamp_min(1e-300)
        return (probs @ value).transpose(1, 2).contiguous(), None

    return attention


@contextmanager
def reference_model(model, heads: dict[int, list[int]], key_weight: torch.Tensor, padding: torch.Tensor) -> Iterator:
    reference_attention.padding = padding.bool()
    AttentionInterface.register(REFERENCE, reference_attention(heads, key_weight.double()))
    before = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def reference_logits(model, ids, attention_mask, highlight, heads, *, prompt_len: int | None = None) -> torch.Tensor:
    """All-position logits with PASTA applied on probabilities: weight alpha on non-highlighted prompt keys."""
    prompt = attention_mask.bool().clone()
    if prompt_len is not None:
        prompt[:, prompt_len:] = False
    weight = torch.where(prompt & ~highlight, torch.tensor(ALPHA, dtype=torch.float64), 1.0)
    with reference_model(model, heads, weight, attention_mask), torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask)).logits


def pasta_logits(model, enc, heads, **kwargs) -> torch.Tensor:
    method = PastaMethod(heads, alpha=ALPHA, **kwargs)
    method.setup(model, None)
    with method.active(model, enc), torch.no_grad():
        return model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            position_ids=position_ids_for(enc["attention_mask"]),
        ).logits


def row(enc: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Row ``i`` without its left padding."""
    keep = enc["attention_mask"][i].bool()
    return {k: v[i : i + 1, keep] for k, v in enc.items()}


@pytest.fixture
def llama64(tiny_model):
    return tiny_model.double()


@pytest.fixture
def enc(tokenizer):
    return encode_highlighted(tokenizer, PROMPTS)


def tiny_gemma3(vocab_size: int) -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,  # much shorter than the prompts, so the window mask matters
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="sdpa",
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return model.eval().double()


def test_empty_head_set_and_zero_bias_are_plain_sdpa(tiny_model, enc):
    plain = HighlightMethod().prompt_logits(tiny_model, enc)
    empty = PastaMethod({}, alpha=ALPHA)
    empty.setup(tiny_model, None)
    assert torch.equal(empty.prompt_logits(tiny_model, enc), plain)
    zeros = {layer: torch.zeros(3, 4, enc["input_ids"].shape[1]) for layer in range(3)}
    with attention_bias(tiny_model, zeros), torch.no_grad():
        biased = tiny_model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            position_ids=position_ids_for(enc["attention_mask"]),
        ).logits[:, -1]
    torch.testing.assert_close(biased, plain, atol=1e-5, rtol=1e-6)  # float32 rounding of a different kernel path


@pytest.mark.parametrize("heads", [{0: [1, 3]}, {0: [0], 1: [2, 3], 2: [1]}], ids=["one-layer", "all-layers"])
def test_logits_match_float64_probability_reweighting(llama64, enc, heads):
    steered = pasta_logits(llama64, enc, heads)
    reference = reference_logits(llama64, enc["input_ids"], enc["attention_mask"], enc["highlight_mask"], heads)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(steered[real], reference[real], atol=1e-10, rtol=1e-10)
    plain = reference_logits(llama64, enc["input_ids"], enc["attention_mask"], enc["highlight_mask"], {})
    assert (steered[real] - plain[real]).abs().max() > 1e-2  # the heads really were steered


@pytest.mark.parametrize("query_len", [7, 1], ids=["prompt-pass", "decode-step"])
@pytest.mark.parametrize("mask", ["padding", "none"])
def test_math_attention_equals_sdpa_with_the_bias(query_len, mask):
    """math_attention (CUDA float32's biased calls) against transformers' SDPA path with the same bias: grouped-query
    heads, a boolean padding mask or none (causal), a prompt pass and a decode step, in float64."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from seka_lightning.baselines.pasta import math_attention

    torch.manual_seed(0)
    keys = 7
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    query = torch.randn(3, 4, query_len, 8, dtype=torch.float64)
    key, value = (torch.randn(3, 2, keys, 8, dtype=torch.float64) for _ in range(2))
    bias = torch.where(torch.rand(3, 4, 1, keys) < 0.5, math.log(ALPHA), 0.0).double()
    attention_mask = None
    if mask == "padding" or query_len == 1:
        attention_mask = torch.ones(3, 1, query_len, keys, dtype=torch.bool)
        attention_mask[1, :, :, :2] = False  # row 1 is left-padded by two keys
        if query_len > 1:
            attention_mask &= torch.ones(query_len, keys, dtype=torch.bool).tril()
    want, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=0.3, position_bias=bias)
    got, _ = math_attention(module, query, key, value, attention_mask, bias, scaling=0.3)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="takes neither soft-capping nor dropout.*eval mode"):
        math_attention(module, query, key, value, attention_mask, bias, dropout=0.1)


def test_cuda_float32_biased_calls_run_math_attention(llama64, enc, monkeypatch):
    """Only float32 on CUDA avoids SDPA; forced onto math_attention, PASTA still equals the float64 reference, and no
    process-wide SDPA backend flag is touched (other threads may run the model unsteered meanwhile)."""
    from types import SimpleNamespace

    from seka_lightning.baselines import pasta

    cuda = torch.device("cuda")
    assert pasta.avoids_sdpa(SimpleNamespace(device=cuda, dtype=torch.float32))
    assert not pasta.avoids_sdpa(SimpleNamespace(device=cuda, dtype=torch.bfloat16))
    assert not pasta.avoids_sdpa(torch.zeros(1))  # CPU float32
    flags = lambda: (  # noqa: E731
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
    )
    before, calls, seen = flags(), [], []
    real = pasta.math_attention

    def spy(*args, **kwargs):
        calls.append(1)
        seen.append(flags())
        return real(*args, **kwargs)

    monkeypatch.setattr(pasta, "avoids_sdpa", lambda query: True)
    monkeypatch.setattr(pasta, "math_attention", spy)
    heads = {0: [1, 3], 2: [0]}
    steered = pasta_logits(llama64, enc, heads)
    reference = reference_logits(llama64, enc["input_ids"], enc["attention_mask"], enc["highlight_mask"], heads)
    real_rows = enc["attention_mask"].bool()
    torch.testing.assert_close(steered[real_rows], reference[real_rows], atol=1e-10, rtol=1e-10)
    assert len(calls) == 2 and seen == [before, before] and flags() == before  # layers 0 and 2


def test_include_equals_exclude_on_the_prompt(llama64, enc):
    # All keys of a prefill are prompt keys: +log(1/alpha) on highlighted == log(alpha) on the rest, after softmax.
    heads = {1: [0, 2]}
    exclude = pasta_logits(llama64, enc, heads)
    include = pasta_logits(llama64, enc, heads, scale_position="include")
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(include[real], exclude[real], atol=1e-10, rtol=1e-10)


def test_key_bias_values():
    highlight = torch.tensor([[False, True, False, False]])
    prompt = torch.tensor([[False, True, True, False]])
    log_alpha = math.log(ALPHA)
    assert key_bias(highlight, prompt, alpha=ALPHA).tolist() == [[0.0, 0.0, log_alpha, 0.0]]
    assert key_bias(highlight, prompt, alpha=ALPHA, scale_position="include").tolist() == [[0.0, -log_alpha, 0.0, 0.0]]


def test_batched_rows_match_one_by_one(llama64, enc):
    method = PastaMethod({0: [1], 1: [0, 3], 2: [2]}, alpha=ALPHA)
    method.setup(llama64, None)
    batched_logits = method.prompt_logits(llama64, enc)
    batched = method.generate(llama64, enc, max_new_tokens=6, pad_token_id=0)
    for i in range(len(PROMPTS)):
        single = row(enc, i)
        torch.testing.assert_close(method.prompt_logits(llama64, single)[0], batched_logits[i], atol=1e-10, rtol=0)
        assert torch.equal(method.generate(llama64, single, max_new_tokens=6, pad_token_id=0)[0], batched[i])
    plain = HighlightMethod().generate(llama64, enc, max_new_tokens=6, pad_token_id=0)
    assert not torch.equal(plain, batched)


def generated_step_logits(model, enc, heads, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    method = PastaMethod(heads, alpha=ALPHA)
    method.setup(model, None)
    with method.active(model, enc), torch.no_grad():
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    return out.sequences, torch.stack(out.logits, 1)  # [B, P + steps], [B, steps, V]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generated_keys_get_no_bias(family, tokenizer, llama64, enc):
    model = llama64 if family == "llama" else tiny_gemma3(len(tokenizer))
    heads = {0: [1, 2], 1: [3], 2: [0]}
    steps, prompt_len = 5, enc["input_ids"].shape[1]
    sequences, step_logits = generated_step_logits(model, enc, heads, steps)
    full_mask = torch.cat([enc["attention_mask"], torch.ones(len(PROMPTS), steps, dtype=torch.long)], 1)
    highlight = torch.cat([enc["highlight_mask"], torch.zeros(len(PROMPTS), steps, dtype=torch.bool)], 1)
    ids = sequences[:, :-1]
    mask, highlight = full_mask[:, :-1], highlight[:, :-1]
    forced = reference_logits(model, ids, mask, highlight, heads, prompt_len=prompt_len)[:, prompt_len - 1 :]
    torch.testing.assert_close(step_logits, forced.float(), atol=1e-5, rtol=1e-5)  # generate returns float32 logits
    biased_generated = reference_logits(model, ids, mask, highlight, heads)[:, prompt_len - 1 :]
    assert (biased_generated[:, 1:] - step_logits[:, 1:]).abs().max() > 1e-3  # the control tells them apart


def test_gemma3_sliding_window_prefill_and_batching(tokenizer, enc):
    model = tiny_gemma3(len(tokenizer))
    heads = {0: [0, 3], 1: [1], 2: [2]}
    steered = pasta_logits(model, enc, heads)
    reference = reference_logits(model, enc["input_ids"], enc["attention_mask"], enc["highlight_mask"], heads)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(steered[real], reference[real], atol=1e-10, rtol=1e-10)
    method = PastaMethod(heads, alpha=ALPHA)
    method.setup(model, None)
    batched = method.generate(model, enc, max_new_tokens=4, pad_token_id=0)
    for i in range(len(PROMPTS)):
        assert torch.equal(method.generate(model, row(enc, i), max_new_tokens=4, pad_token_id=0)[0], batched[i])


def test_implementation_restored_after_block_and_exception(tiny_model, enc):
    plain = HighlightMethod().prompt_logits(tiny_model, enc)
    method = PastaMethod({1: [0]}, alpha=ALPHA)
    method.setup(tiny_model, None)
    with method.active(tiny_model, enc):
        assert tiny_model.config._attn_implementation == PASTA_ATTENTION
    assert tiny_model.config._attn_implementation == "sdpa"
    with pytest.raises(KeyError, match="boom"), method.active(tiny_model, enc):
        raise KeyError("boom")
    assert tiny_model.config._attn_implementation == "sdpa"
    assert torch.equal(HighlightMethod().prompt_logits(tiny_model, enc), plain)
    tiny_model.set_attn_implementation("eager")
    with method.active(tiny_model, enc):
        assert tiny_model.config._attn_implementation == PASTA_ATTENTION
    assert tiny_model.config._attn_implementation == "eager"


def test_nested_blocks_and_batch_mismatch_are_refused(tiny_model, enc):
    method = PastaMethod({1: [0]}, alpha=ALPHA)
    method.setup(tiny_model, None)
    with method.active(tiny_model, enc):
        with pytest.raises(RuntimeError, match="PASTA is already active on this model"), method.active(tiny_model, enc):
            pass
        with pytest.raises(ValueError, match="PASTA got a batch of 1 rows but the highlight mask has 3"):
            tiny_model(input_ids=enc["input_ids"][:1])
    assert tiny_model.config._attn_implementation == "sdpa"


def test_heads_from_profiler_and_bare_json(tmp_path, tiny_model):
    profiled = tmp_path / "profiled.json"
    profiled.write_text(json.dumps({"layers": {"2": [3, 1]}, "scores": {}, "settings": {}}))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"0": [0, 1], "1": []}))
    assert read_heads(profiled) == {2: [1, 3]}
    assert read_heads(bare) == {0: [0, 1]}
    method = PastaMethod(str(profiled))
    method.setup(tiny_model, None)
    assert method.heads == {2: [1, 3]}
    assert method.describe() == {"method": "pasta", "heads": str(profiled), "alpha": 0.01, "scale_position": "exclude"}


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        ({1: [4]}, r"heads: layer 1 has head ids \[4\] outside 0..3 \(the model has 4 query heads per layer\)"),
        ({0: [-1]}, r"heads: layer 0 has head ids \[-1\] outside 0..3"),
        ({3: [0]}, r"heads: layer 3 is outside 0..2 \(the model has 3 layers\)"),
    ],
)
def test_heads_outside_the_model_are_refused(tiny_model, heads, message):
    method = PastaMethod(heads)
    with pytest.raises(ValueError, match=message):
        method.setup(tiny_model, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, r"alpha must be in \(0, 1\), got 0.0"),
        ({"alpha": -0.5}, r"alpha must be in \(0, 1\), got -0.5"),
        ({"alpha": 1.0}, r"alpha must be in \(0, 1\), got 1.0"),
        ({"scale_position": "generation"}, r"scale_position must be one of \('exclude', 'include'\), got 'generation'"),
        ({"heads": {"x": [0]}}, r"heads: layer key 'x' is not an integer layer id"),
        ({"heads": {0: [1, 1]}}, r"heads: layer 0 repeats a head id in \[1, 1\]"),
        ({"heads": {0: "1,2"}}, r"heads: layer 0 must map to a list of integer head ids, got '1,2'"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PastaMethod(**{"heads": {0: [0]}, **kwargs})


def test_missing_head_file_and_setup_order(tmp_path, tiny_model, enc):
    with pytest.raises(FileNotFoundError, match="write one with `seka pasta-profile`"):
        PastaMethod(str(tmp_path / "absent.json")).setup(tiny_model, None)
    with pytest.raises(RuntimeError, match=r"PastaMethod.setup\(\) must run before the first batch"):
        with PastaMethod({0: [0]}).active(tiny_model, enc):
            pass
