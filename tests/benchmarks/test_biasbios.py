from __future__ import annotations

import csv
import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from seka_lightning.benchmarks import load_biasbios
from seka_lightning.benchmarks.biasbios import first_sentence_end, read_bios

NURSE_BIO = "She works night shifts at St. Mary's hospital. Dr. Lee trained her. She loves it."
ARCHITECT_BIO = "He designed three bridges in Oslo! Later he moved to Rome."


def write_csv(
    path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = ("hard_text", "profession", "gender")
) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def bios_dir(tmp_path: Path) -> Path:
    """The shared layout in miniature: per-occupation files, a _complete file and a masked-pronoun file."""
    folder = tmp_path / "bios"
    folder.mkdir()
    write_csv(
        folder / "csvs_Bios_samples_nurse.csv", [{"hard_text": NURSE_BIO, "profession": "nurse", "gender": "Female"}]
    )
    write_csv(
        folder / "csvs_Bios_samples_interior_designer.csv",
        [
            {"hard_text": ARCHITECT_BIO, "profession": "interior_designer", "gender": "Male"},
            {"hard_text": "She picks fabrics.", "profession": "interior_designer", "gender": "Female"},
        ],
    )
    write_csv(
        folder / "csvs_Bios_samples_nurse_complete.csv",
        [
            {"hard_text": NURSE_BIO, "profession": "nurse", "gender": "Female"},
            {"hard_text": "He runs the ward. He is kind.", "profession": "nurse", "gender": "Male"},
        ],
    )
    write_csv(
        folder / "csvs_Bios_samples_df_masked_pronoun.csv",
        [{"masked_text": "they run", "labels": "1"}],
        columns=("masked_text", "labels"),
    )
    return folder


def test_prompt_highlights_the_first_sentence(bios_dir: Path) -> None:
    examples = load_biasbios(bios_dir)
    by_uid = {example.uid: example for example in examples}
    nurse = by_uid["biasbios/csvs_Bios_samples_nurse/0"]
    assert nurse.text == (
        "She works night shifts at St. Mary's hospital. Dr. Lee trained her. She loves it"
        ".\n\nThe person has the occupation of a/an "
    )
    assert nurse.highlights == ("She works night shifts at St. Mary's hospital.",)
    assert nurse.marked().startswith("**She works night shifts at St. Mary's hospital.** Dr. Lee")
    assert nurse.fields["label"] == "nurse"
    assert nurse.fields["gender"] == "female"
    assert nurse.fields["bio"] == NURSE_BIO
    architect = by_uid["biasbios/csvs_Bios_samples_interior_designer/0"]
    assert architect.highlights == ("He designed three bridges in Oslo!",)
    assert architect.fields["label"] == "interior designer"
    assert architect.fields["profession"] == "interior_designer"


def test_one_sentence_bio_highlight_ends_where_the_prompt_drops_the_period(bios_dir: Path) -> None:
    example = load_biasbios(bios_dir, name="Alex")[1]
    assert example.text == "She picks fabrics.\n\nAlex has the occupation of a/an "
    assert example.highlights == ("She picks fabrics",)


def test_csv_set_picks_files_and_skips_the_masked_pronoun_file(bios_dir: Path) -> None:
    per_profession = load_biasbios(bios_dir)
    assert [example.uid for example in per_profession] == [
        "biasbios/csvs_Bios_samples_interior_designer/0",
        "biasbios/csvs_Bios_samples_interior_designer/1",
        "biasbios/csvs_Bios_samples_nurse/0",
    ]
    complete = load_biasbios(bios_dir, csv_set="complete")
    assert [example.uid for example in complete] == [
        "biasbios/csvs_Bios_samples_nurse_complete/0",
        "biasbios/csvs_Bios_samples_nurse_complete/1",
    ]
    # "all": the _complete file's first bio repeats the nurse file's, so it appears once.
    everything = load_biasbios(bios_dir, csv_set="all")
    assert [example.uid for example in everything] == [
        "biasbios/csvs_Bios_samples_interior_designer/0",
        "biasbios/csvs_Bios_samples_interior_designer/1",
        "biasbios/csvs_Bios_samples_nurse/0",
        "biasbios/csvs_Bios_samples_nurse_complete/1",
    ]


def test_candidates_are_the_distinct_labels_of_the_evaluated_examples(bios_dir: Path) -> None:
    assert {example.fields["candidates"] for example in load_biasbios(bios_dir)} == {("interior designer", "nurse")}
    subset = load_biasbios(bios_dir, example_subset=":2")
    assert [example.fields["candidates"] for example in subset] == [("interior designer",)] * 2
    with pytest.raises(ValueError, match=re.escape(f"example_subset '5:' selects none of the 3 bios in {bios_dir}")):
        load_biasbios(bios_dir, example_subset="5:")


