"""Gemma-3's PronChange SEKA vs a GPU run, with the run's exposed bios taken from their CPU re-runs here.

The committed unsteered, PASTA and SPA runs computed their batch of bios 640-703 wrong on the GPU, and key scaling
and random seeds 0-2 their five exposed batches of 16 (README); their other batches are not exposed. This recomputes
SEKA's paired comparison with each run after replacing the re-run bios' scores by the CPU re-run's, an estimate until
the whole run is re-made, and counts the re-run generations identical to the GPU run's. The unsteered run's re-runs
are every batch of 64 re-run here (``pronchange-gemma3-270m-none-cpu-bios-*``), exposed or not:

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
RERUNS = {  # committed run -> the CPU re-runs of its batches (folders here)
    "none": sorted(path.name for path in HERE.glob("pronchange-gemma3-270m-none-cpu-bios-*")),
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


def main() -> None:
    seka = read(RESULTS / "seka" / "predictions.jsonl.gz")
    uids = sorted(seka)
    report: dict[str, dict] = {}
    for run, folders in RERUNS.items():
        committed = read(RESULTS / run / "predictions.jsonl.gz")
        rerun: dict[str, dict] = {}
        for folder in folders:
            rerun.update(read(HERE / folder / "predictions.jsonl.gz"))
        corrected = {**committed, **rerun}
        same = sum(row["generation"] == committed[uid]["generation"] for uid, row in rerun.items())
        report[run] = {"bios": len(uids), "replaced": len(rerun), "identical_generations": same}
        for name in METRICS:
            steered = [seka[u]["scores"][name] for u in uids]
            for label, base in (("committed", committed), ("with_cpu_batches", corrected)):
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
