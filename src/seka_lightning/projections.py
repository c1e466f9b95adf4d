"""Key projections from streamed statistics (SPEC §3): the spectral math, plain torch.

``Ω± = A± / N`` is decomposed in float32; ``P+`` keeps the top singular directions covering ``top_pct`` of the
spectrum, ``P-`` the complement of the top part. Heads whose keys barely move between the positive and negative
texts (``sqrt(D) / N < min_diff``) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seka_lightning.stats import KeySums


@dataclass
class Projections:
    """Per selected layer and KV head: projectors ``pos``/``neg`` ``[L, H, d, d]``, their SVD factors
    ``u_pos``/``u_neg`` ``[L, H, d, d]`` and ``s_pos``/``s_neg`` ``[L, H, d]``, the head filter value ``diff``
    ``[L, H]`` and the boolean ``kept`` ``[L, H]``. ``neg``/``u_neg``/``s_neg`` are None for positive-only banks."""

    pos: torch.Tensor
    u_pos: torch.Tensor
    s_pos: torch.Tensor
    diff: torch.Tensor
    kept: torch.Tensor
    neg: torch.Tensor | None = None
    u_neg: torch.Tensor | None = None
    s_neg: torch.Tensor | None = None


def validate_hyperparameters(top_pct: float, min_diff: float) -> None:
    if not 0.0 < top_pct <= 1.0:
        raise ValueError(f"top_pct must be in (0, 1], got {top_pct}")
    if min_diff < 0.0:
        raise ValueError(f"min_diff must be >= 0, got {min_diff}")


def top_rank(singular_values: torch.Tensor, top_pct: float) -> torch.Tensor:
    """``k(S) = #{i : cumsum(S)_i / sum(S) < top_pct} + 1`` for ``S`` of shape ``[..., d]``, clamped to d."""
    cumulative = singular_values.cumsum(-1) / singular_values.sum(-1, keepdim=True)
    k = (cumulative < top_pct).sum(-1) + 1
    return k.clamp(max=singular_values.shape[-1])


def _projector(u: torch.Tensor, k: torch.Tensor, *, top: bool) -> torch.Tensor:
    """``U[:, :k] U[:, :k]ᵀ`` (top) or ``U[:, k:] U[:, k:]ᵀ`` (complement), per head with its own k."""
    d = u.shape[-1]
    column = torch.arange(d, device=u.device)
    keep = column < k[..., None] if top else column >= k[..., None]  # [..., d]
    u_kept = u * keep[..., None, :].to(u.dtype)
    return u_kept @ u_kept.transpose(-1, -2)


def projections_from_sums(
    sums: KeySums,
    *,
    top_pct: float = 0.9,
    min_diff: float = 0.2,
    positive_only: bool = False,
    skipped_fill: float = 0.0,
) -> Projections:
    """Build the bank's matrices from :class:`KeySums` (SPEC §3; AdaSEKA experts with ``positive_only=True``).

    Positive-only (AdaSEKA expert) banks filter heads with ``||h+ - h||`` instead of ``||h+ - h-||`` and fill
    skipped heads' U and S with ``skipped_fill`` (NaN for experts; zeros for SEKA banks, as the reference does).
    """
    validate_hyperparameters(top_pct, min_diff)
    n = float(sums.count.item())
    if n <= 0:
        raise ValueError("the statistics hold no answer-token rows (N = 0); check that answers occur in their contexts")
    distance = sums.d_pos_neutral if positive_only else sums.d_pos_neg
    diff = distance.sqrt() / n  # [L, H]
    kept = diff >= min_diff

    def decompose(a: torch.Tensor, *, top: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        omega = (a / n).to(torch.float32)
        u, s, _ = torch.linalg.svd(omega, full_matrices=False)
        projector = _projector(u, top_rank(s, top_pct), top=top)
        projector = projector * kept[..., None, None].to(projector.dtype)
        u = torch.where(kept[..., None, None], u, torch.full_like(u, skipped_fill))
        s = torch.where(kept[..., None], s, torch.full_like(s, skipped_fill))
        return projector, u, s

    pos, u_pos, s_pos = decompose(sums.a_pos, top=True)
    result = Projections(pos=pos, u_pos=u_pos, s_pos=s_pos, diff=diff.to(torch.float32), kept=kept)
    if not positive_only:
        result.neg, result.u_neg, result.s_neg = decompose(sums.a_neg, top=False)
    return result
