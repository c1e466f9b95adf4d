"""Prompt files for `seka predict`: optional target/original answers, checked line by line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from seka_lightning.data.prompts import PromptDataModule, read_prompt_records, read_prompts
from seka_lightning.effect import mentions
from seka_lightning.highlight import strip_markers

REPO = Path(__file__).resolve().parents[2]


def write_lines(path: Path, *records: object) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plain_prompts_and_prompts_with_answers_both_load(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl",
        {"prompt": "Currently X **is B**."},
        {"prompt": "Currently Y **is in Rome**.", "target": " Rome ", "original": "Paris", "note": "ignored"},
    )
    assert read_prompt_records(path) == [
        {"prompt": "Currently X **is B**."},
        {"prompt": "Currently Y **is in Rome**.", "target": "Rome", "original": "Paris"},
    ]
    assert read_prompts(path) == ["Currently X **is B**.", "Currently Y **is in Rome**."]
    text = tmp_path / "p.txt"
    text.write_text("one\n\ntwo\n")
    assert read_prompt_records(text) == [{"prompt": "one"}, {"prompt": "two"}]
    batches = list(PromptDataModule(path=str(path), batch_size=4).predict_dataloader())
    assert batches == [[{"index": 0, **read_prompt_records(path)[0]}, {"index": 1, **read_prompt_records(path)[1]}]]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "p", "target": "Rome"}, '"target" is given without "original"; give both'),
        ({"prompt": "p", "original": "Paris"}, '"original" is given without "target"; give both'),
        ({"prompt": "p", "target": "", "original": "Paris"}, "\"target\" must be a non-empty string, got ''"),
        ({"prompt": "p", "target": "Rome", "original": "  "}, "\"original\" must be a non-empty string, got '  '"),
        ({"prompt": "p", "target": 3, "original": "Paris"}, '"target" must be a non-empty string, got 3'),
        ({"prompt": "p", "target": "Rome", "original": None}, '"original" must be a non-empty string, got None'),
    ],
)
def test_bad_answer_fields_name_the_line_and_field(tmp_path, record, message):
    path = write_lines(tmp_path / "p.jsonl", {"prompt": "fine", "target": "a", "original": "b"}, record)
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}:2: {message}")):
        read_prompt_records(path)


def test_shipped_knowledge_conflict_prompts_carry_their_answers():
    """Each shipped prompt highlights its target and states its original earlier, outside the highlight."""
    records = read_prompt_records(REPO / "data/prompts/knowledge_conflict.jsonl")
    assert len(records) == 24 and len({r["prompt"] for r in records}) == 24
    for record in records:
        text, spans = strip_markers(record["prompt"])
        assert len(spans) == 1
        (start, end) = spans[0]
        assert mentions(text[start:end], record["target"]) and not mentions(text[start:end], record["original"])
        assert mentions(text[:start], record["original"]) and not mentions(text[:start], record["target"])
        assert record["prompt"].startswith("Previously, ") and record["prompt"].endswith(" Answer in one word.")
