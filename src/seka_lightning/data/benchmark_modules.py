"""Benchmark DataModules for ``seka predict``: examples from the loaders, batched, with the matching scorer."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from seka_lightning.data.benchmarks import (
    BenchmarkExamples,
    HighlightedExample,
    load_biasbios,
    load_counterfact,
    load_lost_in_the_middle,
    load_pronchange,
)
from seka_lightning.data.benchmarks.lost_in_the_middle import DEFAULT_NUM_DOCUMENTS, GOLD_POSITIONS
from seka_lightning.data.benchmarks.lost_in_the_middle import SPLITS as LOST_IN_THE_MIDDLE_SPLITS
from seka_lightning.data.benchmarks.pronchange import SPLITS as PRONCHANGE_SPLITS
from seka_lightning.data.benchmarks.records import resolve_split
from seka_lightning.metrics import has_subject_pronoun
from seka_lightning.scoring import (
    BenchmarkScorer,
    BiasBiosScorer,
    CounterFactScorer,
    LostInTheMiddleScorer,
    PronChangeScorer,
)

log = logging.getLogger(__name__)

BIASBIOS_NOTE = (
    "uninformative highlight: {removed} of {total} bios are the shared copy's hard_text, from which the sentence "
    "naming the occupation was removed, so the highlighted first sentence carries no label information; "
    "report these numbers as such and do not tune on them"
)


def _as_dict(example: HighlightedExample) -> dict[str, Any]:
    return {
        "uid": example.uid,
        "text": example.text,
        "spans": [list(s) for s in example.spans],
        "fields": dict(example.fields),
    }


def _identity(batch: list[dict]) -> list[dict]:
    return batch


class BenchmarkDataModule(L.LightningDataModule):
    """Base: ``load()`` gives the examples, ``scorer()`` the benchmark's scorer; batches never split a group."""

    benchmark = "benchmark"

    def __init__(self, path: str, *, batch_size: int = 8) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.batch_size = path, batch_size
        self._examples: BenchmarkExamples | None = None

    def load(self) -> BenchmarkExamples:
        raise NotImplementedError

    def scorer(self) -> BenchmarkScorer:
        raise NotImplementedError

    @property
    def examples(self) -> BenchmarkExamples:
        if self._examples is None:
            self._examples = self.load()
            if len(self._examples) == 0:
                raise ValueError(
                    f"{self.benchmark}: no examples in {self.path} for this slice; choose a non-empty slice"
                )
            if self._examples.num_missing_highlight == len(self._examples):
                log.warning(
                    "%s: none of the %d examples carries a highlight; every method is scored unsteered",
                    self.benchmark,
                    len(self._examples),
                )
            elif self._examples.num_missing_highlight:
                log.warning(
                    "%s: %d examples have no highlight (kept, scored unsteered, counted in metric_result.json)",
                    self.benchmark,
                    self._examples.num_missing_highlight,
                )
        return self._examples

    def group_key(self, example: HighlightedExample) -> Any:
        """Examples with the same key stay in one batch (CounterFact paraphrases of a case)."""
        return example.uid

    def batches(self) -> list[list[dict[str, Any]]]:
        groups: dict[Any, list[HighlightedExample]] = defaultdict(list)
        for example in self.examples:
            groups[self.group_key(example)].append(example)
        batches: list[list[dict[str, Any]]] = [[]]
        for group in groups.values():
            if batches[-1] and len(batches[-1]) + len(group) > self.batch_size:
                batches.append([])
            batches[-1].extend(_as_dict(e) for e in group)
        return batches

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.batches(), batch_size=None, collate_fn=_identity)

    def describe(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "path": self.path,
            "examples": len(self.examples),
            "missing_highlight": self.examples.num_missing_highlight,
        }

    def counts(self) -> dict[str, int]:
        """Counts for ``metric_result.json``: examples, those without a highlight, and benchmark-specific ones."""
        return {"examples": len(self.examples), "missing_highlight": self.examples.num_missing_highlight}


class CounterFactDataModule(BenchmarkDataModule):
    """CounterFact efficacy and paraphrase prompts (BENCHMARKS.md), test split 5000:10000 by default."""

    benchmark = "counterfact"

    def __init__(
        self,
        path: str = "../shared/data/counterfact",
        *,
        split: str | None = None,
        example_subset: str | None = None,
        batch_size: int = 16,
    ) -> None:
        """
        Args:
            path: the EasyEdit folder (train/val/edit JSON) or a ROME ``counterfact.json``.
            split: ``test`` (5000:10000), ``dev`` (4500:5000) or ``all``; None with no example_subset means test.
            example_subset: a slice of the case_id-ordered records, e.g. ``"5000:5500"``.
            batch_size: prompts per batch (a case's paraphrases stay together).
        """
        super().__init__(path, batch_size=batch_size)
        self.split, self.example_subset = split, example_subset

    def load(self) -> BenchmarkExamples:
        return load_counterfact(self.path, split=self.split, example_subset=self.example_subset)

    def group_key(self, example: HighlightedExample) -> Any:
        return example.fields["case_id"]

    def scorer(self) -> BenchmarkScorer:
        return CounterFactScorer()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "split": self.split, "example_subset": self.example_subset}


