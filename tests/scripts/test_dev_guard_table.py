"""scripts/research/dev_guard_table.py: the cells are paired tests on the same examples, verdicts follow the rule."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from seka_lightning.evidence import write_predictions
from seka_lightning.significance import mcnemar_exact, wilson_interval

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("dev_guard_table", REPO / "scripts" / "research" / "dev_guard_table.py")
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)


def write_run(folder: Path, metric: str, scores: dict, **more: dict) -> Path:
    """A run scoring ``metric`` (and each metric in ``more``) per id."""
    records = [{"id": i, "scores": {metric: s, **{m: v[i] for m, v in more.items()}}} for i, s in scores.items()]
    write_predictions(folder / "predictions.jsonl.gz", records)
    (folder / "metric_result.json").write_text("{}")
    return folder


def test_cell_is_the_exact_mcnemar_test_on_the_same_ids(tmp_path):
    ours = {i: float(i % 3 != 0) for i in range(30)}  # 20 of 30
    theirs = {i: float(i < 12) for i in range(30)}  # 12 of 30
    a = write_run(tmp_path / "a", "exact_match_inside", ours)
    b = write_run(tmp_path / "b", "exact_match_inside", dict(reversed(list(theirs.items()))))  # order irrelevant
    test = mcnemar_exact([ours[i] for i in range(30)], [theirs[i] for i in range(30)])
    interval = wilson_interval(20, 30)
    expected = (
        f"{20 / 30 * 100:.2f} [{interval.low * 100:.2f}, {interval.high * 100:.2f}] "
        f"({test.difference * 100:+.2f}, p = {test.p_value:.2g})"
    )
    assert table.cell(a, b, "exact_match_inside", 100) == expected
    assert table.cell(b, b, "exact_match_inside", 100).count("p =") == 0  # unsteered: no test against itself
    assert table.cell(tmp_path / "missing", b, "exact_match_inside", 100) == "-"


def test_cell_refuses_runs_on_different_examples(tmp_path):
    a = write_run(tmp_path / "a", "exact_match_inside", {i: 1.0 for i in range(10)})
    b = write_run(tmp_path / "b", "exact_match_inside", {i: 1.0 for i in range(1, 11)})
    with pytest.raises(ValueError, match="score different examples"):
        table.cell(a, b, "exact_match_inside", 100)


def test_verdicts():
    assert table.verdict_of([]) == "pass"
    assert table.verdict_of(["exact_match_inside: no dev run"]) == "open"
    assert table.verdict_of(["exact_match_inside: no dev run", "pron_mean_p: 0.01 < unsteered - SE = 0.05"]) == "fail"


def test_main_prints_the_floors_and_one_row_per_guard_checked_candidate(tmp_path, capsys):
    dev = tmp_path / "gemma3-270m"
    base = {"efficacy_score": {"mean": 0.5, "se": 0.05, "n": 4}, "exact_match_inside": {"mean": 0.5, "se": 0.25}}
    table_json = {
        "guards": ["exact_match_inside"],
        "baseline": base,
        "candidates": [
            {"name": "last6-g4", "metrics": {"efficacy_score": {"mean": 1.0}}, "rejected": []},
            {"name": "last6-g8", "metrics": {"efficacy_score": {"mean": 0.75}}, "rejected": ["x: no dev run"]},
        ],
        "chosen": {"name": "last6-g4"},
    }
    dev.with_suffix(".json").write_text(json.dumps(table_json))
    outside = {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0}
    write_run(
        dev / "lost_in_the_middle" / "none",
        "exact_match_inside",
        {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0},
        exact_match_outside=outside,
    )
    write_run(
        dev / "lost_in_the_middle" / "last6-g4",
        "exact_match_inside",
        {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0},
        exact_match_outside={i: 0.0 for i in outside},
    )
    pron = dev / "pronchange" / "none"
    write_predictions(
        pron / "predictions.jsonl.gz", [{"id": i, "scores": {"pron_mean_p": 0.5, "degenerate": i}} for i in (0, 1)]
    )
    (pron / "metric_result.json").write_text("{}")
    table.main([str(dev)])
    out = capsys.readouterr().out
    assert "exact_match_inside 25.00" in out  # floor 0.5 - 0.25
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows] == ["`none`", "`last6-g4`"]  # last6-g8 has no guard run
    assert rows[1].endswith("| **passes** |")
    header = next(line for line in out.splitlines() if line.startswith("| candidate"))
    assert header.split(" | ")[2:4] == ["exact_match_inside x 100", "exact_match_outside x 100 (not a guard)"]
    assert rows[1].split(" | ")[3].startswith("0.00 [")  # the unguarded outside score, tested against unsteered
    assert "(-50.00, p = 0.5)" in rows[1].split(" | ")[3]  # McNemar: 2 discordant pairs, both against


def test_main_prints_a_table_whose_rule_chose_nothing(tmp_path, capsys):
    """A dev table where no candidate passes (the runner writes it with ``chosen: null``) prints every row unbolded."""
    dev = tmp_path / "gemma3-270m"
    base = {"efficacy_score": {"mean": 0.5, "se": 0.05, "n": 4}, "exact_match_inside": {"mean": 0.5, "se": 0.25}}
    reason = "exact_match_inside: 0.0000 < unsteered - SE = 0.2500"
    table_json = {
        "guards": ["exact_match_inside"],
        "baseline": base,
        "candidates": [{"name": "last6-g4", "metrics": {"efficacy_score": {"mean": 1.0}}, "rejected": [reason]}],
        "chosen": None,
    }
    dev.with_suffix(".json").write_text(json.dumps(table_json))
    both = {"exact_match_outside": {0: 1.0, 1: 1.0}}
    write_run(dev / "lost_in_the_middle" / "none", "exact_match_inside", {0: 1.0, 1: 0.0}, **both)
    write_run(dev / "lost_in_the_middle" / "last6-g4", "exact_match_inside", {0: 0.0, 1: 0.0}, **both)
    table.main([str(dev)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert rows[-1].startswith("| `last6-g4` |") and rows[-1].endswith("| fails |")
    assert not any("**" in row for row in rows)
