"""``seka report``: a markdown comparison table and a PNG plot from several evaluation result folders."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from seka_lightning.files import PLOT, REPORT, atomic_path, check_output, write_text

log = logging.getLogger(__name__)

HEADLINE = ("efficacy_score", "paraphrase_score", "top1_accuracy", "pron_score_p", "pron_score_a", "exact_match")


def read_results(folders: list[str]) -> list[dict[str, Any]]:
    """``metric_result.json`` of each folder (a folder may also be a parent searched recursively)."""
    files: list[Path] = []
    for folder in folders:
        path = Path(folder)
        found = [path] if path.is_file() else sorted(path.rglob("metric_result.json"))
        if not found:
            raise FileNotFoundError(f"no metric_result.json under {folder}")
        files += found
    results = []
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON ({err.msg}); re-run the evaluation that wrote it") from None
        if "metrics" not in data or "method" not in data:
            raise ValueError(f"{file} has no 'metrics'/'method'; it was not written by seka predict")
        results.append({**data, "path": str(file)})
    return results


def run_label(result: dict[str, Any]) -> str:
    """The method's name, followed by the run's folder name in brackets where the two differ (two runs of one
    method, e.g. ``adaseka`` with and without a learned gate, stay apart)."""
    method, run = result["method"]["method"], Path(result["path"]).parent.name
    return method if run == method else f"{method} ({run})"


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per run (benchmark, model, method) with the headline metrics (x100) that the row has."""
    columns = [key for key in HEADLINE if any(key in r["metrics"] for r in results)]
    lines = ["| benchmark | model | method | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for r in sorted(results, key=lambda r: (r["config"]["data"].get("benchmark", ""), r["model"], run_label(r))):
        cells = [f"{100 * r['metrics'][c]:.2f}" if c in r["metrics"] else "" for c in columns]
        lines.append(
            f"| {r['config']['data'].get('benchmark', '')} | {r['model']} | {run_label(r)} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def position_plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    """Lost-in-the-middle exact match by gold position: one panel per model, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    litm = [r for r in results if any(k.startswith("exact_match_pos_") for k in r["metrics"])]
    if not litm:
        return None
    models = sorted({r["model"] for r in litm})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models, strict=True):
        for r in sorted((r for r in litm if r["model"] == model), key=run_label):
            points = sorted(
                (int(m.group(1)), v)
                for k, v in r["metrics"].items()
                if (m := re.fullmatch(r"exact_match_pos_(\d+)", k))
            )
            ax.plot([p for p, _ in points], [100 * v for _, v in points], marker="o", label=run_label(r))
        ax.set_title(f"Lost in the middle: {model}", fontsize=9)
        ax.set_xlabel("position of the gold document")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("best-subspan exact match (%)")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def report(
    *,
    results: list[str],
    output: str = "docs/results_table.md",
    plot: str | None = "docs/results/lost_in_the_middle.png",
    overwrite: bool = False,
) -> str:
    """Render a comparison table (markdown) and a lost-in-the-middle plot (PNG) from result folders.

    Args:
        results: folders holding ``metric_result.json`` files (searched recursively) or the files themselves.
        output: the markdown file to write.
        plot: the PNG to write (None = no plot).
        overwrite: replace an existing table at ``output`` and plot at ``plot``.
    """
    rows = read_results(results)
    check_output(output, kind=REPORT, inputs={"--results": results}, overwrite=overwrite)
    if plot is not None:
        check_output(plot, kind=PLOT, inputs={"--results": results, "--output": output}, overwrite=overwrite)
    table = markdown_table(rows)
    out = write_text(output, table)
    if plot is not None:
        position_plot(rows, Path(plot))
    log.info("wrote %s from %d results", out, len(rows))
    return table
