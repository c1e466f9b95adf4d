"""Decode attention for grouped-query layers: one token's query heads attend to their key/value head once.

Under ``torch.compile``, transformers' SDPA path copies the whole KV cache once per query head of a group
(``repeat_kv``) at every layer and decode step. :func:`gqa_decode_attention` instead computes the float32 scores of a
group's query heads against its keys in one pass over the cache. :func:`gqa_decoding` switches one model to it for
the duration of a block (the static-cache decoder in :mod:`seka_lightning.fast_decode` uses it for decode steps);
with ``split_kv=True`` the decode steps run :func:`seka_lightning.split_kv.split_kv_attention` (a Triton kernel that
reads the cache once, spread over every SM) where it can run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from seka_lightning import split_kv as split_kernel
from seka_lightning.families import attention_configs

GQA_DECODE_ATTENTION = "sdpa_gqa_decode"
"""Name of the attention implementation decode steps switch an SDPA model to (SDPA's masks, :func:`gqa_decode_attention`)."""

SPLIT_KV_ATTENTION = "sdpa_gqa_split_kv"
"""The same with the split-KV kernel (:func:`split_kv_decode_attention`)."""


def gqa_decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a one-token query of a grouped-query layer attends to each
    key/value head once, for all the query heads of its group.

    The ``groups`` query heads of a key/value head share its keys. The scores are float32 dot products: under
    ``torch.compile``, one reduction kernel that reads each cached key once; run eagerly, a float32 matmul on a
    float32 copy of the keys. The boolean SDPA mask (``[B or 1, 1, 1, T]``: padding, unfilled cache positions) sends
    hidden positions to ``-inf``; the float32 softmax is rounded to the value dtype (as flash kernels do before their
    second matmul) and multiplied with the values. Anything else (prompt passes, no grouping, dropout, position
    biases, soft-capping, sinks, per-head or float masks) goes to the registered ``"sdpa"`` function (transformers'
    own unless it was overridden).
    """
    if not _grouped_decode_step(module, query, attention_mask, dropout, kwargs):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups, mask = module.num_key_value_groups, attention_mask
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    scale = dim**-0.5 if scaling is None else scaling
    rows = query.reshape(batch, kv_heads, groups, dim).float()  # query head h = kv_head * groups + g
    if torch.compiler.is_compiling():  # inductor fuses the cast, product and sum into one pass over the keys
        scores = (rows[:, :, :, None] * key[:, :, None].float()).sum(-1) * scale  # [B, kv_heads, groups, T]
    else:  # eagerly the product would be materialised [B, kv_heads, groups, T, d]
        scores = torch.matmul(rows, key.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # [B or 1, 1, 1, T] broadcasts over heads and groups
    probs = scores.softmax(-1).to(value.dtype).view(batch * kv_heads, groups, length)
    out = torch.bmm(probs, value.reshape(batch * kv_heads, length, value.shape[-1]))
    return out.view(batch, heads, 1, value.shape[-1]).transpose(1, 2), None


def _grouped_decode_step(module: nn.Module, query: torch.Tensor, mask: torch.Tensor | None, dropout, kwargs) -> bool:
    """Whether this call is a one-token query of a grouped-query layer with at most a boolean ``[B or 1, 1, 1, T]``
    mask and nothing else (no dropout, position biases, soft-capping or sinks): what the decode paths here handle."""
    special = any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux", "sinks"))
    plain_mask = mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1 and mask.shape[2] == 1)
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    return query.shape[2] == 1 and grouped and not dropout and not special and plain_mask


def split_kv_decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """:func:`gqa_decode_attention` with the one-token grouped-query case run by the split-KV kernel where it can run
    (a CUDA device with Triton, head dims a power of two up to 256); everything else as :func:`gqa_decode_attention`."""
    if (
        split_kernel.available(query.device)
        and split_kernel.supports(query, key, value)
        and _grouped_decode_step(module, query, attention_mask, dropout, kwargs)
    ):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return split_kernel.split_kv_attention(query, key, value, attention_mask, scale), None
    return gqa_decode_attention(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


@contextmanager
def gqa_decoding(model: nn.Module, *, split_kv: bool = False) -> Iterator[None]:
    """Within the block, ``model``, if it attends with ``"sdpa"``, attends through :func:`gqa_decode_attention`
    (registered as :data:`GQA_DECODE_ATTENTION`, with SDPA's mask builder), or with ``split_kv`` through
    :func:`split_kv_decode_attention` (:data:`SPLIT_KV_ATTENTION`); other models are left alone. Its configs get their
    implementation back on exit. The names are the same every time, so a step compiled inside one block keeps its
    guards in the next."""
    name, attend = (
        (SPLIT_KV_ATTENTION, split_kv_decode_attention) if split_kv else (GQA_DECODE_ATTENTION, gqa_decode_attention)
    )
    AttentionInterface.register(name, attend)
    AttentionMaskInterface.register(name, sdpa_mask)
    configs = [config for config in attention_configs(model) if config._attn_implementation_internal == "sdpa"]
    try:
        for config in configs:
            config._attn_implementation_internal = name
        yield
    finally:
        for config in configs:
            config._attn_implementation_internal = "sdpa"
