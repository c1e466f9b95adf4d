from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import pytest

from seka_lightning.benchmarks import load_counterfact
from seka_lightning.benchmarks.counterfact import read_counterfact_cases


def easyedit(case_id: int, subject: str, prompt: str, new: str, true: str, rephrase: str) -> dict[str, Any]:
    return {
        "case_id": case_id,
        "prompt": prompt,
        "target_new": new,
        "subject": subject,
        "ground_truth": true,
        "rephrase_prompt": rephrase,
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    }


def rome(case_id: int, subject: str, template: str, new: str, true: str, paraphrases: list[str]) -> dict[str, Any]:
    return {
        "case_id": case_id,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": template,
            "relation_id": "P103",
            "target_new": {"str": new, "id": "Q1860"},
            "target_true": {"str": true, "id": "Q150"},
            "subject": subject,
        },
        "paraphrase_prompts": paraphrases,
        "neighborhood_prompts": ["Michel Rocard is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }


DARRIEUX = easyedit(
    0,
    "Danielle Darrieux",
    "The mother tongue of Danielle Darrieux is",
    "English",
    "French",
    "Where Danielle Darrieux is from, people speak the language of",
)


def write_easyedit(folder: Path, files: dict[str, list[dict[str, Any]]]) -> Path:
    folder.mkdir(exist_ok=True)
    for name, records in files.items():
        (folder / f"counterfact-{name}.json").write_text(json.dumps(records))
    return folder


@pytest.fixture
def easyedit_dir(tmp_path: Path) -> Path:
    # Cases split across the three files out of order, as in the shared copy.
    return write_easyedit(
        tmp_path / "easyedit",
        {
            "train": [
                easyedit(2, "Toko Yasuda", "Toko Yasuda, the", "piano", "guitar", "Toko Yasuda performs on the"),
                easyedit(
                    3,
                    "Autonomous University of Madrid",
                    "Autonomous University of Madrid, which is located in",
                    "Sweden",
                    "Spain",
                    "The Autonomous University of Madrid is in",
                ),
            ],
            "val": [
                easyedit(
                    1,
                    "Edwin of Northumbria",
                    "The official religion of Edwin of Northumbria is",
                    "Islam",
                    "Christianity",
                    "Edwin of Northumbria follows",
                )
            ],
            "edit": [DARRIEUX],
        },
    )


def test_easyedit_prompt_is_the_unmediated_fact_form(easyedit_dir: Path) -> None:
    examples = load_counterfact(easyedit_dir, split="all")
    efficacy = examples[0]
    assert efficacy.uid == "counterfact/0/efficacy"
    assert efficacy.text == (
        "Previously The mother tongue of Danielle Darrieux is French. "
        "Currently The mother tongue of Danielle Darrieux is English. "
        "Where Danielle Darrieux is from, people speak the language of"
    )
    assert efficacy.highlights == ("is English",)
    # The highlight is the attribute inside the "Currently ..." sentence.
    assert efficacy.spans[0][0] > efficacy.text.index("Currently ")
    assert efficacy.marked() == (
        "Previously The mother tongue of Danielle Darrieux is French. "
        "Currently The mother tongue of Danielle Darrieux **is English**. "
        "Where Danielle Darrieux is from, people speak the language of"
    )
    assert dict(efficacy.fields) == {
        "case_id": 0,
        "kind": "efficacy",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "target_true": "French",
        "attribute": "is English",
        "query": "Where Danielle Darrieux is from, people speak the language of",
    }


def test_easyedit_files_are_merged_in_case_id_order_with_one_paraphrase_each(easyedit_dir: Path) -> None:
    examples = load_counterfact(easyedit_dir, split="all")
    assert [example.uid for example in examples] == [
        f"counterfact/{case_id}/{kind}" for case_id in range(4) for kind in ("efficacy", "paraphrase/0")
    ]
    # EasyEdit keeps one rephrasing, so the paraphrase query is the efficacy query.
    assert examples[1].text == examples[0].text
    assert examples[1].fields["kind"] == "paraphrase"
    assert examples[1].fields["paraphrase_index"] == 0
    # The attribute strips ",-;: " from what follows the subject: "Toko Yasuda, the piano" -> "the piano".
    assert examples[4].highlights == ("the piano",)
    assert examples[4].text.startswith("Previously Toko Yasuda, the guitar. Currently Toko Yasuda, the piano. ")
    assert examples[6].highlights == ("which is located in Sweden",)


def test_rome_layout_builds_efficacy_from_the_first_paraphrase_and_one_example_per_paraphrase(tmp_path: Path) -> None:
    records = [
        rome(
            7,
            "Danielle Darrieux",
            "The mother tongue of {} is",
            "English",
            "French",
            ["Shayna does this. Danielle Darrieux, a native", "Bogota is nice. Danielle Darrieux, speaker of"],
        ),
    ]
    (tmp_path / "counterfact.json").write_text(json.dumps(records))
    examples = load_counterfact(tmp_path, split="all")
    assert [example.uid for example in examples] == [
        "counterfact/7/efficacy",
        "counterfact/7/paraphrase/0",
        "counterfact/7/paraphrase/1",
    ]
    head = (
        "Previously The mother tongue of Danielle Darrieux is French. "
        "Currently The mother tongue of Danielle Darrieux is English. "
    )
    assert examples[0].text == head + "Shayna does this. Danielle Darrieux, a native"
    assert examples[1].text == examples[0].text
    assert examples[2].text == head + "Bogota is nice. Danielle Darrieux, speaker of"
    for example in examples:
        assert example.highlights == ("is English",)
        assert example.fields["target_new"] == "English"
        assert example.fields["target_true"] == "French"
        assert example.fields["case_id"] == 7


def test_rome_file_may_be_gzipped_and_given_directly(tmp_path: Path) -> None:
    records = [rome(0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French", ["Q"])]
    file = tmp_path / "counterfact.json.gz"
    file.write_bytes(gzip.compress(json.dumps(records).encode()))
    assert load_counterfact(file, split="all")[0].highlights == ("is English",)
    assert load_counterfact(tmp_path, split="all")[0].highlights == ("is English",)


def test_attribute_is_located_in_the_current_fact_even_when_the_old_fact_has_it(tmp_path: Path) -> None:
    # Same attribute text in both facts: the span must be the second occurrence.
    record = easyedit(0, "Paris", "Paris is a twin city of", "Rome", "Rome", "Paris is paired with")
    (tmp_path / "cf.json").write_text(json.dumps([record]))
    example = load_counterfact(tmp_path / "cf.json", split="all")[0]
    assert (
        example.text
        == "Previously Paris is a twin city of Rome. Currently Paris is a twin city of Rome. Paris is paired with"
    )
    start = len("Previously Paris is a twin city of Rome. Currently Paris ")
    assert example.spans == ((start, start + len("is a twin city of Rome")),)
    assert example.highlights == ("is a twin city of Rome",)


def test_attribute_stops_before_the_final_period_that_the_prompt_drops(tmp_path: Path) -> None:
    record = easyedit(0, "Acme", "Acme is owned by", "Foo Inc.", "Bar", "Acme belongs to")
    (tmp_path / "cf.json").write_text(json.dumps([record]))
    examples = load_counterfact(tmp_path / "cf.json", split="all")
    # ctx.rstrip(". ") removes the period of "Inc.", so "is owned by Foo Inc." is not in the prompt.
    assert examples[0].text == "Previously Acme is owned by Bar. Currently Acme is owned by Foo Inc. Acme belongs to"
    assert examples.missing_highlight == ("counterfact/0/efficacy", "counterfact/0/paraphrase/0")


def test_empty_attribute_is_counted_not_dropped(tmp_path: Path) -> None:
    # Real CounterFact has "twin city" cases whose new target is the subject: the attribute is "".
    records = [
        easyedit(0, "Athens", "The twin city of Athens is", "Athens", "Rome", "Athens is twinned with"),
        DARRIEUX | {"case_id": 1},
    ]
    (tmp_path / "cf.json").write_text(json.dumps(records))
    examples = load_counterfact(tmp_path / "cf.json", split="all")
    assert len(examples) == 4
    assert examples.num_missing_highlight == 2
    assert examples.missing_highlight == ("counterfact/0/efficacy", "counterfact/0/paraphrase/0")
    assert examples[0].spans == ()
    assert examples[0].marked() == examples[0].text
    assert (
        examples[0].text
        == "Previously The twin city of Athens is Rome. Currently The twin city of Athens is Athens. Athens is twinned with"
    )
    assert examples[2].highlights == ("is English",)


def test_example_subset_and_split_slice_cases_in_case_id_order(easyedit_dir: Path) -> None:
    assert [e.uid for e in load_counterfact(easyedit_dir, example_subset="1:3")] == [
        "counterfact/1/efficacy",
        "counterfact/1/paraphrase/0",
        "counterfact/2/efficacy",
        "counterfact/2/paraphrase/0",
    ]
    assert [e.fields["case_id"] for e in load_counterfact(easyedit_dir, split=slice(3, None))] == [3, 3]
    assert [e.fields["case_id"] for e in load_counterfact(easyedit_dir, example_subset="::3")] == [0, 0, 3, 3]


def test_split_errors(easyedit_dir: Path) -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"split 'test' (cases 5000:10000) selects none of the 4 CounterFact cases in {easyedit_dir}; "
            "choose a range inside the data (split='all' takes every case)"
        ),
    ):
        load_counterfact(easyedit_dir)
    with pytest.raises(ValueError, match=re.escape("example_subset '9:' selects none of the 4 CounterFact cases")):
        load_counterfact(easyedit_dir, example_subset="9:")
    with pytest.raises(ValueError, match=re.escape("give either split ('dev') or example_subset ('0:2'), not both")):
        load_counterfact(easyedit_dir, split="dev", example_subset="0:2")
    with pytest.raises(ValueError, match=re.escape("split 'train' is not one of ['all', 'dev', 'test']")):
        load_counterfact(easyedit_dir, split="train")
    with pytest.raises(ValueError, match=re.escape("example_subset '1-2' is not a slice")):
        load_counterfact(easyedit_dir, example_subset="1-2")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {k: v for k, v in DARRIEUX.items() if k != "ground_truth"},
            "counterfact-edit.json record 0 (case_id 0): missing field 'ground_truth'",
        ),
        (
            {k: v for k, v in DARRIEUX.items() if k != "rephrase_prompt"},
            "counterfact-edit.json record 0 (case_id 0): missing field 'rephrase_prompt'",
        ),
        (
            {k: v for k, v in DARRIEUX.items() if k != "case_id"},
            "counterfact-edit.json record 0: missing field 'case_id'",
        ),
        (DARRIEUX | {"case_id": "0"}, "counterfact-edit.json record 0: field 'case_id' must be an integer, got '0'"),
        (
            DARRIEUX | {"target_new": ""},
            "counterfact-edit.json record 0 (case_id 0): field 'target_new' must be a non-empty string, got ''",
        ),
    ],
)
def test_easyedit_record_errors_name_file_record_case_and_field(
    tmp_path: Path, record: dict[str, Any], message: str
) -> None:
    folder = write_easyedit(tmp_path / "cf", {"train": [], "val": [], "edit": [record]})
    (folder / "counterfact-train.json").write_text(json.dumps([DARRIEUX | {"case_id": 5}]))
    (folder / "counterfact-val.json").write_text(json.dumps([DARRIEUX | {"case_id": 6}]))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_counterfact(folder, split="all")


