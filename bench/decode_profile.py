"""Where a static_loop decode step spends its time: unsteered greedy generation through StaticGreedyDecoder on the
Qwen3-8B shape (random bf16 weights, batch 1, 4096-token prompt, 60 new tokens), timed, then profiled with
torch.profiler (CUDA kernels, including those replayed from CUDA graphs). Writes decode_profile.json.

    python -m bench.decode_profile --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.generation import random_prompts
from bench.shapes import get_shape, random_model
from seka_lightning.fast_decode import StaticGreedyDecoder
from seka_lightning.methods import HighlightMethod


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=60)
    args = parser.parse_args()
    device = torch.device("cuda")
    shape = get_shape("qwen3-8b")
    model = random_model(shape, device=device, dtype=torch.bfloat16, seed=0)
    enc = random_prompts(
        1, args.prompt_tokens, documents=30, highlighted=20, vocab_size=shape.vocab_size, seed=0, device=device
    )
    decoder = StaticGreedyDecoder(model, batch_size=1, max_cache_len=args.prompt_tokens + args.new_tokens)
    method = HighlightMethod()

    def run(new_tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        decoder.generate(method, enc, max_new_tokens=new_tokens, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):
        run(args.new_tokens)  # compilation and CUDA-graph capture
    full = sorted(run(args.new_tokens) for _ in range(5))[2]
    prompt_only = sorted(run(1) for _ in range(5))[2]
    per_step = (full - prompt_only) / (args.new_tokens - 1)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(args.new_tokens)
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    total_us = sum(e.self_device_time_total for e in events)
    top = [
        {"name": e.key[:160], "count": e.count, "total_us": e.self_device_time_total,
         "share": e.self_device_time_total / total_us}
        for e in events[:30]
    ]  # fmt: skip
    result = {
        "settings": vars(args) | {"shape": "qwen3-8b", "batch": 1, "dtype": "bfloat16", "method": "none"},
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
        "call_s_median": full,
        "prompt_only_call_s_median": prompt_only,
        "decode_step_s": per_step,
        "weight_bytes_per_step": weight_bytes,
        "weight_read_rate_bytes_per_s": weight_bytes / per_step,
        "profiled_kernel_time_s": total_us / 1e6,
        "top_kernels": top,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_profile.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels"}, indent=2))
    for row in top[:20]:
        print(f"{row['share']:6.1%} {row['count']:6d} {row['total_us'] / 1e3:9.2f} ms  {row['name'][:110]}")


if __name__ == "__main__":
    main()
