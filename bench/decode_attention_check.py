"""Decode attention at Qwen3-8B's attention shape on the GPU (bf16): accuracy against a float64 reference and time
per call, for transformers' SDPA path, ``gqa_decode_attention`` (the float32-score path that CPU tests cannot reach)
and the split-KV Triton kernel (``split_kv_attention``) at a few launch settings.

    python -m bench.decode_attention_check --out OUT
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bench.generation import measure_ceilings
from seka_lightning import split_kv
from seka_lightning.decode_attention import gqa_decode_attention

LAUNCHES = ((64, 264, 4), (64, 528, 4), (128, 264, 4), (64, 264, 8), (32, 528, 4))
"""(positions per block, target programs, warps) of the kernel launches timed; the first is the shipped default."""
DEFAULT_SPLIT = "split_kv_b{}_p{}_w{}".format(*LAUNCHES[0])


def reference(query, key, value, mask, scale: float) -> torch.Tensor:
    """Grouped-query attention in float64, written out: [B, Hq, 1, D] -> [B, 1, Hq, D]."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.double().repeat_interleave(groups, 1), value.double().repeat_interleave(groups, 1)
    scores = (query.double() @ key.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2)


def split_kv_forward(module, query, key, value, mask, *, scaling: float, **launch) -> tuple[torch.Tensor, None]:
    """The kernel behind the attention-function signature (``launch``: block, target programs, warps)."""
    return split_kv.split_kv_attention(query, key, value, mask, scaling, **launch), None


def time_call(fn, repeats: int = 200) -> float:
    """Median microseconds of ``fn()`` over ``repeats`` calls, each between two CUDA events (after 10 warm-up
    calls)."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 10])
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    heads, kv_heads, dim, length, filled = 32, 8, 128, 4160, 4100
    module = nn.Module()
    module.num_key_value_groups = heads // kv_heads
    generator = torch.Generator(device).manual_seed(0)
    # the generation benchmark's probe (2 GiB of random data), so this file's read time is on its floor's scale
    copy_rate = measure_ceilings(device, dtype, copy_bytes=2 * 2**30, matmul_size=8192).copy_bytes_per_s
    implementations = {"sdpa": sdpa_attention_forward, "gqa_decode_attention": gqa_decode_attention}
    for block, target, warps in LAUNCHES:
        name = f"split_kv_b{block}_p{target}_w{warps}"
        implementations[name] = functools.partial(split_kv_forward, block=block, target=target, num_warps=warps)
    results = []
    for batch in args.batch_sizes:
        query = torch.randn(batch, heads, 1, dim, device=device, generator=generator).to(dtype)
        key, value = (
            torch.randn(batch, kv_heads, length, dim, device=device, generator=generator).to(dtype) for _ in "kv"
        )
        key = key * 2.0  # sharper softmax than unit scores
        mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=device)
        mask[..., :filled] = True
        mask[1:, ..., :50] = False  # left padding on the other rows
        truth = reference(query, key, value, mask, dim**-0.5)
        kv_bytes = 2 * key.numel() * key.element_size()
        row = {
            "batch": batch,
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": dim,
            "cache_len": length,
            "kv_bytes": kv_bytes,
            "copy_bytes_per_s": copy_rate,
            "kv_read_at_copy_rate_us": kv_bytes / copy_rate * 1e6,
        }
        for name, attend in implementations.items():
            # the kernel's launch is the same either way; compiled, inductor fuses the stretches' reduction
            for compiled in (False, True) if not name.startswith("split_kv") or name == DEFAULT_SPLIT else (False,):
                fn = torch.compile(attend, fullgraph=True) if compiled else attend
                tag = f"{name}{'_compiled' if compiled else ''}"
                out = fn(module, query, key, value, mask, scaling=dim**-0.5)[0]
                error = (out.double() - truth).abs()
                row[f"{tag}_max_abs_err"] = error.max().item()
                row[f"{tag}_mean_abs_err"] = error.mean().item()
                row[f"{tag}_us"] = time_call(lambda: fn(module, query, key, value, mask, scaling=dim**-0.5))  # noqa: B023
        results.append(row)
        print(json.dumps(row))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_attention_check.json").write_text(
        json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
