"""What every benchmark writes: the environment, robust summaries of repeated timings, atomic JSON and markdown."""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

import seka_lightning


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, so a result file says what produced it."""
    import lightning
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "seka_lightning": seka_lightning.__version__,
        "device": str(device),
        "cuda": torch.version.cuda,
        "gpu_name": None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if device.type == "cuda":
        env["gpu_name"] = torch.cuda.get_device_name(device)
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, extremes and the relative spread ``(max - min) / median`` of repeated measurements."""
    if not samples:
        raise ValueError("summarize() needs at least one sample")
    median = statistics.median(samples)
    return {
        "median": median,
        "min": min(samples),
        "max": max(samples),
        "spread_rel": (max(samples) - min(samples)) / median if median > 0 else 0.0,
    }


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a host clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak allocated bytes since the last reset (None on devices without an allocator counter, e.g. CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def allocated_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return None


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is unknown or the reference is zero."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def paired_ratio(values: Sequence[float], references: Sequence[float]) -> float | None:
    """Median over rounds of ``values[i] / references[i]``: the ratio of two interleaved measurements, robust to drift
    that moves both alike from one round to the next. None unless both have the same, non-zero number of rounds."""
    if not values or len(values) != len(references) or any(r <= 0 for r in references):
        return None
    return statistics.median(v / r for v, r in zip(values, references, strict=True))


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, Callable[[Any], str]]]) -> str:
    """A GitHub markdown table; ``columns`` are ``(header, key, formatter)``; missing values show as ``-``."""
    lines = [
        "| " + " | ".join(header for header, _, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        cells = [fmt(row[key]) if row.get(key) is not None else "-" for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seconds(value: float) -> str:
    return f"{value:.3f}"


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def times(value: float) -> str:
    return f"{value:.2f}x"


def plain(value: Any) -> str:
    return str(value)
