"""``seka report``: headline numbers with 95% intervals, paired tests, and the lost-in-the-middle plot, read from
``docs/results/<benchmark>/<model>/<method>/``; ``--verify`` re-derives every number from its predictions.

Layout. A method folder is one of :data:`METHODS` and holds ``metric_result.json`` and ``predictions.jsonl.gz``
(written by :class:`~seka_lightning.lit.writers.BenchmarkWriter`). The random-projection ablation keeps one run per
seed in ``random/seed-<k>/`` (three seeds, e.g. ``--model.method.seed 0/1/2``).

Headline table. Each metric of :data:`HEADLINE` is shown x100 with its 95% interval from ``metric_result.json``
(Wilson for 0/1 scores, percentile bootstrap over ids otherwise). The random ablation is shown as the mean over its
seeds with the min-max range over seeds (its per-seed intervals are in the seed folders; a single seed is shown with
its interval, marked ``(1 seed)``); ``n`` lists the id counts.

Paired tests. SEKA and AdaSEKA are each compared with none, key_scaling, every random seed separately (not pooled:
each seed is one fixed set of projections, so each is its own paired comparison), PASTA and SPA, on the ids both
runs scored: exact McNemar when both per-id scores are 0/1, else the paired bootstrap
(:mod:`seka_lightning.significance`). A row gives the number of paired ids, the difference of means (x100) and the
two-sided p-value; no correction for multiple comparisons is applied.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seka_lightning.evidence import METRIC_RESULT, PREDICTIONS, per_id_scores, read_predictions, verify_results
from seka_lightning.files import PLOT, REPORT, atomic_path, check_output, write_text
from seka_lightning.significance import paired_test

log = logging.getLogger(__name__)

METHODS = ("none", "seka", "adaseka", "key_scaling", "random", "pasta", "spa")
BASELINES = ("none", "key_scaling", "random", "pasta", "spa")
# each steered method and what it is tested against: AdaSEKA also against SEKA (does routing over experts help?)
COMPARED = {"seka": BASELINES, "adaseka": ("seka", *BASELINES)}
HEADLINE = (
    "efficacy_score",
    "paraphrase_score",
    "top1_accuracy",
    "pron_score_p",
    "pron_score_a",
    "pron_mean_p",
    "pron_mean_a",
    "degenerate",
    "exact_match",
    "exact_match_inside",
    "exact_match_outside",
)
LAYOUT = "<benchmark>/<model>/<method>/ (random: <benchmark>/<model>/random/seed-<k>/)"
DEV_FOLDER = "dev"
"""The tuning runs (``dev/<model>/<benchmark>/<candidate>/``): checked by ``--verify``, never tabulated."""


@dataclass
class Run:
    """One result folder of the layout."""

    benchmark: str
    model: str
    method: str
    seed: int | None
    folder: Path
    result: dict[str, Any]
    _records: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return self.method if self.seed is None else f"{self.method} seed-{self.seed}"

    def records(self) -> list[dict[str, Any]]:
        if self._records is None:
            self._records = read_predictions(self.folder / PREDICTIONS)
        return self._records


def read_runs(root: str | Path) -> list[Run]:
    """Every run under ``root``, checked against the layout (folder names, and the method recorded in the file)."""
    root = Path(root)
    files = sorted(f for f in root.rglob(METRIC_RESULT) if f.relative_to(root).parts[0] != DEV_FOLDER)
    if not files:
        raise FileNotFoundError(f"no {METRIC_RESULT} under {root}; point --results at a folder laid out as {LAYOUT}")
    return [_read_run(root, file) for file in files]


SEED_FOLDER = re.compile(r"seed-(\d+)")


def _run_depth(parts: Sequence[str]) -> int | None:
    """How many trailing folders of ``parts`` name one run in the layout: 3 for ``<benchmark>/<model>/<method>``, 4
    for ``<benchmark>/<model>/random/seed-<k>``; None when they name none."""
    if len(parts) >= 4 and parts[-2] == "random" and SEED_FOLDER.fullmatch(parts[-1]):
        return 4
    if len(parts) >= 3 and parts[-1] in METHODS and parts[-1] != "random":
        return 3
    return None


def results_root(run_folder: str | Path) -> Path | None:
    """The results folder that holds ``run_folder`` in the layout (``<root>/<benchmark>/<model>/<method>/``, random:
    ``.../random/seed-<k>/``), or None when the folder is not laid out so."""
    folder = Path(run_folder)
    depth = _run_depth(folder.parts)
    return None if depth is None else folder.parents[depth - 1]


def _read_run(root: Path, file: Path) -> Run:
    parts = file.parent.relative_to(root).parts
    if _run_depth(parts) != len(parts):
        raise ValueError(
            f"{file} is not in the results layout {LAYOUT} with a method folder among {', '.join(METHODS)}; "
            "move it there or out of the results folder"
        )
    try:
        result = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err.msg}); re-run the evaluation that wrote it") from None
    if "metrics" not in result or "method" not in result:
        raise ValueError(f"{file} has no 'metrics'/'method'; it was not written by seka predict")
    recorded = result["method"].get("method")
    if recorded != parts[2]:
        raise ValueError(f"{file} holds a {recorded!r} run inside the {parts[2]!r} folder; move it to its own folder")
    seed = int(SEED_FOLDER.fullmatch(parts[3]).group(1)) if len(parts) == 4 else None
    return Run(benchmark=parts[0], model=parts[1], method=parts[2], seed=seed, folder=file.parent, result=result)


def _groups(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.benchmark, r.model, METHODS.index(r.method), r.seed or 0)):
        groups.setdefault((run.benchmark, run.model), []).append(run)
    return groups


def _columns(runs: list[Run]) -> list[str]:
    return [m for m in HEADLINE if any(m in r.result["metrics"] for r in runs)]


def _cell(runs: list[Run], metric: str) -> str:
    """``value [low, high]`` x100 for one run; ``mean (k seeds: min-max)`` over the seeds of the random ablation
    (one seed: its value and interval, marked ``(1 seed)``)."""
    values = [r.result["metrics"][metric] for r in runs if metric in r.result["metrics"]]
    if not values:
        return ""
    if runs[0].method == "random" and len(values) > 1:
        return f"{100 * statistics.fmean(values):.2f} ({len(values)} seeds: {100 * min(values):.2f}-{100 * max(values):.2f})"
    low, high = runs[0].result.get("intervals", {}).get(metric, [None, None])
    interval = "" if low is None else f" [{100 * low:.2f}, {100 * high:.2f}]"
    return f"{100 * values[0]:.2f}{interval}" + (" (1 seed)" if runs[0].method == "random" else "")


def headline_table(runs: list[Run]) -> str:
    """One row per benchmark, model and method, with the headline metrics (x100), intervals and id counts."""
    columns = _columns(runs)
    lines = [
        "| benchmark | model | method | " + " | ".join(columns) + " | n |",
        "|---|---|---|" + "---|" * (len(columns) + 1),
    ]
    for (benchmark, model), group in _groups(runs).items():
        for method in dict.fromkeys(r.method for r in group):
            members = [r for r in group if r.method == method]
            counts = sorted({r.result.get("n", {}).get(c) for r in members for c in columns} - {None})
            cells = [_cell(members, c) for c in columns]
            lines.append(
                f"| {benchmark} | {model} | {method} | " + " | ".join(cells) + f" | {'/'.join(map(str, counts))} |"
            )
    return "\n".join(lines) + "\n"


def paired_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """SEKA and AdaSEKA against each baseline run (random: per seed), and AdaSEKA against SEKA, on their shared ids,
    per headline metric."""
    rows = []
    for (benchmark, model), group in _groups(runs).items():
        for steered in (r for r in group if r.method in COMPARED):
            for baseline in (r for r in group if r.method in COMPARED[steered.method]):
                for metric in _columns([steered, baseline]):
                    mine, theirs = per_id_scores(steered.records(), metric), per_id_scores(baseline.records(), metric)
                    shared = [key for key in mine if key in theirs]
                    if not shared:
                        continue
                    test = paired_test([mine[k] for k in shared], [theirs[k] for k in shared])
                    rows.append(
                        {
                            "benchmark": benchmark,
                            "model": model,
                            "metric": metric,
                            "comparison": f"{steered.label} vs {baseline.label}",
                            "test": test.test,
                            "n": test.n,
                            "difference": test.difference,
                            "p_value": test.p_value,
                        }
                    )
    return rows


def paired_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| benchmark | model | metric | comparison | test | n paired | difference (x100) | p-value |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['benchmark']} | {r['model']} | {r['metric']} | {r['comparison']} | {r['test']} | {r['n']} | "
        f"{100 * r['difference']:+.2f} | {r['p_value']:.3g} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def _position_series(runs: list[Run]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Gold positions, values (x100) and lower/upper error lengths: the 95% interval for one run, the min-max
    range over seeds (around their mean) for the random ablation."""
    keys = sorted(
        (int(m.group(1)), k) for k in runs[0].result["metrics"] if (m := re.fullmatch(r"exact_match_pos_(\d+)", k))
    )
    positions, values, below, above = [], [], [], []
    for position, key in keys:
        seen = [r.result["metrics"][key] for r in runs if key in r.result["metrics"]]
        centre = statistics.fmean(seen)
        if len(runs) > 1:
            low, high = min(seen), max(seen)
        else:
            low, high = runs[0].result.get("intervals", {}).get(key, [centre, centre])
        positions.append(position)
        values.append(100 * centre)
        below.append(100 * (centre - low))
        above.append(100 * (high - centre))
    return positions, values, below, above


