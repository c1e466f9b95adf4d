"""The split-KV decode-attention kernel against a float64 reference, its plan, its dispatch and the decoder option.

Without a GPU the kernel runs through Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest before the
module is imported), on float16 and float32 inputs; with one (``-m gpu``) it runs compiled, in bfloat16 too.
"""

from __future__ import annotations

import pytest
import torch
from bench.generation import random_prompts
from bench.shapes import get_shape, random_model
from tests.conftest import gqa_attention_reference, tiny_gemma3
from torch import nn

from seka_lightning import split_kv
from seka_lightning.decode_attention import gqa_decode_attention, split_kv_decode_attention
from seka_lightning.fast_decode import StaticDecoding, StaticGreedyDecoder
from seka_lightning.methods import HighlightMethod

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
needs_kernel = pytest.mark.skipif(
    not split_kv.available(DEVICE), reason="no Triton, or no CUDA device and no interpreter"
)


def inputs(batch, heads, kv_heads, length, dim, dtype, *, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    key = 2 * torch.randn(batch, kv_heads, length, dim, generator=generator)  # sharper than unit scores
    value = torch.randn(batch, kv_heads, length, dim, generator=generator)
    return (t.to(DEVICE, dtype) for t in (query, key, value))


def tolerance(dtype: torch.dtype) -> float:
    """Max abs error allowed on unit-scale outputs: the probabilities are rounded to the input dtype."""
    return {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


def dtypes() -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@needs_kernel
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "length", "dim"),
    [(1, 8, 2, 300, 64), (3, 9, 3, 257, 32), (2, 4, 1, 130, 256), (2, 6, 2, 64, 16)],
)
def test_kernel_matches_float64_attention(batch, heads, kv_heads, length, dim, dtype) -> None:
    query, key, value = inputs(batch, heads, kv_heads, length, dim, dtype)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool, device=DEVICE)
    mask[..., length - 5 :] = False  # unfilled cache slots
    mask[1:, ..., : length // 2] = False  # long left padding: some rows' first stretches are wholly hidden
    scale = dim**-0.5
    for target in (1, 16, 10_000):  # one stretch per head, several, one block each
        out = split_kv.split_kv_attention(query, key, value, mask, scale, target=target)
        assert out.shape == (batch, 1, heads, dim) and out.dtype == dtype
        assert (out.double() - gqa_attention_reference(query, key, value, mask, scale)).abs().max().item() < tolerance(
            dtype
        )
    # no mask, and one mask row broadcast over the batch
    unmasked = split_kv.split_kv_attention(query, key, value, None, scale, target=16)
    assert (unmasked.double() - gqa_attention_reference(query, key, value, None, scale)).abs().max() < tolerance(dtype)
    shared = split_kv.split_kv_attention(query, key, value, mask[:1], scale, target=16)
    assert (shared.double() - gqa_attention_reference(query, key, value, mask[:1], scale)).abs().max() < tolerance(
        dtype
    )


@needs_kernel
def test_a_wholly_hidden_row_gives_nan_like_sdpa() -> None:
    query, key, value = inputs(2, 4, 2, 100, 16, torch.float32)
    mask = torch.ones(2, 1, 1, 100, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out = split_kv.split_kv_attention(query, key, value, mask, 0.25, target=8)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()


@pytest.mark.parametrize("rows_heads", [1, 8, 80, 300])
@pytest.mark.parametrize("length", [1, 63, 64, 65, 4160, 32_828])
def test_plan_covers_the_cache_in_whole_blocks(rows_heads: int, length: int) -> None:
    splits, per_split = split_kv.plan(rows_heads, length)
    assert per_split % split_kv.BLOCK_T == 0 and splits >= 1
    assert (splits - 1) * per_split < length <= splits * per_split  # every position once, no empty stretch
    blocks = -(-length // split_kv.BLOCK_T)
    wanted = min(blocks, -(-split_kv.TARGET_PROGRAMS // rows_heads))  # stretches to reach the target programs
    assert wanted / 2 <= splits <= wanted  # whole blocks per stretch at most halve them


def test_supports_only_the_shapes_the_kernel_takes() -> None:
    q, k, v = torch.zeros(1, 4, 1, 64), torch.zeros(1, 2, 8, 64), torch.zeros(1, 2, 8, 64)
    assert split_kv.supports(q, k, v)
    assert not split_kv.supports(torch.zeros(1, 4, 1, 96), torch.zeros(1, 2, 8, 96), torch.zeros(1, 2, 8, 96))
    assert not split_kv.supports(q, k.half(), v.half())  # mixed dtypes
    assert not split_kv.supports(q.double(), k.double(), v.double())  # float64: no kernel build
    assert not split_kv.supports(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v)  # strided head dim
    assert not split_kv.supports(torch.zeros(1, 4, 1, 8), torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))


@needs_kernel
def test_dispatch_runs_the_kernel_for_grouped_decode_steps_only(monkeypatch) -> None:
    module = nn.Module()
    module.num_key_value_groups = 2
    query, key, value = inputs(2, 4, 2, 40, 16, torch.float32)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool, device=DEVICE)
    calls = []
    kernel = split_kv.split_kv_attention
    monkeypatch.setattr(split_kv, "split_kv_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    out = split_kv_decode_attention(module, query, key, value, mask, scaling=0.25)[0]
    assert calls == [1]
    assert torch.allclose(out, gqa_decode_attention(module, query, key, value, mask, scaling=0.25)[0], atol=1e-5)
    split_kv_decode_attention(module, query, key, value, mask.float(), scaling=0.25)  # float mask: the SDPA path
    module.num_key_value_groups = 1
    split_kv_decode_attention(module, query, key[:, :1].expand(2, 4, 40, 16), value[:, :1].expand(2, 4, 40, 16), mask)
    assert calls == [1]


@needs_kernel
@pytest.mark.parametrize("padded", [False, True])
def test_decoder_with_split_kv_generates_what_generate_does(padded: bool, monkeypatch) -> None:
    shape = get_shape("tiny")
    model = random_model(shape, device=DEVICE, dtype=torch.float32)
    enc = random_prompts(2, 96, documents=6, highlighted=3, vocab_size=shape.vocab_size, seed=0, device=DEVICE)
    if not padded:
        enc = {name: value[:1] for name, value in enc.items()}
    assert bool((enc["attention_mask"] == 0).any()) == padded
    decoder = StaticGreedyDecoder(
        model, batch_size=2, max_cache_len=104, compile=False, grouped_decode=True, split_kv=True
    )
    calls = []
    kernel = split_kv.split_kv_attention
    monkeypatch.setattr(split_kv, "split_kv_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    got = decoder.generate(HighlightMethod(), enc, max_new_tokens=8, pad_token_id=0)
    assert len(calls) == 7 * shape.num_layers  # every decode step of every layer went through the kernel
    assert torch.equal(got, HighlightMethod().generate(model, enc, max_new_tokens=8, pad_token_id=0))


def test_split_kv_is_refused_without_grouped_decoding_or_triton(monkeypatch) -> None:
    model = random_model(get_shape("tiny"), device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match="split_kv runs inside the grouped decode path, which grouped_decode=False"):
        StaticGreedyDecoder(model, batch_size=1, max_cache_len=16, compile=False, grouped_decode=False, split_kv=True)
    if split_kv.triton is not None:  # uncompiled, split_kv alone switches the grouped path on
        assert StaticGreedyDecoder(model, batch_size=1, max_cache_len=16, compile=False, split_kv=True).grouped_decode
    monkeypatch.setattr(split_kv, "triton", None)
    with pytest.raises(ValueError, match="split_kv needs Triton"):
        StaticGreedyDecoder(model, batch_size=1, max_cache_len=16, compile=False, grouped_decode=True, split_kv=True)
    with pytest.raises(ValueError, match="split_kv needs Triton"):
        StaticDecoding(HighlightMethod(), max_length=16, split_kv=True)


@pytest.mark.skipif(split_kv.triton is None, reason="needs Triton")
def test_split_kv_is_refused_for_attention_the_kernel_does_not_take(tokenizer) -> None:
    """Plain multi-head attention and head dims outside the kernel's are refused when the decoder is built, rather
    than falling back while the run records split_kv."""
    from transformers import LlamaConfig, LlamaForCausalLM

    plain = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    )
    with pytest.raises(ValueError, match="this model has 4 query heads, 4 key/value heads of dim 16; drop split_kv"):
        StaticGreedyDecoder(plain, batch_size=1, max_cache_len=16, compile=False, split_kv=True)
    narrow = tiny_gemma3(len(tokenizer), sliding_window=8)  # head dim 8
    with pytest.raises(ValueError, match="4 query heads, 2 key/value heads of dim 8; drop split_kv"):
        StaticGreedyDecoder(narrow, batch_size=1, max_cache_len=16, compile=False, split_kv=True)


@pytest.mark.skipif(split_kv.triton is None, reason="needs Triton")
def test_split_kv_on_a_cpu_without_the_interpreter_is_refused_at_generate(monkeypatch) -> None:
    model = random_model(get_shape("tiny"), device=torch.device("cpu"), dtype=torch.float32)
    monkeypatch.setattr(split_kv, "INTERPRET", False)
    decoder = StaticGreedyDecoder(
        model, batch_size=1, max_cache_len=16, compile=False, grouped_decode=True, split_kv=True
    )
    enc = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(
        ValueError, match="split_kv runs its Triton kernel on CUDA devices, and these inputs are on cpu"
    ):
        decoder.generate(HighlightMethod(), enc, max_new_tokens=2, pad_token_id=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fuse_projections", [False, True])
def test_compiled_decoder_with_split_kv_on_cuda_generates_what_generate_does(fuse_projections: bool) -> None:
    shape = get_shape("tiny")
    model = random_model(shape, device=DEVICE, dtype=torch.float32)
    enc = random_prompts(2, 96, documents=6, highlighted=3, vocab_size=shape.vocab_size, seed=0, device=DEVICE)
    decoder = StaticGreedyDecoder(
        model, batch_size=2, max_cache_len=104, split_kv=True, fuse_projections=fuse_projections
    )  # inductor, CUDA graphs
    expected = HighlightMethod().generate(model, enc, max_new_tokens=8, pad_token_id=0)
    for _ in range(2):
        assert torch.equal(decoder.generate(HighlightMethod(), enc, max_new_tokens=8, pad_token_id=0), expected)


@needs_kernel
def test_sliding_window_layers_attend_through_the_kernel_too(tokenizer, monkeypatch) -> None:
    """Gemma-3's sliding-window layers (a window shorter than the prompt) and its full layer all take the kernel in
    the decode steps, and the decoder generates what ``generate`` does."""
    model = tiny_gemma3(len(tokenizer), sliding_window=16, head_dim=16).to(DEVICE)  # the kernel takes d >= 16
    enc = tokenizer(["the cat sat on the mat " * 6, "a dog ran " * 5], return_tensors="pt", padding=True)
    enc = {name: value.to(DEVICE) for name, value in enc.items()}
    assert enc["input_ids"].shape[1] > 16 and (enc["attention_mask"] == 0).any()  # past the window, one row padded
    calls = []
    kernel = split_kv.split_kv_attention
    monkeypatch.setattr(split_kv, "split_kv_attention", lambda *a, **k: calls.append(a[1].shape[2]) or kernel(*a, **k))
    decoder = StaticGreedyDecoder(
        model, batch_size=2, max_cache_len=enc["input_ids"].shape[1] + 8, compile=False, grouped_decode=True,
        split_kv=True,
    )  # fmt: skip
    got = decoder.generate(HighlightMethod(), enc, max_new_tokens=8, pad_token_id=0)
    assert len(calls) == 7 * 3 and 16 in calls  # every step, every layer; the sliding layers' keys are the window
    assert torch.equal(got, HighlightMethod().generate(model, enc, max_new_tokens=8, pad_token_id=0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offsets_past_two_to_the_31_elements() -> None:
    """A cache of more than 2^31 elements (3 rows x 2^23 positions x 128): the last row's keys start at element
    2^31, past 32-bit offsets. Its query head 0 finds the one key planted for it near the end (a value of 0.5
    everywhere), as a float64 reference does; a wrapped offset would read another row's keys and miss it."""
    length, dim = 2**23, 128
    generator = torch.Generator(DEVICE).manual_seed(0)
    query = torch.randn(3, 4, 1, dim, device=DEVICE, generator=generator).half()
    key, value = (0.1 * torch.randn(3, 1, length, dim, device=DEVICE, generator=generator).half() for _ in "kv")
    key[2, 0, length - 3], value[2, 0, length - 3] = 2 * query[2, 0, 0], 0.5
    out = split_kv.split_kv_attention(query, key, value, None, dim**-0.5)
    truth = torch.softmax((query[2, :, 0].double() @ key[2, 0].double().T) * dim**-0.5, -1) @ value[2, 0].double()
    assert truth[0].min() > 0.45  # the planted key takes head 0's attention
    assert (out[2, 0].double() - truth).abs().max() < 1e-2
