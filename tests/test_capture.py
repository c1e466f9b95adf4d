"""collect_triplet_keys: one right-padded pass over all texts gives each text's unpadded keys, with or without the
attention mask it only passes to models that need it."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from seka_lightning.capture import capture_keys, collect_triplet_keys, is_causal
from seka_lightning.data.triplets import answer_token_indices, iter_triplets, read_pairs
from seka_lightning.families import resolve_layout


def _gemma3(vocab_size: int, *, bidirectional: bool) -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], use_bidirectional_attention=bidirectional,
        attn_implementation="sdpa", pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
    return Gemma3ForCausalLM(config).double().eval()


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_batched_keys_equal_each_text_s_unpadded_keys(tokenizer, qa_file, bidirectional):
    """Sliding and full layers, texts of different lengths: without a mask a bidirectional model's full layer would
    see the padding of shorter rows (the next layer's keys move), a causal one never does."""
    model = _gemma3(len(tokenizer), bidirectional=bidirectional)
    assert is_causal(model) is not bidirectional
    layout = resolve_layout(model)
    triplets = list(iter_triplets(read_pairs(qa_file, max_samples=4)))
    got = collect_triplet_keys(model, tokenizer, layout, [0, 1, 2], triplets, device=torch.device("cpu"))
    assert got.kept == len(triplets)
    lengths = set()
    for k, batched in enumerate((got.neutral, got.positive, got.negative)):
        reference = []
        for triplet in triplets:
            text = triplet.texts()[k]
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            rows = torch.tensor(answer_token_indices(encoded["offset_mapping"], text, triplet.answer))
            ids = torch.tensor([encoded["input_ids"]])
            lengths.add(ids.shape[1])
            reference.append(capture_keys(model, layout, [0, 1, 2], ids, None, rows))
        torch.testing.assert_close(batched, torch.cat(reference, dim=1), rtol=1e-10, atol=1e-10)
    assert len(lengths) > 1, "the texts must differ in length, so shorter rows are padded"
