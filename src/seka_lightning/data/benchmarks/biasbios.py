"""BiasBios: name a person's occupation from their biography, with the first sentence highlighted.

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
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from seka_lightning.data.benchmarks.records import (
    BenchmarkExamples,
    HighlightedExample,
    read_json_records,
    read_text,
    require_str,
    select_subset,
)

log = logging.getLogger(__name__)

CsvSet = Literal["per_profession", "complete", "all"]
CSV_SETS: tuple[str, ...] = ("per_profession", "complete", "all")
CSV_COLUMNS = ("hard_text", "profession", "gender")
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
    path = Path(path)
    if path.is_dir():
        bios = [bio for file in _csv_files(path, csv_set) for bio in _read_csv(file)]
    elif path.is_file():
        bios = _read_csv(path) if _is_csv(path) else _read_jsonl(path)
    else:
        raise ValueError(f"Bias-in-Bios path {path} does not exist; point it at a folder of CSVs or a file")
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
    rows = list(csv.DictReader(io.StringIO(read_text(file))))
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
    """Public Bias-in-Bios records: ``raw`` (the whole bio) is the context when present, else ``hard_text``."""
    bios = []
    for index, record in enumerate(read_json_records(file)):
        where = f"{file.name} record {index}"
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
                uid=f"{_stem(file)}/{index}",
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
