"""Gemma-3's PronChange SEKA vs a GPU run, with the run's exposed bios taken from their CPU re-runs here.

The GPU runs of unsteered, PASTA and SPA computed their batch of bios 640-703 wrong, and key scaling and random seeds
0-2 their five exposed batches of 16 (README); their other batches are not exposed. This recomputes SEKA's paired
comparison with each GPU run after replacing the re-run bios' scores by the CPU re-run's, an estimate until the whole
run is re-made, and counts the re-run generations identical to the GPU run's. A run in ``REPLACED`` is re-made: the
committed result is the full CPU re-run and the GPU run is kept here; its rows also give SEKA against the full re-run
and the full re-run's generations identical to the GPU run's, in the exposed bios and elsewhere:

    python docs/research/sdpa_kv_len_bug/pronchange_estimate.py
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from seka_lightning.significance import paired_test

HERE = Path(__file__).parent
RESULTS = HERE.parents[1] / "results" / "pronchange" / "gemma3-270m"
METRICS = ("pron_mean_p", "pron_mean_a", "degenerate")
BATCHES_OF_16 = (112, 304, 368, 688, 832)  # the first bio of each exposed batch of 16 (exposed_batches.json)
REPLACED = {  # committed result (a full CPU re-run) -> the GPU run, kept here
    "none": "pronchange-gemma3-270m-none-gpu",
    "pasta": "pronchange-gemma3-270m-pasta-gpu",
    "spa": "pronchange-gemma3-270m-spa-gpu",
    "key_scaling": "pronchange-gemma3-270m-key_scaling-gpu",
}
RERUNS = {  # GPU run -> the CPU re-runs of its batches (folders here)
    "none": ["pronchange-gemma3-270m-none-cpu-bios-0-63", "pronchange-gemma3-270m-none-cpu-bios-640-703"],
    "pasta": ["pronchange-gemma3-270m-pasta-cpu-bios-640-703"],
    "spa": ["pronchange-gemma3-270m-spa-cpu-bios-640-703"],
    **{
        run: [f"pronchange-gemma3-270m-{name}-cpu-bios-{s}-{s + 15}" for s in BATCHES_OF_16]
        for run, name in (
            ("key_scaling", "key_scaling"),
            ("random/seed-0", "random-seed-0"),
            ("random/seed-1", "random-seed-1"),
            ("random/seed-2", "random-seed-2"),
        )
    },
}


def read(path: Path) -> dict[str, dict]:
    with gzip.open(path, "rt") as handle:
        return {row["uid"]: row for row in map(json.loads, handle)}


def replaced(run: str) -> bool:
    """Whether ``run``'s committed result is a full CPU re-run, its GPU run kept here."""
    return run in REPLACED and (HERE / REPLACED[run]).is_dir()


def gpu_run(run: str) -> dict[str, dict]:
    """The GPU run's records: kept here once replaced, else still the committed result."""
    return read((HERE / REPLACED[run] if replaced(run) else RESULTS / run) / "predictions.jsonl.gz")


def exposed_uids(run: str) -> set[str]:
    """The uids of the GPU run's exposed batches (``exposed_batches.json`` names the runs by their results folder)."""
    for scan in json.loads((HERE / "exposed_batches.json").read_text()):
        if scan["result"] == f"docs/results/pronchange/gemma3-270m/{run}":
            return {uid for batch in scan["exposed_batches"] for uid in batch["uids"]}
    raise KeyError(f"exposed_batches.json has no scan of {run}")


def identical(rows: dict[str, dict], gpu: dict[str, dict]) -> int:
    return sum(row["generation"] == gpu[uid]["generation"] for uid, row in rows.items())


def main() -> None:
    seka = read(RESULTS / "seka" / "predictions.jsonl.gz")
    uids = sorted(seka)
    report: dict[str, dict] = {}
    for run, folders in RERUNS.items():
        gpu = gpu_run(run)
        rerun: dict[str, dict] = {}
        for folder in folders:
            rerun.update(read(HERE / folder / "predictions.jsonl.gz"))
        runs = {"gpu_run": gpu, "with_cpu_batches": {**gpu, **rerun}}
        report[run] = {"bios": len(uids), "replaced": len(rerun), "identical_generations": identical(rerun, gpu)}
        if replaced(run):
            runs["full_cpu_rerun"] = full = read(RESULTS / run / "predictions.jsonl.gz")
            exposed = exposed_uids(run)
            report[run]["full_cpu_rerun_identical_generations"] = {
                "exposed": f"{identical({u: r for u, r in full.items() if u in exposed}, gpu)} of {len(exposed)}",
                "elsewhere": f"{identical({u: r for u, r in full.items() if u not in exposed}, gpu)} of "
                f"{len(full) - len(exposed)}",
            }
        for name in METRICS:
            steered = [seka[u]["scores"][name] for u in uids]
            for label, base in runs.items():
                test = paired_test(steered, [base[u]["scores"][name] for u in uids])
                report[run][f"{name} {label}"] = {
                    run: sum(base[u]["scores"][name] for u in uids) / len(uids),
                    "seka": sum(steered) / len(uids),
                    "seka_minus_run": test.difference,
                    "p_value": test.p_value,
                    "test": test.test,
                }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