def test_public_jsonl_records_use_raw_start_pos_and_name(tmp_path: Path) -> None:
    hard_text = "Nancy has years of experience in surgery. She lives in Ohio."
    records = [
        {
            "raw": "Nancy Lee is a registered nurse. RN since 1999. " + hard_text,
            "start_pos": len("Nancy Lee is a registered nurse. RN since 1999. "),
            "hard_text": hard_text,
            "title": "nurse",
            "gender": "F",
            "name": ["Nancy", "", "Lee"],
        },
        {"hard_text": "He builds houses. He is tall.", "title": "architect", "gender": "M"},
    ]
    file = tmp_path / "bios.jsonl.gz"
    file.write_bytes(gzip.compress("\n".join(json.dumps(record) for record in records).encode()))
    first, second = load_biasbios(file)
    assert first.uid == "biasbios/bios/0"
    assert first.text == (
        "Nancy Lee is a registered nurse. RN since 1999. Nancy has years of experience in surgery. She lives in Ohio"
        ".\n\nNancy Lee has the occupation of a/an "
    )
    # raw[:start_pos] is what the public data removed as the first sentence; the splitter would stop earlier.
    assert first.highlights == ("Nancy Lee is a registered nurse. RN since 1999.",)
    assert (first.fields["gender"], first.fields["name"]) == ("female", "Nancy Lee")
    assert second.text == "He builds houses. He is tall.\n\nThe person has the occupation of a/an "
    assert second.highlights == ("He builds houses.",)
    assert first.fields["candidates"] == ("architect", "nurse")


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ("Dr. Smith is a dentist. She opened a clinic.", "Dr. Smith is a dentist."),
        ("L. John Walpole has a license. All CPAs study.", "L. John Walpole has a license."),
        ("He moved to the U.S. in 1990. He works there.", "He moved to the U.S. in 1990."),
        ('He said "we build." Then he left.', 'He said "we build."'),
        ("Is she a poet? Yes, she is.", "Is she a poet?"),
        ("She was born in 1975. 2001 was her big year.", "She was born in 1975."),
        ("She joined No. 10 in Jan. 2015. She left.", "She joined No. 10 in Jan. 2015."),
        ("One sentence only.  ", "One sentence only."),
        ("no capital after. so one sentence", "no capital after. so one sentence"),
    ],
)
def test_first_sentence_end(text: str, first: str) -> None:
    assert text[: first_sentence_end(text)] == first


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"hard_text": "", "profession": "nurse", "gender": "Female"},
            "bad.csv row 0: field 'hard_text' must be a non-empty string, got ''",
        ),
        (
            {"hard_text": "A bio.", "profession": "nurse", "gender": "X"},
            "bad.csv row 0: field 'gender' must be one of F, M, Female, Male; got 'X'",
        ),
    ],
)
def test_csv_row_errors_name_file_row_and_field(tmp_path: Path, row: dict[str, str], message: str) -> None:
    write_csv(tmp_path / "bad.csv", [row])
    with pytest.raises(ValueError, match=re.escape(message)):
        load_biasbios(tmp_path / "bad.csv")


def test_csv_without_a_column_names_the_missing_field(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "bad.csv", [{"hard_text": "A bio.", "profession": "nurse"}], columns=("hard_text", "profession")
    )
    with pytest.raises(ValueError, match=re.escape("bad.csv row 0: missing field 'gender'")):
        load_biasbios(tmp_path / "bad.csv")


def test_jsonl_errors_name_file_record_and_field(tmp_path: Path) -> None:
    file = tmp_path / "bios.jsonl"
    file.write_text(json.dumps({"hard_text": "A bio.", "gender": "F"}) + "\n")
    with pytest.raises(ValueError, match=re.escape("bios.jsonl record 0: missing field 'profession'")):
        load_biasbios(file)
    file.write_text(json.dumps({"hard_text": "A bio.", "title": "nurse", "gender": "F", "name": 3}) + "\n")
    with pytest.raises(ValueError, match=re.escape("bios.jsonl record 0: field 'name' must be a string or a list")):
        load_biasbios(file)


def test_empty_inputs_and_bad_options_are_errors(tmp_path: Path, bios_dir: Path) -> None:
    write_csv(tmp_path / "empty.csv", [])
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'empty.csv'} holds no rows")):
        load_biasbios(tmp_path / "empty.csv")
    (bios_dir / "csvs_Bios_samples_nurse_complete.csv").unlink()
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{bios_dir} has no Bias-in-Bios CSV (columns hard_text, profession, gender) in csv_set 'complete'"
        ),
    ):
        load_biasbios(bios_dir, csv_set="complete")
    with pytest.raises(
        ValueError, match=re.escape("csv_set 'some' is not one of ['per_profession', 'complete', 'all']")
    ):
        load_biasbios(bios_dir, csv_set="some")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=re.escape("name must be a non-empty string (the stand-in for the person), got ''")
    ):
        load_biasbios(bios_dir, name="")
    with pytest.raises(ValueError, match=re.escape(f"Bias-in-Bios path {tmp_path / 'nope'} does not exist")):
        load_biasbios(tmp_path / "nope")


def test_real_biasbios_sets(shared_data: Path) -> None:
    folder = shared_data / "biasbios_subset"
    examples = load_biasbios(folder)
    assert len(examples) == 280
    assert Counter(example.fields["label"] for example in examples) == Counter(
        {label: 10 for label in examples[0].fields["candidates"]}
    )
    assert len(examples[0].fields["candidates"]) == 28
    for example in examples:
        (highlight,) = example.highlights
        assert example.fields["bio"].startswith(highlight)
        assert example.text.endswith(".\n\nThe person has the occupation of a/an ")
    assert len(read_bios(folder, csv_set="complete")) == 1000
    # 10 + 1,000 accountant bios and 27 x 10 others, two of the accountant bios repeated.
    assert len(read_bios(folder, csv_set="all")) == 1278
