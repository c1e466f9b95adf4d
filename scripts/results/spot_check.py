"""Re-run the first records of a committed result with its recorded command, here, and compare the predictions.

    python scripts/results/spot_check.py docs/results/lost_in_the_middle/gemma3-270m/seka \\
        --records 2 --max-new-tokens 10 --accelerator cpu --out outputs/spot/litm-gemma-seka \\
        --set model.method.bank=outputs/results/banks/gemma3-270m.safetensors

The command is the one in the result's ``metric_result.json`` (``provenance.command``), with its data narrowed to the
first ``--records`` records of its slice (for lost in the middle a record is a question, asked at every gold
position), its output sent to ``--out`` (which must not exist: nothing is overwritten) and its accelerator set;
``--set KEY=VALUE`` overrides any other option (a bank the run read from ``outputs/`` must be rebuilt first, e.g. by
``scripts/results/run.py --stages build``). Each re-run record is compared with the committed record of the same
``id``: its scores (within 1e-4) and its generated text; with ``--max-new-tokens`` the generations are shorter, so the
re-run text must be the start of the committed one and scores are not compared. Prints the agreement and the first
disagreements, writes ``OUT/spot_check.json``, and exits 1 when fewer than ``--min-agreement`` of the records agree
(a run that differs on another device or version shows up here before anyone reads its metrics).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from seka_lightning.evidence import METRIC_RESULT, PREDICTIONS, read_predictions  # noqa: E402
from seka_lightning.files import write_json  # noqa: E402

TEXT_FIELDS = ("prediction", "generation")  # lost in the middle; PronChange and BiasBios
REPLACED = ("--trainer.callbacks.output_dir", "--trainer.accelerator", "--data.example_subset", "--data.split")


def first_records(data: dict, records: int) -> str:
    """The slice ``"A:A+records"`` at the start of the result's data slice (its ``slice`` or ``example_subset``)."""
    if records < 1:
        raise ValueError(f"--records must be >= 1, got {records}")
    spec = data.get("slice") or data.get("example_subset")
    start = int(spec.split(":")[0] or 0) if spec else 0
    return f"{start}:{start + records}"


