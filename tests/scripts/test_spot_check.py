"""scripts/results/spot_check.py: the re-run command it derives from a recorded one, and how it compares records."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("spot_check", REPO / "scripts" / "results" / "spot_check.py")
spot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(spot)

RECORDED = [
    "seka", "predict", "-c", "configs/eval/pronchange.yaml", "-c", "configs/methods/smollm2-135m/seka.yaml",
    "--model.method.bank", "outputs/banks/b.safetensors", "--data.split", "test", "--data.example_subset", "null",
    "--data.max_new_tokens", "256", "--trainer.accelerator=gpu",
    "--trainer.callbacks.output_dir", "docs/results/pronchange/smollm2-135m/seka",
]  # fmt: skip
PRONCHANGE = {"benchmark": "pronchange", "slice": "0:900", "split": "test", "example_subset": None}
KWARGS = dict(records=8, accelerator="cpu", max_new_tokens=None, overrides=[])


def test_the_rerun_narrows_the_slice_and_redirects_the_output(tmp_path):
    command = spot.rerun_command(
        RECORDED,
        PRONCHANGE,
        **{**KWARGS, "max_new_tokens": 20, "overrides": ["model.method.bank=/elsewhere/b.safetensors"]},
        out=tmp_path / "spot",
    )
    assert command == [
        sys.executable, "-m", "seka_lightning.cli", "predict",
        "-c", "configs/eval/pronchange.yaml", "-c", "configs/methods/smollm2-135m/seka.yaml",
        "--model.method.bank", "/elsewhere/b.safetensors",
        "--data.example_subset", "0:8", "--data.split", "null", "--data.max_new_tokens", "20",
        "--trainer.accelerator", "cpu", "--trainer.callbacks.output_dir", str(tmp_path / "spot"),
    ]  # fmt: skip


def test_a_split_from_a_config_file_is_cleared_and_kept_generation_lengths_stay(tmp_path):
    """The eval configs set ``split: test``; a recorded command without --data.split still needs it cleared."""
    recorded = [word for word in RECORDED if word not in ("--data.split", "test")]
    command = spot.rerun_command(recorded, PRONCHANGE, **KWARGS, out=tmp_path)
    assert command[command.index("--data.example_subset") :][:4] == [
        "--data.example_subset",
        "0:8",
        "--data.split",
        "null",
    ]
    assert command[command.index("--data.max_new_tokens") + 1] == "256"  # without --max-new-tokens: as recorded
    biasbios = spot.rerun_command(recorded, {"benchmark": "biasbios", "example_subset": None}, **KWARGS, out=tmp_path)
    assert "--data.split" not in biasbios  # BiasBios has no split option


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"slice": "5000:5500"}, "5000:5008"),
        ({"benchmark": "lost_in_the_middle", "split": None, "slice": "0:100", "example_subset": "0:100"}, "0:8"),
        ({"benchmark": "counterfact", "split": "dev", "example_subset": None}, "4500:4508"),  # no slice recorded
        ({"benchmark": "counterfact", "split": None, "example_subset": None}, "5000:5008"),  # neither: test
        ({"benchmark": "biasbios", "example_subset": None}, "0:8"),  # the whole set
    ],
)
def test_the_first_records_start_where_the_results_records_start(data, expected):
    assert spot.first_records(data, 8) == expected


@pytest.mark.parametrize(
    ("data", "records", "message"),
    [
        ({}, 0, "--records must be >= 1"),
        ({"slice": "0:900:2"}, 1, "not a plain 'A:B' slice"),
        ({"slice": "-8:"}, 1, "not a plain 'A:B' slice"),
        ({"benchmark": "biasbios", "split": "dev"}, 1, "names no known records"),
    ],
)
def test_records_that_cannot_be_narrowed_are_refused(data, records, message):
    with pytest.raises(ValueError, match=message):
        spot.first_records(data, records)


def test_a_command_that_is_not_a_predict_cannot_be_read_or_overrides_the_checks_own_options_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not `seka predict"):
        spot.rerun_command(["seka", "fit", "-c", "x.yaml"], {}, **KWARGS, out=tmp_path)
    with pytest.raises(ValueError, match="ends with '--data.path' and no value"):
        spot.rerun_command(["seka", "predict", "--data.path"], {}, **KWARGS, out=tmp_path)
    with pytest.raises(ValueError, match="--set takes KEY=VALUE"):
        spot.rerun_command(RECORDED, PRONCHANGE, **{**KWARGS, "overrides": ["model.method.bank"]}, out=tmp_path)
    for own in ("data.example_subset=0:900", "trainer.accelerator=gpu", "data.max_new_tokens=5", "data.split=dev"):
        with pytest.raises(ValueError, match="the spot check's own option"):
            spot.rerun_command(RECORDED, PRONCHANGE, **{**KWARGS, "overrides": [own]}, out=tmp_path)


def record(uid: str, text: str, score: float, rid: int = 0) -> dict:
    return {"uid": uid, "id": rid, "generation": text, "scores": {"pron_mean_p": score}}


def test_records_agree_on_text_and_scores_or_on_a_non_empty_prefix_when_shorter():
    committed = [record("a", "She is a nurse.", 0.5), record("b", "He he he", 0.0), record("c", "x", 1.0)]
    same = [record("a", "She is a nurse.", 0.5 + 5e-5), record("b", "He he he", 0.0)]
    assert spot.agreement(committed, same, prefix_only=False)["agree"] == 2
    changed = [record("a", "She is a nurse.", 0.6), record("b", "They they", 0.0), record("z", "?", 0.0)]
    result = spot.agreement(committed, changed, prefix_only=False)
    assert (result["records"], result["agree"]) == (3, 0)
    assert [d["uid"] for d in result["differences"]] == ["a", "b", "z"]
    assert "scores[pron_mean_p]" in result["differences"][0]["difference"]
    assert result["differences"][2]["difference"] == "no committed record with this uid"
    shorter = [record("a", "She is", 0.0), record("b", "He he", 0.3), record("c", "y", 1.0), record("b", "", 0.0)]
    result = spot.agreement(committed, shorter, prefix_only=True)  # scores of shorter generations are not compared
    assert (result["agree"], [d["uid"] for d in result["differences"]]) == (2, ["c", "b"])  # "" starts everything
    no_text = {"uid": "n", "id": 1, "scores": {"efficacy_score": 1.0}}
    assert spot.agreement([no_text], [no_text], prefix_only=True)["agree"] == 0
    assert spot.agreement([no_text], [no_text], prefix_only=False)["agree"] == 1


def test_slice_dependent_scores_are_not_compared_but_the_text_and_other_scores_are():
    """BiasBios ranks over the professions of the slice and fits its TF-IDF on the slice's bios: a narrowed re-run's
    accuracy and consistency differ from the full run's even when every generation is the same."""

    def bios(uid: str, text: str, top1: float, fluency: float | None = 2.0) -> dict:
        scores = {"top1_accuracy": top1, "top3_accuracy": top1, "consistency": top1}
        return {"uid": uid, "id": uid, "generation": text, "scores": scores | ({"fluency": fluency} if fluency else {})}

    skip = ("top", "consistency")
    committed = [bios("a", "An accountant.", 0.0), bios("b", "A nurse.", 1.0), bios("n", "", 1.0, fluency=None)]
    rerun = [bios("a", "An accountant.", 1.0), bios("b", "A nurse.", 1.0, fluency=2.5), bios("n", "", 0.0, None)]
    result = spot.agreement(committed, rerun, prefix_only=False, slice_scores=skip)
    assert result["agree"] == 1
    assert [(d["uid"], d["difference"].split(":")[0]) for d in result["differences"]] == [
        ("b", "scores[fluency]"),
        ("n", "nothing to compare"),
    ]
    changed = spot.agreement(committed, [bios("a", "A nurse.", 0.0)], prefix_only=False, slice_scores=skip)
    assert changed["differences"][0]["uid"] == "a" and changed["agree"] == 0
    assert spot.agreement(committed, rerun[:1], prefix_only=False)["differences"][0]["uid"] == "a"  # all compared


