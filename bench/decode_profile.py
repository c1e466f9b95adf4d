"""Where a static_loop decode step spends its time: unsteered greedy generation through StaticGreedyDecoder on a
random-weight model (default: the Qwen3-8B shape in bf16, batch 1, 4096-token prompt, 60 new tokens), timed against
the decode step's hardware floor (weights and cached K/V over the copy bandwidth measured in the same run), then
profiled with torch.profiler (kernels, including those replayed from CUDA graphs). Writes decode_profile.json.

    python -m bench.decode_profile --out DIR [--batch-size 10] [--mode max-autotune] [--inductor KEY=VALUE ...]

``--mode`` and ``--inductor`` (``torch._inductor.config`` fields, e.g. ``coordinate_descent_tuning=true``, set for this
run only) try compile settings of the decode step; ``--shape tiny --device cpu --mode none`` runs every line on a CPU in
seconds.

``kernels_by_kind`` sorts kernels by name only: the decode step's own attention runs as an inductor-generated reduction
(``fused``) and a cuBLAS value matmul (``matmul``), so the ``attention`` kind holds the kernels named for attention
(the prompt pass's SDPA, softmaxes); docs/performance.md reads the decode attention from the kernel list.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.generation import ModelCost, generation_floor, measure_ceilings, random_prompts, resolve_device
from bench.report import synchronize
from bench.shapes import SHAPES, get_shape, random_model
from seka_lightning.fast_decode import StaticGreedyDecoder
from seka_lightning.methods import HighlightMethod

# kernel-name fragments of each kind of work (the first that matches names the kind: attention kernels are often
# CUTLASS or GEMM-like, so attention is matched first)
KINDS = (
    ("attention", ("attention", "flash", "fmha", "sdpa", "softmax")),
    ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "cublas", "mm_", "_mm", "::mm", "::bmm", "addmm", "matmul")),
    ("fused", ("triton", "fused")),
    ("copy", ("memcpy", "memset", "copy", "index_put", "scatter")),
)


def kind_of(name: str) -> str:
    """The kind of work a kernel named ``name`` does (see ``KINDS``), or ``other``."""
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return "other"


def parse_inductor(pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings as inductor config values (JSON values: true, 4, "x"; anything else stays a string);
    an unknown key is refused."""
    import torch._inductor.config as inductor

    settings: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--inductor takes KEY=VALUE, got {pair!r}")
        if not hasattr(inductor, key):
            raise ValueError(f"torch._inductor.config has no field {key!r}")
        try:
            settings[key] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key] = raw
    return settings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_profile", description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode of the decode step; none: eager")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: quick CPU checks)")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE", help="torch._inductor.config fields")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each kind (median)")
    parser.add_argument(
        "--fuse-projections", action="store_true", help="each layer's q/k/v and gate/up as one matmul each"
    )
    parser.add_argument(
        "--split-kv", action="store_true", help="decode attention through the split-KV Triton kernel (CUDA)"
    )
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (the decode steps are timed as full minus prompt-only calls)")
    for name in ("batch_size", "prompt_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        inductor = parse_inductor(args.inductor)
    except ValueError as error:
        parser.error(str(error))
    import torch._inductor.config as inductor_config

    with inductor_config.patch(inductor):  # this run only: the settings are restored on return
        return profile_decode(args, inductor)


def profile_decode(args: argparse.Namespace, inductor: dict[str, object]) -> dict:
    """Time and profile unsteered decoding as ``args`` say; write and return the result."""
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shape = get_shape(args.shape)
    model = random_model(shape, device=device, dtype=dtype, seed=0)
    enc = random_prompts(
        args.batch_size, args.prompt_tokens, documents=30, highlighted=20, vocab_size=shape.vocab_size, seed=0,
        device=device,
    )  # fmt: skip
    compiled = args.mode != "none"
    decoder = StaticGreedyDecoder(
        model,
        batch_size=args.batch_size,
        max_cache_len=args.prompt_tokens + args.new_tokens,
        compile=compiled,
        backend=args.backend,
        mode=args.mode if compiled else None,
        fuse_projections=args.fuse_projections,
        split_kv=args.split_kv,
    )
    method = HighlightMethod()

    def run(new_tokens: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        decoder.generate(method, enc, max_new_tokens=new_tokens, pad_token_id=0)
        synchronize(device)
        return time.perf_counter() - start

    compile_start = time.perf_counter()
    for _ in range(3):
        run(args.new_tokens)  # compilation and CUDA-graph capture
    compile_s = time.perf_counter() - compile_start
    full = statistics.median(run(args.new_tokens) for _ in range(args.repeats))
    prompt_only = statistics.median(run(1) for _ in range(args.repeats))
    steps = args.new_tokens - 1
    per_step = (full - prompt_only) / steps
    cost = ModelCost.of(model, shape)
    ceilings = measure_ceilings(
        device, dtype, copy_bytes=2**31 if on_gpu else 2**22, matmul_size=8192 if on_gpu else 64
    )
    floor = generation_floor(
        cost, ceilings, batch=args.batch_size, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens
    )
    step_floor = floor["decode_s"] / steps
    with profile(activities=[ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]) as prof:
        run(args.new_tokens)

    def self_us(event) -> float:
        return event.self_device_time_total if on_gpu else event.self_cpu_time_total

    events = sorted((e for e in prof.key_averages() if self_us(e) > 0), key=self_us, reverse=True)
    total_us = sum(self_us(e) for e in events)
    by_kind: dict[str, dict[str, float]] = {}
    for event in events:
        entry = by_kind.setdefault(kind_of(event.key), {"us": 0.0, "count": 0})
        entry["us"] += self_us(event)
        entry["count"] += event.count
    kinds = {
        kind: {"count": int(v["count"]), "total_us": v["us"], "share": v["us"] / total_us if total_us else 0.0}
        for kind, v in sorted(by_kind.items(), key=lambda item: -item[1]["us"])
    }
    top = [
        {"name": e.key[:160], "kind": kind_of(e.key), "count": e.count, "total_us": self_us(e),
         "share": self_us(e) / total_us if total_us else 0.0}
        for e in events[:40]
    ]  # fmt: skip
    result = {
        "settings": vars(args) | {"dtype": str(dtype).removeprefix("torch."), "method": "none", "inductor": inductor},
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "compile_s": compile_s,
        "call_s_median": full,
        "prompt_only_call_s_median": prompt_only,
        "decode_step_s": per_step,
        "decode_step_floor_s": step_floor,
        "decode_step_over_floor": per_step / step_floor,
        "call_over_floor": full / floor["total_s"],
        "copy_bytes_per_s": ceilings.copy_bytes_per_s,
        "matmul_flops_per_s": ceilings.matmul_flops_per_s,
        "weight_bytes_per_step": cost.weight_bytes,
        "weight_read_rate_bytes_per_s": cost.weight_bytes / per_step,
        # the profiled call runs the prompt pass and every decode step; its kernels per step are an upper bound
        "profiled_kernel_time_s": total_us / 1e6,
        "kernels_by_kind": kinds,
        "top_kernels": top,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "decode_profile.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / "decode_profile.json")
    print(json.dumps({k: v for k, v in result.items() if k not in ("top_kernels", "kernels_by_kind")}, indent=2))
    for kind, entry in kinds.items():
        print(f"{entry['share']:6.1%} {entry['count']:7d} {entry['total_us'] / 1e3:9.2f} ms  [{kind}]")
    for row in top[:25]:
        print(f"{row['share']:6.1%} {row['count']:7d} {row['total_us'] / 1e3:9.2f} ms  {row['name'][:110]}")
    return result


if __name__ == "__main__":
    main()
