"""`seka predict`: unsteered and steered continuations side by side, equal to direct generate calls."""

from __future__ import annotations

import json

import torch

from seka_lightning import ProjectionBank, encode_highlighted, load_model, steer
from seka_lightning.cli import run_lightning

PROMPTS = ["The keepers carry **silver lanterns** to the harbor.", "Where is **the golden tower** now?", "plain prompt"]


def test_predict_writes_side_by_side_generations(tiny_model_dir, tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 2, 16, 16, generator=gen))
    bank = ProjectionBank(layers=[0, 1, 2], pos=q[..., :4] @ q[..., :4].transpose(-1, -2), metadata={"num_layers": 3})
    bank.save(tmp_path / "bank.safetensors")
    out = tmp_path / "pred.jsonl"
    run_lightning(
        [
            "predict",
            "--model",
            "seka_lightning.lit.generation.HighlightGenerator",
            "--model.pretrained",
            str(tiny_model_dir),
            "--model.method",
            "seka_lightning.methods.SekaMethod",
            "--model.method.bank",
            str(tmp_path / "bank.safetensors"),
            "--model.method.gain_pos",
            "3.0",
            "--model.max_new_tokens",
            "5",
            "--data",
            "seka_lightning.data.prompts.PromptDataModule",
            "--data.prompts",
            json.dumps(PROMPTS),
            "--data.batch_size",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks+",
            "seka_lightning.lit.writers.ComparisonWriter",
            "--trainer.callbacks.output",
            str(out),
        ]
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS and [r["index"] for r in records] == [0, 1, 2]
    assert "unsteered" in capsys.readouterr().out  # the table was printed

    model, tokenizer = load_model(str(tiny_model_dir))
    for record in records:
        enc = encode_highlighted(tokenizer, [record["prompt"]])
        kwargs = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "max_new_tokens": 5,
            "do_sample": False,
        }
        plain = tokenizer.decode(model.generate(**kwargs)[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        with steer(model, bank, enc["highlight_mask"], gain_pos=3.0):
            steered = tokenizer.decode(
                model.generate(**kwargs)[0, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
        assert record["unsteered"] == plain and record["steered"] == steered
    assert records[2]["highlighted_tokens"] == 0 and records[2]["steered"] == records[2]["unsteered"]


def test_merged_predictions_survive_unicode_line_separators(tmp_path):
    """Generated text can hold U+2028 / U+0085, which str.splitlines() treats as line breaks."""
    from types import SimpleNamespace

    from seka_lightning.lit.writers import merge_rank_parts

    trainer = SimpleNamespace(
        global_rank=0, world_size=1, is_global_zero=True, strategy=SimpleNamespace(barrier=lambda name: None)
    )
    records = [{"uid": "b", "generation": "one\u2028two\x85three"}, {"uid": "a", "generation": "plain"}]
    merged = merge_rank_parts(trainer, [records], tmp_path / "out.jsonl", key="uid")
    assert merged == sorted(records, key=lambda r: r["uid"])
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().split("\n") if line] == merged
