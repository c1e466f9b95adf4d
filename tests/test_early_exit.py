"""Building stops each forward pass at the last captured layer's key site: the layers above it, the final norm and
the LM head never run, and the statistics are bit-identical to those of full forward passes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from tests.conftest import tiny_llama
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from seka_lightning import capture
from seka_lightning.build import build_statistics
from seka_lightning.data.triplets import read_pairs
from seka_lightning.families import resolve_layout


def _gemma3(vocab_size: int) -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        attn_implementation="sdpa", pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
    return Gemma3ForCausalLM(config).eval()


MODELS = {"llama": lambda vocab: tiny_llama(vocab, layers=4), "gemma3": _gemma3}


@contextmanager
def _ran(modules: dict[str, nn.Module]) -> Iterator[set[str]]:
    """The names of the ``modules`` whose forward ran inside the block."""
    seen: set[str] = set()
    handles = [m.register_forward_hook(lambda *_, name=name: seen.add(name)) for name, m in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _watched(model: nn.Module) -> dict[str, nn.Module]:
    layout = resolve_layout(model)
    watched = {f"layer{i}": sites.attention for i, sites in enumerate(layout.layers)}
    watched["norm"] = model.model.norm
    watched["lm_head"] = model.lm_head
    return watched


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize(
    ("layers", "attention_ratio", "last"),
    [("all", None, 3), ("last2", None, 3), ("first2", None, 1), ("0,2", None, 2), ("first2", 1e-3, 1)],
    ids=["all", "last2", "first2", "0,2", "first2-attention-filter"],
)
def test_early_exit_keeps_the_statistics_bit_identical(
    family, layers, attention_ratio, last, tokenizer, qa_file, monkeypatch
):
    model = MODELS[family](len(tokenizer))
    pairs = read_pairs(qa_file, max_samples=6)
    settings = {"layers": layers, "batch_size": 5, "attention_ratio": attention_ratio}
    watched = _watched(model)

    with _ran(watched) as early:
        fast = build_statistics(model, tokenizer, pairs, **settings)
    assert early == {f"layer{i}" for i in range(last + 1)} - ({f"layer{last}"} if attention_ratio is None else set())

    # the reference: the same hooks, never stopping, so every pass runs the whole model
    full_hook = capture._make_capture_hook
    full_attention_hook = capture._make_attention_hook
    monkeypatch.setattr(capture, "_make_capture_hook", lambda *args, stop: full_hook(*args, stop=False))
    monkeypatch.setattr(capture, "_make_attention_hook", lambda *args, stop: full_attention_hook(*args, stop=False))
    with _ran(watched) as everything:
        full = build_statistics(model, tokenizer, pairs, **settings)
    assert everything == set(watched)

    assert fast.metadata == full.metadata
    assert fast.metadata["triplets_used"] > 0
    for name, value in full.sums.tensors().items():
        assert torch.equal(fast.sums.tensors()[name], value), name


def test_a_failing_hook_leaves_no_hook_behind(tiny_model, tokenizer, qa_file, monkeypatch):
    """An error inside the pass (not the private stop) propagates, and the model is left without capture hooks."""
    layout = resolve_layout(tiny_model)

    def failing(*args, stop):
        def hook(module, inputs, output):
            raise RuntimeError("boom")

        return hook

    monkeypatch.setattr(capture, "_make_capture_hook", failing)
    with pytest.raises(RuntimeError, match="boom"):
        build_statistics(tiny_model, tokenizer, read_pairs(qa_file, max_samples=2), layers="all")
    assert all(not sites.key_module._forward_hooks for sites in layout.layers)
