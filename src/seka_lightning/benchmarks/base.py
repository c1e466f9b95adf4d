"""What every benchmark shares: the scorer base class, the batch-item type and the DataModule base.

A benchmark module (``counterfact.py``, ...) holds its record loader, its scorer and its DataModule. A scorer is an
``nn.Module`` holding torchmetrics states (so they move with the model and reduce across DDP ranks); ``score`` runs
the method on one encoded batch, so every method gets the same prompts, tokens and scoring.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from seka_lightning.benchmarks.records import BenchmarkExamples, HighlightedExample
from seka_lightning.methods import Encoded, HighlightMethod
from seka_lightning.metrics import target_first_token_ids

log = logging.getLogger(__name__)

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


def decode(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> list[str]:
    """The generated token ids as text, special tokens dropped."""
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics as floats, without the NaN of a subgroup the run did not contain."""
    return {name: float(value) for name, value in metrics.items() if not math.isnan(float(value))}


def as_dict(example: HighlightedExample) -> dict[str, Any]:
    """The batch item of an example: plain JSON-able values (a DataLoader batch is a list of these)."""
    return {
        "uid": example.uid,
        "text": example.text,
        "spans": [list(s) for s in example.spans],
        "fields": dict(example.fields),
    }


def _identity(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
            batches[-1].extend(as_dict(e) for e in group)
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
