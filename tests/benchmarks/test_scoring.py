"""Benchmark scorers: every headline metric is recomputable from the per-record ``id`` and ``scores`` (the contract
with the report), records carry the protocol's per-example values, and errors name the benchmark record."""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

from seka_lightning.benchmarks import (
    BiasBiosScorer,
    CounterFactScorer,
    LostInTheMiddleScorer,
    PronChangeScorer,
    RecordError,
    load_biasbios,
    load_counterfact,
    load_lost_in_the_middle,
    load_pronchange,
)
from seka_lightning.benchmarks.base import as_dict as _as_dict
from seka_lightning.methods import HighlightMethod
from seka_lightning.metrics import n_gram_entropy, pronoun_change

CASES = [
    (0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French", ["{} speaks", "{} grew up speaking"]),
    (1, "Toyota", "{} is based in", "Germany", "Japan", ["The headquarters of {} are in"]),
    (
        2,
        "the keepers",
        "What {} carry is",
        "silver",
        "stone",
        ["People say {} carry", "It is known {} carry", "{} hold"],
    ),
    (3, "Rome", "{} is the capital of", "France", "Italy", ["The city of {} is the capital of"]),
]


class ScriptedMethod(HighlightMethod):
    """Seeded random prompt logits and scripted generations: scorers are tested without a model."""

    def __init__(self, vocab: int, generations: list[str] | None = None, *, tokenizer=None, seed: int = 0) -> None:
        self.vocab, self.generations, self.tokenizer = vocab, list(generations or []), tokenizer
        self.gen = torch.Generator().manual_seed(seed)

    def prompt_logits(self, model, enc):
        return torch.randn(enc["input_ids"].shape[0], self.vocab, generator=self.gen) * 4

    def generate(self, model, enc, *, max_new_tokens, pad_token_id):
        rows = [self.tokenizer.encode(self.generations.pop(0)) for _ in range(enc["input_ids"].shape[0])]
        width = max(len(row) for row in rows)
        return torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])


def run(scorer, method, tokenizer, examples, *, batch: int) -> list[dict[str, Any]]:
    records = []
    for start in range(0, len(examples), batch):
        chunk = [_as_dict(example) for example in examples[start : start + batch]]
        enc = {"input_ids": torch.zeros(len(chunk), 1, dtype=torch.long)}
        records += scorer.score(method, None, tokenizer, enc, chunk)
    return records


def recompute(records: list[dict[str, Any]]) -> dict[str, float]:
    """The report's rule: mean over distinct ids of the mean over that id's records carrying the metric."""
    values: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for name, value in record["scores"].items():
            values[name][record["id"]].append(value)
    return {
        name: math.fsum(math.fsum(v) / len(v) for v in by_id.values()) / len(by_id) for name, by_id in values.items()
    }


def assert_contract(records: list[dict[str, Any]], computed: dict[str, float]) -> None:
    recomputed = recompute(records)
    assert recomputed.keys() == computed.keys()
    for name, value in computed.items():
        assert recomputed[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_counterfact_records_recompute_every_metric(tokenizer, counterfact_file) -> None:
    examples = load_counterfact(counterfact_file(CASES), split="all")
    scorer = CounterFactScorer()
    records = run(scorer, ScriptedMethod(len(tokenizer)), tokenizer, examples, batch=3)
    computed = scorer.compute()
    assert_contract(records, computed)
    assert [r["id"] for r in records] == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]
    for record in records:
        prefix = "efficacy" if record["kind"] == "efficacy" else "paraphrase"
        assert record["scores"] == {
            f"{prefix}_score": float(record["logp_new"] > record["logp_old"]),
            f"{prefix}_magnitude": pytest.approx(math.exp(record["logp_new"]) - math.exp(record["logp_old"])),
        }
    assert 0 < computed["paraphrase_score"] < 1  # the seeded logits win some prompts and lose others


