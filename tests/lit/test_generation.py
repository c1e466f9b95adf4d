"""`seka predict`: unsteered and steered continuations side by side, equal to direct generate calls."""

from __future__ import annotations

import json

import pytest
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
    assert all(r["attention_on_highlight"] is None for r in records)  # measure_attention is off by default


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


def reference_attention(model, enc: dict, row: int) -> float:
    """Attention of the last token onto the highlight, mean over heads and layers, by plain float64 loops."""
    out = model(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        position_ids=(enc["attention_mask"].cumsum(-1) - 1).clamp(min=0),
        output_attentions=True,
    )
    keys = [k for k in range(enc["input_ids"].shape[1]) if enc["highlight_mask"][row, k]]
    per_layer = []
    for weights in out.attentions:
        heads = [sum(float(weights[row, h, -1, k]) for k in keys) for h in range(weights.shape[1])]
        per_layer.append(sum(heads) / len(heads))
    return sum(per_layer) / len(per_layer)


def test_predict_summary_and_attention_on_the_highlight(tiny_model_dir, tmp_path, caplog):
    import logging

    from seka_lightning.effect import highlight_effect

    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(3, 2, 16, 16, generator=gen))
    bank = ProjectionBank(layers=[0, 1, 2], pos=q[..., :4] @ q[..., :4].transpose(-1, -2), metadata={"num_layers": 3})
    bank.save(tmp_path / "bank.safetensors")
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "The keepers carry **silver lanterns** to the harbor.", "target": "silver", "original": "golden"},
        {"prompt": "Where is **the golden tower** now?", "target": "golden tower", "original": "stone"},
        {"prompt": "plain prompt", "target": "the", "original": "a"},
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "pred.jsonl"
    argv = ["predict", "--model", "seka_lightning.lit.generation.HighlightGenerator"]
    argv += [
        "--model.pretrained",
        str(tiny_model_dir),
        "--model.max_new_tokens",
        "4",
        "--model.measure_attention",
        "true",
    ]
    argv += ["--model.method", "seka_lightning.methods.SekaMethod"]
    argv += ["--model.method.bank", str(tmp_path / "bank.safetensors"), "--model.method.gain_pos", "3.0"]
    argv += ["--data", "seka_lightning.data.prompts.PromptDataModule", "--data.path", str(prompts)]
    argv += ["--data.batch_size", "2", "--trainer.accelerator", "cpu", "--trainer.logger", "false"]
    argv += [
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+",
        "seka_lightning.lit.writers.ComparisonWriter",
    ]
    argv += ["--trainer.callbacks.output", str(out), "--trainer.callbacks.show_table", "false"]
    with caplog.at_level(logging.INFO, logger="seka_lightning.cli"):
        run_lightning(argv)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: r[k] for k in ("prompt", "target", "original")} for r in records] == lines

    model, tokenizer = load_model(str(tiny_model_dir), attn_implementation="eager")
    for row, record in enumerate(records[:2]):
        enc = encode_highlighted(tokenizer, [line["prompt"] for line in lines[:2]])  # the batch the record was in
        with torch.no_grad():
            plain = reference_attention(model, enc, row)
            with steer(model, bank, enc["highlight_mask"], gain_pos=3.0):
                steered = reference_attention(model, enc, row)
        assert record["attention_on_highlight"] == pytest.approx({"unsteered": plain, "steered": steered}, rel=1e-5)
        assert steered != pytest.approx(plain, rel=1e-3)  # the bank moves the attention
    assert records[2]["attention_on_highlight"] is None  # no highlight: nothing to measure

    summary = json.loads((tmp_path / "pred.summary.json").read_text())
    expected = highlight_effect(records)
    assert summary == {**expected, "predictions": str(out), "line": summary["line"]}  # JSON keeps floats exactly
    assert summary["follows_highlight"]["n"] == 3 and summary["attention_on_highlight"]["n"] == 2
    assert caplog.messages[-1] == summary["line"] and summary["line"].startswith(
        "summary: answers follow the highlight"
    )
    assert f"summary in {tmp_path / 'pred.summary.json'}" in caplog.messages
