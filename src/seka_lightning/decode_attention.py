"""Decode attention for grouped-query layers: one token's query heads attend to their key/value head once.

Under ``torch.compile``, transformers' SDPA path copies the whole KV cache once per query head of a group
(``repeat_kv``) at every layer and decode step. :func:`gqa_decode_attention` instead computes the float32 scores of a
group's query heads against its keys in one pass over the cache. :func:`gqa_decoding` switches one model to it for
the duration of a block (the static-cache decoder in :mod:`seka_lightning.fast_decode` uses it for decode steps).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from seka_lightning.families import attention_configs

GQA_DECODE_ATTENTION = "sdpa_gqa_decode"
"""Name of the attention implementation decode steps switch an SDPA model to (SDPA's masks, :func:`gqa_decode_attention`)."""


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
    groups = getattr(module, "num_key_value_groups", 1)
    mask = attention_mask
    special = any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux", "sinks"))
    if (
        query.shape[2] != 1
        or groups == 1
        or dropout
        or special
        or (mask is not None and (mask.dtype != torch.bool or mask.shape[1] != 1 or mask.shape[2] != 1))
    ):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
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


@contextmanager
def gqa_decoding(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``, if it attends with ``"sdpa"``, attends through :func:`gqa_decode_attention`
    (registered as :data:`GQA_DECODE_ATTENTION`, with SDPA's mask builder); other models are left alone. Its configs
    get their implementation back on exit. The name is the same every time, so a step compiled inside one block keeps
    its guards in the next."""
    AttentionInterface.register(GQA_DECODE_ATTENTION, gqa_decode_attention)
    AttentionMaskInterface.register(GQA_DECODE_ATTENTION, sdpa_mask)
    configs = [config for config in attention_configs(model) if config._attn_implementation_internal == "sdpa"]
    try:
        for config in configs:
            config._attn_implementation_internal = GQA_DECODE_ATTENTION
        yield
    finally:
        for config in configs:
            config._attn_implementation_internal = "sdpa"