def position_plot(runs: list[Run], path: Path) -> Path | None:
    """Lost in the middle: exact match by gold position, one panel per model, one colour per method in every panel,
    95% intervals as error bars (random: mean and min-max over seeds; one seed: its interval), the id count per position
    in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    litm = [r for r in runs if any(k.startswith("exact_match_pos_") for k in r.result["metrics"])]
    if not litm:
        return None
    colours = {method: plt.get_cmap("tab10")(i) for i, method in enumerate(METHODS)}
    models = sorted({r.model for r in litm})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models, strict=True):
        group = [r for r in litm if r.model == model]
        methods = list(dict.fromkeys(r.method for r in sorted(group, key=lambda r: METHODS.index(r.method))))
        counts: set[int] = set()
        for i, method in enumerate(methods):
            members = [r for r in group if r.method == method]
            positions, values, below, above = _position_series(members)
            counts |= {v for r in members for k, v in r.result.get("n", {}).items() if k.startswith("exact_match_pos_")}
            shift = 0.8 * (i - (len(methods) - 1) / 2) / max(1, len(methods) - 1)  # keep error bars apart
            label = method
            if method == "random":  # one seed: its interval, as any run (_position_series)
                label += " (1 seed)" if len(members) == 1 else f" (mean, min-max of {len(members)} seeds)"
            ax.errorbar(
                [p + shift for p in positions],
                values,
                yerr=[below, above],
                marker="o",
                capsize=3,
                color=colours[method],
                label=label,
            )
            ax.set_xticks(positions)
        n = "n unknown" if not counts else f"n={min(counts)}" if len(counts) == 1 else f"n={min(counts)}-{max(counts)}"
        ax.set_title(f"Lost in the middle: {model} ({n} per position)", fontsize=9)
        ax.set_xlabel("position of the gold document (0 = first)")
    axes[0][0].set_ylabel("best-subspan exact match (%), 95% interval")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    axes[0][-1].legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


COMMITTED_RESULTS, COMMITTED_TABLE = Path("docs/results"), Path("docs/results_table.md")
PLOT_IN_RESULTS = "RESULTS/lost_in_the_middle.png"  # the plot's default: inside the results folder it shows


def default_table(results: str | Path) -> Path:
    """The committed table for the committed results; a table inside any other results folder (so a report of other
    runs never replaces the committed one)."""
    committed = Path(results).resolve() == COMMITTED_RESULTS.resolve()
    return COMMITTED_TABLE if committed else Path(results) / "results_table.md"


def report(
    *,
    results: str = "docs/results",
    output: str | None = None,
    plot: str | None = PLOT_IN_RESULTS,
    verify: bool = False,
    overwrite: bool = False,
) -> str:
    """Headline numbers with 95% intervals and paired tests (markdown) and a lost-in-the-middle plot (PNG) from a
    results folder; with ``--verify``, re-derive every metric from its predictions and exit non-zero on a mismatch.

    Args:
        results: the results folder, laid out as ``<benchmark>/<model>/<method>/`` (random: ``random/seed-<k>/``).
        output: the markdown file to write (default: ``docs/results_table.md`` for ``docs/results``, else
            ``RESULTS/results_table.md``).
        plot: the PNG to write (``null`` = no plot; default: ``lost_in_the_middle.png`` in the results folder).
        verify: only check that every ``metric_result.json`` equals its recomputation from
            ``predictions.jsonl.gz`` (and that the predictions exist); write nothing.
        overwrite: replace an existing table at ``output`` and plot at ``plot``.
    """
    if verify:
        problems = verify_results(results)
        if problems:
            raise SystemExit(f"seka report --verify: {len(problems)} problem(s)\n" + "\n".join(problems))
        message = f"every metric under {results} equals its recomputation from the predictions"
        log.info(message)
        return message
    runs = read_runs(results)  # cheap, and an input error comes before an output error
    output = str(default_table(results)) if output is None else output
    if plot == PLOT_IN_RESULTS:
        plot = str(Path(results) / Path(PLOT_IN_RESULTS).name)
    check_output(output, kind=REPORT, inputs={"--results": results}, overwrite=overwrite)
    if plot is not None:
        check_output(plot, kind=PLOT, inputs={"--results": results, "--output": output}, overwrite=overwrite)
    table = headline_table(runs) + "\nPaired tests (two-sided):\n\n" + paired_table(paired_rows(runs))
    out = write_text(output, table)
    if plot is not None:
        position_plot(runs, Path(plot))
    log.info("wrote %s from %d runs", out, len(runs))
    return table
