"""The dev guard runs of a model as a markdown table, recomputed from their predictions.

    python scripts/research/dev_guard_table.py docs/results/dev/gemma3-270m

One row per candidate of SEKA's grid in the dev table (``docs/results/dev/<model>.json``) that has a guard run, in
the table's grid order: each guard metric with its 95% interval and its paired test against the unsteered dev run
on the same examples (exact McNemar for 0/1 scores, paired bootstrap otherwise; runs scoring different examples are
refused), lost in the middle's exact match on the documents outside the highlight (a guard only where the table's
rule names it) and PronChange's degeneracy rate (the share of looping generations, never a guard) tested the same
way, and the rule's verdict (the chosen candidate in bold).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from seka_lightning.evidence import METRIC_RESULT, PREDICTIONS, per_id_scores, read_predictions, summarize
from seka_lightning.significance import paired_test

# the columns after CounterFact dev: (benchmark, metric, header), every value x 100
COLUMNS = (
    ("lost_in_the_middle", "exact_match_inside", "exact_match_inside x 100"),
    ("lost_in_the_middle", "exact_match_outside", "exact_match_outside x 100"),
    ("pronchange", "pron_mean_p", "pron_mean_p x 100"),
    ("pronchange", "degenerate", "degenerate % of PronChange"),
)
BENCHMARKS = tuple(dict.fromkeys(benchmark for benchmark, _, _ in COLUMNS))


@functools.cache
def records_of(run: Path) -> list:
    """A run's predictions, read once (each run's file serves several columns, the unsteered one every row)."""
    return read_predictions(run / PREDICTIONS)


def cell(run: Path, baseline: Path, metric: str, scale: float) -> str:
    """``value [low, high] (difference, p)``: the value and interval as the run's ``metric_result.json`` records them
    (:func:`summarize`), then the paired test against the unsteered run on the same ids (none for the unsteered run
    itself); ``-`` without a run."""
    if not (run / METRIC_RESULT).exists():
        return "-"
    records = records_of(run)
    summary = summarize(records, [metric])
    (low, high), value = summary["intervals"][metric], summary["metrics"][metric]
    text = f"{value * scale:.2f} [{low * scale:.2f}, {high * scale:.2f}]"
    if run == baseline:
        return text
    ours, theirs = per_id_scores(records, metric), per_id_scores(records_of(baseline), metric)
    if set(ours) != set(theirs):
        raise ValueError(f"{run} and {baseline} score different examples for {metric}; compare the same slice")
    ids = sorted(ours, key=str)
    test = paired_test([ours[i] for i in ids], [theirs[i] for i in ids])
    return f"{text} ({test.difference * scale:+.2f}, p = {test.p_value:.2g})"


VERDICTS = {"pass": "passes", "fail": "fails", "open": "incomplete (a guard not run)"}


def verdict_of(reasons: list[str]) -> str:
    """``pass`` without reasons, ``open`` when the only reasons are guards not run, else ``fail``."""
    if not reasons:
        return "pass"
    return "open" if all(reason.endswith("no dev run") for reason in reasons) else "fail"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dev", type=Path, help="a model's dev folder, e.g. docs/results/dev/gemma3-270m")
    args = parser.parse_args(argv)
    table = json.loads(args.dev.with_suffix(".json").read_text())
    unguarded = " (not a guard)"  # said of a column whose metric the table's rule did not guard
    titles = [title + ("" if metric in table["guards"] else unguarded) for _, metric, title in COLUMNS]
    header = ["candidate", "CounterFact dev", *titles, "verdict"]
    floors = {metric: table["baseline"][metric]["mean"] - table["baseline"][metric]["se"] for metric in table["guards"]}
    print(
        "Guard floors (unsteered mean - one SE, x 100): "
        + ", ".join(f"{metric} {floor * 100:.2f}" for metric, floor in floors.items())
        + "; a verdict is the rule's (src/seka_lightning/selection.py), not the paired test's.\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    chosen = (table["chosen"] or {}).get("name")  # None where no candidate passes the table's guards
    rows = [{"name": "none", "metrics": table["baseline"], "rejected": []}, *table["candidates"]]
    for row in rows:
        runs = {b: args.dev / b / row["name"] for b in BENCHMARKS}
        if row["name"] != "none" and not any((run / METRIC_RESULT).exists() for run in runs.values()):
            continue
        cells = [f"`{row['name']}`", f"{row['metrics']['efficacy_score']['mean'] * 100:.1f}"]
        cells += [cell(runs[benchmark], args.dev / benchmark / "none", metric, 100) for benchmark, metric, _ in COLUMNS]
        verdict = "unsteered" if row["name"] == "none" else VERDICTS[verdict_of(row["rejected"])]
        cells.append(f"**{verdict}**" if row["name"] == chosen else verdict)
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
