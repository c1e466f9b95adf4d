"""`seka report`: the markdown table and plot from metric_result.json files."""

from __future__ import annotations

import json

import pytest

from seka_lightning.report import report


def write_result(folder, method, metrics, benchmark="counterfact"):
    folder.mkdir(parents=True)
    data = {
        "metrics": metrics,
        "method": {"method": method},
        "model": "m",
        "config": {"data": {"benchmark": benchmark}},
    }
    (folder / "metric_result.json").write_text(json.dumps(data))


def test_table_and_plot(tmp_path):
    write_result(tmp_path / "r" / "none", "none", {"efficacy_score": 0.25, "paraphrase_score": 0.5})
    write_result(tmp_path / "r" / "seka", "seka", {"efficacy_score": 0.875, "paraphrase_score": 0.8})
    write_result(
        tmp_path / "r" / "litm",
        "seka",
        {"exact_match": 0.5, "exact_match_pos_0": 0.6, "exact_match_pos_4": 0.4},
        "lost_in_the_middle",
    )
    table = report(results=[str(tmp_path / "r")], output=str(tmp_path / "t.md"), plot=str(tmp_path / "p.png"))
    lines = table.splitlines()
    assert lines[0] == "| benchmark | model | method | efficacy_score | paraphrase_score | exact_match |"
    assert "| counterfact | m | none | 25.00 | 50.00 |  |" in lines
    assert "| counterfact | m | seka | 87.50 | 80.00 |  |" in lines
    assert "| lost_in_the_middle | m | seka (litm) |  |  | 50.00 |" in lines  # a run folder named apart
    assert (tmp_path / "t.md").read_text() == table
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metric_result.json under"):
        report(results=[str(tmp_path)], output=str(tmp_path / "t.md"))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metric_result.json").write_text("{trunc")
    with pytest.raises(ValueError, match="is not valid JSON"):
        report(results=[str(tmp_path / "x")], output=str(tmp_path / "t.md"))
