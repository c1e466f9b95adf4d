"""BankSummary: after `seka fit`, the bank's heads kept, P+ ranks and spectrum per layer, logged and printed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from seka_lightning.bank import ProjectionBank
from seka_lightning.cli import run_lightning
from seka_lightning.lit.callbacks import bank_summary

REPO = Path(__file__).resolve().parents[2]


def test_fit_logs_the_bank_summary_per_layer(tiny_model_dir, qa_file, tmp_path, caplog):
    out = tmp_path / "bank.safetensors"
    with caplog.at_level("INFO"):
        run_lightning(
            [
                "fit",
                "-c",
                str(REPO / "configs" / "build" / "synthetic_qa.yaml"),
                "--model.pretrained",
                str(tiny_model_dir),
                "--model.output",
                str(out),
                "--model.min_diff",
                "0.5",
                "--data.path",
                str(qa_file),
                "--data.max_samples",
                "8",
                "--data.batch_size",
                "4",
                "--trainer.accelerator",
                "cpu",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.logger.save_dir",
                str(tmp_path / "logs"),
                "--trainer.callbacks.dirpath",
                str(tmp_path / "ckpt"),
            ]
        )
    bank = ProjectionBank.load(out)
    # independent references: the head filter of SPEC §3 and the numerical rank of each projector, in float64
    kept = (bank.diff >= 0.5).sum(-1)
    ranks = torch.linalg.matrix_rank(bank.pos.double(), atol=1e-3, hermitian=True)  # [L, H]; eigenvalues 0 or 1
    (metrics_file,) = (tmp_path / "logs").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    per_layer = {int(r["step"]): r for r in rows if r.get("bank/heads_kept")}
    assert sorted(per_layer) == bank.layers
    for index, layer in enumerate(bank.layers):
        assert int(float(per_layer[layer]["bank/heads_kept"])) == int(kept[index])
        heads = (bank.diff[index] >= 0.5).nonzero().flatten()
        expected_rank = ranks[index, heads].double().mean().item() if len(heads) else 0.0
        assert float(per_layer[layer]["bank/rank_mean"]) == pytest.approx(expected_rank)
    assert any(r.get("examples_per_s") for r in rows)  # throughput is logged at every batch
    assert f"heads kept per layer: {' '.join(str(int(k)) for k in kept)}" in caplog.text
    assert f"next: seka predict -c configs/predict/highlight.yaml --model.pretrained {tiny_model_dir}" in caplog.text


def test_summary_of_a_hand_made_bank():
    eye = torch.eye(4)
    pos = torch.zeros(2, 2, 4, 4)
    pos[0, 0] = eye[:, :1] @ eye[:, :1].T  # rank 1
    pos[0, 1] = eye[:, :3] @ eye[:, :3].T  # rank 3
    pos[1, 1] = eye[:, :2] @ eye[:, :2].T  # rank 2; head (1, 0) skipped
    s = torch.tensor([[[4.0, 2, 1, 1], [1, 1, 1, 1]], [[0, 0, 0, 0], [6, 2, 0, 0]]])
    summary = bank_summary(ProjectionBank(layers=[3, 5], pos=pos, s_pos=s))
    assert summary["heads_kept"].tolist() == [2, 1]
    assert summary["rank_mean"].tolist() == [2.0, 2.0]
    assert summary["top_singular_share"].tolist() == pytest.approx([(0.5 + 0.25) / 2, 0.75])