class BiasBiosDataModule(BenchmarkDataModule):
    """BiasBios occupation prompts with the first sentence highlighted (BENCHMARKS.md)."""

    benchmark = "biasbios"

    def __init__(
        self,
        path: str = "../shared/data/biasbios_subset",
        *,
        csv_set: str = "per_profession",
        example_subset: str | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
    ) -> None:
        """
        Args:
            path: folder of Bias-in-Bios CSVs or a JSONL of records.
            csv_set: which shared CSVs to evaluate (``per_profession``, ``complete``, ``all``).
            example_subset: a slice of the records, e.g. ``"0:100"``.
            max_new_tokens: generation length for fluency and consistency (0 = accuracy only).
            batch_size: prompts per batch.
        """
        super().__init__(path, batch_size=batch_size)
        self.csv_set, self.example_subset, self.max_new_tokens = csv_set, example_subset, max_new_tokens

    def load(self) -> BenchmarkExamples:
        return load_biasbios(self.path, csv_set=self.csv_set, example_subset=self.example_subset)

    def scorer(self) -> BenchmarkScorer:
        references: dict[str, list[str]] = defaultdict(list)
        for example in self.examples:
            references[example.fields["label"]].append(example.fields["bio"])
        return BiasBiosScorer(self.examples[0].fields["candidates"], references, max_new_tokens=self.max_new_tokens)

    def describe(self) -> dict[str, Any]:
        settings = {**super().describe(), "csv_set": self.csv_set, "example_subset": self.example_subset}
        removed = sum(bool(example.fields.get("first_sentence_removed")) for example in self.examples)
        if removed:
            settings["note"] = BIASBIOS_NOTE.format(removed=removed, total=len(self.examples))
        return settings


class PronChangeDataModule(BenchmarkDataModule):
    """PronChange: bios with the pronoun-substitution instruction highlighted (BENCHMARKS.md)."""

    benchmark = "pronchange"

    def __init__(
        self,
        path: str = "../shared/data/biasbios_subset",
        *,
        csv_set: str = "complete",
        split: str | None = None,
        example_subset: str | None = None,
        max_new_tokens: int = 256,
        batch_size: int = 16,
    ) -> None:
        """
        Args:
            path: folder of Bias-in-Bios CSVs or a JSONL of records.
            csv_set: which shared CSVs to use (``complete`` = the 1,000 accountant bios).
            split: ``test`` (bios 0:900, reported), ``dev`` (900:1000, for tuning) or ``all``; None with no
                example_subset means test.
            example_subset: a slice of the bios instead of a split, e.g. ``"0:100"``.
            max_new_tokens: generation length (256 in the protocol).
            batch_size: prompts per batch.
        """
        super().__init__(path, batch_size=batch_size)
        self.csv_set, self.split, self.example_subset = csv_set, split, example_subset
        self.max_new_tokens = max_new_tokens
        self.subset = resolve_split(split, example_subset, PRONCHANGE_SPLITS)

    def load(self) -> BenchmarkExamples:
        return load_pronchange(self.path, csv_set=self.csv_set, example_subset=self.subset)

    def scorer(self) -> BenchmarkScorer:
        return PronChangeScorer(max_new_tokens=self.max_new_tokens)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "csv_set": self.csv_set,
            "split": self.split,
            "example_subset": self.example_subset,
            "slice": self.subset,
        }

    def counts(self) -> dict[str, int]:
        """Adds ``bios_without_she_he``: bios with no 'she'/'he', whose P-score conversion is 1 by default."""
        without = sum(not has_subject_pronoun(example.fields["bio"]) for example in self.examples)
        return {**super().counts(), "bios_without_she_he": without}


class LostInTheMiddleDataModule(BenchmarkDataModule):
    """Lost in the middle: k-document contexts with the gold passage at each requested position (BENCHMARKS.md)."""

    benchmark = "lost_in_the_middle"

    def __init__(
        self,
        path: str = "../shared/data/lost_in_the_middle/nq-open-oracle.jsonl.gz",
        *,
        num_documents: int = DEFAULT_NUM_DOCUMENTS,
        gold_positions: Sequence[int] = GOLD_POSITIONS,
        highlight: str = "middle",
        seed: int = 0,
        split: str | None = None,
        example_subset: str | None = None,
        max_new_tokens: int = 60,
        batch_size: int = 8,
    ) -> None:
        """
        Args:
            path: the NQ-open oracle file (contexts are built from it) or a multi-document jsonl(.gz).
            num_documents: documents per context (oracle file only; 30 in the protocol).
            gold_positions: where the gold passage goes (one prompt per question and position).
            highlight: ``middle`` (documents 5 through 25 of 30, ``ctxs[4:25]``) or ``all`` documents (a variant).
            seed: distractor sampling seed.
            split: ``test`` (questions 0:300, reported), ``dev`` (2555:2655, for tuning) or ``all``; None with
                no example_subset means test.
            example_subset: a slice of the questions instead of a split, e.g. ``"0:50"``.
            max_new_tokens: answer length (60 in the protocol).
            batch_size: prompts per batch.
        """
        super().__init__(path, batch_size=batch_size)
        self.num_documents, self.gold_positions = num_documents, list(gold_positions)
        self.highlight, self.seed, self.split, self.example_subset = highlight, seed, split, example_subset
        self.max_new_tokens = max_new_tokens
        self.subset = resolve_split(split, example_subset, LOST_IN_THE_MIDDLE_SPLITS)

    def load(self) -> BenchmarkExamples:
        parts = [
            load_lost_in_the_middle(
                self.path,
                num_documents=self.num_documents,
                gold_position=position,
                seed=self.seed,
                highlight=self.highlight,
                example_subset=self.subset,
            )
            for position in self.gold_positions
        ]
        return BenchmarkExamples(
            self.benchmark,
            tuple(e for part in parts for e in part),
            tuple(uid for part in parts for uid in part.missing_highlight),
        )

    def scorer(self) -> BenchmarkScorer:
        return LostInTheMiddleScorer(positions=self.gold_positions, max_new_tokens=self.max_new_tokens)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "num_documents": self.num_documents,
            "gold_positions": self.gold_positions,
            "highlight": self.highlight,
            "seed": self.seed,
            "split": self.split,
            "example_subset": self.example_subset,
            "slice": self.subset,
        }
