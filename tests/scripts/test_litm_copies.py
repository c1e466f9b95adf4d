"""scripts/results/litm_copies.py: the share of inside-highlight answers that copy from the gold document."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("litm_copies", REPO / "scripts" / "results" / "litm_copies.py")
litm_copies = importlib.util.module_from_spec(spec)
spec.loader.exec_module(litm_copies)


def test_copies_are_counted_over_the_inside_records_with_their_exact_match(tmp_path: Path) -> None:
    text = "Answer.\n\nContext:\nDoc zero says nothing.\n\nThe gold doc says the capital is Paris today.\n\nQuestion?"
    records = [  # gold at document 1, inside the highlight
        {"text": text, "gold_position": 1, "gold_inside_highlight": True, "exact_match": 1.0,
         "prediction": " the  capital is Paris today"},  # 5 words of the gold document (spacing normalized)
        {"text": text, "gold_position": 1, "gold_inside_highlight": True, "exact_match": 0.0,
         "prediction": "capital is Paris"},  # 3 words only: no copy
        {"text": text, "gold_position": 0, "gold_inside_highlight": False, "exact_match": 0.0,
         "prediction": "Doc zero says nothing. at all"},  # outside: not counted
    ]  # fmt: skip
    path = tmp_path / "predictions.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in records).encode()))
    assert litm_copies.summarize(path, words=5) == {
        "inside": 2,
        "copies_gold_pct": 50.0,
        "exact_match_of_copies_pct": 100.0,
    }
    assert litm_copies.copies("says the capital is Paris", "The gold doc says the capital is Paris today.", 5)
    assert not litm_copies.copies("the capital is Rome", "The gold doc says the capital is Paris today.", 4)
