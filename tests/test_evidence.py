"""The per-example contract: gzipped predictions, the recomputation rule, and verification of result folders."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from seka_lightning.evidence import (
    check_records,
    contract_metric,
    per_id_scores,
    read_predictions,
    summarize,
    verify_folder,
    verify_results,
    write_predictions,
)
from seka_lightning.significance import bootstrap_interval, wilson_interval

# CounterFact-like: case 7 has an efficacy prompt and three paraphrases (2 won), case 9 one of each (0 won)
RECORDS = [
    {"id": 7, "scores": {"efficacy_score": 1.0, "efficacy_magnitude": 0.25}},
    {"id": 7, "scores": {"paraphrase_score": 1.0}},
    {"id": 7, "scores": {"paraphrase_score": 0.0}},
    {"id": 7, "scores": {"paraphrase_score": 1.0}},
    {"id": 9, "scores": {"efficacy_score": 0.0, "efficacy_magnitude": -0.5}},
    {"id": 9, "scores": {"paraphrase_score": 0.0}},
    {"id": 11, "scores": {"efficacy_score": 1.0, "efficacy_magnitude": 0.125}},
]


def test_contract_rule_averages_per_id_then_over_ids():
    assert per_id_scores(RECORDS, "paraphrase_score") == {7: 2 / 3, 9: 0.0}
    assert contract_metric(RECORDS, "paraphrase_score") == (1 / 3, 2)  # case 11 has no paraphrase: not counted
    assert contract_metric(RECORDS, "efficacy_score") == (2 / 3, 3)
    assert contract_metric(list(reversed(RECORDS)), "efficacy_magnitude") == contract_metric(
        RECORDS, "efficacy_magnitude"
    )
    with pytest.raises(ValueError, match="no prediction record scores 'top1_accuracy'; it cannot be recomputed"):
        contract_metric(RECORDS, "top1_accuracy")


def test_summarize_gives_wilson_for_0_1_and_bootstrap_otherwise():
    summary = summarize(RECORDS)
    assert summary["n"] == {"efficacy_score": 3, "efficacy_magnitude": 3, "paraphrase_score": 2}
    wilson = wilson_interval(2, 3)
    assert summary["intervals"]["efficacy_score"] == [wilson.low, wilson.high]
    expected = bootstrap_interval([2 / 3, 0.0])
    assert summary["intervals"]["paraphrase_score"] == [expected.low, expected.high]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"scores": {}}, "prediction record 0 has no 'id' and 'scores' object"),
        ({"id": 1, "scores": [1.0]}, "prediction record 0 has no 'id' and 'scores' object"),
        ({"id": 1.5, "scores": {}}, "prediction record 0 has id 1.5; ids must be strings or integers"),
        ({"id": "a", "scores": {"m": "1"}}, "prediction record 0 (id 'a') scores m='1'; scores must be finite numbers"),
        ({"id": "a", "scores": {"m": float("inf")}}, "scores m=inf; scores must be finite numbers"),
    ],
)
def test_records_that_break_the_contract_are_named(record, message):
    with pytest.raises(ValueError) as info:
        check_records([record])
    assert message in str(info.value)


def test_predictions_round_trip_gzipped_and_deterministic(tmp_path):
    records = [{"id": "q1@pos0", "generation": "a\u2028b", "scores": {"exact_match": 1.0}}]
    path = write_predictions(tmp_path / "predictions.jsonl.gz", records)
    first = path.read_bytes()
    assert gzip.decompress(first).decode().split("\n") == [json.dumps(records[0], ensure_ascii=False), ""]
    assert read_predictions(path) == records
    assert write_predictions(tmp_path / "again.jsonl.gz", records).read_bytes() == first  # no time in the header
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="is not a readable gzipped JSONL file"):
        read_predictions(tmp_path / "bad.jsonl.gz")


def result_folder(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    write_predictions(folder / "predictions.jsonl.gz", records)
    (folder / "metric_result.json").write_text(json.dumps({**summarize(records), "method": {"method": "none"}}))
    return folder


def test_verify_passes_a_faithful_folder_and_names_every_mismatch(tmp_path):
    good = result_folder(tmp_path / "cf" / "m" / "none", RECORDS)
    assert verify_folder(good) == []
    tampered = result_folder(tmp_path / "cf" / "m" / "seka", RECORDS)
    result = json.loads((tampered / "metric_result.json").read_text())
    result["metrics"]["efficacy_score"] = 0.9
    result["n"]["paraphrase_score"] = 3
    result["metrics"]["top1_accuracy"] = 0.5
    (tampered / "metric_result.json").write_text(json.dumps(result))
    missing = result_folder(tmp_path / "cf" / "m" / "spa", RECORDS)
    (missing / "predictions.jsonl.gz").unlink()
    file = tampered / "metric_result.json"
    assert verify_results(tmp_path) == [
        f"{file}: efficacy_score value: recorded 0.9, recomputed {2 / 3!r} from predictions.jsonl.gz",
        f"{file}: paraphrase_score n: recorded 3, recomputed 2 from predictions.jsonl.gz",
        f"{file}: top1_accuracy: no per-example scores in predictions.jsonl.gz",
        f"{missing}: missing predictions.jsonl.gz beside metric_result.json",
    ]
    with pytest.raises(FileNotFoundError, match="no metric_result.json under"):
        verify_results(tmp_path / "empty")
