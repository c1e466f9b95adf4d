"""`seka report`: headline table with intervals, paired tests, the plot, and `--verify`, on result folders built here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from seka_lightning.evidence import summarize, write_predictions
from seka_lightning.report import default_table, report
from seka_lightning.significance import paired_bootstrap_test, wilson_interval

IDS = list(range(12))


def counterfact_records(efficacy: list[int], paraphrase: list[tuple[int, int]]) -> list[dict]:
    """One efficacy record and two paraphrase records per case (``paraphrase`` = the two outcomes)."""
    records = []
    for case, won, (p1, p2) in zip(IDS, efficacy, paraphrase, strict=True):
        records.append({"id": case, "kind": "efficacy", "scores": {"efficacy_score": float(won)}})
        records += [{"id": case, "kind": "paraphrase", "scores": {"paraphrase_score": float(p)}} for p in (p1, p2)]
    return records


def write_run(folder: Path, method: str, records: list[dict], **method_settings) -> Path:
    folder.mkdir(parents=True)
    write_predictions(folder / "predictions.jsonl.gz", records)
    result = {**summarize(records), "method": {"method": method, **method_settings}, "model": "m", "config": {}}
    (folder / "metric_result.json").write_text(json.dumps(result))
    return folder


NONE_EFFICACY = [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]
SEKA_EFFICACY = [1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0]  # 8 won only by SEKA, 1 only by none
NONE_PARAPHRASE = [(0, 0), (1, 0), (0, 0), (0, 1)] * 3
SEKA_PARAPHRASE = [(1, 1), (1, 0), (1, 1), (0, 1)] * 3


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    base = root / "counterfact" / "m"
    write_run(base / "none", "none", counterfact_records(NONE_EFFICACY, NONE_PARAPHRASE))
    write_run(base / "seka", "seka", counterfact_records(SEKA_EFFICACY, SEKA_PARAPHRASE))
    for seed, wins in enumerate((3, 4, 6)):
        efficacy = [1] * wins + [0] * (12 - wins)
        write_run(base / "random" / f"seed-{seed}", "random", counterfact_records(efficacy, NONE_PARAPHRASE), seed=seed)
    return root


def test_headline_table_with_intervals_and_seed_spread(results, tmp_path):
    table = report(results=str(results), output=str(tmp_path / "t.md"), plot=None)
    lines = table.splitlines()
    assert lines[0] == "| benchmark | model | method | efficacy_score | paraphrase_score | n |"
    w = wilson_interval(10, 12)
    seka_row = next(line for line in lines if line.startswith("| counterfact | m | seka |"))
    assert seka_row.startswith(f"| counterfact | m | seka | 83.33 [{100 * w.low:.2f}, {100 * w.high:.2f}] | 75.00 [")
    assert seka_row.endswith(" | 12 |")
    mean = 100 * (3 + 4 + 6) / 36
    assert (
        f"| counterfact | m | random | {mean:.2f} (3 seeds: 25.00-50.00) | 25.00 (3 seeds: 25.00-25.00) | 12 |" in lines
    )
    assert (tmp_path / "t.md").read_text() == table


def test_a_random_ablation_with_one_seed_shows_its_interval_not_a_spread(tmp_path):
    root = tmp_path / "results"
    efficacy = [1] * 3 + [0] * 9
    write_run(
        root / "counterfact" / "m" / "random" / "seed-0", "random", counterfact_records(efficacy, NONE_PARAPHRASE)
    )
    w = wilson_interval(3, 12)
    table = report(results=str(root), output=str(tmp_path / "t.md"), plot=None)
    assert f"| counterfact | m | random | 25.00 [{100 * w.low:.2f}, {100 * w.high:.2f}] (1 seed) | " in table


def brute_force_mcnemar(b: int, c: int) -> float:
    n = b + c
    tail = sum(Fraction(math.comb(n, k), 2**n) for k in range(min(b, c) + 1))
    return float(min(Fraction(1), 2 * tail))


def test_paired_tests_against_independent_references(results, tmp_path):
    table = report(results=str(results), output=str(tmp_path / "t.md"), plot=None)
    rows = [line for line in table.splitlines() if " vs " in line]
    assert len(rows) == 2 * 4  # seka vs none and each random seed (not pooled), two metrics each
    p = brute_force_mcnemar(8, 1)
    assert f"| counterfact | m | efficacy_score | seka vs none | mcnemar-exact | 12 | +58.33 | {p:.3g} |" in rows
    none_per_case = [sum(pair) / 2 for pair in NONE_PARAPHRASE]
    seka_per_case = [sum(pair) / 2 for pair in SEKA_PARAPHRASE]
    boot = paired_bootstrap_test(seka_per_case, none_per_case)
    expected = (
        f"| counterfact | m | paraphrase_score | seka vs none | paired-bootstrap | 12 | +50.00 | {boot.p_value:.3g} |"
    )
    assert expected in rows
    assert any(
        row.startswith("| counterfact | m | efficacy_score | seka vs random seed-2 | mcnemar-exact | 12 |")
        for row in rows
    )


def test_pronchange_reports_mean_p_scores_and_degeneracy_with_paired_tests(tmp_path):
    """PronChange's guard metric (pron_mean_p) and the degeneracy rate are headline columns with paired tests: the
    paired bootstrap for the mean P-score, exact McNemar for the 0/1 degeneracy flag."""
    none_p = [0.0, 0.1, 0.0, 0.2, 0.0, 0.05, 0.0, 0.0, 0.3, 0.0, 0.1, 0.0]
    seka_p = [0.1, 0.1, 0.0, 0.3, 0.2, 0.05, 0.0, 0.1, 0.3, 0.1, 0.1, 0.0]
    none_d = [0] * 10 + [1, 1]
    seka_d = [1] * 9 + [0, 0, 1]  # 9 turned degenerate, 1 recovered

    def records(p_scores, degenerate):
        return [
            {"id": i, "scores": {"pron_mean_p": p, "degenerate": float(d)}}
            for i, (p, d) in enumerate(zip(p_scores, degenerate, strict=True))
        ]

    root = tmp_path / "results"
    write_run(root / "pronchange" / "m" / "none", "none", records(none_p, none_d))
    write_run(root / "pronchange" / "m" / "seka", "seka", records(seka_p, seka_d))
    table = report(results=str(root), output=str(tmp_path / "t.md"), plot=None)
    lines = table.splitlines()
    assert lines[0] == "| benchmark | model | method | pron_mean_p | degenerate | n |"
    assert (
        next(line for line in lines if line.startswith("| pronchange | m | seka |"))
        .split(" | ")[4]
        .startswith("83.33 [")
    )
    boot = paired_bootstrap_test(seka_p, none_p)
    mean_diff = 100 * (sum(seka_p) - sum(none_p)) / 12
    assert (
        f"| pronchange | m | pron_mean_p | seka vs none | paired-bootstrap | 12 | {mean_diff:+.2f} | {boot.p_value:.3g} |"
        in lines
    )
    p = brute_force_mcnemar(9, 1)
    assert f"| pronchange | m | degenerate | seka vs none | mcnemar-exact | 12 | +66.67 | {p:.3g} |" in lines


def test_adaseka_is_tested_against_seka_and_each_baseline(results, tmp_path):
    """AdaSEKA is paired with SEKA as well as with every baseline; SEKA is never paired with AdaSEKA."""
    adaseka = [1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0]  # vs SEKA: wins case 8 alone, loses cases 4-6
    write_run(results / "counterfact" / "m" / "adaseka", "adaseka", counterfact_records(adaseka, SEKA_PARAPHRASE))
    table = report(results=str(results), output=str(tmp_path / "t.md"), plot=None)
    rows = [line for line in table.splitlines() if "| efficacy_score | " in line and " vs " in line]
    assert (
        f"| counterfact | m | efficacy_score | adaseka vs seka | mcnemar-exact | 12 | -16.67 | "
        f"{brute_force_mcnemar(1, 3):.3g} |" in rows
    )
    compared = sorted(row.split(" | ")[3] for row in rows)
    assert compared == sorted(
        [f"{method} vs none" for method in ("seka", "adaseka")]
        + [f"{method} vs random seed-{seed}" for method in ("seka", "adaseka") for seed in range(3)]
        + ["adaseka vs seka"]
    )


def test_pairs_only_shared_ids(results, tmp_path):
    spa = counterfact_records(NONE_EFFICACY, NONE_PARAPHRASE)[: 3 * 5]  # cases 0-4 only
    write_run(results / "counterfact" / "m" / "spa", "spa", spa)
    table = report(results=str(results), output=str(tmp_path / "t.md"), plot=None)
    row = next(line for line in table.splitlines() if "efficacy_score | seka vs spa" in line)
    # cases 0-4: SEKA wins 1-3 alone, none wins nothing alone -> 3 discordant pairs
    assert (
        row
        == f"| counterfact | m | efficacy_score | seka vs spa | mcnemar-exact | 5 | +60.00 | {brute_force_mcnemar(3, 0):.3g} |"
    )


def test_verify_passes_then_names_a_tampered_metric_and_a_missing_file(results):
    assert report(results=str(results), verify=True) == (
        f"every metric under {results} equals its recomputation from the predictions"
    )
    seka = results / "counterfact" / "m" / "seka" / "metric_result.json"
    data = json.loads(seka.read_text())
    data["metrics"]["efficacy_score"] = 0.9
    seka.write_text(json.dumps(data))
    (results / "counterfact" / "m" / "random" / "seed-1" / "predictions.jsonl.gz").unlink()
    with pytest.raises(SystemExit) as info:
        report(results=str(results), verify=True)
    assert str(info.value) == (
        "seka report --verify: 2 problem(s)\n"
        f"{results / 'counterfact' / 'm' / 'random' / 'seed-1'}: missing predictions.jsonl.gz beside metric_result.json\n"
        f"{seka}: efficacy_score value: recorded 0.9, recomputed {10 / 12!r} from predictions.jsonl.gz"
    )


def test_dev_runs_are_verified_but_not_tabulated(results, tmp_path):
    """Tuning runs under dev/ (outside the method layout) are re-checked by --verify and left out of the table."""
    dev = write_run(
        results / "dev" / "m" / "counterfact" / "last15-g2",
        "seka",
        counterfact_records(SEKA_EFFICACY, SEKA_PARAPHRASE),
    )
    table = tmp_path / "table.md"
    report(results=str(results), output=str(table), plot=None)
    assert "last15-g2" not in table.read_text() and "| counterfact | m | seka |" in table.read_text()
    data = json.loads((dev / "metric_result.json").read_text())
    data["metrics"]["efficacy_score"] = 0.5
    (dev / "metric_result.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit) as info:
        report(results=str(results), verify=True)
    assert f"{dev / 'metric_result.json'}: efficacy_score value: recorded 0.5" in str(info.value)


def test_verify_from_the_command_line_exits_non_zero(results):
    seka = results / "counterfact" / "m" / "seka" / "metric_result.json"
    data = json.loads(seka.read_text())
    data["n"]["paraphrase_score"] = 11
    seka.write_text(json.dumps(data))
    cmd = [sys.executable, "-m", "seka_lightning.cli", "report", "--verify", "true", "--results", str(results)]
    done = subprocess.run(cmd, env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert f"{seka}: paraphrase_score n: recorded 11, recomputed 12 from predictions.jsonl.gz" in done.stderr


def test_layout_errors_name_the_file_and_the_fix(results, tmp_path):
    stray = write_run(results / "counterfact" / "m" / "adaseka_gate", "adaseka", [{"id": 0, "scores": {"x": 1.0}}])
    with pytest.raises(ValueError) as info:
        report(results=str(results), output=str(tmp_path / "t.md"), plot=None)
    assert str(info.value) == (
        f"{stray / 'metric_result.json'} is not in the results layout <benchmark>/<model>/<method>/ (random: "
        "<benchmark>/<model>/random/seed-<k>/) with a method folder among none, seka, adaseka, key_scaling, random, "
        "pasta, spa; move it there or out of the results folder"
    )
    stray.rename(results / "counterfact" / "m" / "pasta")
    with pytest.raises(ValueError, match="holds a 'adaseka' run inside the 'pasta' folder; move it to its own folder"):
        report(results=str(results), output=str(tmp_path / "t.md"), plot=None)
    with pytest.raises(FileNotFoundError, match="no metric_result.json under"):
        report(results=str(tmp_path / "empty"), output=str(tmp_path / "t.md"))
    assert not (tmp_path / "t.md").exists()


def write_litm_runs(root: Path, models: tuple[str, ...] = ("a", "b")) -> None:
    for model in models:
        for method, seeds in (("none", [None]), ("seka", [None]), ("random", [0, 1, 2])):
            for seed in seeds:
                records = [
                    {"id": f"q{q}@pos{p}", "scores": {"exact_match": float(hit), f"exact_match_pos_{p}": float(hit)}}
                    for q in range(6)
                    for p in (0, 4, 9)
                    if (hit := (q + p + (seed or 0)) % 3 == 0) is not None
                ]
                folder = root / "lost_in_the_middle" / model / method
                write_run(folder if seed is None else folder / f"seed-{seed}", method, records)


def test_lost_in_the_middle_plot(tmp_path):
    root = tmp_path / "results"
    write_litm_runs(root)
    png = tmp_path / "p.png"
    table = report(results=str(root), output=str(tmp_path / "t.md"), plot=str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lost_in_the_middle | a | seka | " in table


@pytest.mark.parametrize(
    ("folder", "root"),
    [
        ("docs/results/counterfact/smollm2-135m/seka", "docs/results"),
        ("docs/results/counterfact/smollm2-135m/random/seed-2", "docs/results"),
        ("counterfact/smollm2-135m/none", "."),
        ("/tmp/t1", None),
        ("runs/counterfact/smollm2-135m/random", None),
        ("runs/counterfact/smollm2-135m/seed-1", None),
    ],
)
def test_results_root_follows_the_layout(folder, root):
    """predict's next-step hint names the folder seka report reads, and none for a folder outside the layout."""
    from seka_lightning.report import results_root

    assert results_root(folder) == (None if root is None else Path(root))


def test_a_report_of_other_runs_writes_inside_them_and_never_replaces_the_committed_table_or_plot(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    write_litm_runs(Path("docs/results"), models=("a",))
    report(overwrite=False)  # the committed folder: its table beside it, its plot inside it
    committed = [Path("docs/results_table.md"), Path("docs/results/lost_in_the_middle.png")]
    before = [path.read_bytes() for path in committed]
    other = Path("elsewhere")
    write_litm_runs(other, models=("b",))
    report(results=str(other), overwrite=True)
    assert [path.read_bytes() for path in committed] == before
    assert (other / "results_table.md").read_text().startswith("| benchmark | model | method |")
    assert (other / "lost_in_the_middle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same folder named another way is still the committed one
    assert default_table(tmp_path / "docs" / "results") == Path("docs/results_table.md")
    assert default_table("docs/results/../results") == Path("docs/results_table.md")
    assert default_table(other) == other / "results_table.md"
