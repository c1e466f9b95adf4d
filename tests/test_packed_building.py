"""Packed building passes (``pack_tokens``): several texts share a row, each attending only to itself.

The references are independent of the packing code: every text run alone through the model (batch 1, no padding,
float64), and the right-padded default path."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_llama
from tests.test_early_exit import _gemma3
from transformers import OPTConfig, OPTForCausalLM

from seka_lightning.build import build_bank, build_statistics
from seka_lightning.capture import _packed, capture_keys, collect_triplet_keys
from seka_lightning.data.triplets import answer_token_indices, iter_triplets, read_pairs
from seka_lightning.families import resolve_layout

CPU = torch.device("cpu")
MODELS = {"llama": lambda vocab: tiny_llama(vocab, layers=3), "gemma3": _gemma3}


def _alone(model, tokenizer, layout, layers, text: str, answer: str) -> torch.Tensor:
    """Answer-token keys of ``text`` run by itself: ``[L, M, H, d]``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tokens = answer_token_indices(enc["offset_mapping"], text, answer)
    ids = torch.tensor([enc["input_ids"]])
    return capture_keys(model, layout, layers, ids, None, torch.tensor(tokens))


def test_packing_places_every_text_once_without_overlap_and_restarts_positions():
    lengths = [7, 3, 12, 5, 5, 9, 1, 12, 4]
    ids = [list(range(100 * i, 100 * i + n)) for i, n in enumerate(lengths)]
    run = _packed(ids, -1, CPU, pack_tokens=16)
    assert run.width == 16 and run.attention_mask is None
    # first fit in decreasing length: 12+4 | 12+3+1 | 9+7 | 5+5, 58 tokens in 4 rows of 16
    assert run.input_ids.shape == (4, 16) and (run.input_ids == -1).sum() == 4 * 16 - sum(lengths)
    for text, (row, offset) in zip(ids, run.starts, strict=True):
        assert run.input_ids[row, offset : offset + len(text)].tolist() == text
        assert run.position_ids[row, offset : offset + len(text)].tolist() == list(range(len(text)))
    # padding is position 0 (a text of its own): no position goes past the longest text's
    assert run.position_ids[run.input_ids == -1].eq(0).all() and run.position_ids.max() == max(lengths) - 1
    # a text longer than pack_tokens widens the rows to it instead of being cut
    wide = _packed(ids, -1, CPU, pack_tokens=8)
    assert wide.width == 12 and all(offset + n <= 12 for (_, offset), n in zip(wide.starts, lengths, strict=True))


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("pack_tokens", [1, 150, 4096], ids=["longest", "several-rows", "one-row"])
def test_packed_keys_equal_each_text_run_alone_in_float64(family, pack_tokens, tokenizer, qa_file):
    model = MODELS[family](len(tokenizer)).double()
    layout = resolve_layout(model)
    layers = list(range(layout.num_layers))
    triplets = list(iter_triplets(read_pairs(qa_file, max_samples=5)))
    packed = collect_triplet_keys(model, tokenizer, layout, layers, triplets, device=CPU, pack_tokens=pack_tokens)
    padded = collect_triplet_keys(model, tokenizer, layout, layers, triplets, device=CPU)
    assert packed.kept == padded.kept == len(triplets) and packed.lengths == padded.lengths
    assert packed.slots <= padded.slots and (packed.slots < padded.slots or pack_tokens == 1)
    alone = [
        torch.cat([_alone(model, tokenizer, layout, layers, t.texts()[k], t.answer) for t in triplets], dim=1)
        for k in range(3)
    ]
    for got, want in zip((packed.neutral, packed.positive, packed.negative), alone, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_packed_attention_filter_sees_the_same_masses(family, tokenizer, qa_file, monkeypatch):
    from seka_lightning import capture

    model = MODELS[family](len(tokenizer)).double()
    layout = resolve_layout(model)
    triplets = list(iter_triplets(read_pairs(qa_file, max_samples=6)))
    masses = []
    real = capture.attention_kept
    monkeypatch.setattr(capture, "attention_kept", lambda n, p, r: masses.append((n, p)) or real(n, p, r))
    runs = [
        collect_triplet_keys(
            model, tokenizer, layout, [0, 1], triplets, device=CPU, positive_only=True, attention_ratio=0.55,
            pack_tokens=pack,
        )
        for pack in (None, 200)
    ]  # fmt: skip
    assert runs[1].slots < runs[0].slots
    for padded, packed in zip(*masses, strict=True):
        torch.testing.assert_close(packed, padded, rtol=0, atol=1e-12)
    assert runs[0].kept == runs[1].kept and runs[0].skipped_attention == runs[1].skipped_attention
    assert 0 < runs[0].kept < len(triplets), "ratio 0.55 must keep some triplets and drop others here"
    torch.testing.assert_close(runs[1].positive, runs[0].positive, rtol=0, atol=1e-12)


def test_packed_bank_equals_the_padded_bank(tokenizer, qa_file):
    model = tiny_llama(len(tokenizer)).double()
    pairs = read_pairs(qa_file)
    padded = build_bank(model, tokenizer, pairs, batch_size=8)
    packed = build_bank(model, tokenizer, pairs, batch_size=8, pack_tokens=128)
    assert packed.metadata["pack_tokens"] == 128 and "pack_tokens" not in padded.metadata
    for name, value in padded.statistics.tensors().items():
        torch.testing.assert_close(packed.statistics.tensors()[name], value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed.pos, padded.pos, rtol=0, atol=1e-9)
    torch.testing.assert_close(packed.neg, padded.neg, rtol=0, atol=1e-9)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "512"])
def test_bad_pack_tokens_is_refused_with_the_fix(bad, tokenizer, qa_file):
    with pytest.raises(ValueError, match=r"pack_tokens must be a row width in tokens >= 1 \(e\.g\. 512\), or None"):
        build_statistics(tiny_llama(len(tokenizer)), tokenizer, read_pairs(qa_file), pack_tokens=bad)


def test_packing_with_flash_attention_is_refused_before_any_pass(tokenizer, qa_file):
    """transformers builds no per-text mask for flash attention over several rows: the texts would mix."""
    model = tiny_llama(len(tokenizer))
    model.config._attn_implementation = "flash_attention_2"  # only read by the check; nothing runs
    with pytest.raises(ValueError, match="'flash_attention_2' attention does not build for several rows; load"):
        build_statistics(model, tokenizer, read_pairs(qa_file), pack_tokens=64)


def test_packing_a_model_discovered_by_structure_is_refused(tokenizer, qa_file):
    """OPT is found by structure, not by the family table, and its forward does not hand the restarting positions to
    the mask: packed, its texts would attend to each other."""
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=32, pad_token_id=0, attn_implementation="sdpa",
    )  # fmt: skip
    model = OPTForCausalLM(config).eval()
    assert resolve_layout(model).family == "discovered"
    with pytest.raises(ValueError, match="was discovered by structure, so its packed texts might attend to each other"):
        build_statistics(model, tokenizer, read_pairs(qa_file), pack_tokens=64)


def test_packing_a_bidirectional_model_is_refused(tokenizer, qa_file):
    model = _gemma3(len(tokenizer))
    model.config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="attends bidirectionally, so set pack_tokens to None"):
        build_statistics(model, tokenizer, read_pairs(qa_file), pack_tokens=64)
