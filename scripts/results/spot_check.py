"""Re-run the first records of a committed result with its recorded command, here, and compare the predictions.

    python scripts/results/spot_check.py docs/results/lost_in_the_middle/gemma3-270m/seka \\
        --records 2 --max-new-tokens 10 --accelerator cpu --out outputs/spot/litm-gemma-seka \\
        --set model.method.bank=outputs/results/banks/gemma3-270m.safetensors

The command is the one in the result's ``metric_result.json`` (``provenance.command``), with its data narrowed to the
first ``--records`` records of its slice or split (for lost in the middle a record is a question, asked at every gold
position), its output sent to ``--out`` (which must not exist: nothing is overwritten) and its accelerator set;
``--set KEY=VALUE`` overrides any other recorded option (a bank the run read from ``outputs/`` must be rebuilt first,
e.g. by ``scripts/results/run.py --stages build``). Each re-run record is compared with the committed record of the
same ``uid``: its scores (within 1e-4) and its generated text; with ``--max-new-tokens`` the generations are shorter,
so the re-run text must be a non-empty start of the committed one and scores are not compared. Scores that depend on
the whole slice are never compared (BiasBios: top-k accuracy over the professions present in it, consistency against a
TF-IDF fitted on its bios), so a BiasBios record agrees on its generation and fluency; one with neither fails. Prints
the agreement and the first disagreements, writes ``OUT/spot_check.json``, and exits 1 when fewer than
``--min-agreement`` of the records agree (a run that differs on another device or version shows up here before anyone
reads its metrics), 3 when the re-run itself fails or writes no records.

With ``--against RUN`` nothing is re-run: every record of the committed result is compared, texts and scores, with
the record of the same ``uid`` in RUN, an existing run of the same method (e.g. one over a longer slice, through
another decode path, or on another device; a difference names its text "re-run"); a record RUN lacks disagrees, and
a RUN of another benchmark, model or method is refused:

    python scripts/results/spot_check.py docs/results/lost_in_the_middle/gemma3-270m/seka \\
        --against docs/research/litm_full_protocol/lost_in_the_middle/gemma3-270m/seka --out outputs/spot/litm-0-300
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from seka_lightning.benchmarks import counterfact, lost_in_the_middle, pronchange
from seka_lightning.benchmarks.records import parse_example_subset
from seka_lightning.evidence import METRIC_RESULT, PREDICTIONS, read_predictions
from seka_lightning.files import write_json

REPO = Path(__file__).resolve().parents[2]
TEXT_FIELDS = ("prediction", "generation")  # lost in the middle; PronChange and BiasBios
REPLACED = ("--trainer.callbacks.output_dir", "--trainer.accelerator", "--data.example_subset", "--data.split")
OWN = (*REPLACED, "--data.max_new_tokens")  # options only the spot check sets
# per benchmark: names (prefixes) of the scores that depend on the whole slice
SLICE_SCORES = {"biasbios": ("top", "consistency")}
SPLITS = {  # benchmark -> split name -> its records (a slice, or "A:B" / None = every record)
    "counterfact": counterfact.SPLITS,
    "lost_in_the_middle": lost_in_the_middle.SPLITS,
    "pronchange": pronchange.SPLITS,
}
RERUN_FAILED = 3


def data_slice(data: dict) -> slice:
    """The records a result evaluated: its ``slice``, its ``example_subset``, or the records of its named
    ``split`` (every record when none is given)."""
    spec = data.get("slice") or data.get("example_subset")
    if spec is None and "split" in data:
        name = data["split"] or "test"  # a benchmark with splits evaluates "test" when given neither
        table = SPLITS.get(data.get("benchmark"), {})
        if name not in table:
            raise ValueError(f"the result's split {name!r} of {data.get('benchmark')!r} names no known records")
        spec = table[name]
    if isinstance(spec, slice):
        return spec
    return slice(None) if spec is None else parse_example_subset(spec)


def first_records(data: dict, records: int) -> str:
    """The slice ``"A:A+records"`` at the start of the result's records (:func:`data_slice`)."""
    if records < 1:
        raise ValueError(f"--records must be >= 1, got {records}")
    part = data_slice(data)
    if part.step not in (None, 1) or any(end is not None and end < 0 for end in (part.start, part.stop)):
        raise ValueError(f"the result's records {part} are not a plain 'A:B' slice; spot-check it by hand")
    start = part.start or 0
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
    # a split may come from a config file (configs/eval/*.yaml set `split: test`): the data says whether there is one
    has_split = "split" in data or any(key == "--data.split" for key, _ in pairs)
    drop = OWN if max_new_tokens is not None else REPLACED
    kept = [(key, value) for key, value in pairs if key not in drop]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE (e.g. model.method.bank=B.safetensors), got {item!r}")
        option = "--" + key.removeprefix("--")
        if option in OWN:
            raise ValueError(
                f"--set {key} is the spot check's own option; use --records, --accelerator, --out or --max-new-tokens"
            )
        kept = [(k, v) for k, v in kept if k != option] + [(option, value)]
    kept.append(("--data.example_subset", first_records(data, records)))
    if has_split:
        kept.append(("--data.split", "null"))
    if max_new_tokens is not None:
        kept.append(("--data.max_new_tokens", str(max_new_tokens)))
    kept += [("--trainer.accelerator", accelerator), ("--trainer.callbacks.output_dir", str(out))]
    return [sys.executable, "-m", "seka_lightning.cli", "predict", *head, *(w for pair in kept for w in pair)]


