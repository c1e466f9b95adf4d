from __future__ import annotations

import gzip
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import pytest

from seka_lightning.benchmarks import load_lost_in_the_middle, middle_documents
from seka_lightning.benchmarks.lost_in_the_middle import INSTRUCTION, normalize_words


def oracle_record(question: str, answers: list[str], title: str, text: str) -> dict[str, Any]:
    ctx = {"title": title, "text": text, "hasanswer": True, "isgold": True}
    return {"question": question, "answers": answers, "ctxs": [ctx], "nq_annotated_gold": {"title": title}}


def write_jsonl_gz(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(gzip.compress("\n".join(json.dumps(record) for record in records).encode()))
    return path


QUESTIONS = [
    oracle_record(
        "who wrote hamlet",
        ["William Shakespeare", "Shakespeare"],
        "Hamlet",
        "Hamlet is a tragedy by William Shakespeare.",
    ),
    oracle_record("capital of france", ["Paris"], "France", "The capital of France is Paris."),
    oracle_record("shape of the atlantic", ["S"], "Atlantic Ocean", "The Atlantic is S-shaped."),
    # Passages that contain other questions' answers as whole words (possessives included):
    oracle_record(
        "who built the globe", ["the Chamberlain's Men"], "Globe Theatre", "Shakespeare's company built the Globe."
    ),
    oracle_record("where is the louvre", ["the Louvre Palace"], "Louvre", "The Louvre is a museum in Paris, France."),
    oracle_record("what is a sea", ["body of salt water"], "Sea", "Seas are oceans' edges; Ocean's Eleven is a film."),
    # ... and ones that contain them only inside longer words:
    oracle_record("what is parisian cuisine", ["French food"], "Parisian cuisine", "Parisian chefs cook well."),
]
QUESTIONS += [
    oracle_record(
        f"question {index}", [f"answer{index}"], f"Title {index}", f"Filler passage number {index} answer{index}."
    )
    for index in range(7, 30)
]


@pytest.fixture
def oracle_file(tmp_path: Path) -> Path:
    return write_jsonl_gz(tmp_path / "nq-open-oracle.jsonl.gz", QUESTIONS)


def documents_of(text: str, k: int) -> list[str]:
    """The k documents of a prompt, parsed back from its text independently of the loader."""
    body = text.removeprefix(INSTRUCTION).split("\n\nQuestion: ")[0]
    documents = body.split("\n\n")
    assert len(documents) == k
    return documents


def test_exact_prompt_with_a_two_question_pool(tmp_path: Path) -> None:
    file = write_jsonl_gz(tmp_path / "oracle.jsonl.gz", QUESTIONS[:2])
    examples = load_lost_in_the_middle(file, num_documents=2, gold_position=1, highlight="all")
    example = examples[0]
    assert example.uid == "lost_in_the_middle/0/k2/gold1"
    assert example.text == (
        "Directly answer in one short phrase without any other word.\n\nContext:\n"
        "France\nThe capital of France is Paris.\n\n"
        "Hamlet\nHamlet is a tragedy by William Shakespeare."
        "\n\nQuestion: who wrote hamlet\n\nAnswer:"
    )
    assert example.highlights == (
        "France\nThe capital of France is Paris.",
        "Hamlet\nHamlet is a tragedy by William Shakespeare.",
    )
    assert dict(example.fields) == {
        "question": "who wrote hamlet",
        "answers": ("William Shakespeare", "Shakespeare"),
        "gold_position": 1,
        "num_documents": 2,
        "highlighted_documents": (0, 1),
        "gold_inside_highlight": True,
        "record_index": 0,
        "gold_title": "Hamlet",
    }


@pytest.mark.parametrize("gold_position", [0, 3, 7])
def test_gold_is_at_the_requested_position_and_distractors_are_distinct(oracle_file: Path, gold_position: int) -> None:
    examples = load_lost_in_the_middle(oracle_file, num_documents=8, gold_position=gold_position)
    assert len(examples) == len(QUESTIONS)
    for record, example in zip(QUESTIONS, examples, strict=True):
        gold = record["ctxs"][0]
        documents = documents_of(example.text, 8)
        assert documents[gold_position] == f"{gold['title']}\n{gold['text']}"
        assert len(set(documents)) == 8
        assert example.text.endswith(f"\n\nQuestion: {record['question']}\n\nAnswer:")


def test_distractors_never_contain_an_answer(oracle_file: Path) -> None:
    for seed in range(5):
        examples = load_lost_in_the_middle(oracle_file, num_documents=10, gold_position=4, seed=seed)
        for record, example in zip(QUESTIONS, examples, strict=True):
            distractors = documents_of(example.text, 10)
            del distractors[4]
            for document in distractors:
                for answer in record["answers"]:
                    assert f" {normalize_words(answer)} " not in f" {normalize_words(document)} "
    # Independently of normalize_words, the hand-known cases: the Globe passage names Shakespeare,
    # the Louvre passage names Paris, so neither is ever a distractor for those questions.
    for seed in range(5):
        examples = load_lost_in_the_middle(oracle_file, num_documents=25, gold_position=0, seed=seed)
        assert "Shakespeare's company" not in examples[0].text
        assert "museum in Paris" not in examples[1].text


def test_word_matching_keeps_passages_with_the_answer_only_inside_a_word(oracle_file: Path) -> None:
    # Asking for every allowed passage shows exactly which ones the filter lets through.
    # "Paris": the Louvre passage names it, "Parisian" does not count; 28 passages remain.
    (paris,) = load_lost_in_the_middle(oracle_file, num_documents=29, gold_position=0, example_subset="1:2")
    assert "Parisian chefs" in paris.text
    assert "museum in Paris" not in paris.text
    # "S": the possessives "Shakespeare's" and "Ocean's" contain the word "s", "S-shaped" is the gold.
    (shape,) = load_lost_in_the_middle(oracle_file, num_documents=28, gold_position=0, example_subset="2:3")
    assert "Shakespeare's company" not in shape.text
    assert "Ocean's Eleven" not in shape.text
    assert "Parisian chefs" in shape.text
    assert "Hamlet is a tragedy by William Shakespeare." in shape.text
    assert normalize_words("The Chamberlain's Men, Inc.") == "chamberlain s men inc"


def test_same_seed_same_contexts_and_subset_does_not_change_them(oracle_file: Path) -> None:
    first = load_lost_in_the_middle(oracle_file, gold_position=2, num_documents=6, seed=3)
    again = load_lost_in_the_middle(oracle_file, gold_position=2, num_documents=6, seed=3)
    assert [example.text for example in first] == [example.text for example in again]
    other = load_lost_in_the_middle(oracle_file, gold_position=2, num_documents=6, seed=4)
    assert [example.text for example in first] != [example.text for example in other]
    sliced = load_lost_in_the_middle(oracle_file, gold_position=2, num_documents=6, seed=3, example_subset="5:8")
    assert [example.text for example in sliced] == [example.text for example in first[5:8]]
    assert [example.fields["record_index"] for example in sliced] == [5, 6, 7]


def test_middle_documents_rule() -> None:
    # BENCHMARKS.md: documents 5 through 25 of 30, the reference's ctxs[4:25]; other k scale both ends by k / 30.
    assert middle_documents(30) == range(4, 25)
    assert middle_documents(20) == range(3, 17)  # 2.67 -> 3, 16.67 -> 17
    assert middle_documents(10) == range(1, 8)  # 1.33 -> 1, 8.33 -> 8
    assert middle_documents(1) == range(0, 1)
    for k in range(1, 61):
        expected = range(math.floor(4 * k / 30 + 0.5), math.floor(25 * k / 30 + 0.5))
        assert middle_documents(k) == expected, k


def test_protocol_defaults_are_thirty_documents_and_inside_flags(oracle_file: Path) -> None:
    # oracle_file has 30 questions, too few distractors for 30 documents: the error proves the default k is 30.
    with pytest.raises(ValueError, match=re.escape("only 28 of the 29 distractors needed")):
        load_lost_in_the_middle(oracle_file, gold_position=0)
    examples = load_lost_in_the_middle(oracle_file, num_documents=10, gold_position=0)
    assert all(example.fields["gold_inside_highlight"] is False for example in examples)
    inside = load_lost_in_the_middle(oracle_file, num_documents=10, gold_position=1)
    assert all(example.fields["gold_inside_highlight"] is True for example in inside)
    every = load_lost_in_the_middle(oracle_file, num_documents=10, gold_position=0, highlight="all")
    assert all(example.fields["gold_inside_highlight"] is True for example in every)


def test_middle_highlight_covers_exactly_the_middle_documents(oracle_file: Path) -> None:
    example = load_lost_in_the_middle(oracle_file, num_documents=20, gold_position=9)[0]
    documents = documents_of(example.text, 20)
    assert example.highlights == tuple(documents[3:17])
    assert example.fields["highlighted_documents"] == tuple(range(3, 17))
    every = load_lost_in_the_middle(oracle_file, num_documents=20, gold_position=9, highlight="all")[0]
    assert every.text == example.text
    assert every.highlights == tuple(documents)


def multi_document_record(gold_at: int, k: int) -> dict[str, Any]:
    ctxs = [
        {
            "id": str(i),
            "title": f"T{i}",
            "text": f"text {i}",
            "score": "1.0",
            "hasanswer": i == gold_at,
            "isgold": i == gold_at,
        }
        for i in range(k)
    ]
    return {"question": "q?", "answers": ["text"], "ctxs": ctxs}


def test_multi_document_layout_takes_documents_and_gold_from_the_file(tmp_path: Path) -> None:
    file = write_jsonl_gz(
        tmp_path / "nq-open-30_total_documents_gold_at_4.jsonl.gz", [multi_document_record(4, 30)] * 2
    )
    examples = load_lost_in_the_middle(file)
    assert len(examples) == 2
    example = examples[1]
    assert example.uid == "lost_in_the_middle/1/k30/gold4"
    assert documents_of(example.text, 30) == [f"T{i}\ntext {i}" for i in range(30)]
    assert example.highlights == tuple(f"T{i}\ntext {i}" for i in range(4, 25))
    assert load_lost_in_the_middle(file, num_documents=30, gold_position=4)[0].text == example.text
    with pytest.raises(ValueError, match=re.escape(f"{file.name} record 0: has 30 documents, not num_documents = 20")):
        load_lost_in_the_middle(file, num_documents=20)
    with pytest.raises(
        ValueError, match=re.escape(f"{file.name} record 0: the gold document is at 4, not gold_position = 0")
    ):
        load_lost_in_the_middle(file, gold_position=0)


def test_multi_document_record_needs_exactly_one_gold(tmp_path: Path) -> None:
    record = multi_document_record(4, 5)
    record["ctxs"][0]["isgold"] = True
    file = write_jsonl_gz(tmp_path / "multi.jsonl.gz", [record])
    with pytest.raises(
        ValueError,
        match=re.escape(
            "multi.jsonl.gz record 0: a multi-document record needs exactly one ctx with isgold true, found 2"
        ),
    ):
        load_lost_in_the_middle(file)


def test_option_errors(oracle_file: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "nq-open-oracle.jsonl.gz is an oracle file (one passage per question), so gold_position is required; "
            "pass 0 <= gold_position < num_documents = 30 (the protocol uses [0, 4, 9, 14, 19, 24, 29] for 30)"
        ),
    ):
        load_lost_in_the_middle(oracle_file)
    with pytest.raises(
        ValueError, match=re.escape("gold_position must satisfy 0 <= gold_position < num_documents = 30, got 30")
    ):
        load_lost_in_the_middle(oracle_file, gold_position=30)
    with pytest.raises(ValueError, match=re.escape("num_documents must be >= 1, got 0")):
        load_lost_in_the_middle(oracle_file, num_documents=0, gold_position=0)
    with pytest.raises(ValueError, match=re.escape("highlight 'edges' is not one of ['middle', 'all']")):
        load_lost_in_the_middle(oracle_file, gold_position=0, highlight="edges")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=re.escape(f"example_subset '40:' selects none of the 30 questions in {oracle_file}")
    ):
        load_lost_in_the_middle(oracle_file, gold_position=0, example_subset="40:")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "nq-open-oracle.jsonl.gz record 0: only 28 of the 29 distractors needed contain none of its answers; "
            "lower num_documents"
        ),
    ):
        load_lost_in_the_middle(oracle_file, num_documents=30, gold_position=0)
    with pytest.raises(ValueError, match=re.escape(f"lost-in-the-middle path {tmp_path} is not a file")):
        load_lost_in_the_middle(tmp_path, gold_position=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("answers"), "bad.jsonl.gz record 1: missing field 'answers' (a non-empty list of strings)"),
        (
            lambda r: r.update(answers=[]),
            "bad.jsonl.gz record 1: missing field 'answers' (a non-empty list of strings)",
        ),
        (lambda r: r.pop("question"), "bad.jsonl.gz record 1: missing field 'question'"),
        (lambda r: r.pop("ctxs"), "bad.jsonl.gz record 1: missing field 'ctxs' (a non-empty list of documents)"),
        (lambda r: r["ctxs"][0].pop("title"), "bad.jsonl.gz record 1: ctxs[0] missing field 'title'"),
        (lambda r: r["ctxs"][0].pop("text"), "bad.jsonl.gz record 1 ctxs[0]: missing field 'text'"),
    ],
)
def test_record_errors_name_file_record_and_field(tmp_path: Path, change: Any, message: str) -> None:
    records = json.loads(json.dumps(QUESTIONS[:3]))
    change(records[1])
    file = write_jsonl_gz(tmp_path / "bad.jsonl.gz", records)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_lost_in_the_middle(file, num_documents=2, gold_position=0)


