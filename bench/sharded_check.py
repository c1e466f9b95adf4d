"""A model sharded over two GPUs with ``device_map`` builds the same bank and scores the same as one placed whole.

    python -m bench.sharded_check --model embedded:smollm2-135m --shared ../shared/data --out DIR

Builds a SEKA bank with ``ProjectionBuilder`` (``--trainer.devices 1``) twice, once with the model on ``cuda:0`` and
once split layer-wise over ``cuda:0`` and ``cuda:1`` (``device_map``), then scores CounterFact 5000:5100 with
``BenchmarkEvaluator`` and SEKA both ways. Writes ``DIR/sharded.json`` with the largest differences and where the
shards lived. Needs two GPUs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

from seka_lightning.bank import ProjectionBank
from seka_lightning.benchmarks import CounterFactDataModule
from seka_lightning.data.synthetic_qa import SyntheticQADataModule
from seka_lightning.files import write_json
from seka_lightning.lit.builder import ProjectionBuilder, stats_path_for
from seka_lightning.lit.evaluator import BenchmarkEvaluator
from seka_lightning.lit.writers import BenchmarkWriter
from seka_lightning.methods import SekaMethod
from seka_lightning.models import load_model
from seka_lightning.stats import KeySums


def trainer(**kwargs) -> L.Trainer:
    """A quiet one-device Trainer (the checks compare numbers, not logs)."""
    return L.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def two_gpu_map(pretrained: str) -> dict[str, int]:
    """Layers 0..n/2-1, the embeddings and the (tied) head on GPU 0; the other layers and the final norm on GPU 1."""
    model, _ = load_model(pretrained)
    inner = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is inner)
    n = len(inner.layers)
    device_map = {f"{prefix}.layers.{i}": int(i >= n // 2) for i in range(n)}
    for name, _ in inner.named_children():
        if name != "layers":
            device_map[f"{prefix}.{name}"] = 1 if name == "norm" else 0
    for name, _ in model.named_children():
        if name != prefix.split(".")[0]:
            device_map[name] = 0
    return device_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--out", default="outputs/sharded")
    parser.add_argument("--pairs", type=int, default=300)
    args = parser.parse_args()
    out = Path(args.out)
    device_map = two_gpu_map(args.model)
    runs = {}
    for name, dm in (("placed", None), ("sharded", device_map)):
        started = time.perf_counter()
        bank_path = out / name / "bank.safetensors"
        builder = ProjectionBuilder(args.model, min_diff=0.0, output=str(bank_path), device_map=dm)
        devices = sorted({str(p.device) for p in builder.model.parameters()})
        trainer(max_epochs=1).fit(
            builder, datamodule=SyntheticQADataModule("data/synthetic_qa.jsonl", batch_size=32, max_samples=args.pairs)
        )
        build_s = time.perf_counter() - started
        evaluator = BenchmarkEvaluator(
            args.model, SekaMethod(str(bank_path), gain_pos=2.0, layers="last20"), device_map=dm
        )
        trainer(callbacks=[BenchmarkWriter(str(out / name / "counterfact"))]).predict(
            evaluator,
            datamodule=CounterFactDataModule(f"{args.shared}/counterfact", example_subset="5000:5100", batch_size=50),
            return_predictions=False,
        )
        metrics = json.loads((out / name / "counterfact" / "metric_result.json").read_text())["metrics"]
        runs[name] = {"parameter_devices": devices, "build_s": build_s, "counterfact_5000_5100_seka": metrics}
    sums = {name: KeySums.load(stats_path_for(out / name / "bank.safetensors"))[0] for name in runs}
    banks = {name: ProjectionBank.load(out / name / "bank.safetensors") for name in runs}
    a0 = sums["placed"].a0
    result = {
        "model": args.model,
        "pairs": args.pairs,
        "device_map": device_map,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "runs": runs,
        "max_rel_diff_a0": float((sums["sharded"].a0 - a0).abs().max() / a0.abs().max()),
        "same_count": bool(torch.equal(sums["placed"].count, sums["sharded"].count)),
        "max_abs_diff_pos": float((banks["sharded"].pos - banks["placed"].pos).abs().max()),
        "metrics_equal": runs["placed"]["counterfact_5000_5100_seka"] == runs["sharded"]["counterfact_5000_5100_seka"],
    }
    write_json(out / "sharded.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
