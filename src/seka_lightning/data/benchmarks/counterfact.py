"""CounterFact as knowledge-conflict prompts: does the model follow the new fact stated in context?

Reads the EasyEdit layout (``counterfact-{train,val,edit}.json``, merged and sorted by case_id)
and the standard ROME layout (``counterfact.json``). Prompts follow BENCHMARKS.md, "unmediated
fact" form: ``"Previously " + old_fact + ". " + "Currently " + new_fact.rstrip(". ") + ". " + query``,
with the attribute of the new fact highlighted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from seka_lightning.data.benchmarks.records import (
    BenchmarkExamples,
    HighlightedExample,
    parse_example_subset,
    read_json_records,
    require_str,
)

log = logging.getLogger(__name__)

EASYEDIT_FILES = ("counterfact-train.json", "counterfact-val.json", "counterfact-edit.json")
ROME_FILE = "counterfact.json"
# BENCHMARKS.md: the paper's test split is records 5000:10000 and dev/tuning is 4500:5000, with
# records indexed in case_id order.
SPLITS: dict[str, slice] = {"test": slice(5000, 10000), "dev": slice(4500, 5000), "all": slice(None)}


@dataclass(frozen=True)
class CounterFactCase:
    """One CounterFact case, independent of the file layout it came from."""

    case_id: int
    subject: str
    rewrite_prompt: str
    """The rewrite prompt with the subject filled in, e.g. "The mother tongue of Danielle Darrieux is"."""
    target_new: str
    target_true: str
    paraphrases: tuple[str, ...]


def load_counterfact(
    path: str | PathLike[str],
    *,
    split: str | slice | None = None,
    example_subset: str | None = None,
) -> BenchmarkExamples:
    """CounterFact efficacy and paraphrase examples for the chosen cases.

    ``path`` is a folder with the EasyEdit files or ``counterfact.json``, or one file of either
    layout (JSON or JSON lines, optionally gzipped). Cases are ordered by case_id and then picked
    by ``split`` ("test" = 5000:10000, "dev" = 4500:5000, "all", or a slice) or by
    ``example_subset`` (slice syntax on the same order, e.g. "5000:5500"); give at most one of
    the two, and neither means "test". Each case yields one efficacy example (query = its first
    paraphrase prompt) followed by one paraphrase example per paraphrase prompt.
    """
    if split is not None and example_subset is not None:
        raise ValueError(
            f"give either split ({split!r}) or example_subset ({example_subset!r}), not both; "
            "example_subset already slices all cases in case_id order"
        )
    cases = read_counterfact_cases(path)
    if example_subset is not None:
        chosen, description = parse_example_subset(example_subset), f"example_subset {example_subset!r}"
    else:
        chosen, description = _split_slice("test" if split is None else split)
    selected = cases[chosen]
    if not selected:
        raise ValueError(
            f"{description} selects none of the {len(cases)} CounterFact cases in {path}; "
            "choose a range inside the data (split='all' takes every case)"
        )
    examples: list[HighlightedExample] = []
    for case in selected:
        examples.append(build_counterfact_example(case, case.paraphrases[0], kind="efficacy"))
        examples.extend(
            build_counterfact_example(case, query, kind="paraphrase", paraphrase_index=index)
            for index, query in enumerate(case.paraphrases)
        )
    missing = tuple(example.uid for example in examples if not example.spans)
    if missing:
        log.warning(
            "CounterFact: %d of %d examples have no highlight (empty or unlocatable attribute), e.g. %s",
            len(missing),
            len(examples),
            missing[0],
        )
    return BenchmarkExamples("counterfact", tuple(examples), missing)


def build_counterfact_example(
    case: CounterFactCase, query: str, *, kind: str, paraphrase_index: int | None = None
) -> HighlightedExample:
    """The prompt for one query of a case, with the new fact's attribute highlighted.

    The highlight is missing (no spans) when the attribute is empty, e.g. a "twin city" case
    whose new target is the subject itself, so the new fact ends with the subject.
    """
    new_fact = f"{case.rewrite_prompt} {case.target_new}"
    old_fact = f"{case.rewrite_prompt} {case.target_true}"
    # BENCHMARKS.md: attribute = ctx.split(subject)[-1].strip(",-;: "), i.e. what the new fact
    # says after the subject's last mention, e.g. "is English".
    attribute = new_fact.split(case.subject)[-1].strip(",-;: ")
    head = f"Previously {old_fact}. Currently "
    current = new_fact.rstrip(". ")
    text = f"{head}{current}. {query}"
    # The highlight must be the attribute inside the "Currently ..." sentence (the old fact may
    # share words with it); it is that sentence's tail, hence rfind.
    start = current.rfind(attribute) if attribute else -1
    spans = () if start < 0 else ((len(head) + start, len(head) + start + len(attribute)),)
    uid = f"counterfact/{case.case_id}/{kind}"
    if paraphrase_index is not None:
        uid += f"/{paraphrase_index}"
    fields: dict[str, Any] = {
        "case_id": case.case_id,
        "kind": kind,
        "subject": case.subject,
        "target_new": case.target_new,
        "target_true": case.target_true,
        "attribute": attribute,
        "query": query,
    }
    if paraphrase_index is not None:
        fields["paraphrase_index"] = paraphrase_index
    return HighlightedExample(uid, text, spans, fields)


def read_counterfact_cases(path: str | PathLike[str]) -> list[CounterFactCase]:
    """Every case under ``path`` (either layout), sorted by case_id; duplicate case_ids are an error."""
    path = Path(path)
    if path.is_dir():
        files = _layout_files(path)
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"CounterFact path {path} does not exist; point it at a folder or a JSON file")
    cases: list[CounterFactCase] = []
    origin: dict[int, str] = {}
    for file in files:
        for index, record in enumerate(read_json_records(file)):
            case = _parse_case(record, where=f"{file.name} record {index}")
            if case.case_id in origin:
                raise ValueError(
                    f"{file.name} record {index}: case_id {case.case_id} already appears in "
                    f"{origin[case.case_id]}; each case must appear once"
                )
            origin[case.case_id] = file.name
            cases.append(case)
    cases.sort(key=lambda case: case.case_id)
    return cases


def _layout_files(folder: Path) -> list[Path]:
    """The files of the layout found in ``folder``: ROME's single file, else all three EasyEdit files."""
    for name in (ROME_FILE, ROME_FILE + ".gz"):
        if (folder / name).is_file():
            return [folder / name]
    present = [
        next((folder / candidate for candidate in (name, name + ".gz") if (folder / candidate).is_file()), None)
        for name in EASYEDIT_FILES
    ]
    if all(file is None for file in present):
        raise ValueError(
            f"{folder} holds neither {ROME_FILE} (ROME layout) nor {', '.join(EASYEDIT_FILES)} (EasyEdit layout)"
        )
    missing = [name for name, file in zip(EASYEDIT_FILES, present, strict=True) if file is None]
    if missing:
        # The split indices assume all 21,919 cases, so a partial EasyEdit copy would shift them.
        raise ValueError(f"{folder}: EasyEdit layout is missing {', '.join(missing)}; all three files are needed")
    return [file for file in present if file is not None]


