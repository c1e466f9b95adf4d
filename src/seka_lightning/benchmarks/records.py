"""The example type every benchmark produces, and the record readers the loaders share.

Records are read through 🤗 datasets (``load_dataset("json" / "csv", data_files=...)`` on local files, cached in
the datasets cache; no network call for a local file) or, for a ``hub:<name>`` path, from a hub dataset.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar, overload

import datasets
import pyarrow

log = logging.getLogger(__name__)

HUB_PREFIX = "hub:"
_GZIP_MAGIC = b"\x1f\x8b"
_T = TypeVar("_T")
_SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*(?::\s*(-?\d+)?\s*)?$")


@dataclass(frozen=True)
class HighlightedExample:
    """One benchmark prompt: the plain text baselines see, plus the character spans to highlight.

    ``spans`` are ``[start, end)`` offsets into ``text``, each non-empty, in order and
    non-overlapping; the tuple is empty only for an example whose highlight was not found (its
    loader counts it in :attr:`BenchmarkExamples.missing_highlight`). ``fields`` holds the
    benchmark-specific data (targets, gold labels, ...) and should be JSON-serialisable.
    """

    uid: str
    text: str
    spans: tuple[tuple[int, int], ...]
    fields: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        spans = tuple((int(start), int(end)) for start, end in self.spans)
        previous_end = 0
        for start, end in spans:
            if not 0 <= start < end <= len(self.text):
                raise ValueError(
                    f"{self.uid}: span ({start}, {end}) must satisfy 0 <= start < end <= len(text) = {len(self.text)}"
                )
            if start < previous_end:
                raise ValueError(
                    f"{self.uid}: spans must be in order and non-overlapping; ({start}, {end}) starts "
                    f"before the previous span ends at {previous_end}"
                )
            previous_end = end
        object.__setattr__(self, "spans", spans)
        # A private copy, so the caller's dict cannot change a frozen example afterwards.
        object.__setattr__(self, "fields", dict(self.fields))

    @property
    def highlights(self) -> tuple[str, ...]:
        """The highlighted substrings, one per span."""
        return tuple(self.text[start:end] for start, end in self.spans)

    def marked(self, markers: tuple[str, str] = ("**", "**")) -> str:
        """The text with ``markers[0]`` before and ``markers[1]`` after each span."""
        start_marker, end_marker = markers
        pieces: list[str] = []
        cursor = 0
        for start, end in self.spans:
            pieces += [self.text[cursor:start], start_marker, self.text[start:end], end_marker]
            cursor = end
        pieces.append(self.text[cursor:])
        return "".join(pieces)


@dataclass(frozen=True)
class BenchmarkExamples(Sequence[HighlightedExample]):
    """A benchmark's examples in order, with the uids of those whose highlight was not found.

    Examples without a highlight are kept (every method is scored on the same prompts; steering
    is then a no-op on them) and counted here, so reports can state how many there were.
    """

    benchmark: str
    examples: tuple[HighlightedExample, ...]
    missing_highlight: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unhighlighted = tuple(example.uid for example in self.examples if not example.spans)
        if unhighlighted != tuple(self.missing_highlight):
            raise ValueError(
                f"{self.benchmark}: missing_highlight must list exactly the examples without spans, "
                f"in order; got {list(self.missing_highlight)[:5]} for {list(unhighlighted)[:5]}"
            )

    @property
    def num_missing_highlight(self) -> int:
        """How many examples have no highlight (their highlight text was not found)."""
        return len(self.missing_highlight)

    def __len__(self) -> int:
        return len(self.examples)

    @overload
    def __getitem__(self, index: int) -> HighlightedExample: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[HighlightedExample, ...]: ...

    def __getitem__(self, index: int | slice) -> HighlightedExample | tuple[HighlightedExample, ...]:
        return self.examples[index]

    def __iter__(self) -> Iterator[HighlightedExample]:
        return iter(self.examples)


def read_text(path: str | PathLike[str]) -> str:
    """A UTF-8 file's text, gunzipped first when the file is gzip-compressed (by content, not name)."""
    data = Path(path).read_bytes()
    if data[:2] == _GZIP_MAGIC:
        data = gzip.decompress(data)
    return data.decode("utf-8-sig")


def hub_name(path: str | PathLike[str]) -> str | None:
    """The dataset name of a ``hub:<name>`` path (e.g. ``hub:azhx/counterfact``), or None for a local path."""
    text = str(path)
    if not text.startswith(HUB_PREFIX):
        return None
    name = text.removeprefix(HUB_PREFIX).strip()
    if not name:
        raise ValueError(f"{text!r} names no dataset; write hub:<owner>/<name>, e.g. hub:azhx/counterfact")
    return name


