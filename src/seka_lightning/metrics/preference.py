"""CounterFact efficacy and paraphrase scores: does the model prefer the new target over the old one?"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from seka_lightning.metrics._checks import require_examples


class TargetPreference(Metric):
    """Per-case fraction of prompts where P(new) > P(old), averaged over cases; plus the probability margin.

    ``update`` takes one row per case: ``[C]`` tensors when each case has one prompt (efficacy), or ``[C, P]``
    tensors padded to P prompts with a ``mask`` marking the real ones (paraphrase). A case is always complete
    within one call, so per-case fractions are exact and only sums cross ranks. To batch cases with different
    prompt counts, pad with ``torch.nn.utils.rnn.pad_sequence(..., batch_first=True)`` and pass the mask of
    real prompts; padded values are ignored (they may be anything, NaN included).

    ``compute`` returns ``{"score", "magnitude"}``: ``score`` is the mean over cases of the fraction of the
    case's prompts won (strictly, compared in log space); ``magnitude`` is the mean over cases of the case's
    mean ``P(new) - P(old)`` in probability space. Both follow the per-case-then-over-cases averaging of
    ROME's ``summarize`` and PASTA's ``metrics.efficacy``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    case_score_sum: torch.Tensor
    case_magnitude_sum: torch.Tensor
    cases: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        """``kwargs`` go to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``)."""
        super().__init__(**kwargs)
        self.add_state("case_score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("case_magnitude_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cases", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logp_new: torch.Tensor, logp_old: torch.Tensor, *, mask: torch.Tensor | None = None) -> None:
        """Add cases: first-token log-probs of the new and old target, ``[C]`` or ``[C, P]`` (+ ``mask``)."""
        if logp_new.shape != logp_old.shape:
            raise ValueError(
                f"logp_new {tuple(logp_new.shape)} and logp_old {tuple(logp_old.shape)} must have one shape"
            )
        if logp_new.dim() == 1:
            if mask is not None:
                raise ValueError("mask is only for padded [C, P] inputs; [C] inputs have one prompt per case")
            logp_new, logp_old = logp_new[:, None], logp_old[:, None]
        elif logp_new.dim() != 2:
            raise ValueError(f"logp_new must be [C] or [C, P], got shape {tuple(logp_new.shape)}")
        if mask is None:
            mask = torch.ones_like(logp_new, dtype=torch.bool)
        elif mask.shape != logp_new.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(logp_new.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        prompts = mask.sum(dim=1)  # [C]
        if bool((prompts == 0).any()):
            raise ValueError("every case (row) needs at least one prompt with mask=True")

        new = torch.where(mask, logp_new.to(torch.float64), 0.0)  # [C, P]; padding may hold anything
        old = torch.where(mask, logp_old.to(torch.float64), 0.0)
        if bool(new.isnan().any() or old.isnan().any()):
            raise ValueError("logp_new / logp_old contain NaN at unmasked positions")
        wins = ((new > old) & mask).sum(dim=1).to(torch.float64) / prompts
        margin = torch.where(mask, new.exp() - old.exp(), 0.0).sum(dim=1) / prompts

        self.case_score_sum += wins.sum()
        self.case_magnitude_sum += margin.sum()
        self.cases += wins.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        require_examples(type(self).__name__, self.cases)
        return {"score": self.case_score_sum / self.cases, "magnitude": self.case_magnitude_sum / self.cases}