def _parse_case(record: dict[str, Any], *, where: str) -> CounterFactCase:
    """A case from a ROME record (``requested_rewrite``) or an EasyEdit record."""
    if "case_id" not in record:
        raise ValueError(f"{where}: missing field 'case_id'")
    case_id = record["case_id"]
    if isinstance(case_id, bool) or not isinstance(case_id, int):
        raise ValueError(f"{where}: field 'case_id' must be an integer, got {case_id!r}")
    where = f"{where} (case_id {case_id})"
    if "requested_rewrite" in record:
        return _parse_rome(record, case_id, where=where)
    subject = require_str(record, "subject", where=where)
    rephrase = require_str(record, "rephrase_prompt", where=where)
    return CounterFactCase(
        case_id=case_id,
        subject=subject,
        rewrite_prompt=require_str(record, "prompt", where=where),
        target_new=require_str(record, "target_new", where=where),
        target_true=require_str(record, "ground_truth", where=where),
        # The EasyEdit layout keeps a single rephrasing per case.
        paraphrases=(rephrase,),
    )


def _parse_rome(record: dict[str, Any], case_id: int, *, where: str) -> CounterFactCase:
    rewrite = record["requested_rewrite"]
    if not isinstance(rewrite, dict):
        raise ValueError(f"{where}: field 'requested_rewrite' must be an object, got {rewrite!r}")
    subject = require_str(rewrite, "subject", where=f"{where} requested_rewrite")
    template = require_str(rewrite, "prompt", where=f"{where} requested_rewrite")
    if "{}" not in template:
        raise ValueError(f"{where}: requested_rewrite 'prompt' {template!r} has no '{{}}' for the subject")
    targets = {}
    for key in ("target_new", "target_true"):
        target = rewrite.get(key)
        if not isinstance(target, dict):
            raise ValueError(f"{where}: missing field 'requested_rewrite.{key}' (an object with 'str')")
        targets[key] = require_str(target, "str", where=f"{where} requested_rewrite.{key}")
    paraphrases = record.get("paraphrase_prompts")
    if not isinstance(paraphrases, list) or not paraphrases:
        raise ValueError(f"{where}: missing field 'paraphrase_prompts' (a non-empty list of prompts)")
    for index, prompt in enumerate(paraphrases):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: paraphrase_prompts[{index}] must be a non-empty string, got {prompt!r}")
    return CounterFactCase(
        case_id=case_id,
        subject=subject,
        rewrite_prompt=template.replace("{}", subject),
        target_new=targets["target_new"],
        target_true=targets["target_true"],
        paraphrases=tuple(paraphrases),
    )


def _split_slice(split: str | slice) -> tuple[slice, str]:
    if isinstance(split, slice):
        return split, f"split {split!r}"
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {sorted(SPLITS)}; or pass a slice / example_subset")
    chosen = SPLITS[split]
    if chosen.start is None:
        return chosen, f"split {split!r}"
    return chosen, f"split {split!r} (cases {chosen.start}:{chosen.stop})"