def compare(committed: dict, rerun: dict, *, prefix_only: bool, slice_scores: tuple[str, ...] = ()) -> str | None:
    """None when the re-run record agrees with the committed one, else what differs. With ``prefix_only`` the
    re-run text must be a non-empty start of the committed one (or both empty), a record without text fails, and
    scores are not compared. Scores named with a prefix in ``slice_scores`` are never compared; a record with nothing
    left to compare (no text, no other score) fails."""
    fields = [field for field in TEXT_FIELDS if field in committed or field in rerun]
    if prefix_only and not fields:
        return "no generated text to compare (drop --max-new-tokens to compare scores)"
    for field in fields:
        old, new = str(committed.get(field, "")), str(rerun.get(field, ""))
        cut = new.rstrip("\ufffd")  # a shorter generation can end inside a character
        same = (old.startswith(cut) and (bool(cut) or not old)) if prefix_only else old == new
        if not same:
            return f"{field}: committed {old[:60]!r}, re-run {new[:60]!r}"
    if prefix_only:
        return None
    compared = [metric for metric in committed["scores"] if not metric.startswith(tuple(slice_scores))]
    if not compared and not any(committed.get(field) for field in fields):
        reason = ", and its scores depend on the whole slice" if slice_scores else " and no scores"
        return f"nothing to compare: no generated text{reason}"
    for metric in compared:
        value, other = committed["scores"][metric], rerun["scores"].get(metric)
        if other is None or not math.isclose(float(value), float(other), rel_tol=0.0, abs_tol=1e-4):
            return f"scores[{metric}]: committed {value}, re-run {other}"
    return None


