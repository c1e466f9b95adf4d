"""Which batches of a committed result met PyTorch's mem-efficient SDPA bug (pytorch/pytorch#191937).

On CUDA, torch's memory-efficient SDPA kernel returns wrong attention, silently, when the keys and values are a
stride-0 broadcast (transformers' ``repeat_kv`` of a model with ONE key/value head, such as Gemma-3-270M, gives a
view, not a copy) and the key length is 1 more than a multiple of 32; fixed upstream in August 2026 (commit
4ebacbf), after the torch 2.11 of our GPU image. A prompt pass attends over the batch's padded prompt length, so a
batch is exposed when that length is = 1 (mod 32). The static-cache decoder's full-attention layers attend over the
cache (a multiple of 64 slots) and its sliding-window layers over the prompt only when it is longer than the window
(512 for Gemma-3), so with ``static_decoding`` a batch is exposed only when both hold. Decode steps are not exposed
(one query: transformers' ``pack_gqa`` or this project's grouped decode attention, no broadcast keys).

For each result folder: rebuild its batches exactly as ``seka predict`` formed them (its recorded command's
``--data.*`` options over its configs), encode each prompt as every method sees it, and print the batches whose
padded length is exposed, with their record ids. Writes JSON with ``--out``. Run from the repository root:

    PYTHONPATH=src python docs/research/sdpa_kv_len_bug/scan_batches.py docs/results/counterfact/gemma3-270m/none
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seka_lightning.benchmarks.evaluate import encode_examples
from seka_lightning.cli import run_lightning
from seka_lightning.files import write_json

WINDOW = 512  # Gemma-3's sliding window


def data_args(command: list[str]) -> list[str]:
    """The recorded command's eval and model configs and its ``--data.*`` options (nothing of the method)."""
    keep, i = [], 0
    args = command[2:]  # drop "seka predict"
    while i < len(args):
        flag = args[i]
        value = args[i + 1] if i + 1 < len(args) else None
        if flag == "-c" and value and ("configs/eval/" in value or "configs/models/" in value):
            keep += [flag, value]
        elif flag.startswith("--data.") and value is not None:
            keep += [flag, value]
        i += 2 if flag.startswith("-") and value is not None and not value.startswith("--") else 1
    return keep


_WIDTHS: dict[tuple, tuple[int, list[tuple[int, list[str]]]]] = {}


def batch_widths(args: list[str], encode: dict) -> tuple[int, list[tuple[int, list[str]]]]:
    """The batch size and each batch's (padded prompt length, record ids), as ``seka predict`` forms them."""
    key = (*args, *sorted(encode.items()))
    if key not in _WIDTHS:
        cli = run_lightning([*args, "--trainer.accelerator", "cpu"], run=False)
        tokenizer, data = cli.model.tokenizer, cli.datamodule
        widths = []
        for batch in data.batches():
            lengths = []
            for example in batch:
                try:
                    lengths.append(int(encode_examples(tokenizer, [example], **encode)["input_ids"].shape[1]))
                except ValueError:
                    pass  # skipped by the evaluator: its highlight covers no whole token
            widths.append((max(lengths), [e["uid"] for e in batch]))
        _WIDTHS[key] = (data.batch_size, widths)
    return _WIDTHS[key]


def scan(result: Path) -> dict:
    provenance = json.loads((result / "metric_result.json").read_text())["provenance"]
    command, config = provenance["command"], provenance["config"]
    static = config.get("static_decoding")
    encode = {"chat": bool(config.get("chat")), "add_special_tokens": bool(config.get("add_special_tokens"))}
    batch_size, batches = batch_widths(data_args(command), encode)
    exposed = [
        {"batch": index, "padded_length": width, "uids": uids}
        for index, (width, uids) in enumerate(batches)
        if width % 32 == 1 and (not static or width > WINDOW)
    ]
    return {
        "result": str(result),
        "command": command,
        "static_decoding": static,
        "batch_size": batch_size,
        "batches": len(batches),
        "exposed_batches": exposed,
        "exposed_examples": sum(len(b["uids"]) for b in exposed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    found = []
    for result in args.results:
        report = scan(result)
        found.append(report)
        print(
            f"{result}: batch size {report['batch_size']}, {report['batches']} batches, "
            f"{len(report['exposed_batches'])} exposed ({report['exposed_examples']} examples)"
            + "".join(
                f"\n  batch {b['batch']} (padded length {b['padded_length']}): {b['uids'][0]} .. {b['uids'][-1]}"
                for b in report["exposed_batches"]
            ),
            flush=True,
        )
    if args.out:
        write_json(args.out, found)


if __name__ == "__main__":
    sys.exit(main())
