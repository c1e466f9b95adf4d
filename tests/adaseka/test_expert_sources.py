"""Expert triplet sources: record construction, held-out guards, and the real shared data where present."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from seka_lightning.adaseka.sources import (
    BiasBiosTripletDataModule,
    CounterFactTripletDataModule,
    HighlightedQADataModule,
    LostInTheMiddleTripletDataModule,
    with_irrelevant_questions,
)
from seka_lightning.data.triplets import Triplet

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def needs(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (only developer machines and CI have it)")
    return path


def test_irrelevant_question_is_the_next_records():
    triplets = with_irrelevant_questions([("c1", "q1", "a1"), ("c2", "q2", "a2"), ("c3", "q3", "a3")])
    assert triplets == [
        Triplet("c1", "q1", "a1", "q2"),
        Triplet("c2", "q2", "a2", "q3"),
        Triplet("c3", "q3", "a3", "q1"),
    ]


@pytest.mark.parametrize("case_ids", ["0:", "5000:6000", "4000:4600", ":"])
def test_counterfact_source_refuses_dev_and_test_cases(case_ids):
    with pytest.raises(ValueError, match="overlaps cases 4500:10000, the dev and test slices"):
        CounterFactTripletDataModule(case_ids=case_ids)


def test_counterfact_source_uses_train_cases_only():
    module = CounterFactTripletDataModule(str(needs(DATA / "counterfact")), max_samples=50, batch_size=7)
    module.setup("fit")
    assert len(module.triplets) == 50
    records = module.records()
    assert len(records) == 21919 - 10000
    for triplet in module.triplets:
        context = triplet.context
        assert context.startswith("Previously, ") and ". Currently, " in context
        assert context.rstrip(".").endswith(triplet.answer) and triplet.relevant_question.endswith(" ?")
    batches = list(module.train_dataloader())
    assert [len(b) for b in batches] == [7] * 7 + [1]


def test_lost_in_the_middle_source_takes_late_questions_with_answers_in_the_gold_passage(tmp_path):
    path = needs(DATA / "lost_in_the_middle" / "nq-open-oracle.jsonl.gz")
    module = LostInTheMiddleTripletDataModule(str(path), max_samples=None)
    records = module.records()
    with gzip.open(path, "rt") as handle:
        questions = [json.loads(line)["question"] for line in handle]
    evaluated = {q.strip() for q in questions[:300]}
    assert 0 < len(records) <= 500
    for context, question, answer in records:
        assert answer.lower() in context.lower() and question.endswith("?")
        assert question.rstrip("?") not in evaluated and question not in evaluated


def test_biasbios_source_answers_are_verbatim_occupations():
    module = BiasBiosTripletDataModule(str(needs(DATA / "biasbios_subset")), max_samples=None)
    records = module.records()
    assert records and all(answer.lower() == "accountant" and answer in context for context, _, answer in records)
    sentences = BiasBiosTripletDataModule(str(DATA / "biasbios_subset"), answer="sentence", max_samples=3).records()
    assert len(sentences) == 500 and all(context.startswith(answer) for context, _, answer in sentences)


def test_highlighted_qa_prompts_highlight_the_context(qa_file):
    module = HighlightedQADataModule(str(qa_file), batch_size=3, max_samples=2)
    module.setup("validate")
    batch = next(iter(module.val_dataloader()))
    assert len(batch) == 3
    for example in batch:
        ((start, end),) = example["spans"]
        assert example["text"][:start] == "Context: " and example["answer"] in example["text"][start:end]
