"""Accuracy of ``gqa_decode_attention`` at Qwen3-8B's attention shape on the GPU (bf16, the float32-score matmul
path that CPU tests cannot reach), against a float64 reference, next to transformers' SDPA path on the same inputs.

    python -m bench.decode_attention_check --out OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from seka_lightning.decode_attention import gqa_decode_attention


def reference(query, key, value, mask, scale: float) -> torch.Tensor:
    """Grouped-query attention in float64, written out: [B, Hq, 1, D] -> [B, 1, Hq, D]."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.double().repeat_interleave(groups, 1), value.double().repeat_interleave(groups, 1)
    scores = (query.double() @ key.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    heads, kv_heads, dim, length, filled = 32, 8, 128, 4156, 4100
    module = nn.Module()
    module.num_key_value_groups = heads // kv_heads
    generator = torch.Generator(device).manual_seed(0)
    results = []
    for batch in (1, 10):
        query = torch.randn(batch, heads, 1, dim, device=device, generator=generator).to(dtype)
        key, value = (
            torch.randn(batch, kv_heads, length, dim, device=device, generator=generator).to(dtype) for _ in "kv"
        )
        key = key * 2.0  # sharper softmax than unit scores
        mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=device)
        mask[..., :filled] = True
        mask[1:, ..., :50] = False  # left padding on the other rows
        truth = reference(query, key, value, mask, dim**-0.5)
        row = {"batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "cache_len": length}
        for name, attend in (("gqa_decode_attention", gqa_decode_attention), ("sdpa", sdpa_attention_forward)):
            for compiled in (False, True):
                fn = torch.compile(attend, fullgraph=True) if compiled else attend
                out = fn(module, query, key, value, mask, scaling=dim**-0.5)[0]
                error = (out.double() - truth).abs()
                row[f"{name}{'_compiled' if compiled else ''}_max_abs_err"] = error.max().item()
                row[f"{name}{'_compiled' if compiled else ''}_mean_abs_err"] = error.mean().item()
        results.append(row)
        print(json.dumps(row))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_attention_check.json").write_text(
        json.dumps({"torch": torch.__version__, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