def test_records_sharing_an_id_are_matched_by_uid():
    """CounterFact writes an efficacy and a paraphrase record per case, with one ``id``."""
    committed = [record("cf/5000/efficacy", "", 1.0, 5000), record("cf/5000/paraphrase", "", 0.0, 5000)]
    rerun = committed[::-1]
    assert spot.agreement(committed, rerun, prefix_only=False)["agree"] == 2


def write_result(folder: Path, records: list[dict], data: dict = PRONCHANGE, method: str = "seka") -> None:
    folder.mkdir(parents=True)
    result = {"provenance": {"command": RECORDED}, "config": {"data": data}, "model": "m", "method": {"method": method}}
    (folder / "metric_result.json").write_text(json.dumps(result))
    with gzip.open(folder / "predictions.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_the_check_writes_its_summary_and_exits_by_agreement(tmp_path, monkeypatch, capsys):
    result = tmp_path / "result"
    write_result(result, [record("a", "She is a nurse.", 0.5), record("b", "He he", 0.0)])
    reruns = iter(
        [[record("a", "She is", 0.0), record("b", "He", 0.0)], [record("a", "She is", 0.0), record("b", "It", 0.0)]]
    )

    def fake_run(command, cwd):
        out = Path(command[command.index("--trainer.callbacks.output_dir") + 1])
        write_result(out, next(reruns))
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(spot.subprocess, "run", fake_run)
    assert spot.main([str(result), "--out", str(tmp_path / "one"), "--max-new-tokens", "3"]) == 0
    summary = json.loads((tmp_path / "one" / "spot_check.json").read_text())
    assert (summary["records"], summary["agree"], summary["command"][0]) == (2, 2, "python")
    assert spot.main([str(result), "--out", str(tmp_path / "two"), "--max-new-tokens", "3"]) == 1
    assert "b: generation: committed 'He he', re-run 'It'" in capsys.readouterr().out
    monkeypatch.setattr(spot.subprocess, "run", lambda command, cwd: SimpleNamespace(returncode=1))
    assert spot.main([str(result), "--out", str(tmp_path / "three")]) == spot.RERUN_FAILED


def test_a_biasbios_check_leaves_its_slice_scores_out(tmp_path, monkeypatch, capsys):
    biasbios = {"benchmark": "biasbios", "example_subset": None}
    command = ["seka", "predict", "-c", "configs/eval/biasbios.yaml", "--data.example_subset", "null",
               "--trainer.callbacks.output_dir", "docs/results/biasbios/gemma3-270m/none"]  # fmt: skip
    bios = {"uid": "a", "id": "a", "generation": "An accountant.", "scores": {"top1_accuracy": 0.0}}
    result = tmp_path / "result"
    write_result(result, [bios], data=biasbios)
    (result / "metric_result.json").write_text(
        json.dumps({"provenance": {"command": command}, "config": {"data": biasbios}})
    )
    ran = []

    def fake_run(command, cwd):
        ran.append(command)
        out = Path(command[command.index("--trainer.callbacks.output_dir") + 1])
        write_result(out, [bios | {"scores": {"top1_accuracy": 1.0}}], data=biasbios)
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(spot.subprocess, "run", fake_run)
    assert spot.main([str(result), "--out", str(tmp_path / "one")]) == 0
    assert "--data.split" not in ran[0] and ran[0][ran[0].index("--data.example_subset") + 1] == "0:2"
    assert "depend on the whole slice and are not compared" in capsys.readouterr().out
    summary = json.loads((tmp_path / "one" / "spot_check.json").read_text())
    assert summary["scores_not_compared"] == ["top", "consistency"] and summary["agree"] == 1


def test_an_existing_output_folder_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    result = tmp_path / "result"
    write_result(result, [record("a", "x", 0.0)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(spot.subprocess, "run", lambda *a, **k: pytest.fail("nothing may run"))
    with pytest.raises(SystemExit) as exit_info:
        spot.main([str(result), "--out", str(out)])
    assert exit_info.value.code == 2
    assert "exists; pick a new folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_against_compares_every_record_with_an_existing_run_and_reruns_nothing(tmp_path, monkeypatch, capsys):
    result, longer = tmp_path / "result", tmp_path / "longer"
    write_result(result, [record("a", "She is a nurse.", 0.5), record("b", "He he", 0.0)])
    monkeypatch.setattr(spot.subprocess, "run", lambda *a, **k: pytest.fail("--against re-runs nothing"))
    write_result(longer, [record("c", "x", 1.0), record("b", "He he", 0.0), record("a", "She is a nurse.", 0.5)])
    assert spot.main([str(result), "--against", str(longer), "--out", str(tmp_path / "one")]) == 0
    summary = json.loads((tmp_path / "one" / "spot_check.json").read_text())
    assert (summary["records"], summary["agree"], summary["against_records"]) == (2, 2, 3)
    # a different score, and a record the other run lacks, each disagree
    write_result(tmp_path / "other", [record("a", "She is a nurse.", 0.25)])
    assert spot.main([str(result), "--against", str(tmp_path / "other"), "--out", str(tmp_path / "two")]) == 1
    summary = json.loads((tmp_path / "two" / "spot_check.json").read_text())
    assert (summary["records"], summary["agree"], summary["fraction"]) == (2, 0, 0.0)
    assert [d["uid"] for d in summary["differences"]] == ["b", "a"]  # missing records first
    assert "not in --against's run" in summary["differences"][0]["difference"]
    assert "0 of 2 records of" in capsys.readouterr().out


def test_a_record_missing_from_the_other_run_counts_against_the_agreement(tmp_path, capsys):
    result, partial = tmp_path / "result", tmp_path / "partial"
    write_result(result, [record("a", "She is a nurse.", 0.5), record("b", "He he", 0.0)])
    write_result(partial, [record("a", "She is a nurse.", 0.5)])
    assert spot.main([str(result), "--against", str(partial), "--out", str(tmp_path / "one")]) == 1
    summary = json.loads((tmp_path / "one" / "spot_check.json").read_text())
    assert (summary["agree"], summary["missing"], summary["fraction"]) == (1, 1, 0.5)
    assert summary["differences"] == [{"uid": "b", "difference": "not in --against's run"}]
    args = [str(result), "--against", str(partial), "--out", str(tmp_path / "two"), "--min-agreement", "0.5"]
    assert spot.main(args) == 0


def test_against_refuses_a_run_of_another_method(tmp_path, capsys):
    result, other = tmp_path / "result", tmp_path / "other"
    write_result(result, [record("a", "x", 0.0)])
    write_result(other, [record("a", "x", 0.0)], method="key_scaling")
    with pytest.raises(SystemExit) as exit_info:
        spot.main([str(result), "--against", str(other), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "('pronchange', 'm', 'key_scaling'), the result ('pronchange', 'm', 'seka')" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", [["--records", "4"], ["--accelerator", "gpu"], ["--set", "a=b"]])
def test_against_refuses_the_options_of_a_rerun(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        spot.main(["r", "--against", "x", *option, "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "drop --records" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_missing_run_is_named_without_a_traceback(tmp_path, capsys):
    result = tmp_path / "result"
    write_result(result, [record("a", "x", 0.0)])
    with pytest.raises(SystemExit) as exit_info:
        spot.main([str(result), "--against", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "absent/predictions.jsonl.gz does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
