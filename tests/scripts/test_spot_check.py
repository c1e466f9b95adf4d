"""scripts/results/spot_check.py: the re-run command it derives from a recorded one, and how it compares records."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("spot_check", REPO / "scripts" / "results" / "spot_check.py")
spot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(spot)

RECORDED = [
    "seka", "predict", "-c", "configs/eval/pronchange.yaml", "-c", "configs/methods/smollm2-135m/seka.yaml",
    "--model.method.bank", "outputs/banks/b.safetensors", "--data.split", "test", "--data.example_subset", "null",
    "--trainer.accelerator=gpu", "--trainer.callbacks.output_dir", "docs/results/pronchange/smollm2-135m/seka",
]  # fmt: skip


def options(command: list[str]) -> dict[str, str]:
    """The ``--key value`` options after ``predict`` and its ``-c`` files, as a dict (the last value wins)."""
    words = command[command.index("predict") + 1 :]
    while words and not words[0].startswith("--"):
        words = words[1:]
    return dict(zip(words[::2], words[1::2], strict=True))


def test_the_rerun_narrows_the_slice_and_redirects_the_output(tmp_path):
    command = spot.rerun_command(
        RECORDED,
        {"slice": "0:900", "split": "test"},
        records=8,
        out=tmp_path / "spot",
        accelerator="cpu",
        max_new_tokens=20,
        overrides=["model.method.bank=/elsewhere/b.safetensors"],
    )
    assert command[:4] == [sys.executable, "-m", "seka_lightning.cli", "predict"]
    assert command[4:8] == ["-c", "configs/eval/pronchange.yaml", "-c", "configs/methods/smollm2-135m/seka.yaml"]
    assert options(command) == {
        "--model.method.bank": "/elsewhere/b.safetensors",
        "--data.example_subset": "0:8",
        "--data.split": "null",
        "--data.max_new_tokens": "20",
        "--trainer.accelerator": "cpu",
        "--trainer.callbacks.output_dir": str(tmp_path / "spot"),
    }


def test_the_first_records_start_where_the_slice_starts():
    assert spot.first_records({"slice": "5000:5500"}, 16) == "5000:5016"
    assert spot.first_records({"example_subset": "0:100"}, 2) == "0:2"
    assert spot.first_records({"example_subset": None}, 3) == "0:3"  # the whole set: its first records
    with pytest.raises(ValueError, match="--records must be >= 1"):
        spot.first_records({}, 0)


def test_a_command_that_is_not_a_predict_or_cannot_be_read_is_refused(tmp_path):
    kwargs = dict(records=1, out=tmp_path, accelerator="cpu", max_new_tokens=None, overrides=[])
    with pytest.raises(ValueError, match="not `seka predict"):
        spot.rerun_command(["seka", "fit", "-c", "x.yaml"], {}, **kwargs)
    with pytest.raises(ValueError, match="ends with '--data.path' and no value"):
        spot.rerun_command(["seka", "predict", "--data.path"], {}, **kwargs)
    with pytest.raises(ValueError, match="--set takes KEY=VALUE"):
        spot.rerun_command(RECORDED, {}, **{**kwargs, "overrides": ["model.method.bank"]})


def record(rid: str, text: str, score: float) -> dict:
    return {"id": rid, "generation": text, "scores": {"pron_mean_p": score}}


def test_records_agree_on_text_and_scores_or_on_a_prefix_when_shorter():
    committed = [record("a", "She is a nurse.", 0.5), record("b", "He he he", 0.0), record("c", "x", 1.0)]
    same = [record("a", "She is a nurse.", 0.5 + 5e-5), record("b", "He he he", 0.0)]
    assert spot.agreement(committed, same, prefix_only=False)["agree"] == 2
    changed = [record("a", "She is a nurse.", 0.6), record("b", "They they", 0.0), record("z", "?", 0.0)]
    result = spot.agreement(committed, changed, prefix_only=False)
    assert (result["records"], result["agree"]) == (3, 0)
    assert [d["id"] for d in result["differences"]] == ["a", "b", "z"]
    assert "scores[pron_mean_p]" in result["differences"][0]["difference"]
    assert result["differences"][2]["difference"] == "no committed record with this id"
    shorter = [record("a", "She is", 0.0), record("b", "He he", 0.3), record("c", "y", 1.0)]
    result = spot.agreement(committed, shorter, prefix_only=True)  # scores of shorter generations are not compared
    assert (result["agree"], [d["id"] for d in result["differences"]]) == (2, ["c"])


def test_repeated_ids_are_matched_in_order():
    committed = [{"id": "q", "prediction": "one", "scores": {}}, {"id": "q", "prediction": "two", "scores": {}}]
    rerun = [{"id": "q", "prediction": "one", "scores": {}}, {"id": "q", "prediction": "two", "scores": {}}]
    assert spot.agreement(committed, rerun, prefix_only=False)["agree"] == 2
    assert spot.agreement(committed, rerun[::-1], prefix_only=False)["agree"] == 0


def test_an_existing_output_folder_is_refused_before_anything_runs(tmp_path, capsys):
    result = tmp_path / "result"
    result.mkdir()
    (result / "metric_result.json").write_text(json.dumps({"provenance": {"command": RECORDED}, "config": {}}))
    with gzip.open(result / "predictions.jsonl.gz", "wt") as f:
        f.write(json.dumps(record("a", "x", 0.0)) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        spot.main([str(result), "--out", str(out)])
    assert exit_info.value.code == 2
    assert "exists; pick a new folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
