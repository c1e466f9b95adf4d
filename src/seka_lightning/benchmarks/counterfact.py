"""CounterFact (knowledge conflict: does the model follow the new fact stated in context?): records, scorer, DataModule.

Reads the EasyEdit layout (``counterfact-{train,val,edit}.json``, merged and sorted by case_id),
the standard ROME layout (``counterfact.json``) and a hub dataset of ROME records (``hub:azhx/counterfact``). Prompts follow BENCHMARKS.md, "unmediated
fact" form: ``"Previously " + old_fact + ". " + "Currently " + new_fact.rstrip(". ") + ". " + query``,
with the attribute of the new fact highlighted.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from seka_lightning.benchmarks.base import BenchmarkDataModule, BenchmarkScorer, Example, RecordId, naming_record
from seka_lightning.benchmarks.records import (
    BenchmarkExamples,
    HighlightedExample,
    hub_name,
    parse_example_subset,
    read_hub_records,
    read_json_records,
    require_str,
)
from seka_lightning.metrics import TargetPreference, first_token_logprob

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
    cases: list[CounterFactCase] = []
    origin: dict[int, str] = {}
    for source, records in _sources(path):
        for index, record in enumerate(records):
            case = _parse_case(record, where=f"{source} record {index}")
            if case.case_id in origin:
                raise ValueError(
                    f"{source} record {index}: case_id {case.case_id} already appears in "
                    f"{origin[case.case_id]}; each case must appear once"
                )
            origin[case.case_id] = source
            cases.append(case)
    cases.sort(key=lambda case: case.case_id)
    return cases


def _sources(path: str | PathLike[str]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """The records of each file of the layout under ``path`` (or of a ``hub:<name>`` dataset), with the source's name."""
    name = hub_name(path)
    if name is not None:
        yield name, read_hub_records(name)
        return
    path = Path(path)
    if path.is_dir():
        files = _layout_files(path)
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"CounterFact path {path} does not exist; point it at a folder, a JSON file or hub:<name>")
    for file in files:
        yield file.name, read_json_records(file)


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


class CounterFactScorer(BenchmarkScorer):
    """Efficacy (first paraphrase prompt) and paraphrase (every paraphrase prompt, fraction per case) scores:
    a prompt is won when the first-token log-prob of the new target beats the old one's (BENCHMARKS.md).

    Record ids are the case_id; efficacy records carry ``efficacy_score`` (0/1) and ``efficacy_magnitude``
    (P(new) - P(old)), paraphrase records ``paraphrase_score`` and ``paraphrase_magnitude``.
    """

    benchmark = "counterfact"

    def __init__(self) -> None:
        super().__init__()
        self.efficacy = TargetPreference()
        self.paraphrase = TargetPreference()

    def record_id(self, example: Example) -> RecordId:
        return example["fields"]["case_id"]

    def score(self, method, model, tokenizer, enc, examples):
        targets = []
        for example in examples:
            fields = example["fields"]
            with naming_record(self.benchmark, self.record_id(example)):
                targets.append(
                    (self.first_ids(tokenizer, fields["target_new"]), self.first_ids(tokenizer, fields["target_true"]))
                )
        logprobs = torch.log_softmax(method.prompt_logits(model, enc), dim=-1)
        records, by_case = [], defaultdict(list)
        for row, (example, (new_ids, old_ids)) in enumerate(zip(examples, targets, strict=True)):
            fields = example["fields"]
            new = first_token_logprob(logprobs[row], new_ids)
            old = first_token_logprob(logprobs[row], old_ids)
            prefix = "efficacy" if fields["kind"] == "efficacy" else "paraphrase"
            won = bool(new > old)
            magnitude = float(new.double().exp() - old.double().exp())
            records.append(
                {
                    "id": fields["case_id"],
                    "case_id": fields["case_id"],
                    "kind": fields["kind"],
                    "logp_new": float(new),
                    "logp_old": float(old),
                    "won": won,
                    "scores": {f"{prefix}_score": float(won), f"{prefix}_magnitude": magnitude},
                }
            )
            if fields["kind"] == "efficacy":
                self.efficacy.update(new[None], old[None])
            else:
                by_case[fields["case_id"]].append((new, old))
        if by_case:
            width = max(len(pairs) for pairs in by_case.values())
            new = torch.zeros(len(by_case), width, device=logprobs.device)
            old = torch.zeros_like(new)
            mask = torch.zeros_like(new, dtype=torch.bool)
            for i, pairs in enumerate(by_case.values()):
                for j, (n, o) in enumerate(pairs):
                    new[i, j], old[i, j], mask[i, j] = n, o, True
            self.paraphrase.update(new, old, mask=mask)
        return records

    def compute(self):
        efficacy, paraphrase = self.efficacy.compute(), self.paraphrase.compute()
        return {
            "efficacy_score": float(efficacy["score"]),
            "efficacy_magnitude": float(efficacy["magnitude"]),
            "paraphrase_score": float(paraphrase["score"]),
            "paraphrase_magnitude": float(paraphrase["magnitude"]),
        }


class CounterFactDataModule(BenchmarkDataModule):
    """CounterFact efficacy and paraphrase prompts (BENCHMARKS.md), test split 5000:10000 by default."""

    benchmark = "counterfact"

    def __init__(
        self,
        path: str = "../shared/data/counterfact",
        *,
        split: str | None = None,
        example_subset: str | None = None,
        batch_size: int = 16,
    ) -> None:
        """
        Args:
            path: the EasyEdit folder (train/val/edit JSON) or a ROME ``counterfact.json``.
            split: ``test`` (5000:10000), ``dev`` (4500:5000) or ``all``; None with no example_subset means test.
            example_subset: a slice of the case_id-ordered records, e.g. ``"5000:5500"``.
            batch_size: prompts per batch (a case's paraphrases stay together).
        """
        super().__init__(path, batch_size=batch_size)
        self.split, self.example_subset = split, example_subset

    def load(self) -> BenchmarkExamples:
        return load_counterfact(self.path, split=self.split, example_subset=self.example_subset)

    def group_key(self, example: HighlightedExample) -> Any:
        return example.fields["case_id"]

    def scorer(self) -> BenchmarkScorer:
        return CounterFactScorer()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "split": self.split, "example_subset": self.example_subset}
