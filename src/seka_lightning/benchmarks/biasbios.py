"""BiasBios (name a person's occupation from their biography, first sentence highlighted): records, scorer, DataModule.

Reads the shared subset (a folder of CSVs ``hard_text, profession, gender``: no names, the
original first sentence already removed) and the public Bias-in-Bios record layout as JSON lines
(``hard_text``, ``title`` or ``profession``, ``gender``, optional ``raw``, ``start_pos``, ``name``).

Which CSVs of the shared folder form the evaluation set: the folder holds one 10-row file per
occupation (28 occupations, 280 rows), ``csvs_Bios_samples_accountant_complete.csv`` with 1,000
more accountant bios (2 of them repeat rows of the 10-row accountant file), and
``csvs_Bios_samples_df_masked_pronoun.csv``, the ``_complete`` bios lower-cased with pronouns
replaced by "they" and a 0/1 gender label (not bios to prompt with; always skipped). Top-1
accuracy over "the distinct occupations of the evaluated set" only means something on a
balanced set, so BiasBios evaluates the 28 one-per-occupation files by default
(``csv_set="per_profession"``); the 1,000 single-occupation ``_complete`` bios pair with the
masked-pronoun file and are PronChange's default set (see ``pronchange.py``).
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch

from seka_lightning.benchmarks.base import (
    BenchmarkDataModule,
    BenchmarkScorer,
    Example,
    RecordId,
    decode,
    naming_record,
)
from seka_lightning.benchmarks.records import (
    BenchmarkExamples,
    HighlightedExample,
    hub_name,
    read_csv_rows,
    read_hub_records,
    read_json_records,
    read_text,
    require_str,
    select_subset,
)
from seka_lightning.metrics import (
    NGramEntropy,
    TfidfConsistency,
    TopKAccuracy,
    candidate_logprobs,
    gold_rank,
    n_gram_entropy,
)

log = logging.getLogger(__name__)

CsvSet = Literal["per_profession", "complete", "all"]
CSV_SETS: tuple[str, ...] = ("per_profession", "complete", "all")
CSV_COLUMNS = ("hard_text", "profession", "gender")
BIASBIOS_NOTE = (
    "uninformative highlight: {removed} of {total} bios are the shared copy's hard_text, from which the sentence "
    "naming the occupation was removed, so the highlighted first sentence carries no label information; "
    "report these numbers as such and do not tune on them"
)
# The shared copy has no names; a neutral stand-in that reads naturally at the start of the
# question sentence and does not clash with the first names many bios mention.
DEFAULT_NAME = "The person"

_GENDERS = {"f": "female", "female": "female", "m": "male", "male": "male"}
# A sentence ends at . ! or ? (plus closing quotes/brackets) followed by space and a capital or digit.
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s+[\"'“‘(\[]?[A-Z0-9])")
_WORD_BEFORE = re.compile(r"[\w.]*$")
# Words whose trailing period does not end a sentence in bios ("Dr. Smith", "No. 1", "Jan. 2015").
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof rev hon st jr sr gen col capt lt sgt maj gov sen rep no vs mt ft approx dept univ "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split()
)


@dataclass(frozen=True)
class Bio:
    """One biography record, independent of the file layout it came from."""

    uid: str
    """``<file stem>/<row index>``, stable across runs."""
    text: str
    """The biography used as context."""
    profession: str
    """The occupation as the source spells it, e.g. "interior_designer"."""
    gender: str
    """"female" or "male"."""
    name: str | None
    """The person's name where the source has one."""
    first_sentence_end: int
    """Offset in ``text`` where its first sentence (with its final punctuation) ends."""
    first_sentence_removed: bool = True
    """Whether ``text`` is ``hard_text``, the bio without its original first sentence (the one naming the
    occupation), so that the highlighted "first sentence" is really the bio's second one."""

    @property
    def label(self) -> str:
        """The occupation as words, the string the model is scored on ("interior designer")."""
        return self.profession.replace("_", " ")


