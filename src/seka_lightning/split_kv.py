"""Split-KV decode attention for grouped-query layers, as a Triton kernel ("flash decoding").

A decode step's attention reads the whole KV cache for one query token per row. Done as three kernels (the scores,
the softmax, the value matmul) it reads the keys at a fraction of the copy rate: at batch 1 there are only as many
blocks as key/value heads (8 on Qwen3-8B), and the scores and probabilities of every cached position go through
memory twice. Here each program takes one key/value head of one row and one stretch of the cache, computes the scores
of the head's ``groups`` query heads against it with an online softmax, and writes its partial result (the running
maximum, the sum of exponentials and the unnormalised value sum); a short reduction over the stretches finishes.
With enough stretches every SM reads keys and values at once, and each is read once.

Numerics follow FlashAttention's: float32 scores and softmax statistics, the probabilities rounded to the value
dtype for the value matmul, float32 accumulation (float32 inputs multiply in full float32, not TF32). Fully hidden
rows give NaN, as SDPA does.

Triton is optional (the CUDA builds of torch bring it): :func:`available` says whether the kernel can run on a
tensor's device. With ``TRITON_INTERPRET=1`` set before this module is imported it runs on CPU tensors through
Triton's interpreter (the tests), in float16 or float32 (the interpreter has no bfloat16 matmul).
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the decoder keeps its reduction path
    triton = None

BLOCK_T = 64
"""Cached positions per inner step of a program."""

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Triton's interpreter was on when this module was imported (its kernels then run on CPU tensors)."""

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The dtypes the kernel runs in."""

TARGET_PROGRAMS = 264
"""Programs to aim for per call (two per SM of an H200); more stretches when there are fewer rows x heads."""


def available(device: torch.device) -> bool:
    """Whether the kernel runs on ``device``: Triton is importable and the device is CUDA, or Triton interprets."""
    if triton is None:
        return False
    return device.type == "cuda" or INTERPRET


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the kernel takes these decode-step shapes: head dims a power of two from 16 to 256, contiguous heads
    (last stride 1), a query and key/value pair of one dtype among float16, bfloat16 and float32."""
    return (
        query.shape[-1] == key.shape[-1] == value.shape[-1]
        and supports_head_dim(query.shape[-1])
        and query.dtype == key.dtype == value.dtype
        and query.dtype in DTYPES
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
    )


def supports_head_dim(dim: int) -> bool:
    """Head dims the kernel takes: a power of two from 16 to 256."""
    return 16 <= dim <= 256 and dim & (dim - 1) == 0


