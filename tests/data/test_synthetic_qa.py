"""Synthetic QA reading, triplets, answer tokens, and the per-rank batch split used by `seka fit`."""

from __future__ import annotations

import json

import pytest

from seka_lightning.data.synthetic_qa import TripletBatches
from seka_lightning.data.triplets import Triplet, answer_token_indices, read_pairs, triplets_from_pair

PAIR = {
    "context_1": "The keepers carry silver lanterns.",
    "question_1": "What do the keepers carry?",
    "answer_1": "silver lanterns",
    "context_2": "The tower stands in the valley.",
    "question_2": "Where does the tower stand?",
    "answer_2": "the valley",
}


def test_triplets_and_spec_texts():
    first, second = triplets_from_pair(PAIR)
    assert first == Triplet(PAIR["context_1"], PAIR["question_1"], "silver lanterns", PAIR["question_2"])
    assert second.irrelevant_question == PAIR["question_1"]
    assert first.texts() == (
        "Context: The keepers carry silver lanterns. ",
        "Question: What do the keepers carry?\nContext: The keepers carry silver lanterns.",
        "Question: Where does the tower stand?\nContext: The keepers carry silver lanterns.",
    )


def test_answer_tokens_first_case_insensitive_occurrence_and_fallbacks():
    text = "Context: Silver lanterns glow."  # "silver lanterns" is characters 9..24
    offsets = [(0, 7), (7, 8), (8, 15), (15, 24), (24, 29), (29, 30)]
    assert answer_token_indices(offsets, text, "silver lanterns") == [3]  # strict rule first, as the reference
    assert answer_token_indices([(0, 8), (8, 24), (24, 30)], text, "silver lanterns") == [1]  # start - 1 fallback
    assert answer_token_indices([(0, 8), (9, 25), (25, 30)], text, "silver lanterns") == [1]  # end + 1 fallback
    assert answer_token_indices([(0, 8), (8, 25)], text, "silver lanterns") == []
    assert answer_token_indices(offsets, text, "golden") == []


def test_read_pairs_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no QA pairs; point data.path at a non-empty JSONL file"):
        read_pairs(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(PAIR) + "\n" + '{"context_1": "trunc')
    with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
        read_pairs(broken)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({**PAIR, "answer_2": ""}) + "\n")
    with pytest.raises(ValueError, match=r"missing.jsonl:1: missing or empty fields \['answer_2'\]"):
        read_pairs(missing)
    with pytest.raises(FileNotFoundError, match="generate one with"):
        read_pairs(tmp_path / "nope.jsonl")


def test_rank_split_covers_every_triplet_once_with_equal_counts():
    triplets = [Triplet(str(i), "q", "a", "r") for i in range(23)]
    shards = [list(TripletBatches(triplets, batch_size=4, rank=r, world_size=3)) for r in range(3)]
    assert {len(s) for s in shards} == {2}  # 6 global batches -> 2 per rank, none padded here
    seen = sorted(int(t.context) for shard in shards for batch in shard for t in batch)
    assert seen == list(range(23))
    uneven = [list(TripletBatches(triplets, batch_size=4, rank=r, world_size=4)) for r in range(4)]
    assert {len(s) for s in uneven} == {2} and uneven[3][1] == [] and uneven[2][1] == []
    resumed = list(TripletBatches(triplets, batch_size=4, rank=0, world_size=1, skip=4))
    assert [int(b[0].context) for b in resumed] == [16, 20]
