"""A plain mean of per-example scores (float64 sums, exact under DDP), for rates such as degeneracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from seka_lightning.metrics._checks import require_examples


class MeanScore(Metric):
    """Mean of per-example values; ``compute`` raises on no examples unless ``allow_empty`` (then NaN).

    ``allow_empty`` is for subgroups a run may not contain (e.g. gold documents outside the highlight when every
    document is highlighted); the scorers drop a NaN result rather than report it.
    """

    full_state_update = False
    is_differentiable = False

    total: torch.Tensor
    count: torch.Tensor

    def __init__(self, *, allow_empty: bool = False, **kwargs: Any) -> None:
        """``allow_empty``: return NaN instead of raising when no value was added; ``kwargs`` go to ``Metric``."""
        super().__init__(**kwargs)
        self.allow_empty = allow_empty
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: Sequence[float]) -> None:
        """Add one value per example (finite numbers)."""
        values = [float(v) for v in values]
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise ValueError(f"values must be finite numbers, got {bad[:3]}")
        self.total += math.fsum(values)
        self.count += len(values)

    def compute(self) -> torch.Tensor:
        if not self.allow_empty:
            require_examples(type(self).__name__, self.count)
        return self.total / self.count
