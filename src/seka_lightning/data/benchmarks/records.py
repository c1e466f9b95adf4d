"""The example type every benchmark produces, and the small file helpers the loaders share."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar, overload

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


def read_json_records(path: str | PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON array file or a JSON-lines file (either optionally gzipped)."""
    path = Path(path)
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
