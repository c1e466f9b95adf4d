"""Per-example evidence: the ``predictions.jsonl.gz`` file, the rule that recomputes headline metrics from it, and
the check (``seka report --verify``) that every ``metric_result.json`` agrees with its predictions.

The contract shared with the scorers: every record has a stable ``id`` (CounterFact: its ``case_id``; elsewhere a
string such as ``"q17@pos4"``) and a ``scores`` object ``{metric: number}``. A metric ``m`` is the mean over the
distinct ids that carry it of (the mean of ``scores[m]`` over that id's records). Per-case fractions (CounterFact's
paraphrase score) and plain per-example means are the same rule; records without ``m`` do not count for ``m``.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from seka_lightning.files import atomic_path
from seka_lightning.significance import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, mean_interval

PREDICTIONS = "predictions.jsonl.gz"
METRIC_RESULT = "metric_result.json"
Record = dict[str, Any]


def check_records(records: Sequence[Record]) -> None:
    """Raise ``ValueError`` naming the first record that breaks the contract (an ``id`` and numeric ``scores``)."""
    for index, record in enumerate(records):
        if "id" not in record or not isinstance(record.get("scores"), dict):
            raise ValueError(
                f"prediction record {index} has no 'id' and 'scores' object (keys: {sorted(record)}); every scorer "
                "must return records with a stable 'id' and per-example 'scores' {metric: number}"
            )
        if not isinstance(record["id"], str | int) or isinstance(record["id"], bool):
            raise ValueError(f"prediction record {index} has id {record['id']!r}; ids must be strings or integers")
        for name, value in record["scores"].items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(
                    f"prediction record {index} (id {record['id']!r}) scores {name}={value!r}; scores must be "
                    "finite numbers"
                )


def write_predictions(path: str | Path, records: Iterable[Record]) -> Path:
    """Gzipped JSON lines, written atomically; the gzip header holds no name or time, so equal records give equal
    bytes."""
    with atomic_path(path) as tmp, tmp.open("wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle:
            for record in records:
                handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return Path(path)


def read_predictions(path: str | Path) -> list[Record]:
    """The records of a ``predictions.jsonl.gz`` (split on ``\\n`` only: generations may hold U+2028)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; re-run the evaluation that writes it")
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
        return [json.loads(line) for line in text.split("\n") if line]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable gzipped JSONL file ({err}); re-run the evaluation") from None


def metric_names(records: Iterable[Record]) -> list[str]:
    """Every metric some record scores, in order of first appearance."""
    return list(dict.fromkeys(name for record in records for name in record["scores"]))


def per_id_scores(records: Iterable[Record], metric: str) -> dict[str | int, float]:
    """``{id: mean of scores[metric] over the id's records}`` over the ids that carry ``metric``."""
    grouped: dict[str | int, list[float]] = {}
    for record in records:
        if metric in record["scores"]:
            grouped.setdefault(record["id"], []).append(float(record["scores"][metric]))
    return {key: math.fsum(values) / len(values) for key, values in grouped.items()}


def contract_metric(records: Iterable[Record], metric: str) -> tuple[float, int]:
    """The headline value of ``metric`` by the contract rule and the number of ids it averages over.

    Sums use ``math.fsum``, so the value does not depend on the order of the records."""
    values = per_id_scores(records, metric)
    if not values:
        raise ValueError(f"no prediction record scores {metric!r}; it cannot be recomputed from the predictions")
    return math.fsum(values.values()) / len(values), len(values)


def summarize(
    records: Sequence[Record],
    metrics: Iterable[str] | None = None,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, dict[str, Any]]:
    """``metrics`` (default: every scored metric) with their values, 95% intervals and id counts:
    ``{"metrics": {m: v}, "intervals": {m: [low, high]}, "n": {m: count}}``."""
    check_records(records)
    out: dict[str, dict[str, Any]] = {"metrics": {}, "intervals": {}, "n": {}}
    for metric in metric_names(records) if metrics is None else metrics:
        value, n = contract_metric(records, metric)
        interval = mean_interval(list(per_id_scores(records, metric).values()), resamples=resamples, seed=seed)
        out["metrics"][metric], out["n"][metric] = value, n
        out["intervals"][metric] = [interval.low, interval.high]
    return out


def verify_folder(folder: str | Path) -> list[str]:
    """Problems with one result folder: a missing or unreadable predictions file, or a metric, count or interval of
    ``metric_result.json`` that its predictions do not reproduce (one message per problem, empty when it agrees)."""
    folder = Path(folder)
    result_file = folder / METRIC_RESULT
    try:
        result = json.loads(result_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        return [f"{result_file}: unreadable ({err})"]
    try:
        records = read_predictions(folder / PREDICTIONS)
        check_records(records)
    except FileNotFoundError:
        return [f"{folder}: missing {PREDICTIONS} beside {METRIC_RESULT}"]
    except ValueError as err:
        return [f"{folder / PREDICTIONS}: {err}"]
    seed = (result.get("provenance") or {}).get("seeds", {}).get("bootstrap", BOOTSTRAP_SEED)
    problems = []
    for metric, recorded in result.get("metrics", {}).items():
        try:
            summary = summarize(records, [metric], seed=seed)
        except ValueError:
            problems.append(f"{result_file}: {metric}: no per-example scores in {PREDICTIONS}")
            continue
        problems += _compare(result_file, metric, "value", recorded, summary["metrics"][metric])
        problems += _compare(result_file, metric, "n", result.get("n", {}).get(metric), summary["n"][metric])
        problems += _compare(
            result_file, metric, "interval", result.get("intervals", {}).get(metric), summary["intervals"][metric]
        )
    return problems


def _compare(file: Path, metric: str, what: str, recorded: Any, recomputed: Any) -> list[str]:
    """One message when ``recorded`` is not ``recomputed`` (intervals to 1e-12: quantiles of float64 means)."""
    if what == "interval":
        same = (
            isinstance(recorded, list)
            and len(recorded) == 2
            and all(math.isclose(a, b, abs_tol=1e-12) for a, b in zip(recorded, recomputed, strict=True))
        )
    else:
        same = recorded == recomputed
    if same:
        return []
    return [f"{file}: {metric} {what}: recorded {recorded!r}, recomputed {recomputed!r} from {PREDICTIONS}"]


def verify_results(root: str | Path) -> list[str]:
    """:func:`verify_folder` for every ``metric_result.json`` under ``root``."""
    root = Path(root)
    files = sorted(root.rglob(METRIC_RESULT))
    if not files:
        raise FileNotFoundError(f"no {METRIC_RESULT} under {root}; point --results at a results folder")
    return [problem for file in files for problem in verify_folder(file.parent)]
