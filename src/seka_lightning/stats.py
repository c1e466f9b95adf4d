"""Streaming key statistics for building projections (SPEC §3).

Everything a bank needs is a sum over answer-token rows, so the statistics stream in float64 and all-reduce by
sum across DDP ranks. The keys themselves are never kept. On a device without float64 (Apple MPS) the sums stay on
the CPU and each batch's answer-token keys are copied there before they are added.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torchmetrics import Metric

from seka_lightning.files import atomic_path

STATISTICS_FORMAT = "seka-lightning-statistics"


@dataclass
class KeySums:
    """The sufficient statistics of SPEC §3 for L layers, H KV heads and head dim d.

    ``count`` is N (rows); ``a0 = Σ hᵀh``, ``a_pos = Σ hᵀh+``, ``a_neg = Σ hᵀh-`` are ``[L, H, d, d]``;
    ``d_pos_neg = Σ ||h+ - h-||²`` and ``d_pos_neutral = Σ ||h+ - h||²`` are ``[L, H]``. All float64.
    """

    count: torch.Tensor
    a0: torch.Tensor
    a_pos: torch.Tensor
    a_neg: torch.Tensor
    d_pos_neg: torch.Tensor
    d_pos_neutral: torch.Tensor

    @classmethod
    def zeros(cls, num_layers: int, num_heads: int, head_dim: int) -> KeySums:
        mat = (num_layers, num_heads, head_dim, head_dim)
        return cls(
            count=torch.zeros((), dtype=torch.float64),
            a0=torch.zeros(mat, dtype=torch.float64),
            a_pos=torch.zeros(mat, dtype=torch.float64),
            a_neg=torch.zeros(mat, dtype=torch.float64),
            d_pos_neg=torch.zeros(mat[:2], dtype=torch.float64),
            d_pos_neutral=torch.zeros(mat[:2], dtype=torch.float64),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def save(self, path: str | Path, *, metadata: dict | None = None) -> None:
        """Write the sums (and JSON ``metadata``, tagged as statistics) to a safetensors file atomically."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        atomic_save_safetensors(tensors, path, metadata={**(metadata or {}), "format": STATISTICS_FORMAT})

    @classmethod
    def load(cls, path: str | Path) -> tuple[KeySums, dict]:
        """Read sums written by :meth:`save`; returns ``(sums, metadata)``."""
        tensors, metadata = load_safetensors(path)
        missing = [f.name for f in fields(cls) if f.name not in tensors]
        if missing:
            raise ValueError(f"{path}: not a key-statistics file, missing tensors {missing}")
        metadata.pop("format", None)
        sums = cls(**{f.name: tensors[f.name].to(torch.float64) for f in fields(cls)})
        if not all(torch.isfinite(t).all() for t in sums.tensors().values()):
            raise ValueError(f"{path}: the statistics hold NaN or inf; the file is corrupt, rebuild it with seka fit")
        if int(sums.count.item()) <= 0:
            raise ValueError(f"{path}: the statistics hold no rows (N = 0); rebuild them from data with answers")
        return sums, metadata


def require_finite_sums(sums: Iterable[torch.Tensor]) -> None:
    """Raise if any of the statistics' sums holds NaN or inf (which only non-finite keys can cause)."""
    if not bool(torch.stack([torch.isfinite(t).all() for t in sums]).all()):
        raise ValueError(
            "non-finite keys (NaN or inf) reached the statistics; check the model dtype and weights (float16 "
            "overflows in some models: use bfloat16 or float32)"
        )


def supports_float64(device: torch.device) -> bool:
    """Whether tensors of ``device`` can hold float64 (Apple's MPS cannot)."""
    return device.type != "mps"


class KeyStatistics(Metric):
    """A torchmetrics state holding :class:`KeySums`; ``dist_reduce_fx="sum"`` makes DDP reduction exact.

    The sums follow the module to its device, except to a device without float64 (:func:`supports_float64`, e.g.
    Apple MPS): there they stay on the CPU, and :meth:`update` copies the answer-token keys (a few rows per text) to
    the CPU before the float64 products, so the sums are the same as on any other device.
    """

    full_state_update = False

    def __init__(self, num_layers: int, num_heads: int, head_dim: int) -> None:
        super().__init__(sync_on_compute=True)
        for name, value in KeySums.zeros(num_layers, num_heads, head_dim).tensors().items():
            self.add_state(name, default=value, dist_reduce_fx="sum", persistent=True)

    def _apply(self, fn: Any, exclude_state: Any = ()) -> KeyStatistics:
        """Move the sums with the module, except to a device without float64 (they stay where they are)."""
        target = fn(torch.zeros(1, device=self.device)).device
        if not supports_float64(target):
            exclude_state = (*exclude_state, *self._defaults)
        return super()._apply(fn, exclude_state=exclude_state)

    def update(self, neutral: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> None:
        """Add answer-token keys, each ``[L, M, H, d]`` (M rows aligned across the three texts)."""
        if not neutral.shape == positive.shape == negative.shape:
            raise ValueError(
                f"key shapes differ: neutral {tuple(neutral.shape)}, positive {tuple(positive.shape)}, "
                f"negative {tuple(negative.shape)}"
            )
        # No finiteness check here: it would make the host wait for the GPU on every batch. A NaN or inf key always
        # leaves a distance sum non-finite (Σ ||h+ - h||² covers h and h+, Σ ||h+ - h-||² covers h-: a square of a
        # non-finite difference is inf or NaN, and sums of non-negative terms cannot cancel, also across ranks);
        # check_finite() reads the sums once, at a checkpoint and in compute().
        # to the sums' device first (a no-op unless they are kept on the CPU), then to float64 there
        h, hp, hn = (x.to(self.a0.device).to(torch.float64) for x in (neutral, positive, negative))
        self.count += h.shape[1]
        self.a0 += torch.einsum("lmhd,lmhe->lhde", h, h)
        self.a_pos += torch.einsum("lmhd,lmhe->lhde", h, hp)
        self.a_neg += torch.einsum("lmhd,lmhe->lhde", h, hn)
        self.d_pos_neg += (hp - hn).square().sum(dim=(1, 3))
        self.d_pos_neutral += (hp - h).square().sum(dim=(1, 3))

    def check_finite(self) -> None:
        """Raise if NaN or inf keys reached the sums (one host-device sync)."""
        require_finite_sums(getattr(self, f.name) for f in fields(KeySums))

    def compute(self) -> KeySums:
        self.check_finite()
        return KeySums(**{f.name: getattr(self, f.name) for f in fields(KeySums)})


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, *, metadata: dict | None = None
) -> None:
    """Save ``tensors`` with JSON ``metadata`` via a temp file and rename, so a crash never leaves half a file."""
    header = {"seka": json.dumps(metadata or {}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a safetensors file written by :func:`atomic_save_safetensors`; corrupt files get a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        metadata = json.loads(header.get("seka", "{}"))
    except (SafetensorError, json.JSONDecodeError, OSError) as err:
        raise ValueError(f"{path} is corrupt or not a safetensors file ({err}); rebuild it") from err
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and torch.isnan(tensor).any() and not metadata.get("nan_allowed", False):
            raise ValueError(f"{path}: tensor {name!r} contains NaN; the file is corrupt, rebuild it")
    return tensors, metadata
