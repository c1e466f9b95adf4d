"""Why does each rank of a 2-GPU `seka fit` stream fewer triplets/s than one GPU alone? One process per GPU runs the
streaming builder (no Lightning, no DDP) in phases separated by file barriers: GPU 0 alone, both GPUs at once, and
the same two with tokenizer parallelism off and 4 torch threads. Each phase reports triplets/s and, over a short
profiled stretch, the fraction of wall time the GPU spent in kernels.

    python -m bench.contention --gpu 0 --out DIR & python -m bench.contention --gpu 1 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.building import streaming_build
from bench.report import synchronize
from bench.shapes import get_shape, offline_tokenizer, random_model
from seka_lightning.data.triplets import iter_triplets, read_pairs
from seka_lightning.families import resolve_layout

# (name, GPUs taking part, tokenizer parallelism, torch threads)
PHASES = [
    ("alone", (0,), True, None),
    ("both", (0, 1), True, None),
    ("both_quiet_cpu", (0, 1), False, 4),
    ("alone_quiet_cpu", (0,), False, 4),
]


def barrier(out: Path, name: str, gpu: int, world: int = 2) -> None:
    (out / f".{name}.{gpu}").touch()
    while sum((out / f".{name}.{g}").exists() for g in range(world)) < world:
        time.sleep(0.05)


def busy_fraction(run, device: torch.device) -> float:
    """Kernel time over wall time while ``run()`` executes (torch.profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        synchronize(device)
        wall = time.perf_counter() - start
    kernels = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6  # CPU op time on a CPU
    return kernels / wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--triplets", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shape", default="qwen3-8b", help="tiny: a CPU smoke run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", args.gpu) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    triplets = list(iter_triplets(read_pairs("data/synthetic_qa.jsonl")))
    texts = [t for triplet in triplets for t in triplet.texts()]
    shape = get_shape(args.shape)
    tokenizer = offline_tokenizer(texts, vocab_size=min(8192, shape.vocab_size))
    model = random_model(shape, device=device, dtype=torch.bfloat16, seed=0)
    layout = resolve_layout(model)
    streaming_build(model, tokenizer, layout, triplets[:64], batch_size=args.batch_size, device=device)  # warm-up
    records = []
    for name, gpus, tokenizer_parallel, threads in PHASES:
        barrier(out, name, args.gpu)
        if args.gpu not in gpus:
            barrier(out, name + "_done", args.gpu)
            continue
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if tokenizer_parallel else "false"
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        synchronize(device)
        start = time.perf_counter()
        streaming_build(model, tokenizer, layout, triplets[: args.triplets], batch_size=args.batch_size, device=device)
        synchronize(device)
        seconds = time.perf_counter() - start
        busy = busy_fraction(
            lambda: streaming_build(
                model, tokenizer, layout, triplets[:256], batch_size=args.batch_size, device=device
            ),
            device,
        )
        torch.set_num_threads(before)
        records.append(
            {"phase": name, "gpu": args.gpu, "gpus_running": list(gpus), "tokenizers_parallelism": tokenizer_parallel,
             "torch_threads": threads or before, "triplets": args.triplets, "seconds": seconds,
             "examples_per_s": args.triplets / seconds, "gpu_busy_fraction": busy}
        )  # fmt: skip
        print(json.dumps(records[-1]), flush=True)
        barrier(out, name + "_done", args.gpu)
    (out / f"contention.gpu{args.gpu}.json").write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
