"""On a CUDA device: SDPA's memory-efficient kernel against its math kernel on keys/values shaped as transformers hands
them over for a model with one key/value head (a stride-0 broadcast to 4 query heads, head dim 256 as Gemma-3-270M),
with a left-padding mask, float32, at key lengths around multiples of 32. Prints the largest difference per length,
and that of SDPA's own dispatch with the memory-efficient kernel turned off (as the guard in seka_lightning.models
leaves it), and writes JSON to the path given (default sdpa_kv_len_repro.json). With an unfixed torch, lengths 32k+1
should stand out in the broadcast column only (pytorch/pytorch#191937)."""

from __future__ import annotations

import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def difference(length: int, *, broadcast: bool, batch: int = 8, heads: int = 4, dim: int = 256) -> tuple[float, float]:
    """Largest difference from the math kernel of (the memory-efficient kernel, SDPA's dispatch without it)."""
    generator = torch.Generator("cuda").manual_seed(length)
    q = torch.randn(batch, heads, length, dim, device="cuda", generator=generator)
    k1 = torch.randn(batch, 1, length, dim, device="cuda", generator=generator)
    v1 = torch.randn(batch, 1, length, dim, device="cuda", generator=generator)
    k, v = (k1.expand(-1, heads, -1, -1), v1.expand(-1, heads, -1, -1))
    if not broadcast:
        k, v = k.contiguous(), v.contiguous()
    pad = torch.arange(batch, device="cuda")[:, None] * 2  # row i has 2i padding positions on the left
    keep = torch.arange(length, device="cuda")[None, :] >= pad
    causal = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()
    mask = (causal[None] & keep[:, None, :])[:, None]  # [B, 1, T, T]
    mask[..., 0] = True  # no row fully masked
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        efficient = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with sdpa_kernel(SDPBackend.MATH):
        math = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # what a process guarded by seka_lightning.models.avoid_broken_mem_efficient_sdpa runs: SDPA's own dispatch with
    # the memory-efficient kernel turned off
    enabled = torch.backends.cuda.mem_efficient_sdp_enabled()
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    try:
        guarded = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    finally:
        torch.backends.cuda.enable_mem_efficient_sdp(enabled)
    return float((efficient - math).abs().max()), float((guarded - math).abs().max())


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "sdpa_kv_len_repro.json"
    rows = []
    for length in (31, 32, 33, 34, 63, 64, 65, 66, 97, 129, 513, 3585, 3586):
        (broadcast, guarded), (contiguous, _) = (difference(length, broadcast=b) for b in (True, False))
        row = {"kv_length": length, "broadcast": broadcast, "contiguous": contiguous, "broadcast_guarded": guarded}
        rows.append(row)
        print(row, flush=True)
    record = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": rows}
    with open(out, "w") as handle:
        json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
