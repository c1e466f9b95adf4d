from __future__ import annotations

import gzip
import json
import pickle
import re
from pathlib import Path

import pytest

from seka_lightning.benchmarks.records import (
    BenchmarkExamples,
    HighlightedExample,
    hub_name,
    parse_example_subset,
    read_hub_records,
    read_json_records,
    require_str,
    select_subset,
)


def test_marked_inserts_markers_around_each_span_and_text_stays_plain() -> None:
    example = HighlightedExample("x/0", "alpha beta gamma delta", ((6, 10), (17, 22)), {"a": 1})
    assert example.marked() == "alpha **beta** gamma **delta**"
    assert example.marked(("<b>", "</b>")) == "alpha <b>beta</b> gamma <b>delta</b>"
    assert example.highlights == ("beta", "delta")
    assert example.text == "alpha beta gamma delta"


def test_text_with_markers_in_it_is_left_alone() -> None:
    example = HighlightedExample("x/0", "a ** b", ((5, 6),))
    assert example.marked() == "a ** **b**"


def test_spans_are_normalised_to_int_tuples_and_fields_are_copied() -> None:
    fields = {"label": "nurse"}
    example = HighlightedExample("x/0", "abc", [[0, 2]], fields)  # type: ignore[arg-type]
    fields["label"] = "changed"
    assert example.spans == ((0, 2),)
    assert example.fields == {"label": "nurse"}
    assert hash(example) == hash(HighlightedExample("x/0", "abc", ((0, 2),), {"other": 1}))


def test_example_pickles_for_dataloader_workers() -> None:
    example = HighlightedExample("x/0", "abc", ((0, 2),), {"answers": ("a", "b")})
    assert pickle.loads(pickle.dumps(example)) == example


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        (((2, 2),), "x/0: span (2, 2) must satisfy 0 <= start < end <= len(text) = 5"),
        (((3, 6),), "x/0: span (3, 6) must satisfy 0 <= start < end <= len(text) = 5"),
        (((-1, 2),), "x/0: span (-1, 2) must satisfy 0 <= start < end <= len(text) = 5"),
        (
            ((0, 3), (2, 4)),
            "x/0: spans must be in order and non-overlapping; (2, 4) starts before the previous span ends at 3",
        ),
        (
            ((3, 4), (0, 1)),
            "x/0: spans must be in order and non-overlapping; (0, 1) starts before the previous span ends at 4",
        ),
    ],
)
def test_invalid_spans_are_rejected(spans: tuple[tuple[int, int], ...], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        HighlightedExample("x/0", "abcde", spans)


def test_benchmark_examples_is_a_sequence_that_lists_unhighlighted_examples() -> None:
    with_span = HighlightedExample("b/0", "abc", ((0, 1),))
    without = HighlightedExample("b/1", "abc", ())
    examples = BenchmarkExamples("b", (with_span, without), ("b/1",))
    assert len(examples) == 2
    assert examples[1] is without
    assert list(examples) == [with_span, without]
    assert examples.num_missing_highlight == 1
    with pytest.raises(
        ValueError, match=re.escape("b: missing_highlight must list exactly the examples without spans")
    ):
        BenchmarkExamples("b", (with_span, without))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("5000:5500", slice(5000, 5500, None)),
        (":100", slice(None, 100, None)),
        ("10:", slice(10, None, None)),
        ("::2", slice(None, None, 2)),
        (" -5 : ", slice(-5, None, None)),
        ("1:9:3", slice(1, 9, 3)),
    ],
)
def test_parse_example_subset(spec: str, expected: slice) -> None:
    assert parse_example_subset(spec) == expected


@pytest.mark.parametrize("spec", ["5", "a:b", "1:2:3:4", "", "1.5:2"])
def test_parse_example_subset_rejects_non_slices(spec: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"example_subset {spec!r} is not a slice; use start:stop[:step]")):
        parse_example_subset(spec)


def test_parse_example_subset_rejects_zero_step() -> None:
    with pytest.raises(ValueError, match=re.escape("example_subset '1:5:0' has step 0; use a non-zero step")):
        parse_example_subset("1:5:0")


