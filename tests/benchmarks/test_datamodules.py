"""Benchmark DataModules: dev/test slices, counts for metric_result.json, and the BiasBios shared-copy note."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import pytest

from seka_lightning.benchmarks import (
    BiasBiosDataModule,
    LostInTheMiddleDataModule,
    PronChangeDataModule,
)
from seka_lightning.benchmarks.records import resolve_split

SPLITS = {"test": "0:3", "dev": "3:5", "all": None}


def test_resolve_split() -> None:
    assert resolve_split(None, None, SPLITS) == "0:3"
    assert resolve_split("dev", None, SPLITS) == "3:5"
    assert resolve_split("all", None, SPLITS) is None
    assert resolve_split(None, "1:2", SPLITS) == "1:2"
    with pytest.raises(ValueError, match=re.escape("give either split ('dev') or example_subset ('1:2'), not both")):
        resolve_split("dev", "1:2", SPLITS)
    with pytest.raises(ValueError, match=re.escape("split 'val' is not one of ['all', 'dev', 'test']")):
        resolve_split("val", None, SPLITS)


def write_oracle(path: Path, n: int) -> Path:
    records = [
        {
            "question": f"question {i}",
            "answers": [f"answer{i}"],
            "ctxs": [{"title": f"T{i}", "text": f"Passage {i} says answer{i}.", "hasanswer": True, "isgold": True}],
        }
        for i in range(n)
    ]
    path.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in records).encode()))
    return path


def test_lost_in_the_middle_defaults_follow_the_protocol(tmp_path: Path) -> None:
    module = LostInTheMiddleDataModule(str(write_oracle(tmp_path / "oracle.jsonl.gz", 40)))
    assert (module.num_documents, module.gold_positions, module.highlight) == (30, [0, 4, 9, 14, 19, 24, 29], "middle")
    assert module.subset == "0:300"
    examples = module.examples
    assert len(examples) == 40 * 7
    assert {e.fields["highlighted_documents"] for e in examples} == {tuple(range(4, 25))}
    inside = {e.fields["gold_position"] for e in examples if e.fields["gold_inside_highlight"]}
    assert inside == {4, 9, 14, 19, 24}
    settings = module.describe()
    assert (settings["split"], settings["slice"], settings["num_documents"]) == (None, "0:300", 30)


def test_lost_in_the_middle_dev_and_test_questions_are_disjoint(tmp_path: Path) -> None:
    oracle = str(write_oracle(tmp_path / "oracle.jsonl.gz", 2655))
    kwargs = {"num_documents": 5, "gold_positions": [0]}
    test = LostInTheMiddleDataModule(oracle, split="test", **kwargs).examples
    dev = LostInTheMiddleDataModule(oracle, split="dev", **kwargs).examples
    assert (len(test), len(dev)) == (300, 100)
    test_questions = {e.fields["record_index"] for e in test}
    dev_questions = {e.fields["record_index"] for e in dev}
    assert test_questions == set(range(300)) and dev_questions == set(range(2555, 2655))


def write_bios(folder: Path, name: str, texts: list[str], profession: str = "accountant") -> None:
    with (folder / name).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("hard_text", "profession", "gender"))
        writer.writerows((text, profession, "F") for text in texts)


def test_pronchange_counts_bios_without_she_or_he(tmp_path: Path) -> None:
    texts = ["She audits firms.", "Audits firms in Lyon.", "He files taxes.", "Their office is in Rome."] * 250
    write_bios(tmp_path, "csvs_Bios_samples_accountant_complete.csv", [f"{t} Case {i}." for i, t in enumerate(texts)])
    test = PronChangeDataModule(str(tmp_path))
    assert test.counts() == {"examples": 900, "missing_highlight": 0, "bios_without_she_he": 450}
    dev = PronChangeDataModule(str(tmp_path), split="dev")
    assert dev.counts()["examples"] == 100 and dev.describe()["slice"] == "900:1000"
    with pytest.raises(ValueError, match="give either split"):
        PronChangeDataModule(str(tmp_path), split="dev", example_subset="0:10")


def test_biasbios_on_hard_text_is_labelled_uninformative(tmp_path: Path) -> None:
    write_bios(tmp_path, "csvs_Bios_samples_poet.csv", ["She writes. Verse is hers."], profession="poet")
    write_bios(tmp_path, "csvs_Bios_samples_nurse.csv", ["She helps. Nights are long."], profession="nurse")
    note = BiasBiosDataModule(str(tmp_path)).describe()["note"]
    assert note.startswith("uninformative highlight: 2 of 2 bios are the shared copy's hard_text")
    raw = tmp_path / "bios.jsonl"
    record = {"hard_text": "Verse is hers.", "raw": "Ana is a poet. Verse is hers.", "title": "poet", "gender": "F"}
    raw.write_text(json.dumps(record) + "\n")
    assert "note" not in BiasBiosDataModule(str(raw)).describe()