def rome_without(path: tuple[str, ...]) -> dict[str, Any]:
    record = rome(4, "Danielle Darrieux", "The mother tongue of {} is", "English", "French", ["Q"])
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return record


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            rome_without(("paraphrase_prompts",)),
            "counterfact.json record 0 (case_id 4): missing field 'paraphrase_prompts' (a non-empty list of prompts)",
        ),
        (
            rome_without(("requested_rewrite", "subject")),
            "counterfact.json record 0 (case_id 4) requested_rewrite: missing field 'subject'",
        ),
        (
            rome_without(("requested_rewrite", "target_true")),
            "counterfact.json record 0 (case_id 4): missing field 'requested_rewrite.target_true'",
        ),
        (
            rome_without(("requested_rewrite", "target_new", "str")),
            "counterfact.json record 0 (case_id 4) requested_rewrite.target_new: missing field 'str'",
        ),
        (
            rome(4, "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English", "French", ["Q"]),
            "counterfact.json record 0 (case_id 4): requested_rewrite 'prompt' 'The mother tongue of Danielle "
            "Darrieux is' has no '{}' for the subject",
        ),
    ],
)
def test_rome_record_errors_name_file_record_case_and_field(
    tmp_path: Path, record: dict[str, Any], message: str
) -> None:
    (tmp_path / "counterfact.json").write_text(json.dumps([record]))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_counterfact(tmp_path, split="all")


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} holds neither counterfact.json (ROME layout)")):
        load_counterfact(tmp_path)
    write_easyedit(tmp_path, {"train": [DARRIEUX], "edit": [DARRIEUX | {"case_id": 1}]})
    with pytest.raises(
        ValueError,
        match=re.escape(f"{tmp_path}: EasyEdit layout is missing counterfact-val.json; all three files are needed"),
    ):
        load_counterfact(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"CounterFact path {tmp_path / 'nope'} does not exist")):
        load_counterfact(tmp_path / "nope")