def plan(rows_heads: int, length: int, *, block: int = BLOCK_T, target: int = TARGET_PROGRAMS) -> tuple[int, int]:
    """``(splits, tokens_per_split)`` for ``rows_heads`` (batch x key/value heads) programs over ``length`` cached
    positions: enough stretches to reach about ``target`` programs, each a whole number of ``block`` positions."""
    blocks = -(-length // block)
    splits = max(1, min(blocks, -(-target // rows_heads)))
    per_split = -(-blocks // splits) * block
    return -(-length // per_split), per_split


if triton is not None:

    @triton.jit
    def _partial_attention(
        Q,
        K,
        V,
        Mask,
        Acc,
        Max,
        Sum,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_vb,
        stride_vh,
        stride_vt,
        stride_mb,
        stride_mt,
        length,
        scale,
        KV_HEADS: tl.constexpr,
        SPLITS: tl.constexpr,
        GROUPS: tl.constexpr,
        BLOCK_G: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK: tl.constexpr,
        PER_SPLIT: tl.constexpr,
        HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One (row, key/value head, stretch): the partial softmax attention of the head's query heads."""
        row_head = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a cache can hold more than 2^31 elements
        split = tl.program_id(1)
        row = row_head // KV_HEADS
        head = row_head % KV_HEADS
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, DIM)
        in_group = g < GROUPS
        q = tl.load(
            Q + row * stride_qb + (head * GROUPS + g)[:, None] * stride_qh + d[None, :],
            mask=in_group[:, None],
            other=0.0,
        )  # [BLOCK_G, DIM]
        k_base = K + row * stride_kb + head * stride_kh
        v_base = V + row * stride_vb + head * stride_vh
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, DIM], tl.float32)
        start = split * PER_SPLIT
        for offset in range(0, PER_SPLIT, BLOCK):
            t = start + offset + tl.arange(0, BLOCK)
            inside = t < length
            k = tl.load(k_base + t[:, None] * stride_kt + d[None, :], mask=inside[:, None], other=0.0)  # [BLOCK, DIM]
            s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale).to(tl.float32)  # [BLOCK_G, BLOCK]
            visible = inside
            if HAS_MASK:
                visible = visible & (tl.load(Mask + row * stride_mb + t * stride_mt, mask=inside, other=0) != 0)
            s = tl.where(visible[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a stretch hidden so far adds nothing
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + t[:, None] * stride_vt + d[None, :], mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = row_head * SPLITS + split
        tl.store(Acc + (out * GROUPS + g)[:, None] * DIM + d[None, :], acc, mask=in_group[:, None])
        tl.store(Max + out * GROUPS + g, m_i, mask=in_group)
        tl.store(Sum + out * GROUPS + g, l_i, mask=in_group)


def _launch(grid: tuple[int, int], tensors: tuple, numbers: tuple, constants: dict) -> None:
    _partial_attention[grid](*tensors, *numbers, **constants)


if INTERPRET:  # the interpreter runs the kernel as Python over numpy arrays, which torch.compile cannot trace
    _launch = torch.compiler.disable(_launch)


def split_kv_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    *,
    block: int = BLOCK_T,
    target: int = TARGET_PROGRAMS,
    num_warps: int = 4,
) -> torch.Tensor:
    """One-token grouped-query attention: ``query [B, H, 1, D]`` against the cache ``key``/``value
    [B, H_kv, T, D]`` with the boolean ``mask [B or 1, 1, 1, T]`` (True: attend; None: every position), scores scaled
    by ``scale``. Returns ``[B, 1, H, D]`` in the value dtype (transformers' attention output layout).

    The stretches' count and length are compile-time constants of the kernel, so each cache length gets its own
    build: made for a static cache (one length per decoder), not for a cache that grows every step."""
    if triton is None:
        raise RuntimeError("split_kv_attention needs Triton (pip install triton, or a CUDA build of torch)")
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    splits, per_split = plan(batch * kv_heads, length, block=block, target=target)
    device = query.device
    acc = torch.empty(batch * kv_heads * splits, groups, dim, dtype=torch.float32, device=device)
    maxima = torch.empty(batch * kv_heads * splits, groups, dtype=torch.float32, device=device)
    sums = torch.empty_like(maxima)
    if mask is None:
        mask_rows, stride_mb, stride_mt = torch.ones(1, dtype=torch.bool, device=device), 0, 0
    else:
        mask_rows = mask.reshape(mask.shape[0], length)  # [B or 1, T] bool
        stride_mb, stride_mt = (mask_rows.stride(0) if mask_rows.shape[0] > 1 else 0), mask_rows.stride(1)
    _launch(
        (batch * kv_heads, splits),
        (query, key, value, mask_rows, acc, maxima, sums),
        (
            query.stride(0),
            query.stride(1),
            key.stride(0),
            key.stride(1),
            key.stride(2),
            value.stride(0),
            value.stride(1),
            value.stride(2),
            stride_mb,
            stride_mt,
            length,
            scale,
        ),
        {
            "KV_HEADS": kv_heads,
            "SPLITS": splits,
            "GROUPS": groups,
            "BLOCK_G": max(16, 1 << math.ceil(math.log2(groups))),
            "DIM": dim,
            "BLOCK": block,
            "PER_SPLIT": per_split,
            "HAS_MASK": mask is not None,
            "PRECISION": "ieee" if query.dtype == torch.float32 else "tf32",  # float32 inputs: no TF32 rounding
            "num_warps": num_warps,
        },
    )
    # combine the stretches: weights exp(m_s - max_s m_s); a hidden stretch (m_s = -inf) weighs 0
    maxima = maxima.view(batch * kv_heads, splits, groups)
    top = maxima.amax(1, keepdim=True)
    weights = torch.exp(maxima - torch.where(top == float("-inf"), 0.0, top))  # [B * H_kv, S, G]
    total = (sums.view_as(maxima) * weights).sum(1)  # [B * H_kv, G]
    out = (acc.view(batch * kv_heads, splits, groups, dim) * weights[..., None]).sum(1) / total[..., None]
    return out.to(value.dtype).view(batch, 1, heads, dim)
