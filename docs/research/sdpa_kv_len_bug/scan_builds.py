"""Which forward passes of a SEKA bank build met PyTorch's mem-efficient SDPA bug (see ``scan_batches.py``).

A build (``seka fit`` with ``ProjectionBuilder``) runs each batch's neutral, positive and negative texts in one pass of
right-padded rows, without an attention mask for a causal model, so on CUDA in float32 with SDPA a pass is exposed when
its width (the longest kept text) is 1 more than a multiple of 32 and the model has one key/value head. Builds with
``attention_ratio`` (every AdaSEKA expert config) run eager attention, not SDPA, and are never exposed; packed builds
(``pack_tokens``) are not scanned here. With ``--pasta MODEL``, the PASTA head profile of ``scripts/results/run.py``
(``seka pasta-profile``: 64 synthetic QA pairs, 256 left-padded prompts, batches of 64, SDPA with a padding mask and
an additive bias) is scanned the same way: a batch is exposed when its padded width is 32 k + 1.

This rebuilds the passes of a build config exactly as ``seka fit`` forms them (its DataModule's batches and the
builder's own text filter, ``collect_triplet_keys``, with the model's forward replaced by a recorder of each pass's
width) and prints the exposed ones. Run from the repository root:

    PYTHONPATH=src python docs/research/sdpa_kv_len_bug/scan_builds.py configs/build/gemma3-270m.yaml \\
        --out docs/research/sdpa_kv_len_bug/exposed_builds.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from seka_lightning import capture
from seka_lightning.baselines.pasta_profile import encode_examples, profile_examples
from seka_lightning.cli import run_lightning
from seka_lightning.data.triplets import read_pairs
from seka_lightning.files import write_json
from seka_lightning.models import load_model


def scan(config: Path) -> dict:
    cli = run_lightning(["-c", str(config), "--trainer.accelerator", "cpu"], run=False)
    builder, data = cli.model, cli.datamodule
    hp = builder.hparams
    if hp.attention_ratio is not None:
        return {"config": str(config), "scanned": False, "reason": "attention_ratio: eager attention, no SDPA"}
    if hp.pack_tokens is not None:
        return {"config": str(config), "scanned": False, "reason": "pack_tokens: packed rows, not scanned here"}
    widths: list[int] = []

    def record(model, layout, layer_ids, input_ids, attention_mask, rows, position_ids=None):
        widths.append(int(input_ids.shape[1]))
        return torch.zeros(len(layer_ids), len(rows), 1, 1)

    data.setup("fit")
    original = capture.capture_keys
    capture.capture_keys = record
    try:
        for batch in data.train_dataloader():
            before = len(widths)
            capture.collect_triplet_keys(
                None,
                builder.tokenizer,
                None,
                [0],
                batch,
                device=torch.device("cpu"),
                positive_only=hp.positive_only,
                pack_tokens=None,
            )
            if len(widths) == before:
                widths.append(0)  # no triplet of the batch kept: no pass
    finally:
        capture.capture_keys = original
    exposed = [{"batch": i, "width": w} for i, w in enumerate(widths) if w and w % 32 == 1]
    return {
        "config": str(config),
        "scanned": True,
        "batch_size": data.batch_size,
        "passes": sum(1 for w in widths if w),
        "widths": widths,
        "exposed_passes": exposed,
    }


def scan_pasta_profile(
    pretrained: str, *, add_special_tokens: bool, batch_size: int = 64, max_samples: int = 64
) -> dict:
    """The padded widths of ``seka pasta-profile``'s batches with the runner's settings."""
    _, tokenizer = load_model(pretrained)
    examples = profile_examples(read_pairs("data/synthetic_qa.jsonl", max_samples=max_samples))
    widths = [
        int(
            encode_examples(tokenizer, examples[i : i + batch_size], add_special_tokens=add_special_tokens)[0][
                "input_ids"
            ].shape[1]
        )
        for i in range(0, len(examples), batch_size)
    ]
    return {
        "pasta_profile": pretrained,
        "add_special_tokens": add_special_tokens,
        "batch_size": batch_size,
        "max_samples": max_samples,
        "widths": widths,
        "exposed_passes": [{"batch": i, "width": w} for i, w in enumerate(widths) if w % 32 == 1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path)
    parser.add_argument("--pasta", action="append", default=[], metavar="MODEL", help="e.g. embedded:gemma3-270m")
    parser.add_argument("--pasta-special-tokens", action="store_true", help="the profile adds BOS (Gemma-3: yes)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    found = []
    for config in args.configs:
        report = scan(config)
        found.append(report)
        if report["scanned"]:
            print(f"{config}: {report['passes']} passes, exposed: {report['exposed_passes'] or 'none'}", flush=True)
        else:
            print(f"{config}: not scanned ({report['reason']})", flush=True)
    for model in args.pasta:
        report = scan_pasta_profile(model, add_special_tokens=args.pasta_special_tokens)
        found.append(report)
        print(f"PASTA profile of {model}: widths {report['widths']}, exposed: {report['exposed_passes'] or 'none'}")
    if args.out:
        write_json(args.out, found)


if __name__ == "__main__":
    sys.exit(main())