def test_duplicate_case_ids_across_files_are_an_error(tmp_path: Path) -> None:
    folder = write_easyedit(tmp_path, {"train": [DARRIEUX], "val": [], "edit": [DARRIEUX]})
    (folder / "counterfact-val.json").write_text(json.dumps([DARRIEUX | {"case_id": 1}]))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "counterfact-edit.json record 0: case_id 0 already appears in counterfact-train.json; each case must appear once"
        ),
    ):
        load_counterfact(folder, split="all")


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "counterfact.json").write_text("[]")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'counterfact.json'} holds no records")):
        load_counterfact(tmp_path, split="all")


def test_real_counterfact_has_all_cases_in_case_id_order(shared_data: Path) -> None:
    cases = read_counterfact_cases(shared_data / "counterfact")
    assert len(cases) == 21_919
    assert [case.case_id for case in cases] == list(range(21_919))


def test_real_counterfact_test_split(shared_data: Path) -> None:
    examples = load_counterfact(shared_data / "counterfact")
    assert len(examples) == 2 * 5000
    first = examples[0]
    assert first.uid == "counterfact/5000/efficacy"
    assert first.text == (
        "Previously Joachim Barrande was employed in Prague. Currently Joachim Barrande was employed in Oslo. "
        "To get to work every day, Joachim Barrande has to"
    )
    assert first.highlights == ("was employed in Oslo",)
    assert (first.fields["target_new"], first.fields["target_true"]) == ("Oslo", "Prague")
    assert examples[-1].fields["case_id"] == 9999
    # The only unhighlighted test cases are the two whose new "twin city" is the subject itself.
    assert sorted({uid.split("/")[1] for uid in examples.missing_highlight}) == ["7093", "8594"]
    for example in examples:
        if example.spans:
            assert example.highlights == (example.fields["attribute"],)