def write_bios(folder: Path, rows_by_profession: dict[str, list[str]]) -> Path:
    for profession, texts in rows_by_profession.items():
        with (folder / f"csvs_Bios_samples_{profession}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(("hard_text", "profession", "gender"))
            writer.writerows((text, profession, "F") for text in texts)
    return folder


def test_biasbios_records_recompute_every_metric(tokenizer, tmp_path: Path) -> None:
    folder = write_bios(
        tmp_path,
        {
            "teacher": ["She teaches in Lyon. Her class is large.", "He teaches math. He likes it."],
            "painter": ["She paints. Her art sells.", "He paints walls. He is busy."],
            "nurse": ["She works nights. She helps.", "He nurses. He cares."],
            "poet": ["She writes. Verse is hers."],
        },
    )
    examples = load_biasbios(folder)
    references: dict[str, list[str]] = defaultdict(list)
    for example in examples:
        references[example.fields["label"]].append(example.fields["bio"])
    generations = [f"The person works as a {e.fields['label']} and writes {i} verses." for i, e in enumerate(examples)]
    scorer = BiasBiosScorer(examples[0].fields["candidates"], references, max_new_tokens=8)
    method = ScriptedMethod(len(tokenizer), generations, tokenizer=tokenizer, seed=3)
    records = run(scorer, method, tokenizer, examples, batch=3)
    computed = scorer.compute()
    assert_contract(records, computed)
    assert set(computed) == {"top1_accuracy", "top3_accuracy", "fluency", "consistency"}
    assert records[0]["id"] == "csvs_Bios_samples_nurse/0"
    for record, generation in zip(records, generations, strict=True):
        assert record["scores"]["fluency"] == pytest.approx(n_gram_entropy(generation))
        assert record["scores"]["top1_accuracy"] == float(record["predicted"] == record["label"])
        assert record["scores"]["top3_accuracy"] == float(record["gold_rank"] < 3)


def test_pronchange_strips_the_echoed_instruction_and_recomputes_every_metric(tokenizer, tmp_path: Path) -> None:
    folder = write_bios(
        tmp_path,
        {
            "teacher_complete": [
                "She teaches math in Lyon. Her students love her.",
                "He paints walls in Rome and he sings.",
                "Teaches math in Lyon to many students.",  # no she/he
                "She writes poems about rivers.",
            ]
        },
    )
    examples = load_pronchange(folder)
    instruction = examples[0].fields["instruction"]
    generations = [
        instruction + " They teach math in Lyon. Their students love them.",  # echo, then a full conversion
        "He paints walls in Rome and he sings.",  # nothing changed
        "teaches math math math math math math math math math math math math",  # looping
        "They write poems about rivers.",
    ]
    scorer = PronChangeScorer(max_new_tokens=8)
    method = ScriptedMethod(len(tokenizer), list(generations), tokenizer=tokenizer)
    records = run(scorer, method, tokenizer, examples, batch=3)
    computed = scorer.compute()
    assert_contract(records, computed)
    assert [r["echo_removed"] for r in records] == [True, False, False, False]
    assert [r["has_she_he"] for r in records] == [True, True, False, True]
    assert [r["scores"]["degenerate"] for r in records] == [0.0, 0.0, 1.0, 0.0]
    # the echo's quoted 'she' and 'he' do not count: scored as if the model had written only its answer
    answer_only = pronoun_change(examples[0].fields["bio"], " They teach math in Lyon. Their students love them.")
    assert records[0]["p"] == pytest.approx(answer_only.p) and answer_only.p > 0
    assert pronoun_change(examples[0].fields["bio"], generations[0]).p < answer_only.p
    assert computed["degenerate"] == 0.25
    assert computed["pron_score_p"] == pytest.approx(sum(r["p"] > 0 for r in records) / 4)


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


@pytest.mark.parametrize("highlight", ["middle", "all"])
def test_lost_in_the_middle_inside_outside_and_positions_recompute(tokenizer, tmp_path: Path, highlight: str) -> None:
    oracle = write_oracle(tmp_path / "oracle.jsonl.gz", 8)
    positions = [0, 1, 3]  # of 4 documents: the middle is 1..2, so 0 and 3 are outside
    examples = [
        e
        for p in positions
        for e in load_lost_in_the_middle(oracle, num_documents=4, gold_position=p, highlight=highlight)
    ]
    # right answers for even questions at positions 0 and 1, and for every question at 3
    generations = [
        f"answer{e.fields['record_index']}"
        if e.fields["record_index"] % 2 == 0 or e.fields["gold_position"] == 3
        else "no idea"
        for e in examples
    ]
    scorer = LostInTheMiddleScorer(positions=positions, max_new_tokens=4)
    records = run(
        scorer, ScriptedMethod(len(tokenizer), generations, tokenizer=tokenizer), tokenizer, examples, batch=5
    )
    computed = scorer.compute()
    assert_contract(records, computed)
    assert records[9]["id"] == "q1@pos1"
    assert computed["exact_match_pos_0"] == 0.5 and computed["exact_match_pos_3"] == 1.0
    if highlight == "middle":
        assert computed["exact_match_inside"] == 0.5 and computed["exact_match_outside"] == 0.75
    else:
        assert "exact_match_outside" not in computed and computed["exact_match_inside"] == computed["exact_match"]


def test_scoring_errors_name_the_benchmark_record(tokenizer, tmp_path: Path, counterfact_file) -> None:
    folder = write_bios(tmp_path, {"teacher_complete": ["She teaches math.", "He."]})
    examples = load_pronchange(folder)
    method = ScriptedMethod(len(tokenizer), ["They teach math.", "They."], tokenizer=tokenizer)
    with pytest.raises(
        RecordError,
        match=re.escape(
            "pronchange record 'csvs_Bios_samples_teacher_complete/1': original text 'He.' has no non-pronoun"
        ),
    ):
        run(PronChangeScorer(max_new_tokens=4), method, tokenizer, examples, batch=2)
    bios = load_biasbios(write_bios(tmp_path, {"poet": ["She writes. Verse is hers."]}), csv_set="per_profession")
    scorer = BiasBiosScorer(["teacher"], {"teacher": ["A teacher."]}, max_new_tokens=0)
    with pytest.raises(
        RecordError,
        match=re.escape("biasbios record 'csvs_Bios_samples_poet/0': label 'poet' is not among the candidate labels"),
    ):
        run(scorer, ScriptedMethod(len(tokenizer)), tokenizer, bios, batch=2)
    cases = load_counterfact(counterfact_file(CASES[:2]), split="all")
    broken = [_as_dict(e) for e in cases]
    broken[3]["fields"]["target_new"] = ""
    with pytest.raises(RecordError, match=re.escape("counterfact record 1: target must be a non-empty string, got ''")):
        CounterFactScorer().score(
            ScriptedMethod(len(tokenizer)), None, tokenizer, {"input_ids": torch.zeros(5, 1)}, broken
        )
