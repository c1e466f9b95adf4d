"""Synthetic QA reading, triplets, answer tokens, and the per-rank batch split used by `seka fit`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from seka_lightning.data.synthetic_qa import SyntheticQADataModule, TripletBatches
from seka_lightning.data.triplets import (
    Triplet,
    answer_token_indices,
    iter_pairs,
    iter_triplets,
    read_pairs,
    triplets_from_pair,
)

REPO = Path(__file__).resolve().parents[2]

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
    not_object = tmp_path / "list.jsonl"
    not_object.write_text(json.dumps(PAIR) + "\n\n" + json.dumps([PAIR]) + "\n")
    with pytest.raises(ValueError, match=r"list.jsonl:3: a JSON list, not an object; each line needs \['context_1'"):
        read_pairs(not_object)
    absent = tmp_path / "absent.jsonl"
    absent.write_text(json.dumps({**PAIR, "answer_2": "the mountain"}) + "\n")
    assert read_pairs(absent)[0]["answer_2"] == "the mountain"  # read as written; SPEC §3 skips its triplet
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(
        json.dumps({**PAIR, "context_1": "Caf\u00e9 silver lanterns."}, ensure_ascii=False).encode("latin-1")
    )
    with pytest.raises(ValueError, match="latin.jsonl is not UTF-8 text .*; save it as UTF-8 JSONL"):
        read_pairs(latin)


@pytest.mark.parametrize("name", ["synthetic_qa.jsonl", "synthetic_qa_heldout.jsonl"])
def test_shipped_pairs_and_triplets_equal_a_line_by_line_json_reading(name):
    """Reading through 🤗 datasets changes nothing: the pairs, the triplets and their order are those of json.loads
    on each non-blank line (the reader before datasets)."""
    path = REPO / "data" / name
    reference = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    pairs = read_pairs(path)
    assert pairs == reference
    assert list(iter_triplets(pairs)) == [t for pair in reference for t in triplets_from_pair(pair)]
    assert read_pairs(path, max_samples=5) == reference[:5]


def test_strings_are_kept_as_written(tmp_path):
    """Date-like answers stay strings (the json loader's Arrow inference would turn them into timestamps)."""
    dated = {
        **PAIR,
        "context_1": "It opened on 1999-01-01.",
        "answer_1": "1999-01-01",
        "context_2": "Built 2020-01-01T10:00:00.",
        "answer_2": "2020-01-01T10:00:00",
    }
    path = tmp_path / "dated.jsonl"
    path.write_text(json.dumps(dated) + "\n" + json.dumps({**dated, "id": 7}) + "\n")
    assert read_pairs(path) == [dated, {**dated, "id": 7}]


def test_pairs_stream_line_by_line(tmp_path):
    """The reader yields a pair before it reads the next line: max_samples stops before a later broken line."""
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps(PAIR) + "\n" + '{"broken')
    pairs = iter_pairs(path)
    assert next(pairs) == PAIR and next(pairs) == PAIR
    with pytest.raises(ValueError, match="qa.jsonl:3: not valid JSON"):
        next(pairs)
    assert read_pairs(path, max_samples=2) == [PAIR, PAIR]


def test_fingerprint_is_the_file_digest_from_any_directory(tmp_path, monkeypatch):
    """From a directory without data/, the config's relative path reads the shipped file, and the
    fingerprint is the same; a user's own data/ file there is read instead."""
    shipped = REPO / "data" / "synthetic_qa.jsonl"
    expected = hashlib.sha256(shipped.read_bytes() + b"max_samples=3").hexdigest()
    monkeypatch.chdir(tmp_path)
    module = SyntheticQADataModule("data/synthetic_qa.jsonl", max_samples=3)
    module.setup("fit")
    assert module.fingerprint() == expected
    assert module.triplets == list(iter_triplets(read_pairs(shipped, max_samples=3)))
    own = tmp_path / "data" / "synthetic_qa.jsonl"
    own.parent.mkdir()
    own.write_text(json.dumps(PAIR) + "\n")
    assert read_pairs("data/synthetic_qa.jsonl") == [PAIR]
    assert (
        SyntheticQADataModule("data/synthetic_qa.jsonl", max_samples=3).fingerprint()
        == hashlib.sha256(own.read_bytes() + b"max_samples=3").hexdigest()
    )


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
