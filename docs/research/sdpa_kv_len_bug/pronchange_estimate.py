"""Gemma-3's PronChange SEKA vs unsteered with the unsteered run's exposed bios (640-703) taken from their CPU re-run.

The committed unsteered run (GPU) computed its batch of bios 640-703 wrong (README); its other 14 batches are not
exposed. This recomputes the paired comparison with those 64 bios' scores from the CPU re-run here, an estimate
until the whole run is re-made:

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


def read(path: Path) -> dict[str, dict]:
    with gzip.open(path, "rt") as handle:
        return {row["uid"]: row for row in map(json.loads, handle)}


def main() -> None:
    none, seka = read(RESULTS / "none" / "predictions.jsonl.gz"), read(RESULTS / "seka" / "predictions.jsonl.gz")
    rerun = read(HERE / "pronchange-gemma3-270m-none-cpu-bios-640-703" / "predictions.jsonl.gz")
    corrected = {**none, **rerun}
    uids = sorted(seka)
    report = {"bios": len(uids), "replaced": len(rerun)}
    for name in METRICS:
        steered = [seka[u]["scores"][name] for u in uids]
        for label, base in (("committed", none), ("with_cpu_batch", corrected)):
            test = paired_test(steered, [base[u]["scores"][name] for u in uids])
            report[f"{name} {label}"] = {
                "none": sum(base[u]["scores"][name] for u in uids) / len(uids),
                "seka": sum(steered) / len(uids),
                "seka_minus_none": test.difference,
                "p_value": test.p_value,
                "test": test.test,
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