def option_pairs(command: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split ``seka predict ...`` into its leading words (up to the first ``--`` option) and its ``(--key, value)``
    options, each ``--key value`` or ``--key=value``; ``-c FILE`` stays with the leading words."""
    head: list[str] = []
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(command) and not command[i].startswith("--"):
        head.append(command[i])
        i += 1
    while i < len(command):
        word = command[i]
        if not word.startswith("--"):
            raise ValueError(f"cannot read the recorded command at {word!r}: expected an --option")
        if "=" in word:
            key, value = word.split("=", 1)
            i += 1
        elif i + 1 < len(command):
            key, value = word, command[i + 1]
            i += 2
        else:
            raise ValueError(f"the recorded command ends with {word!r} and no value")
        pairs.append((key, value))
    return head, pairs


def rerun_command(
    provenance_command: list[str],
    data: dict,
    *,
    records: int,
    out: Path,
    accelerator: str,
    max_new_tokens: int | None,
    overrides: list[str],
) -> list[str]:
    """The recorded command narrowed to the first records, writing to ``out`` on ``accelerator``, with overrides."""
    if provenance_command[:2] != ["seka", "predict"]:
        raise ValueError(f"the recorded command is not `seka predict ...`: {provenance_command[:4]}")
    head, pairs = option_pairs(provenance_command[2:])
    had_split = any(key == "--data.split" for key, _ in pairs)
    kept = [(key, value) for key, value in pairs if key not in REPLACED]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE (e.g. model.method.bank=B.safetensors), got {item!r}")
        option = "--" + key.removeprefix("--")
        kept = [(k, v) for k, v in kept if k != option] + [(option, value)]
    kept += [("--data.example_subset", first_records(data, records))]
    if had_split:
        kept.append(("--data.split", "null"))
    if max_new_tokens is not None:
        kept = [(k, v) for k, v in kept if k != "--data.max_new_tokens"] + [
            ("--data.max_new_tokens", str(max_new_tokens))
        ]
    kept += [("--trainer.accelerator", accelerator), ("--trainer.callbacks.output_dir", str(out))]
    return [sys.executable, "-m", "seka_lightning.cli", "predict", *head, *(w for pair in kept for w in pair)]


def compare(committed: dict, rerun: dict, *, prefix_only: bool) -> str | None:
    """None when the re-run record agrees with the committed one, else what differs."""
    for field in TEXT_FIELDS:
        if field in committed or field in rerun:
            old, new = str(committed.get(field, "")), str(rerun.get(field, ""))
            same = old.startswith(new.rstrip("\ufffd")) if prefix_only else old == new
            if not same:
                return f"{field}: committed {old[:60]!r}, re-run {new[:60]!r}"
    if prefix_only:
        return None
    for metric, value in committed["scores"].items():
        other = rerun["scores"].get(metric)
        if other is None or not math.isclose(float(value), float(other), rel_tol=0.0, abs_tol=1e-4):
            return f"scores[{metric}]: committed {value}, re-run {other}"
    return None


def agreement(committed: list[dict], rerun: list[dict], *, prefix_only: bool) -> dict:
    """Per re-run record (matched on ``id`` and, where an id has several records, their order): agreement counts and
    the first 10 disagreements."""
    by_id: dict = {}
    for record in committed:
        by_id.setdefault(record["id"], []).append(record)
    seen: dict = {}
    agree, differences = 0, []
    for record in rerun:
        index = seen.get(record["id"], 0)
        seen[record["id"]] = index + 1
        matches = by_id.get(record["id"], [])
        if index >= len(matches):
            differences.append({"id": record["id"], "difference": "no committed record with this id"})
            continue
        difference = compare(matches[index], record, prefix_only=prefix_only)
        if difference is None:
            agree += 1
        else:
            differences.append({"id": record["id"], "difference": difference})
    return {
        "records": len(rerun),
        "agree": agree,
        "fraction": agree / len(rerun) if rerun else 0.0,
        "differences": differences[:10],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, help="a committed result folder (metric_result.json, predictions)")
    parser.add_argument("--records", type=int, default=2, help="records of the slice to re-run (from its start)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="shorter generations (prefix comparison)")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu", "auto"])
    parser.add_argument("--out", type=Path, required=True, help="the re-run's output folder (must not exist)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--min-agreement", type=float, default=1.0, help="fraction of records that must agree")
    args = parser.parse_args(argv)
    result = json.loads((args.result / METRIC_RESULT).read_text())
    committed = read_predictions(args.result / PREDICTIONS)
    if args.out.exists():
        parser.error(f"--out {args.out} exists; pick a new folder (a spot check never overwrites a run)")
    command = rerun_command(
        result["provenance"]["command"],
        result["config"]["data"],
        records=args.records,
        out=args.out,
        accelerator=args.accelerator,
        max_new_tokens=args.max_new_tokens,
        overrides=args.overrides,
    )
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=REPO)
    if done.returncode != 0:
        print(f"the re-run failed (exit {done.returncode}); nothing compared", file=sys.stderr)
        return done.returncode
    summary = agreement(
        committed, read_predictions(args.out / PREDICTIONS), prefix_only=args.max_new_tokens is not None
    )
    summary |= {"result": str(args.result), "command": command, "min_agreement": args.min_agreement}
    write_json(args.out / "spot_check.json", summary)
    print(f"{summary['agree']} of {summary['records']} re-run records agree with {args.result}")
    for item in summary["differences"]:
        print(f"  {item['id']}: {item['difference']}")
    return 0 if summary["fraction"] >= args.min_agreement else 1


if __name__ == "__main__":
    sys.exit(main())
