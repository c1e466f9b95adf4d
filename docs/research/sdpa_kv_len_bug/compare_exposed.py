"""Compare the CPU re-runs of the exposed CounterFact batches with the committed GPU records (README's table).

python docs/research/sdpa_kv_len_bug/compare_exposed.py
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE.parents[1] / "results" / "counterfact" / "gemma3-270m"


def read(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle]


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


def main() -> None:
    report = {}
    batches = defaultdict(list)
    for row in read(HERE / "counterfact-gemma3-270m-random-cpu-exposed-batches.jsonl.gz"):
        batches[(row["seed"], row["control"])].append(row)
    for (seed, control), rows in sorted(batches.items()):
        gpu = {r["uid"]: r for r in read(RESULTS / "random" / f"seed-{seed}" / "predictions.jsonl.gz")}
        report[f"random seed {seed}" + (" control" if control else " exposed")] = compare(rows, gpu)
    gpu = {r["uid"]: r for r in read(HERE / "counterfact-gemma3-270m-none-gpu" / "predictions.jsonl.gz")}
    cpu = read(RESULTS / "none" / "predictions.jsonl.gz")
    exposed = {f"counterfact/{case}/{kind}" for case in range(9704, 9736) for kind in ("efficacy", "paraphrase/0")}
    report["unsteered exposed"] = compare([r for r in cpu if r["uid"] in exposed], gpu)
    report["unsteered elsewhere"] = compare([r for r in cpu if r["uid"] not in exposed], gpu)
    spa_cpu = read(HERE / "counterfact-gemma3-270m-spa-cpu-cases-9696-9743" / "predictions.jsonl.gz")
    gpu = {r["uid"]: r for r in read(RESULTS / "spa" / "predictions.jsonl.gz")}
    report["SPA exposed"] = compare([r for r in spa_cpu if r["uid"] in exposed], gpu)
    report["SPA elsewhere"] = compare([r for r in spa_cpu if r["uid"] not in exposed], gpu)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
