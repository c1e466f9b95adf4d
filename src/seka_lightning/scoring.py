"""Benchmark scorers: how each benchmark turns a method's logits or generations into per-example records and metrics.

A scorer is an ``nn.Module`` holding torchmetrics states (so they move with the model and reduce across DDP ranks).
``score`` runs the method on one encoded batch; every method gets the same prompts, tokens and scoring.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from seka_lightning.methods import Encoded, HighlightMethod
from seka_lightning.metrics import (
    MeanScore,
    NGramEntropy,
    PronounChangeScore,
    SubspanExactMatch,
    TargetPreference,
    TfidfConsistency,
    TopKAccuracy,
    best_subspan_em,
    candidate_logprobs,
    first_token_logprob,
    gold_rank,
    has_subject_pronoun,
    is_degenerate,
    n_gram_entropy,
    pronoun_change,
    strip_echo,
    target_first_token_ids,
)

Example = Mapping[str, Any]  # {"uid", "text", "spans", "fields"}
RecordId = int | str


class RecordError(ValueError):
    """A benchmark record that cannot be scored, named by its benchmark id (not by its row in a batch)."""


@contextmanager
def naming_record(benchmark: str, record_id: RecordId) -> Iterator[None]:
    """Re-raise a ValueError or KeyError raised inside as a :class:`RecordError` naming the record."""
    try:
        yield
    except RecordError:
        raise
    except ValueError as error:
        raise RecordError(f"{benchmark} record {record_id!r}: {error}") from error
    except KeyError as error:
        raise RecordError(f"{benchmark} record {record_id!r}: missing field {error}") from error


class BenchmarkScorer(nn.Module):
    """Base: ``score`` returns one JSON-able record per example and updates the metrics; ``compute`` gives results.

    Every record has a stable ``id`` (:meth:`record_id`) and a ``scores`` object ``{metric: number}``. The
    contract with the report: each headline metric m of ``compute`` equals the mean over distinct ids of the mean
    of ``scores[m]`` over that id's records carrying m (records without m do not count for m).
    """

    benchmark = "benchmark"

    def __init__(self) -> None:
        super().__init__()
        self._first_ids: dict[str, list[int]] = {}

    def record_id(self, example: Example) -> RecordId:
        """The record's stable benchmark id (used in predictions and in error messages)."""
        return example["uid"]

    def first_ids(self, tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
        if target not in self._first_ids:
            self._first_ids[target] = target_first_token_ids(tokenizer, target)
        return self._first_ids[target]

    def score(
        self,
        method: HighlightMethod,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        enc: Encoded,
        examples: Sequence[Example],
    ) -> list[dict[str, Any]]:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


def _decode(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> list[str]:
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics as floats, without the NaN of a subgroup the run did not contain."""
    return {name: float(value) for name, value in metrics.items() if not math.isnan(float(value))}


class CounterFactScorer(BenchmarkScorer):
    """Efficacy (first paraphrase prompt) and paraphrase (every paraphrase prompt, fraction per case) scores:
    a prompt is won when the first-token log-prob of the new target beats the old one's (BENCHMARKS.md).

    Record ids are the case_id; efficacy records carry ``efficacy_score`` (0/1) and ``efficacy_magnitude``
    (P(new) - P(old)), paraphrase records ``paraphrase_score`` and ``paraphrase_magnitude``.
    """

    benchmark = "counterfact"

    def __init__(self) -> None:
        super().__init__()
        self.efficacy = TargetPreference()
        self.paraphrase = TargetPreference()

    def record_id(self, example: Example) -> RecordId:
        return example["fields"]["case_id"]

    def score(self, method, model, tokenizer, enc, examples):
        targets = []
        for example in examples:
            fields = example["fields"]
            with naming_record(self.benchmark, self.record_id(example)):
                targets.append(
                    (self.first_ids(tokenizer, fields["target_new"]), self.first_ids(tokenizer, fields["target_true"]))
                )
        logprobs = torch.log_softmax(method.prompt_logits(model, enc), dim=-1)
        records, by_case = [], defaultdict(list)
        for row, (example, (new_ids, old_ids)) in enumerate(zip(examples, targets, strict=True)):
            fields = example["fields"]
            new = first_token_logprob(logprobs[row], new_ids)
            old = first_token_logprob(logprobs[row], old_ids)
            prefix = "efficacy" if fields["kind"] == "efficacy" else "paraphrase"
            won = bool(new > old)
            magnitude = float(new.double().exp() - old.double().exp())
            records.append(
                {
                    "id": fields["case_id"],
                    "case_id": fields["case_id"],
                    "kind": fields["kind"],
                    "logp_new": float(new),
                    "logp_old": float(old),
                    "won": won,
                    "scores": {f"{prefix}_score": float(won), f"{prefix}_magnitude": magnitude},
                }
            )
            if fields["kind"] == "efficacy":
                self.efficacy.update(new[None], old[None])
            else:
                by_case[fields["case_id"]].append((new, old))
        if by_case:
            width = max(len(pairs) for pairs in by_case.values())
            new = torch.zeros(len(by_case), width, device=logprobs.device)
            old = torch.zeros_like(new)
            mask = torch.zeros_like(new, dtype=torch.bool)
            for i, pairs in enumerate(by_case.values()):
                for j, (n, o) in enumerate(pairs):
                    new[i, j], old[i, j], mask[i, j] = n, o, True
            self.paraphrase.update(new, old, mask=mask)
        return records

    def compute(self):
        efficacy, paraphrase = self.efficacy.compute(), self.paraphrase.compute()
        return {
            "efficacy_score": float(efficacy["score"]),
            "efficacy_magnitude": float(efficacy["magnitude"]),
            "paraphrase_score": float(paraphrase["score"]),
            "paraphrase_magnitude": float(paraphrase["magnitude"]),
        }


class BiasBiosScorer(BenchmarkScorer):
    """Top-1/top-3 occupation accuracy by first-token log-prob over the evaluated set's labels, plus fluency
    (n-gram entropy) and TF-IDF consistency with same-label bios of a ``max_new_tokens`` generation.

    Record ids are the bio's ``<file stem>/<row>``; each record carries ``top{k}_accuracy`` (0/1) and, with a
    generation, its ``fluency`` and ``consistency``.
    """

    benchmark = "biasbios"

    def __init__(
        self, candidates: Sequence[str], references: Mapping[str, Sequence[str]], *, max_new_tokens: int = 64
    ) -> None:
        super().__init__()
        if not candidates:
            raise ValueError("BiasBios needs at least one candidate label")
        self.candidates = list(candidates)
        self.max_new_tokens = max_new_tokens
        self.accuracy = TopKAccuracy(top_k=tuple(dict.fromkeys((1, min(3, len(self.candidates))))))
        self.fluency = NGramEntropy()
        self.consistency = TfidfConsistency(references)

    def record_id(self, example: Example) -> RecordId:
        return example["fields"]["bio_uid"]

    def _target(self, example: Example) -> int:
        label = example["fields"]["label"]
        if label not in self.candidates:
            raise ValueError(f"label {label!r} is not among the candidate labels {self.candidates}")
        return self.candidates.index(label)

    def score(self, method, model, tokenizer, enc, examples):
        gold = []
        for example in examples:
            with naming_record(self.benchmark, self.record_id(example)):
                gold.append(self._target(example))
        logprobs = torch.log_softmax(method.prompt_logits(model, enc), dim=-1)
        ids = [self.first_ids(tokenizer, label) for label in self.candidates]
        scores = candidate_logprobs(logprobs, ids)  # [B, C]
        target = torch.tensor(gold, device=scores.device)
        self.accuracy.update(scores, target)
        ranks = gold_rank(scores, target).tolist()
        labels = [e["fields"]["label"] for e in examples]
        generations = [""] * len(examples)
        if self.max_new_tokens:
            out = method.generate(model, enc, max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            generations = _decode(tokenizer, out)
            self.fluency.update(generations)
            self.consistency.update(generations, labels)
        predicted = scores.argmax(-1).tolist()
        records = []
        for example, p, rank, generation, label in zip(examples, predicted, ranks, generations, labels, strict=True):
            values = {f"top{k}_accuracy": float(rank < k) for k in self.accuracy.top_k}
            if self.max_new_tokens:
                values["fluency"] = n_gram_entropy(generation, ns=self.fluency.ns, weights=self.fluency.weights)
                values["consistency"] = self.consistency.similarity(generation, label)
            records.append(
                {
                    "id": self.record_id(example),
                    "label": label,
                    "predicted": self.candidates[p],
                    "gold_rank": rank,
                    "generation": generation,
                    "scores": values,
                }
            )
        return records

    def compute(self):
        accuracy = self.accuracy.compute()
        result = {f"{k}_accuracy": float(v) for k, v in accuracy.items()}
        if self.max_new_tokens:
            result["fluency"] = float(self.fluency.compute())
            result["consistency"] = float(self.consistency.compute())
        return result


class PronChangeScorer(BenchmarkScorer):
    """Pronoun-change P/A scores (fraction of samples with score > 0, and the mean) of a generation, scored after
    removing any echoed copy of the instruction, and the degeneracy rate of the raw generations.

    Record ids are the bio's ``<file stem>/<row>``; each record carries ``pron_score_p/a`` (score > 0, as 0/1),
    ``pron_mean_p/a`` (the score) and ``degenerate`` (0/1, :func:`~seka_lightning.metrics.is_degenerate`).
    """

    benchmark = "pronchange"

    def __init__(self, *, max_new_tokens: int = 256) -> None:
        super().__init__()
        self.max_new_tokens = max_new_tokens
        self.pronouns = PronounChangeScore()
        self.degenerate = MeanScore()

    def record_id(self, example: Example) -> RecordId:
        return example["fields"]["bio_uid"]

    def score(self, method, model, tokenizer, enc, examples):
        out = method.generate(model, enc, max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        generations = _decode(tokenizer, out)
        originals, scored, records = [], [], []
        for example, generation in zip(examples, generations, strict=True):
            fields = example["fields"]
            with naming_record(self.benchmark, self.record_id(example)):
                text = strip_echo(generation, fields["instruction"])
                change = pronoun_change(fields["bio"], text)
            degenerate = float(is_degenerate(generation))
            originals.append(fields["bio"])
            scored.append(text)
            records.append(
                {
                    "id": self.record_id(example),
                    "generation": generation,
                    "echo_removed": text != generation,
                    "has_she_he": has_subject_pronoun(fields["bio"]),
                    "p": change.p,
                    "a": change.a,
                    "scores": {
                        "pron_score_p": float(change.p > 0),
                        "pron_score_a": float(change.a > 0),
                        "pron_mean_p": change.p,
                        "pron_mean_a": change.a,
                        "degenerate": degenerate,
                    },
                }
            )
        self.pronouns.update(originals, scored)
        self.degenerate.update([record["scores"]["degenerate"] for record in records])
        return records

    def compute(self):
        result = self.pronouns.compute()
        return {
            "pron_score_p": float(result["p_score"]),
            "pron_score_a": float(result["a_score"]),
            "pron_mean_p": float(result["p_mean"]),
            "pron_mean_a": float(result["a_mean"]),
            "degenerate": float(self.degenerate.compute()),
        }


class LostInTheMiddleScorer(BenchmarkScorer):
    """Best-subspan exact match of a short generated answer: overall, per gold position, and with the gold
    document inside / outside the highlighted documents.

    Record ids are ``q{question index}@pos{gold position}``; each record carries ``exact_match``,
    ``exact_match_pos_<p>`` and one of ``exact_match_inside`` / ``exact_match_outside`` (0/1). A group no
    record falls in (e.g. "outside" when every document is highlighted) is left out of ``compute``.
    """

    benchmark = "lost_in_the_middle"

    def __init__(self, *, positions: Sequence[int], max_new_tokens: int = 60) -> None:
        super().__init__()
        self.max_new_tokens = max_new_tokens
        self.exact_match = SubspanExactMatch(positions=tuple(positions))
        self.inside = MeanScore(allow_empty=True)
        self.outside = MeanScore(allow_empty=True)

    def record_id(self, example: Example) -> RecordId:
        fields = example["fields"]
        return f"q{fields['record_index']}@pos{fields['gold_position']}"

    def score(self, method, model, tokenizer, enc, examples):
        out = method.generate(model, enc, max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        predictions = _decode(tokenizer, out)
        records = []
        for example, prediction in zip(examples, predictions, strict=True):
            fields = example["fields"]
            with naming_record(self.benchmark, self.record_id(example)):
                answers = list(fields["answers"])
                correct = float(best_subspan_em(prediction, answers))
            position, inside = fields["gold_position"], bool(fields["gold_inside_highlight"])
            records.append(
                {
                    "id": self.record_id(example),
                    "prediction": prediction,
                    "answers": answers,
                    "gold_position": position,
                    "gold_inside_highlight": inside,
                    "exact_match": correct,
                    "scores": {
                        "exact_match": correct,
                        f"exact_match_pos_{position}": correct,
                        f"exact_match_{'inside' if inside else 'outside'}": correct,
                    },
                }
            )
        self.exact_match.update(predictions, [r["answers"] for r in records], [r["gold_position"] for r in records])
        self.inside.update([r["exact_match"] for r in records if r["gold_inside_highlight"]])
        self.outside.update([r["exact_match"] for r in records if not r["gold_inside_highlight"]])
        return records

    def compute(self):
        result = {
            ("exact_match" if k == "em" else k.replace("em_pos_", "exact_match_pos_")): v
            for k, v in self.exact_match.compute().items()
        }
        result["exact_match_inside"] = self.inside.compute()
        result["exact_match_outside"] = self.outside.compute()
        return _finite(result)
