"""Compare Gemma-3's CounterFact CPU re-runs with the GPU runs they replaced, exposed batches against the rest.

Each committed result named in ``REPLACED`` is now a full CPU re-run and the GPU run it replaced is kept here; the
exposed records are those ``exposed_batches.json`` names for the GPU run. Also compares the CPU re-runs of the
exposed batches alone (random seeds 1-2; SPA's, AdaSEKA's and PASTA's cases 9696-9743, batch 147) with the same GPU
runs (README's table), and estimates AdaSEKA's and PASTA's efficacy and their paired tests with batch 147 taken from
the CPU re-run, until the whole runs are re-made:

    python docs/research/sdpa_kv_len_bug/compare_exposed.py
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

from seka_lightning.evidence import per_id_scores
from seka_lightning.significance import paired_test

HERE = Path(__file__).parent
RESULTS = HERE.parents[1] / "results" / "counterfact" / "gemma3-270m"
REPLACED = {  # committed result (a full CPU re-run now) -> the GPU run it replaced, kept here
    "none": "counterfact-gemma3-270m-none-gpu",
    "random/seed-1": "counterfact-gemma3-270m-random-seed-1-gpu",
    "random/seed-2": "counterfact-gemma3-270m-random-seed-2-gpu",
    "spa": "counterfact-gemma3-270m-spa-gpu",
    "adaseka": "counterfact-gemma3-270m-adaseka-gpu",
    "pasta": "counterfact-gemma3-270m-pasta-gpu",
}
BATCH_147 = {  # committed result -> the CPU re-run of its cases 9696-9743 (batch 147 and 32 records outside it)
    "spa": "counterfact-gemma3-270m-spa-cpu-cases-9696-9743",
    "adaseka": "counterfact-gemma3-270m-adaseka-cpu-cases-9696-9743",
    "pasta": "counterfact-gemma3-270m-pasta-cpu-cases-9696-9743",
}
ESTIMATED = ("adaseka", "pasta")  # each GPU run with batch 147 re-run, against SEKA, none and key scaling


def read(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle]


def gpu_run(run: str) -> dict[str, dict]:
    """The GPU run's records: kept here once replaced, else still the committed result."""
    folder = HERE / REPLACED[run] if run in REPLACED and (HERE / REPLACED[run]).is_dir() else RESULTS / run
    return {r["uid"]: r for r in read(folder / "predictions.jsonl.gz")}


def exposed_uids() -> dict[str, set[str]]:
    """Per GPU run (by its folder name here once replaced, and by its run name while estimated), the uids of its
    exposed batches; ``exposed_batches.json`` names each run by the folder it was scanned in."""
    names = defaultdict(set)
    for run, folder in REPLACED.items():
        names[f"docs/results/counterfact/gemma3-270m/{run}"].add(folder)
        names[f"docs/research/sdpa_kv_len_bug/{folder}"].add(folder)
    for run in ESTIMATED:
        names[f"docs/results/counterfact/gemma3-270m/{run}"].add(run)
    found = {}
    for scan in json.loads((HERE / "exposed_batches.json").read_text()):
        for name in names.get(scan["result"], ()):
            found[name] = {uid for batch in scan["exposed_batches"] for uid in batch["uids"]}
    return found


def compare(cpu: list[dict], gpu: dict[str, dict]) -> dict:
    """Records, score flips (records), net efficacy change (cases) and the largest log-prob difference."""
    flips = net = 0
    largest = 0.0
    for row in cpu:
        other = gpu[row["uid"]]
        name = "efficacy_score" if row["kind"] == "efficacy" else "paraphrase_score"
        largest = max(largest, abs(row["logp_new"] - other["logp_new"]), abs(row["logp_old"] - other["logp_old"]))
        flips += row["scores"][name] != other["scores"][name]
        if row["kind"] == "efficacy":
            net += row["scores"][name] - other["scores"][name]
    return {"records": len(cpu), "flips": flips, "net_efficacy_cases": net, "largest_logp_difference": largest}


def estimate(run: str, rerun: list[dict]) -> dict:
    """``run``'s GPU efficacy, and with the re-run records in place of its GPU ones, with SEKA's, none's and key
    scaling's paired exact McNemar tests against each."""
    gpu = gpu_run(run)
    corrected = {**gpu, **{row["uid"]: row for row in rerun}}
    others = {
        other: per_id_scores(read(RESULTS / other / "predictions.jsonl.gz"), "efficacy_score")
        for other in ("seka", "none", "key_scaling")
    }
    report = {"cases": len(per_id_scores(gpu.values(), "efficacy_score")), "replaced_records": len(rerun)}
    for label, rows in (("gpu_run", gpu), ("with_cpu_batch", corrected)):
        scores = per_id_scores(rows.values(), "efficacy_score")  # per case, as seka report pairs them
        uids = sorted(scores)
        report[label] = {"efficacy": 100 * sum(scores.values()) / len(uids)}
        for other, theirs in others.items():
            test = paired_test([scores[u] for u in uids], [theirs[u] for u in uids])
            report[label][f"{run}_minus_{other}"] = {"points": 100 * test.difference, "p_value": test.p_value}
    return report


def main() -> None:
    report = {}
    exposed = exposed_uids()
    for run, folder in REPLACED.items():
        if not (HERE / folder).is_dir():
            continue  # not replaced yet
        cpu, gpu = read(RESULTS / run / "predictions.jsonl.gz"), gpu_run(run)
        report[f"{run}: full CPU re-run, exposed"] = compare([r for r in cpu if r["uid"] in exposed[folder]], gpu)
        report[f"{run}: full CPU re-run, elsewhere"] = compare([r for r in cpu if r["uid"] not in exposed[folder]], gpu)
    batches = defaultdict(list)
    for row in read(HERE / "counterfact-gemma3-270m-random-cpu-exposed-batches.jsonl.gz"):
        batches[(row["seed"], row["control"])].append(row)
    for (seed, control), rows in sorted(batches.items()):
        label = "control" if control else "exposed"
        report[f"random/seed-{seed}: CPU re-run of its exposed batches, {label}"] = compare(
            rows, gpu_run(f"random/seed-{seed}")
        )
    for run, folder in BATCH_147.items():
        rows = read(HERE / folder / "predictions.jsonl.gz")
        gpu, batch = gpu_run(run), exposed[REPLACED.get(run, run)]
        report[f"{run}: CPU re-run of cases 9696-9743, exposed"] = compare([r for r in rows if r["uid"] in batch], gpu)
        report[f"{run}: CPU re-run of cases 9696-9743, elsewhere"] = compare(
            [r for r in rows if r["uid"] not in batch], gpu
        )
    for run in ESTIMATED:
        rerun = [r for r in read(HERE / BATCH_147[run] / "predictions.jsonl.gz") if r["uid"] in exposed[run]]
        report[f"{run}: estimate with batch 147 from the CPU re-run"] = estimate(run, rerun)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