def load_biasbios(
    path: str | PathLike[str],
    *,
    name: str = DEFAULT_NAME,
    csv_set: CsvSet = "per_profession",
    example_subset: str | None = None,
) -> BenchmarkExamples:
    """BiasBios prompts: the bio, then ``"{name} has the occupation of a/an "``; first sentence highlighted.

    ``name`` stands in for the person where the source has no name (the shared CSVs); records
    with a name use it. ``csv_set`` picks the CSVs of a folder (see the module docstring).
    ``example_subset`` slices the bios in load order (files by name, rows in file order). Each
    example's ``candidates`` are the distinct occupations of the returned (evaluated) examples.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string (the stand-in for the person), got {name!r}")
    bios = select_subset(read_bios(path, csv_set=csv_set), example_subset, what=f"bios in {path}")
    candidates = tuple(sorted({bio.label for bio in bios}))
    examples = []
    for bio in bios:
        person = bio.name or name
        # BENCHMARKS.md: prompt = context.rstrip(". ") + ".\n\n" + f"{name} has the occupation of a/an ".
        context = bio.text.rstrip(". ")
        text = context + ".\n\n" + f"{person} has the occupation of a/an "
        # The rstrip can eat the first sentence's final period when the bio is one sentence long.
        start = len(context) - len(context.lstrip())
        span = (start, min(bio.first_sentence_end, len(context)))
        fields: dict[str, Any] = {
            "label": bio.label,
            "profession": bio.profession,
            "gender": bio.gender,
            "candidates": candidates,
            "name": person,
            "bio": bio.text,
            "bio_uid": bio.uid,
            "first_sentence_removed": bio.first_sentence_removed,
        }
        examples.append(HighlightedExample(f"biasbios/{bio.uid}", text, (span,), fields))
    return BenchmarkExamples("biasbios", tuple(examples))


def read_bios(path: str | PathLike[str], *, csv_set: CsvSet = "all") -> list[Bio]:
    """The bios under ``path``: a folder of CSVs (filtered by ``csv_set``), one CSV, or one JSON-lines file.

    Exact repeats of a bio text are kept once (the shared folder has two), in load order.
    """
    if csv_set not in CSV_SETS:
        raise ValueError(f"csv_set {csv_set!r} is not one of {list(CSV_SETS)}")
    name = hub_name(path)
    path = Path(path)
    if name is not None:
        bios = _bios_from_records(read_hub_records(name), source=name, stem=name.rsplit("/", 1)[-1])
    elif path.is_dir():
        bios = [bio for file in _csv_files(path, csv_set) for bio in _read_csv(file)]
    elif path.is_file():
        bios = _read_csv(path) if _is_csv(path) else _read_jsonl(path)
    else:
        raise ValueError(f"Bias-in-Bios path {path} does not exist; point it at a folder of CSVs, a file or hub:<name>")
    seen: set[str] = set()
    unique = []
    for bio in bios:
        if bio.text not in seen:
            seen.add(bio.text)
            unique.append(bio)
    if len(unique) < len(bios):
        log.info("Bias-in-Bios: dropped %d repeated bios in %s", len(bios) - len(unique), path)
    return unique


def first_sentence_end(text: str) -> int:
    """Offset where ``text``'s first sentence ends (after its punctuation), or its length if one sentence.

    A rule-based splitter: a period after an initial ("L. John"), an abbreviation with inner
    periods ("U.S.", "Ph.D.") or a title ("Dr.", "Mr.") does not end the sentence.
    """
    for match in _SENTENCE_END.finditer(text):
        if text[match.start()] == "." and _is_abbreviation(text[: match.start()]):
            continue
        return match.end()
    return len(text.rstrip())


def _is_abbreviation(before_period: str) -> bool:
    word = _WORD_BEFORE.search(before_period)
    token = word.group() if word else ""
    return (len(token) == 1 and token.isalpha()) or "." in token or token.lower() in _ABBREVIATIONS


def _is_csv(path: Path) -> bool:
    return path.name.endswith((".csv", ".csv.gz"))


def _stem(path: Path) -> str:
    return path.name.removesuffix(".gz").rsplit(".", 1)[0]


def _csv_files(folder: Path, csv_set: CsvSet) -> list[Path]:
    """The bios CSVs of ``folder`` in ``csv_set``; other CSVs (e.g. the masked-pronoun file) are skipped."""
    files = []
    for file in sorted(folder.iterdir()):
        if not (file.is_file() and _is_csv(file)):
            continue
        header = next(csv.reader(io.StringIO(read_text(file))), [])
        if not set(CSV_COLUMNS) <= set(header):
            log.debug("Bias-in-Bios: skipping %s (columns %s, not %s)", file.name, header, CSV_COLUMNS)
            continue
        complete = _stem(file).endswith("_complete")
        if csv_set == "all" or complete == (csv_set == "complete"):
            files.append(file)
    if not files:
        raise ValueError(
            f"{folder} has no Bias-in-Bios CSV (columns {', '.join(CSV_COLUMNS)}) in csv_set {csv_set!r}; "
            f"choose another of {list(CSV_SETS)} or another folder"
        )
    return files


def _read_csv(file: Path) -> list[Bio]:
    _, rows = read_csv_rows(file)
    if not rows:
        raise ValueError(f"{file} holds no rows; expected a CSV with columns {', '.join(CSV_COLUMNS)}")
    bios = []
    for index, row in enumerate(rows):
        where = f"{file.name} row {index}"
        text = require_str(row, "hard_text", where=where)
        bios.append(
            Bio(
                uid=f"{_stem(file)}/{index}",
                text=text,
                profession=require_str(row, "profession", where=where),
                gender=_gender(require_str(row, "gender", where=where), where=where),
                name=None,
                first_sentence_end=first_sentence_end(text),
            )
        )
    return bios


def _read_jsonl(file: Path) -> list[Bio]:
    """The public Bias-in-Bios records of a JSON-lines file."""
    return _bios_from_records(read_json_records(file), source=file.name, stem=_stem(file))


def _bios_from_records(records: list[dict[str, Any]], *, source: str, stem: str) -> list[Bio]:
    """Public Bias-in-Bios records: ``raw`` (the whole bio) is the context when present, else ``hard_text``."""
    bios = []
    for index, record in enumerate(records):
        where = f"{source} record {index}"
        hard_text = require_str(record, "hard_text", where=where)
        profession_key = "title" if "title" in record else "profession"
        profession = require_str(record, profession_key, where=where)
        gender = _gender(require_str(record, "gender", where=where), where=where)
        raw = record.get("raw")
        if raw is not None and not isinstance(raw, str):
            raise ValueError(f"{where}: field 'raw' must be a string, got {raw!r}")
        text = raw if raw and raw.strip() else hard_text
        start_pos = record.get("start_pos")
        if text is raw and isinstance(start_pos, int) and 0 < start_pos < len(text):
            # In the public records hard_text = raw[start_pos:], so raw[:start_pos] is the first sentence.
            end = len(text[:start_pos].rstrip())
        else:
            end = first_sentence_end(text)
        bios.append(
            Bio(
                uid=f"{stem}/{index}",
                text=text,
                profession=profession,
                gender=gender,
                name=_name(record.get("name"), where=where),
                first_sentence_end=end,
                first_sentence_removed=text is not raw,
            )
        )
    return bios


def _gender(value: str, *, where: str) -> str:
    gender = _GENDERS.get(value.strip().lower())
    if gender is None:
        raise ValueError(f"{where}: field 'gender' must be one of F, M, Female, Male; got {value!r}")
    return gender


def _name(value: Any, *, where: str) -> str | None:
    """A record's name: a string, or the public layout's [first, middle, last] list."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list | tuple) and all(isinstance(part, str) for part in value):
        return " ".join(part.strip() for part in value if part.strip()) or None
    raise ValueError(f"{where}: field 'name' must be a string or a list of strings, got {value!r}")


