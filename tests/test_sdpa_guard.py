"""The guard against SDPA's memory-efficient CUDA kernel for models with a single key/value head (models.py).

The kernel's bug itself needs a GPU (docs/research/sdpa_kv_len_bug/); here: its premise in transformers (one head's
``repeat_kv`` is a stride-0 view, several heads' a copy), which models the guard picks, and that it switches the
kernel off only for them, only with CUDA, and through ``load_model``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_gemma3
from transformers.integrations.sdpa_attention import repeat_kv

from seka_lightning.models import (
    SDPA_KV_LENGTH_BUG,
    avoid_broken_mem_efficient_sdpa,
    load_model,
    single_key_value_head,
)


def gemma3(kv_heads: int, attn: str = "sdpa"):
    model = tiny_gemma3(64, sliding_window=4, kv_heads=kv_heads)
    model.config._attn_implementation = attn
    return model


@pytest.fixture
def kernel_flag() -> Iterator[None]:
    """Restore the process-wide switch whatever a test does to it."""
    before = torch.backends.cuda.mem_efficient_sdp_enabled()
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    try:
        yield
    finally:
        torch.backends.cuda.enable_mem_efficient_sdp(before)


@pytest.fixture
def cuda_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_one_key_value_head_reaches_sdpa_as_a_stride_0_broadcast() -> None:
    one = torch.randn(2, 1, 65, 8)
    repeated = repeat_kv(one, 4)
    assert repeated.shape == (2, 4, 65, 8) and repeated.stride(1) == 0 and repeated.data_ptr() == one.data_ptr()
    several = repeat_kv(torch.randn(2, 2, 65, 8), 2)
    assert several.stride(1) != 0 and several.is_contiguous()


def test_single_key_value_head_picks_shared_heads_under_sdpa_only() -> None:
    assert single_key_value_head(gemma3(1))
    assert not single_key_value_head(gemma3(2))
    assert not single_key_value_head(gemma3(1, attn="eager"))


def test_guard_turns_the_kernel_off_for_a_single_key_value_head_on_cuda(
    kernel_flag: None, cuda_available: None, caplog: pytest.LogCaptureFixture
) -> None:
    assert not avoid_broken_mem_efficient_sdpa(gemma3(2))
    assert torch.backends.cuda.mem_efficient_sdp_enabled()
    with caplog.at_level(logging.WARNING, logger="seka_lightning.models"):
        assert avoid_broken_mem_efficient_sdpa(gemma3(1))
    assert not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert SDPA_KV_LENGTH_BUG in caplog.text and "turned off for this process" in caplog.text


def test_guard_changes_nothing_without_cuda(kernel_flag: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not avoid_broken_mem_efficient_sdpa(gemma3(1))
    assert torch.backends.cuda.mem_efficient_sdp_enabled()


def test_load_model_applies_the_guard(kernel_flag: None, cuda_available: None, tmp_path: Path, tokenizer) -> None:
    folder = tmp_path / "gemma3-one-kv-head"
    tiny_gemma3(tokenizer.vocab_size, sliding_window=4, kv_heads=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model, _ = load_model(str(folder))
    assert model.config.num_key_value_heads == 1
    assert not torch.backends.cuda.mem_efficient_sdp_enabled()