def agreement(
    committed: list[dict], rerun: list[dict], *, prefix_only: bool, slice_scores: tuple[str, ...] = ()
) -> dict:
    """Per re-run record (matched on ``uid``: CounterFact's efficacy and paraphrase records share an ``id``):
    agreement counts and the first 10 disagreements."""
    by_uid = {record["uid"]: record for record in committed}
    agree, differences = 0, []
    for record in rerun:
        match = by_uid.get(record["uid"])
        difference = (
            "no committed record with this uid"
            if match is None
            else compare(match, record, prefix_only=prefix_only, slice_scores=slice_scores)
        )
        if difference is None:
            agree += 1
        else:
            differences.append({"uid": record["uid"], "difference": difference})
    return {
        "records": len(rerun),
        "agree": agree,
        "fraction": agree / len(rerun) if rerun else 0.0,
        "differences": differences[:10],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, help="a committed result folder (metric_result.json, predictions)")
    parser.add_argument("--records", type=int, help="records of the slice to re-run (from its start; default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="shorter generations (prefix comparison)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu", "auto"], help="the re-run's (default cpu)")
    parser.add_argument("--out", type=Path, required=True, help="the re-run's output folder (must not exist)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--min-agreement", type=float, default=1.0, help="fraction of records that must agree")
    parser.add_argument(
        "--against", type=Path, metavar="RUN", help="compare every record with this existing run instead of re-running"
    )
    args = parser.parse_args(argv)
    rerun_options = (args.records, args.max_new_tokens, args.accelerator, args.overrides or None)
    if args.against is not None and any(option is not None for option in rerun_options):
        parser.error(
            "--against compares every record with an existing run: drop --records, --max-new-tokens, --accelerator, "
            "--set"
        )
    args.result, args.out = args.result.resolve(), args.out.resolve()  # the re-run runs in the repository root
    args.against = None if args.against is None else args.against.resolve()
    if args.out.exists():
        parser.error(f"--out {args.out} exists; pick a new folder (a spot check never overwrites a run)")
    try:  # a missing or unreadable run is the user's input error, named, not a traceback
        result = json.loads((args.result / METRIC_RESULT).read_text())
        committed = read_predictions(args.result / PREDICTIONS)
        other = None
        if args.against is not None:
            other = read_predictions(args.against / PREDICTIONS)
            same_run_kind(result, json.loads((args.against / METRIC_RESULT).read_text()))
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"{error.__class__.__name__}: {error}" if isinstance(error, KeyError) else str(error))
    if other is not None:
        return check_against(args, result, committed, other)
    try:
        command = rerun_command(
            result["provenance"]["command"],
            result["config"]["data"],
            records=2 if args.records is None else args.records,
            out=args.out,
            accelerator=args.accelerator or "cpu",
            max_new_tokens=args.max_new_tokens,
            overrides=args.overrides,
        )
    except ValueError as error:
        parser.error(str(error))
    print("$", " ".join(command), flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        print("the re-run failed; nothing compared", file=sys.stderr)
        return RERUN_FAILED
    rerun = read_predictions(args.out / PREDICTIONS)
    if not rerun:
        print("the re-run wrote no records; nothing compared", file=sys.stderr)
        return RERUN_FAILED
    slice_scores = SLICE_SCORES.get(result["config"]["data"].get("benchmark"), ())
    if slice_scores:
        print(f"scores named {', '.join(slice_scores)}... depend on the whole slice and are not compared")
    summary = agreement(committed, rerun, prefix_only=args.max_new_tokens is not None, slice_scores=slice_scores)
    summary |= {"scores_not_compared": "all" if args.max_new_tokens is not None else list(slice_scores)}
    summary |= {"result": str(args.result), "command": ["python", *command[1:]], "min_agreement": args.min_agreement}
    return finish(args, summary, f"re-run records agree with {args.result}")


def run_kind(result: dict) -> tuple:
    """What a run evaluated: its benchmark, model and method name."""
    method = result["method"]
    return (
        result["config"]["data"].get("benchmark"),
        result["model"],
        method.get("method") if isinstance(method, dict) else method,
    )


def same_run_kind(result: dict, other: dict) -> None:
    """Refuse comparing runs of different benchmarks, models or methods (every record would only disagree)."""
    if run_kind(result) != run_kind(other):
        raise ValueError(
            f"--against's run is (benchmark, model, method) {run_kind(other)}, the result {run_kind(result)}: "
            "compare runs of the same method on the same benchmark and model"
        )


def check_against(args: argparse.Namespace, result: dict, committed: list[dict], against: list[dict]) -> int:
    """``--against RUN``: every committed record compared, texts and scores (those that depend on the whole slice
    left out, as for a re-run), with RUN's record (``against``) of the same ``uid``; one RUN lacks disagrees."""
    other = {record["uid"]: record for record in against}
    slice_scores = SLICE_SCORES.get(result["config"]["data"].get("benchmark"), ())
    matched = [other[record["uid"]] for record in committed if record["uid"] in other]
    summary = agreement(committed, matched, prefix_only=False, slice_scores=slice_scores)
    missing = [{"uid": r["uid"], "difference": "not in --against's run"} for r in committed if r["uid"] not in other]
    summary |= {
        "records": len(committed),
        "fraction": summary["agree"] / len(committed) if committed else 0.0,
        "missing": len(missing),
        "differences": (missing[:5] + summary["differences"])[:10],
        "scores_not_compared": list(slice_scores),
        "result": str(args.result),
        "against": str(args.against),
        "against_records": len(other),
        "min_agreement": args.min_agreement,
    }
    return finish(args, summary, f"records of {args.result} agree with {args.against}")


def finish(args: argparse.Namespace, summary: dict, agreeing: str) -> int:
    """Write ``OUT/spot_check.json``, print the agreement and the first disagreements, and exit by agreement."""
    write_json(args.out / "spot_check.json", summary)
    print(f"{summary['agree']} of {summary['records']} {agreeing}")
    for item in summary["differences"]:
        print(f"  {item['uid']}: {item['difference']}")
    return 0 if summary["fraction"] >= args.min_agreement else 1


if __name__ == "__main__":
    sys.exit(main())
