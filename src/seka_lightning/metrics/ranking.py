"""Top-k accuracy over a fixed set of candidate labels (BiasBios occupation prediction)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from seka_lightning.metrics._checks import require_examples


def gold_rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of the gold candidate per row: ``[N, C], [N] -> [N]``.

    Ties are broken by candidate index (lower index ranks first), so rank 0 is exactly ``argmax``; this
    matters because candidates sharing a first token get identical scores.
    """
    gold = scores.gather(1, target[:, None])  # [N, 1]
    index = torch.arange(scores.shape[1], device=scores.device)[None, :]  # [1, C]
    ahead = (scores > gold) | ((scores == gold) & (index < target[:, None]))
    return ahead.sum(dim=1)


class TopKAccuracy(Metric):
    """Fraction of examples whose gold label is among the k best-scored candidates, for each k in ``top_k``.

    ``compute`` returns ``{"top1": ..., "top3": ...}`` (one key per k). Ranking ties follow :func:`gold_rank`.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, *, top_k: Sequence[int] = (1, 3), **kwargs: Any) -> None:
        """``top_k``: the k values to report; ``kwargs`` go to ``torchmetrics.Metric``."""
        super().__init__(**kwargs)
        ks = list(top_k)
        if not ks or any(not isinstance(k, int) or k < 1 for k in ks) or len(set(ks)) != len(ks):
            raise ValueError(f"top_k must be distinct positive integers, got {top_k!r}")
        self.top_k = ks
        self.add_state("correct", default=torch.zeros(len(ks), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Add examples: candidate ``scores`` ``[N, C]`` (higher is better) and gold indices ``[N]``."""
        if scores.dim() != 2:
            raise ValueError(f"scores must be [N, C], got shape {tuple(scores.shape)}")
        if target.shape != (scores.shape[0],) or target.dtype not in (torch.long, torch.int):
            raise ValueError(
                f"target must be an integer tensor of shape ({scores.shape[0]},), "
                f"got {target.dtype} {tuple(target.shape)}"
            )
        num_candidates = scores.shape[1]
        if max(self.top_k) > num_candidates:
            raise ValueError(
                f"top_k={max(self.top_k)} exceeds the number of candidates ({num_candidates}); "
                "lower top_k or score more labels"
            )
        if bool(((target < 0) | (target >= num_candidates)).any()):
            raise ValueError(f"target holds indices outside [0, {num_candidates})")
        if bool(scores.isnan().any()):
            raise ValueError("scores contain NaN")
        rank = gold_rank(scores, target.long())  # [N]
        ks = torch.tensor(self.top_k, device=rank.device)
        self.correct += (rank[:, None] < ks[None, :]).sum(dim=0)
        self.total += rank.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        require_examples(type(self).__name__, self.total)
        accuracy = self.correct.to(torch.float64) / self.total
        return {f"top{k}": accuracy[i] for i, k in enumerate(self.top_k)}