def read_hub_records(name: str, *, split: str = "train") -> list[dict[str, Any]]:
    """The records of split ``split`` of the hub dataset ``name``, class-label columns as their label names."""
    with _quiet_datasets():
        try:
            dataset = datasets.load_dataset(name, split=split)
        except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
            raise ValueError(
                f"hub dataset {name!r} (split {split!r}) cannot be loaded ({error}); check the name and that the hub "
                "is reachable, or point the path at a local copy"
            ) from error
    if len(dataset) == 0:
        raise ValueError(f"hub dataset {name!r} split {split!r} holds no records; choose another split")
    labels = {column: f.names for column, f in dataset.features.items() if isinstance(f, datasets.ClassLabel)}
    records = [_without_nulls(record) for record in dataset.to_list()]
    for record in records:
        for column, names in labels.items():
            if column in record:
                record[column] = names[record[column]]
    return records


def read_json_records(path: str | PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON array file or a JSON-lines file (either optionally gzipped), read by 🤗 datasets.

    Where Arrow cannot hold the file as one table (a broken line, records that are not objects, a field whose
    type changes between records) the file is read as plain JSON instead, which names the problem or, for mixed
    types, returns the same records.
    """
    path = Path(path)
    try:
        with _quiet_datasets():
            dataset = datasets.load_dataset("json", data_files=str(path), split="train", on_mixed_types=None)
    except (ValueError, datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException) as error:
        log.debug("%s: datasets could not read it as one table (%s); reading it as plain JSON", path, error)
        return _read_plain_json_records(path)
    if dataset.column_names == ["text"]:
        # datasets wraps a JSON array of scalars as {"text": value}: check that the file really holds objects.
        return _read_plain_json_records(path)
    return [_without_nulls(record) for record in dataset.to_list()]


def read_csv_rows(path: str | PathLike[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of a CSV file (optionally gzipped), every value a string as written, read by 🤗 datasets."""
    path = Path(path)
    lines = csv.reader(io.StringIO(read_text(path)))
    header = next(lines, [])
    if not header or next(lines, None) is None:
        return header, []
    with _quiet_datasets():
        dataset = datasets.load_dataset(
            "csv",
            data_files=str(path),
            split="train",
            features=datasets.Features({column: datasets.Value("string") for column in header}),
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8-sig",
        )
    return header, dataset.to_list()


def _read_plain_json_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON array or JSON-lines file parsed as plain JSON, with errors naming the file and line."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
    else:
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {line_number}: not valid JSON ({error})") from error
    if not records:
        raise ValueError(f"{path} holds no records; expected a JSON array or JSON lines of objects")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path} record {index}: expected a JSON object, got {type(record).__name__}")
    return records


def _without_nulls(value: Any) -> Any:
    """``value`` without the None-valued keys Arrow adds to an object for the fields other records have."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide datasets' progress bars for one read (a benchmark load is not a download), restoring the setting after."""
    were_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not were_disabled:
            datasets.enable_progress_bars()


def parse_example_subset(example_subset: str) -> slice:
    """Parse Python slice syntax such as ``"5000:5500"``, ``":100"`` or ``"::2"``."""
    match = _SLICE.match(example_subset)
    if match is None:
        raise ValueError(
            f"example_subset {example_subset!r} is not a slice; use start:stop[:step] with integers, "
            "either end may be omitted (e.g. '5000:5500' or ':100')"
        )
    start, stop, step = (None if group is None else int(group) for group in match.groups())
    if step == 0:
        raise ValueError(f"example_subset {example_subset!r} has step 0; use a non-zero step")
    return slice(start, stop, step)


def select_subset(items: Sequence[_T], example_subset: str | None, *, what: str) -> list[_T]:
    """The items picked by ``example_subset`` (all when None); an empty selection is an error."""
    if example_subset is None:
        selected = list(items)
    else:
        selected = list(items[parse_example_subset(example_subset)])
    if not selected:
        raise ValueError(
            f"example_subset {example_subset!r} selects none of the {len(items)} {what}; choose a range inside the data"
        )
    return selected


def require_str(record: Mapping[str, Any], key: str, *, where: str) -> str:
    """``record[key]`` as a non-empty string, or a ValueError naming the record and the field."""
    if key not in record or record[key] is None:
        raise ValueError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def resolve_split(split: str | None, example_subset: str | None, splits: Mapping[str, str | None]) -> str | None:
    """The ``example_subset`` a benchmark evaluates: the named ``split`` (None = "test") or an explicit slice.

    ``splits`` maps split names to slices of the records (None = every record); give at most one of the two.
    """
    if split is not None and example_subset is not None:
        raise ValueError(
            f"give either split ({split!r}) or example_subset ({example_subset!r}), not both; "
            "example_subset already slices the records"
        )
    if example_subset is not None:
        return example_subset
    name = "test" if split is None else split
    if name not in splits:
        raise ValueError(f"split {name!r} is not one of {sorted(splits)}; or pass example_subset (e.g. '0:100')")
    return splits[name]
