"""Diagnostics of highlighting, as plain functions of model outputs: where the attention goes, and how likely the
answer is.

Both feed ``seka validate``. Attention weights need an eager forward pass with ``output_attentions=True`` (fused
SDPA/flash kernels never form them); since SEKA edits keys before attention, a steered pass yields the steered
weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def attention_mass(attentions: Sequence[torch.Tensor], key_mask: torch.Tensor, *, query_index: int) -> torch.Tensor:
    """Attention that the token at ``query_index`` pays to the keys in ``key_mask``, per layer, mean over heads.

    Args:
        attentions: one softmax weight tensor ``[B, H, T, T]`` (queries x keys) per layer, as
            ``output_attentions=True`` returns them.
        key_mask: bool ``[B, T]``, the keys whose weights are summed (e.g. the highlighted prompt tokens).
        query_index: the query position (the same for every row; ``-1`` is the last token).

    Returns:
        float64 ``[B, L]``: for each row and layer, ``mean_h sum_{k in mask} A[b, h, query, k]``.
    """
    if len(attentions) == 0:
        raise ValueError(
            "no attention weights; run the model with attn_implementation='eager' and output_attentions=True"
        )
    if key_mask.ndim != 2 or key_mask.dtype != torch.bool:
        raise ValueError(f"key_mask must be a bool tensor [B, T], got {key_mask.dtype} {tuple(key_mask.shape)}")
    batch, seq_len = key_mask.shape
    for layer, weights in enumerate(attentions):
        if weights.ndim != 4 or weights.shape[0] != batch or weights.shape[2:] != (seq_len, seq_len):
            raise ValueError(
                f"attentions[{layer}] has shape {tuple(weights.shape)}; expected [{batch}, heads, {seq_len}, {seq_len}] "
                "to match key_mask"
            )
    if not -seq_len <= query_index < seq_len:
        raise ValueError(f"query_index={query_index} is outside a sequence of {seq_len} tokens")
    rows = torch.stack([weights[:, :, query_index, :] for weights in attentions], dim=1).double()  # [B, L, H, T]
    mask = key_mask[:, None, None, :].to(device=rows.device, dtype=rows.dtype)
    return (rows * mask).sum(-1).mean(-1)


def answer_log_likelihood(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-likelihood of the labelled tokens of each row.

    Args:
        logits: ``[B, T, V]``; ``logits[:, t]`` is the distribution of token ``t + 1`` (the causal-LM convention).
        labels: ``[B, T]`` token ids aligned with the inputs; positions equal to ``ignore_index`` (the prompt,
            padding) are not scored. The first position is never scored (nothing predicts it).
        ignore_index: the label of unscored positions.

    Returns:
        ``(total, count)``: float64 ``[B]`` sums of ``log p(label)`` and int64 ``[B]`` numbers of scored tokens;
        the per-token mean is ``total / count``.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits [B, T, V] and labels [B, T] must agree, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    targets = labels[:, 1:]
    scored = targets != ignore_index
    log_probs = logits[:, :-1].double().log_softmax(-1)  # [B, T-1, V]
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, 0.0).sum(-1), scored.sum(-1)