def test_select_subset_slices_in_order_and_rejects_empty_selections() -> None:
    assert select_subset(list(range(10)), "2:8:2", what="rows") == [2, 4, 6]
    assert select_subset(list(range(3)), None, what="rows") == [0, 1, 2]
    with pytest.raises(ValueError, match=re.escape("example_subset '20:30' selects none of the 10 rows")):
        select_subset(list(range(10)), "20:30", what="rows")


def test_read_json_records_reads_arrays_and_lines_gzipped_or_not(tmp_path: Path) -> None:
    records = [{"a": 1}, {"a": 2}]
    (tmp_path / "array.json").write_text(json.dumps(records))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    # Gzip is detected by content, whatever the name says.
    (tmp_path / "array_gz.json").write_bytes(gzip.compress(json.dumps(records).encode()))
    (tmp_path / "lines.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps(r) for r in records).encode()))
    for name in ("array.json", "lines.jsonl", "array_gz.json", "lines.jsonl.gz"):
        assert read_json_records(tmp_path / name) == records


def test_read_json_records_errors_name_the_file_and_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=re.escape(f"{empty} holds no records")):
        read_json_records(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=re.escape(f"{broken} line 2: not valid JSON")):
        read_json_records(broken)
    scalars = tmp_path / "scalars.json"
    scalars.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{scalars} record 0: expected a JSON object, got int")):
        read_json_records(scalars)


def test_require_str_names_the_record_and_the_field() -> None:
    assert require_str({"a": "x"}, "a", where="f.json record 3") == "x"
    with pytest.raises(ValueError, match=re.escape("f.json record 3: missing field 'b'")):
        require_str({"a": "x"}, "b", where="f.json record 3")
    with pytest.raises(ValueError, match=re.escape("f.json record 3: field 'a' must be a non-empty string, got ' '")):
        require_str({"a": " "}, "a", where="f.json record 3")


def test_read_json_records_goes_through_datasets_and_keeps_mixed_types_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    from seka_lightning.benchmarks import records as records_module

    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(records_module.datasets, "load_dataset", spy)
    file = tmp_path / "r.jsonl"
    file.write_text(json.dumps({"a": "x", "b": {"c": 1}}) + "\n" + json.dumps({"a": "y"}) + "\n")
    # Arrow fills the field the second record lacks with null; the records come back as written.
    assert read_json_records(file) == [{"a": "x", "b": {"c": 1}}, {"a": "y"}]
    assert calls[-1][0] == ("json",) and calls[-1][1]["data_files"] == str(file)
    # A field whose type changes between records: datasets would re-encode it, so it is read as plain JSON.
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"id": 1}) + "\n" + json.dumps({"id": "2"}) + "\n")
    assert read_json_records(mixed) == [{"id": 1}, {"id": "2"}]


def test_hub_paths_pass_the_name_to_load_dataset_and_decode_class_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from seka_lightning.benchmarks import records as records_module

    features = datasets.Features(
        {"hard_text": datasets.Value("string"), "profession": datasets.ClassLabel(names=["nurse", "poet"])}
    )
    table = datasets.Dataset.from_list([{"hard_text": "A.", "profession": 1}], features=features)
    calls = []

    def fake(name, **kwargs):
        calls.append((name, kwargs))
        return table

    monkeypatch.setattr(records_module.datasets, "load_dataset", fake)
    assert hub_name("hub:LabHC/bias_in_bios") == "LabHC/bias_in_bios"
    assert hub_name("data/bios.csv") is None
    assert read_hub_records("LabHC/bias_in_bios", split="test") == [{"hard_text": "A.", "profession": "poet"}]
    assert calls == [("LabHC/bias_in_bios", {"split": "test"})]
    with pytest.raises(ValueError, match=re.escape("'hub:' names no dataset; write hub:<owner>/<name>")):
        hub_name("hub:")


def test_an_unreachable_hub_dataset_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from seka_lightning.benchmarks import records as records_module

    def offline(name, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(records_module.datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=re.escape("hub dataset 'azhx/counterfact' (split 'train') cannot be loaded")):
        read_hub_records("azhx/counterfact")
