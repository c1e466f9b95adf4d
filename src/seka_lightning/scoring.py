"""Benchmark scorers: how each benchmark turns a method's logits or generations into per-example records and metrics.

A scorer is an ``nn.Module`` holding torchmetrics states (so they move with the model and reduce across DDP ranks).
``score`` runs the method on one encoded batch; every method gets the same prompts, tokens and scoring.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from seka_lightning.methods import Encoded, HighlightMethod
from seka_lightning.metrics import (
    NGramEntropy,
    PronounChangeScore,
    SubspanExactMatch,
    TargetPreference,
    TfidfConsistency,
    TopKAccuracy,
    best_subspan_em,
    candidate_logprobs,
    first_token_logprob,
    pronoun_change,
    target_first_token_ids,
)

Example = Mapping[str, Any]  # {"uid", "text", "spans", "fields"}


class BenchmarkScorer(nn.Module):
    """Base: ``score`` returns one JSON-able record per example and updates the metrics; ``compute`` gives results."""

    benchmark = "benchmark"

    def __init__(self) -> None:
        super().__init__()
        self._first_ids: dict[str, list[int]] = {}

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


class CounterFactScorer(BenchmarkScorer):
    """Efficacy (first paraphrase prompt) and paraphrase (every paraphrase prompt, fraction per case) scores:
    a prompt is won when the first-token log-prob of the new target beats the old one's (BENCHMARKS.md)."""

    benchmark = "counterfact"

    def __init__(self) -> None:
        super().__init__()
        self.efficacy = TargetPreference()
        self.paraphrase = TargetPreference()

    def score(self, method, model, tokenizer, enc, examples):
        logprobs = torch.log_softmax(method.prompt_logits(model, enc), dim=-1)
        records, by_case = [], defaultdict(list)
        for row, example in enumerate(examples):
            fields = example["fields"]
            new = first_token_logprob(logprobs[row], self.first_ids(tokenizer, fields["target_new"]))
            old = first_token_logprob(logprobs[row], self.first_ids(tokenizer, fields["target_true"]))
            records.append(
                {
                    "case_id": fields["case_id"],
                    "kind": fields["kind"],
                    "logp_new": float(new),
                    "logp_old": float(old),
                    "won": bool(new > old),
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
    (n-gram entropy) and TF-IDF consistency with same-label bios of a ``max_new_tokens`` generation."""

    benchmark = "biasbios"

    def __init__(
        self, candidates: Sequence[str], references: Mapping[str, Sequence[str]], *, max_new_tokens: int = 64
    ) -> None:
        super().__init__()
        if not candidates:
            raise ValueError("BiasBios needs at least one candidate label")
        self.candidates = list(candidates)
        self.max_new_tokens = max_new_tokens
        self.accuracy = TopKAccuracy(top_k=(1, min(3, len(self.candidates))))
        self.fluency = NGramEntropy()
        self.consistency = TfidfConsistency(references)

    def score(self, method, model, tokenizer, enc, examples):
        logprobs = torch.log_softmax(method.prompt_logits(model, enc), dim=-1)
        ids = [self.first_ids(tokenizer, label) for label in self.candidates]
        scores = candidate_logprobs(logprobs, ids)  # [B, C]
        target = torch.tensor([self.candidates.index(e["fields"]["label"]) for e in examples], device=scores.device)
        self.accuracy.update(scores, target)
        generations = [""] * len(examples)
        if self.max_new_tokens:
            out = method.generate(model, enc, max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            generations = _decode(tokenizer, out)
            labels = [e["fields"]["label"] for e in examples]
            self.fluency.update(generations)
            self.consistency.update(generations, labels)
        predicted = scores.argmax(-1).tolist()
        return [
            {"label": e["fields"]["label"], "predicted": self.candidates[p], "generation": g}
            for e, p, g in zip(examples, predicted, generations, strict=True)
        ]

    def compute(self):
        accuracy = self.accuracy.compute()
        result = {f"{k}_accuracy": float(v) for k, v in accuracy.items()}
        if self.max_new_tokens:
            result["fluency"] = float(self.fluency.compute())
            result["consistency"] = float(self.consistency.compute())
        return result


class PronChangeScorer(BenchmarkScorer):
    """Pronoun-change P/A scores (fraction of samples with score > 0, and the mean) of a generation."""

    benchmark = "pronchange"

    def __init__(self, *, max_new_tokens: int = 256) -> None:
        super().__init__()
        self.max_new_tokens = max_new_tokens
        self.pronouns = PronounChangeScore()

    def score(self, method, model, tokenizer, enc, examples):
        out = method.generate(model, enc, max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        generations = _decode(tokenizer, out)
        originals = [e["fields"]["bio"] for e in examples]
        self.pronouns.update(originals, generations)
        records = []
        for original, generation in zip(originals, generations, strict=True):
            change = pronoun_change(original, generation)
            records.append({"generation": generation, "p": change.p, "a": change.a})
        return records

    def compute(self):
        result = self.pronouns.compute()
        return {
            "pron_score_p": float(result["p_score"]),
            "pron_score_a": float(result["a_score"]),
            "pron_mean_p": float(result["p_mean"]),
            "pron_mean_a": float(result["a_mean"]),
        }


class LostInTheMiddleScorer(BenchmarkScorer):
    """Best-subspan exact match of a short generated answer, overall and per gold position."""

    benchmark = "lost_in_the_middle"

    def __init__(self, *, positions: Sequence[int], max_new_tokens: int = 60) -> None:
        super().__init__()
        self.max_new_tokens = max_new_tokens
        self.exact_match = SubspanExactMatch(positions=tuple(positions))

    def score(self, method, model, tokenizer, enc, examples):
        out = method.generate(model, enc, max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        predictions = _decode(tokenizer, out)
        answers = [list(e["fields"]["answers"]) for e in examples]
        positions = [e["fields"]["gold_position"] for e in examples]
        self.exact_match.update(predictions, answers, positions)
        return [
            {"prediction": p, "answers": a, "gold_position": g, "exact_match": float(best_subspan_em(p, a))}
            for p, a, g in zip(predictions, answers, positions, strict=True)
        ]

    def compute(self):
        result = self.exact_match.compute()
        return {
            ("exact_match" if k == "em" else k.replace("em_pos_", "exact_match_pos_")): float(v)
            for k, v in result.items()
        }