class BiasBiosScorer(BenchmarkScorer):
    """Top-1/top-3 occupation accuracy by first-token log-prob over the evaluated set's labels, plus fluency
    (n-gram entropy) and TF-IDF consistency with same-label bios of a ``max_new_tokens`` generation.

    Record ids are the bio's ``<file stem>/<row>``; each record carries ``top{k}_accuracy`` (0/1) and, with a
    generation, its ``fluency`` and ``consistency``.
    """

    benchmark = "biasbios"

    def __init__(
        self, candidates: Sequence[str], references: Mapping[str, Sequence[str]], *, max_new_tokens: int = 64
    ) -> None:
        super().__init__()
        if not candidates:
            raise ValueError("BiasBios needs at least one candidate label")
        self.candidates = list(candidates)
        self.max_new_tokens = max_new_tokens
        self.accuracy = TopKAccuracy(top_k=tuple(dict.fromkeys((1, min(3, len(self.candidates))))))
        self.fluency = NGramEntropy()
        self.consistency = TfidfConsistency(references)

    def record_id(self, example: Example) -> RecordId:
        return example["fields"]["bio_uid"]

    def _target(self, example: Example) -> int:
        label = example["fields"]["label"]
        if label not in self.candidates:
            raise ValueError(f"label {label!r} is not among the candidate labels {self.candidates}")
        return self.candidates.index(label)

    def score(self, method, model, tokenizer, enc, examples):
        gold = []
        for example in examples:
            with naming_record(self.benchmark, self.record_id(example)):
                gold.append(self._target(example))
        logprobs = torch.log_softmax(method.prompt_logits(model, enc), dim=-1)
        ids = [self.first_ids(tokenizer, label) for label in self.candidates]
        scores = candidate_logprobs(logprobs, ids)  # [B, C]
        target = torch.tensor(gold, device=scores.device)
        self.accuracy.update(scores, target)
        ranks = gold_rank(scores, target).tolist()
        labels = [e["fields"]["label"] for e in examples]
        generations = [""] * len(examples)
        if self.max_new_tokens:
            out = method.generate(model, enc, max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            generations = decode(tokenizer, out)
            self.fluency.update(generations)
            self.consistency.update(generations, labels)
        predicted = scores.argmax(-1).tolist()
        records = []
        for example, p, rank, generation, label in zip(examples, predicted, ranks, generations, labels, strict=True):
            values = {f"top{k}_accuracy": float(rank < k) for k in self.accuracy.top_k}
            if self.max_new_tokens:
                values["fluency"] = n_gram_entropy(generation, ns=self.fluency.ns, weights=self.fluency.weights)
                values["consistency"] = self.consistency.similarity(generation, label)
            records.append(
                {
                    "id": self.record_id(example),
                    "label": label,
                    "predicted": self.candidates[p],
                    "gold_rank": rank,
                    "generation": generation,
                    "scores": values,
                }
            )
        return records

    def compute(self):
        accuracy = self.accuracy.compute()
        result = {f"{k}_accuracy": float(v) for k, v in accuracy.items()}
        if self.max_new_tokens:
            result["fluency"] = float(self.fluency.compute())
            result["consistency"] = float(self.consistency.compute())
        return result


class BiasBiosDataModule(BenchmarkDataModule):
    """BiasBios occupation prompts with the first sentence highlighted (BENCHMARKS.md)."""

    benchmark = "biasbios"

    def __init__(
        self,
        path: str = "../shared/data/biasbios_subset",
        *,
        csv_set: str = "per_profession",
        example_subset: str | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
    ) -> None:
        """
        Args:
            path: folder of Bias-in-Bios CSVs or a JSONL of records.
            csv_set: which shared CSVs to evaluate (``per_profession``, ``complete``, ``all``).
            example_subset: a slice of the records, e.g. ``"0:100"``.
            max_new_tokens: generation length for fluency and consistency (0 = accuracy only).
            batch_size: prompts per batch.
        """
        super().__init__(path, batch_size=batch_size)
        self.csv_set, self.example_subset, self.max_new_tokens = csv_set, example_subset, max_new_tokens

    def load(self) -> BenchmarkExamples:
        return load_biasbios(self.path, csv_set=self.csv_set, example_subset=self.example_subset)

    def scorer(self) -> BenchmarkScorer:
        references: dict[str, list[str]] = defaultdict(list)
        for example in self.examples:
            references[example.fields["label"]].append(example.fields["bio"])
        return BiasBiosScorer(self.examples[0].fields["candidates"], references, max_new_tokens=self.max_new_tokens)

    def describe(self) -> dict[str, Any]:
        settings = {**super().describe(), "csv_set": self.csv_set, "example_subset": self.example_subset}
        removed = sum(bool(example.fields.get("first_sentence_removed")) for example in self.examples)
        if removed:
            settings["note"] = BIASBIOS_NOTE.format(removed=removed, total=len(self.examples))
        return settings