def test_mixed_layouts_are_an_error(tmp_path: Path) -> None:
    file = write_jsonl_gz(tmp_path / "mixed.jsonl.gz", [QUESTIONS[0], multi_document_record(1, 3)])
    with pytest.raises(
        ValueError, match=re.escape("mixed.jsonl.gz mixes oracle records (one passage) with multi-document records")
    ):
        load_lost_in_the_middle(file, gold_position=0)


def test_real_oracle_builds_20_document_contexts_quickly(shared_data: Path) -> None:
    file = shared_data / "lost_in_the_middle" / "nq-open-oracle.jsonl.gz"
    started = time.perf_counter()
    examples = load_lost_in_the_middle(file, num_documents=20, gold_position=9, example_subset=":300")
    elapsed = time.perf_counter() - started
    assert len(examples) == 300
    assert elapsed < 20.0
    # Some passages end in whitespace, so read the documents off the "all" variant's spans.
    every = load_lost_in_the_middle(file, num_documents=20, gold_position=9, example_subset=":300", highlight="all")
    records = [json.loads(line) for line in gzip.open(file, "rt", encoding="utf-8")][:300]
    for record, example, all_highlighted in zip(records, examples, every, strict=True):
        assert all_highlighted.text == example.text
        documents = all_highlighted.highlights
        gold = record["ctxs"][0]
        assert documents[9] == f"{gold['title']}\n{gold['text']}"
        assert len(set(documents)) == 20
        for position, document in enumerate(documents):
            if position != 9:
                for answer in record["answers"]:
                    assert f" {normalize_words(answer)} " not in f" {normalize_words(document)} "
        assert example.highlights == documents[3:17]
