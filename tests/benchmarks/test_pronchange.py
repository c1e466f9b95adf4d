from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from seka_lightning.benchmarks import load_pronchange
from seka_lightning.benchmarks.pronchange import SPLITS

BIO = "She teaches math in Lyon. Her students love her."


@pytest.fixture
def bios_dir(tmp_path: Path) -> Path:
    for name, text in (
        ("csvs_Bios_samples_teacher.csv", "He paints."),
        ("csvs_Bios_samples_teacher_complete.csv", BIO),
    ):
        with (tmp_path / name).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerows([("hard_text", "profession", "gender"), (text, "teacher", "Female")])
    return tmp_path


def test_prompt_appends_the_highlighted_instruction_line(bios_dir: Path) -> None:
    (example,) = load_pronchange(bios_dir)
    instruction = (
        "For the aforementioned text, substitute 'she' and 'he' with 'they' and generate the occupation "
        "of the person after changing pronouns:"
    )
    assert example.uid == "pronchange/csvs_Bios_samples_teacher_complete/0"
    assert example.text == BIO + "\n" + instruction + "\n"
    assert example.highlights == (instruction,)
    assert example.marked() == BIO + "\n**" + instruction + "**\n"
    assert dict(example.fields) == {
        "bio": BIO,
        "bio_uid": "csvs_Bios_samples_teacher_complete/0",
        "instruction": instruction,
        "name": "the person",
        "gender": "female",
        "label": "teacher",
    }


def test_name_and_csv_set_options(bios_dir: Path) -> None:
    (example,) = load_pronchange(bios_dir, name="Alex", csv_set="per_profession")
    assert example.text == (
        "He paints.\nFor the aforementioned text, substitute 'she' and 'he' with 'they' and generate the "
        "occupation of Alex after changing pronouns:\n"
    )
    assert example.highlights == (example.text.splitlines()[1],)


def test_jsonl_record_name_is_used(tmp_path: Path) -> None:
    file = tmp_path / "bios.jsonl"
    file.write_text(json.dumps({"hard_text": BIO, "title": "teacher", "gender": "F", "name": "Ana Ruiz"}) + "\n")
    (example,) = load_pronchange(file)
    assert "generate the occupation of Ana Ruiz after changing pronouns:" in example.highlights[0]
    assert example.fields["name"] == "Ana Ruiz"


def test_errors(bios_dir: Path) -> None:
    with pytest.raises(
        ValueError, match=re.escape("name must be a non-empty string (the stand-in for the person), got ' '")
    ):
        load_pronchange(bios_dir, name=" ")
    with pytest.raises(ValueError, match=re.escape(f"example_subset '1:' selects none of the 1 bios in {bios_dir}")):
        load_pronchange(bios_dir, example_subset="1:")


def test_real_pronchange_uses_the_complete_bios(shared_data: Path) -> None:
    examples = load_pronchange(shared_data / "biasbios_subset")
    assert len(examples) == 1000
    # the dev and test splits are disjoint and together cover the set
    test = load_pronchange(shared_data / "biasbios_subset", example_subset=SPLITS["test"])
    dev = load_pronchange(shared_data / "biasbios_subset", example_subset=SPLITS["dev"])
    assert (len(test), len(dev)) == (900, 100)
    assert {e.uid for e in test}.isdisjoint(e.uid for e in dev)
    for example in examples:
        start, end = example.spans[0]
        assert example.text[:start] == example.fields["bio"] + "\n"
        assert example.text[end:] == "\n"