def test_real_counterfact_subset_and_dev_split(shared_data: Path) -> None:
    subset = load_counterfact(shared_data / "counterfact", example_subset="5000:5500")
    assert len({example.fields["case_id"] for example in subset}) == 500
    assert subset[0].fields["case_id"] == 5000
    assert subset[-1].fields["case_id"] == 5499
    dev = load_counterfact(shared_data / "counterfact", split="dev")
    assert sorted({example.fields["case_id"] for example in dev}) == list(range(4500, 5000))


def test_hub_dataset_of_rome_records_gives_the_same_examples_as_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    from seka_lightning.benchmarks import records as records_module

    records = [
        rome(1, "Toyota", "{} is based in", "Germany", "Japan", ["The headquarters of Toyota are in"]),
        rome(0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French", ["Q1", "Q2"]),
    ]
    (tmp_path / "counterfact.json").write_text(json.dumps(records))
    from_file = load_counterfact(tmp_path, split="all")
    names = []

    def fake(name, **kwargs):
        names.append((name, kwargs["split"]))
        return datasets.Dataset.from_list(records)

    monkeypatch.setattr(records_module.datasets, "load_dataset", fake)
    from_hub = load_counterfact("hub:azhx/counterfact", split="all")
    assert names == [("azhx/counterfact", "train")]
    assert from_hub == from_file
    assert [example.fields["case_id"] for example in from_hub] == [0, 0, 0, 1, 1]
