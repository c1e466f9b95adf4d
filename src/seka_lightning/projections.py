"""Key projections from streamed statistics (SPEC §3): the spectral math, plain torch.

``Ω± = A± / N`` is decomposed in float32; ``P+`` keeps the top singular directions covering ``top_pct`` of the
spectrum, ``P-`` the complement of the top part. Heads whose keys barely move between the positive and negative
texts (head-filter value below ``min_diff``) are skipped; :func:`head_filter_values` says how the value is measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from seka_lightning.stats import KeySums

HEAD_FILTERS = ("relative", "reference")
DEFAULT_HEAD_FILTER = "relative"
# keeps 80-100% of the heads of both embedded models (SmolLM2-135M, Gemma-3-270M) on the shipped synthetic QA data
DEFAULT_MIN_DIFF = 0.05


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


def validate_hyperparameters(top_pct: float, min_diff: float, head_filter: str = DEFAULT_HEAD_FILTER) -> None:
    if not 0.0 < top_pct <= 1.0:
        raise ValueError(f"top_pct must be in (0, 1], got {top_pct}")
    if min_diff < 0.0:
        raise ValueError(f"min_diff must be >= 0, got {min_diff}")
    if head_filter not in HEAD_FILTERS:
        raise ValueError(
            f'head_filter must be one of {HEAD_FILTERS}, got {head_filter!r} ("reference" reproduces the '
            "reference's sqrt(D) / N)"
        )


def head_filter_values(sums: KeySums, *, head_filter: str, positive_only: bool = False) -> torch.Tensor:
    """The per-head value ``[L, H]`` (float64) compared with ``min_diff`` (SPEC §3's head filter).

    ``D`` is ``Σ ||h+ - h-||²`` (``Σ ||h+ - h||²`` for positive-only, AdaSEKA expert, banks) over the N rows.

    - ``"relative"`` (default): ``sqrt(D / N) / sqrt(trace(A0) / N) = sqrt(D / trace(A0))``, the RMS distance
      between the positive and negative keys relative to the RMS key norm. It is dimensionless and does not
      depend on N, so one threshold fits any amount of data and any model's key scale.
    - ``"reference"``: the reference's ``sqrt(D) / N``, kept for fidelity. It shrinks as ``1 / sqrt(N)``, so a
      threshold that keeps heads on a few hundred rows keeps none on a few thousand.
    """
    distance = sums.d_pos_neutral if positive_only else sums.d_pos_neg
    if head_filter == "reference":
        return distance.sqrt() / float(sums.count.item())
    trace = sums.a0.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.where(trace > 0, distance / trace.clamp(min=torch.finfo(trace.dtype).tiny), 0.0).sqrt()


def require_kept_heads(diff: torch.Tensor, *, min_diff: float, head_filter: str) -> None:
    """Raise if ``min_diff`` skips every head (such a bank would steer nothing), naming a threshold that keeps some."""
    if bool((diff >= min_diff).any()):
        return
    largest = float(diff.max())
    raise ValueError(
        f"min_diff={min_diff} keeps none of the {diff.numel()} heads: the largest {head_filter!r} head-filter value "
        f"is {largest:.6g}; set min_diff to at most {_round_down(largest)} (min_diff=0 keeps every head)"
    )


def _round_down(value: float, digits: int = 3) -> str:
    """``value`` rounded down to ``digits`` significant digits, as text (a threshold that still keeps it)."""
    if value <= 0:
        return "0"
    exponent = math.floor(math.log10(value)) - digits + 1
    return f"{math.floor(value / 10**exponent) * 10**exponent:.{digits}g}"


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


def canonical_signs(u: torch.Tensor) -> torch.Tensor:
    """``u`` (``[..., d, r]``, singular vectors in columns) with each column's sign fixed so that its entry of largest
    magnitude is positive (the first such entry on a tie).

    An SVD leaves each singular vector's sign arbitrary, and CPU LAPACK and GPU cuSOLVER choose differently. Projectors
    ``U U^T`` do not see the sign, but AdaSEKA's routing is linear in each vector (SPEC §5), so expert banks store
    their vectors with this sign: the same statistics give the same routing on every device
    (``docs/research/adaseka_svd_sign/``)."""
    peak = u.abs().argmax(dim=-2, keepdim=True)  # [..., 1, r]
    sign = torch.gather(u, -2, peak).sign()
    return u * torch.where(sign == 0, torch.ones_like(sign), sign)


def projections_from_sums(
    sums: KeySums,
    *,
    top_pct: float = 0.9,
    min_diff: float = DEFAULT_MIN_DIFF,
    head_filter: str = DEFAULT_HEAD_FILTER,
    positive_only: bool = False,
    skipped_fill: float = 0.0,
) -> Projections:
    """Build the bank's matrices from :class:`KeySums` (SPEC §3; AdaSEKA experts with ``positive_only=True``).

    Heads whose :func:`head_filter_values` fall below ``min_diff`` are skipped; a ``min_diff`` that skips every
    head is an error. Positive-only (AdaSEKA expert) banks filter heads with ``||h+ - h||`` instead of
    ``||h+ - h-||``, fill skipped heads' U and S with ``skipped_fill`` (NaN for experts; zeros for SEKA banks, as
    the reference does) and store U with :func:`canonical_signs` (SEKA banks keep the SVD's own signs, which no
    projector sees, so their files stay byte-equal to earlier builds).
    """
    validate_hyperparameters(top_pct, min_diff, head_filter)
    n = float(sums.count.item())
    if n <= 0:
        raise ValueError("the statistics hold no answer-token rows (N = 0); check that answers occur in their contexts")
    diff = head_filter_values(sums, head_filter=head_filter, positive_only=positive_only)  # [L, H]
    require_kept_heads(diff, min_diff=min_diff, head_filter=head_filter)
    kept = diff >= min_diff

    def decompose(a: torch.Tensor, *, top: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        omega = (a / n).to(torch.float32)
        u, s, _ = torch.linalg.svd(omega, full_matrices=False)
        if positive_only:
            u = canonical_signs(u)
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
