"""AdaSekaSelector: `seka validate` routing statistics; AdaSekaMethod as an evaluation-harness method."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from seka_lightning.adaseka.experts import ExpertSet
from seka_lightning.adaseka.hooks import RoutingRecord, adaptive_steer
from seka_lightning.adaseka.method import AdaSekaMethod
from seka_lightning.adaseka.selector import AdaSekaSelector
from seka_lightning.adaseka.sources import HighlightedQADataModule
from seka_lightning.cli import run_lightning
from seka_lightning.highlight import encode_spans
from seka_lightning.methods import HighlightMethod

REPO = Path(__file__).resolve().parents[2]


def save_experts(expert_banks, folder: Path) -> Path:
    for name, bank in expert_banks.items():
        bank.save(folder / f"{name}.safetensors")
    config = folder / "experts.json"
    config.write_text(json.dumps({name: str(folder / f"{name}.safetensors") for name in expert_banks}))
    return config


def test_validate_reports_routing_statistics(tiny_model_dir, tokenizer, qa_file, expert_banks, tmp_path):
    config = save_experts(expert_banks, tmp_path)
    out = tmp_path / "routing.json"
    run_lightning(
        [
            "validate", "-c", str(REPO / "configs" / "adaseka" / "validate" / "routing.yaml"),
            "--model.method.experts", str(config), "--model.pretrained", str(tiny_model_dir),
            "--model.stats_output", str(out), "--model.method.gain", "2.0",
            "--data.path", str(qa_file), "--data.max_samples", "5", "--data.batch_size", "4",
            "--trainer.accelerator", "cpu",
        ]
    )  # fmt: skip
    stats = json.loads(out.read_text())
    assert stats["experts"] == ["alpha", "beta", "gamma"] and stats["rows"] == 10
    win = torch.tensor(stats["win_rate_per_layer_head"], dtype=torch.float64)  # [L, H, M]
    torch.testing.assert_close(win.sum(-1), torch.ones(3, 2, dtype=torch.float64))
    assert all(0 <= e <= math.log(3) + 1e-9 for e in stats["entropy_per_layer"])
    # the same prompts routed one by one give the same winners
    data = HighlightedQADataModule(str(qa_file), max_samples=5)
    data.setup("validate")
    model = AdaSekaSelector(AdaSekaMethod(str(config)), pretrained=str(tiny_model_dir))
    model.setup(stage="validate")
    wins = torch.zeros(3, 2, 3, dtype=torch.float64)
    for example in data.examples:
        enc = encode_spans(tokenizer, [example["text"]], [example["spans"]])
        record = RoutingRecord()
        with adaptive_steer(model.model, model.method.expert_set, enc, gain=2.0, record=record):
            model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        for layer in range(3):
            wins[layer] += torch.nn.functional.one_hot(record.coefficients[layer][0].argmax(-1), 3)
    torch.testing.assert_close(win, wins / 10)


def test_harness_method_equals_the_context_manager(tiny_model, tokenizer, expert_banks, tmp_path):
    config = save_experts(expert_banks, tmp_path)
    method = AdaSekaMethod(str(config), gain=3.0, layers="last2", top_k=4)
    method.setup(tiny_model, tokenizer)
    text = "The keepers carry silver lanterns every night."
    start = text.index("silver")
    enc = encode_spans(tokenizer, [text], [[(start, start + len("silver lanterns"))]])
    logits = method.prompt_logits(tiny_model, enc)
    with adaptive_steer(tiny_model, ExpertSet.load(str(config)), enc, gain=3.0, layers="last2", top_k=4):
        expected = HighlightMethod().prompt_logits(tiny_model, enc)
    torch.testing.assert_close(logits, expected)
    assert (logits - HighlightMethod().prompt_logits(tiny_model, enc)).abs().max() > 1e-4
    assert method.describe() == {
        "method": "adaseka", "experts": str(config), "top_k": 4, "gain": 3.0,
        "layers": "last2", "layer_mapping": "by_id", "compat": [],
    }  # fmt: skip
    assert sum(len(m._forward_hooks) for m in tiny_model.modules()) == 0
