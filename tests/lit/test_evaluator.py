"""`seka predict` on a benchmark: metric_result.json equals a direct computation, on one or two processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seka_lightning import ProjectionBank, load_model
from seka_lightning.cli import run_lightning
from seka_lightning.evidence import read_predictions

CASES = [
    (
        0,
        "Danielle Darrieux",
        "The mother tongue of {} is",
        "English",
        "French",
        ["{} is a native speaker of", "{} grew up speaking"],
    ),
    (1, "Toyota", "{} is based in", "Germany", "Japan", ["The headquarters of {} are in"]),
    (
        2,
        "the keepers",
        "What {} carry is",
        "silver",
        "stone",
        ["People say {} carry", "It is known that {} carry", "Everyone knows {} hold"],
    ),
    (3, "Rome", "{} is the capital of", "France", "Italy", ["The city of {} is the capital of"]),
]


def predict_args(model_dir: Path, data: Path, out: Path, method: list[str], devices: int = 1) -> list[str]:
    return [
        "predict",
        "--model",
        "seka_lightning.lit.evaluator.BenchmarkEvaluator",
        "--model.pretrained",
        str(model_dir),
        *method,
        "--data",
        "seka_lightning.benchmarks.CounterFactDataModule",
        "--data.path",
        str(data),
        "--data.split",
        "all",
        "--data.batch_size",
        "3",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(devices),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+",
        "seka_lightning.lit.writers.BenchmarkWriter",
        "--trainer.callbacks.output_dir",
        str(out),
    ]


def best(logp: torch.Tensor, tok, target: str) -> float:
    forms = {target.lower(), target[0].upper() + target[1:], target.upper()}
    return max(logp[tok.encode(f, add_special_tokens=False)[0]].item() for f in forms)


def direct_counterfact(model_dir: Path) -> tuple[float, float]:
    """Each prompt alone, unpadded; first token of each casing; mean over cases of the fraction won."""
    model, tok = load_model(str(model_dir))
    efficacy, paraphrase = [], []
    for _, subj, tpl, new, old, paras in CASES:
        ctx_new, ctx_old = tpl.format(subj) + " " + new, tpl.format(subj) + " " + old
        wins = []
        for query in (p.format(subj) for p in paras):
            text = "Previously " + ctx_old + ". " + "Currently " + ctx_new.rstrip(". ") + ". " + query
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)

            wins.append(float(best(logp, tok, new) > best(logp, tok, old)))
        efficacy.append(wins[0])
        paraphrase.append(sum(wins) / len(wins))
    return sum(efficacy) / len(efficacy), sum(paraphrase) / len(paraphrase)


def test_counterfact_metrics_match_a_direct_computation(tiny_model_dir, counterfact_file, tmp_path):
    data = counterfact_file(CASES)
    run_lightning(
        predict_args(
            tiny_model_dir, data, tmp_path / "none", ["--model.method", "seka_lightning.methods.HighlightMethod"]
        )
    )
    result = json.loads((tmp_path / "none" / "metric_result.json").read_text())
    efficacy, paraphrase = direct_counterfact(tiny_model_dir)
    assert abs(result["metrics"]["efficacy_score"] - efficacy) < 1e-9
    assert abs(result["metrics"]["paraphrase_score"] - paraphrase) < 1e-9
    assert result["counts"]["examples"] == 4 + 7 and result["method"] == {"method": "none"}
    records = read_predictions(tmp_path / "none" / "predictions.jsonl.gz")
    assert len(records) == 11 and records[0]["highlights"] == ["is English"]


def test_seka_method_two_process_and_sharded_predict_give_the_same_metrics(tiny_model_dir, counterfact_file, tmp_path):
    data = counterfact_file(CASES)
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 2, 16, 16, generator=gen))
    ProjectionBank(layers=[0, 1, 2], pos=q[..., :4] @ q[..., :4].transpose(-1, -2), metadata={"num_layers": 3}).save(
        tmp_path / "b.safetensors"
    )
    method = [
        "--model.method",
        "seka_lightning.methods.SekaMethod",
        "--model.method.bank",
        str(tmp_path / "b.safetensors"),
        "--model.method.gain_pos",
        "5.0",
    ]
    run_lightning(predict_args(tiny_model_dir, data, tmp_path / "one", method))
    run_lightning(
        [*predict_args(tiny_model_dir, data, tmp_path / "sharded", method), "--model.device_map", '{"": "cpu"}']
    )
    cmd = [
        sys.executable,
        "-m",
        "seka_lightning.cli",
        *predict_args(tiny_model_dir, data, tmp_path / "two", method, devices=2),
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env={**os.environ}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metric_result.json").read_text())
    two = json.loads((tmp_path / "two" / "metric_result.json").read_text())
    sharded = json.loads((tmp_path / "sharded" / "metric_result.json").read_text())
    assert sharded["metrics"] == one["metrics"] and sharded["config"]["device_map"] == {"": "cpu"}
    for key, value in one["metrics"].items():
        assert abs(two["metrics"][key] - value) < 1e-6, key
    assert two["counts"]["world_size"] == 2 and one["method"]["method"] == "seka" and one["method"]["gain_pos"] == 5.0
    lines = read_predictions(tmp_path / "two" / "predictions.jsonl.gz")
    assert len(lines) == 11 and not list((tmp_path / "two").glob("*.rank*"))


def test_record_whose_highlight_covers_no_whole_token_is_skipped_and_counted(
    tiny_model_dir, counterfact_file, tmp_path, caplog
):
    # "lanter" is a prefix of the new target, so the attribute is the "n" inside the token " lantern"
    broken = (9, "lanter", "What {} carry is", "lantern", "stone", ["People say {} carry"])
    data = counterfact_file([*CASES, broken])
    with caplog.at_level("WARNING"):
        run_lightning(
            predict_args(
                tiny_model_dir, data, tmp_path / "out", ["--model.method", "seka_lightning.methods.HighlightMethod"]
            )
        )
    result = json.loads((tmp_path / "out" / "metric_result.json").read_text())
    assert result["counts"]["skipped_highlight"] == 2 and result["counts"]["examples"] == 11 + 2
    assert "counterfact record 9 skipped: its highlight cannot be encoded" in caplog.text
    efficacy, paraphrase = direct_counterfact(tiny_model_dir)  # the four intact cases
    assert abs(result["metrics"]["efficacy_score"] - efficacy) < 1e-9
    assert abs(result["metrics"]["paraphrase_score"] - paraphrase) < 1e-9
    records = read_predictions(tmp_path / "out" / "predictions.jsonl.gz")
    assert sorted({r["id"] for r in records}) == [0, 1, 2, 3]
    assert all(
        set(r["scores"]) in ({"efficacy_score", "efficacy_magnitude"}, {"paraphrase_score", "paraphrase_magnitude"})
        for r in records
    )


def test_scoring_error_names_the_benchmark_record(tiny_model_dir, tmp_path):
    (tmp_path / "bios").mkdir()
    rows = "hard_text,profession,gender\nShe audits firms in Lyon.,accountant,F\nHe.,accountant,M\n"
    (tmp_path / "bios" / "csvs_Bios_samples_accountant_complete.csv").write_text(rows)
    args = [
        "predict",
        "--model",
        "seka_lightning.lit.evaluator.BenchmarkEvaluator",
        "--model.pretrained",
        str(tiny_model_dir),
        "--model.method",
        "seka_lightning.methods.HighlightMethod",
        "--data",
        "seka_lightning.benchmarks.PronChangeDataModule",
        "--data.path",
        str(tmp_path / "bios"),
        "--data.split",
        "all",
        "--data.max_new_tokens",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    with pytest.raises(
        ValueError,
        match=re.escape("pronchange record 'csvs_Bios_samples_accountant_complete/1': original text 'He.' has no"),
    ):
        run_lightning(args)
