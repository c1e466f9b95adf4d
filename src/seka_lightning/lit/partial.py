"""A predict run's partial state, so that an interrupted ``seka predict`` resumes where it stopped.

Every ``checkpoint_every_s`` seconds (at a batch end) each rank saves, atomically, the rows of the batches it has
finished, the ids its scorer skipped and the scorer's metric states (torchmetrics), under a fingerprint of what the
rows depend on (the package's code and library versions, the weights, the evaluator's settings, the method, the data
settings, the number of batches and of ranks). A run with the same fingerprint replays the saved batches without
running the model and goes on from the first unsaved batch: batches keep their composition, so the rows, the metrics
and the written files equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from seka_lightning.files import atomic_path

FORMAT = 1


@dataclass
class PartialRun:
    """What a rank has finished: ``rows[i]`` are batch i's prediction rows."""

    fingerprint: str
    rows: list[list[dict[str, Any]]] = field(default_factory=list)
    skipped_highlight: list[Any] = field(default_factory=list)
    metric_states: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_time_s: float = 0.0


PREFIX = "predict_partial.rank"


def partial_path(output_dir: Path, rank: int) -> Path:
    """The rank's partial file in the writer's output folder."""
    return output_dir / f"{PREFIX}{rank}.pt"


def partial_files(output_dir: Path) -> list[Path]:
    """Every rank's partial file in ``output_dir`` (of this run's ranks, or of an earlier run with more)."""
    return sorted(output_dir.glob(f"{PREFIX}*.pt"))


def fingerprint(settings: dict[str, Any]) -> str:
    """A stable text of the settings the rows depend on (JSON, sorted keys; other values by ``str``)."""
    return json.dumps(settings, sort_keys=True, default=str)


def metric_states(module: nn.Module) -> dict[str, dict[str, Any]]:
    """The state of every torchmetrics metric inside ``module``, by submodule name, with its update count."""
    return {
        name: {"states": {key: _detached(value) for key, value in metric.metric_state.items()},
               "update_count": metric._update_count}
        for name, metric in module.named_modules()
        if isinstance(metric, Metric)
    }  # fmt: skip


def load_metric_states(module: nn.Module, saved: dict[str, dict[str, Any]], device: torch.device) -> None:
    """Put ``saved`` (from :func:`metric_states`) back into the metrics of ``module``; the metrics must match."""
    metrics = {name: m for name, m in module.named_modules() if isinstance(m, Metric)}
    if set(metrics) != set(saved) or any(set(metrics[n]._defaults) != set(saved[n]["states"]) for n in saved):
        raise ValueError(
            f"the saved scorer states ({sorted(saved)}) do not match this scorer's metrics ({sorted(metrics)})"
        )
    for name, entry in saved.items():
        metric = metrics[name]
        for key, value in entry["states"].items():
            setattr(metric, key, _to(value, device))
        metric._update_count = entry["update_count"]
        metric._computed = None


def save_partial(path: Path, run: PartialRun) -> None:
    """Write ``run`` to ``path`` atomically (a temp file renamed over it)."""
    payload = {
        "format": FORMAT,
        "fingerprint": run.fingerprint,
        "rows": run.rows,
        "skipped_highlight": run.skipped_highlight,
        "metric_states": run.metric_states,
        "wall_time_s": run.wall_time_s,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_partial(path: Path, expected: str) -> PartialRun:
    """Read a partial file written by :func:`save_partial` for a run whose fingerprint is ``expected``.

    Raises ``ValueError`` naming the file and the way out when it is unreadable or from a run with other settings.
    """
    way_out = (
        f"delete {path} to start the run over (or pass the writer's `resume: false`), or run with the settings "
        "that wrote it"
    )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # plain data and tensors only
    except Exception as error:  # truncated or not a torch file
        raise ValueError(f"cannot read the partial predict state {path} ({error}); {way_out}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a partial predict state of format {FORMAT}; {way_out}")
    if payload["fingerprint"] != expected:
        raise ValueError(
            f"{path} was written by a predict run with other settings; {way_out}. "
            f"Saved: {payload['fingerprint']}. This run: {expected}"
        )
    return PartialRun(
        fingerprint=payload["fingerprint"],
        rows=payload["rows"],
        skipped_highlight=payload["skipped_highlight"],
        metric_states=payload["metric_states"],
        wall_time_s=payload["wall_time_s"],
    )


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, list):
        return [_detached(v) for v in value]
    return value


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value
