"""Benchmarks: CounterFact, BiasBios, PronChange, lost in the middle; one module each, plus :func:`evaluate`.

Each benchmark module holds its record loader (plain prompts with the character spans steered methods highlight,
read through 🤗 datasets from the shared copies, the standard public layouts or a ``hub:<name>`` dataset), its
scorer and its DataModule. :func:`evaluate` runs a method over a benchmark's batches with its scorer.
"""

from seka_lightning.benchmarks.base import BenchmarkDataModule, BenchmarkScorer, RecordError
from seka_lightning.benchmarks.biasbios import BiasBiosDataModule, BiasBiosScorer, load_biasbios
from seka_lightning.benchmarks.counterfact import CounterFactDataModule, CounterFactScorer, load_counterfact
from seka_lightning.benchmarks.evaluate import Evaluation, encode_examples, evaluate, evaluate_batch
from seka_lightning.benchmarks.lost_in_the_middle import (
    LostInTheMiddleDataModule,
    LostInTheMiddleScorer,
    load_lost_in_the_middle,
    middle_documents,
)
from seka_lightning.benchmarks.pronchange import PronChangeDataModule, PronChangeScorer, load_pronchange
from seka_lightning.benchmarks.records import BenchmarkExamples, HighlightedExample, parse_example_subset

__all__ = [
    "BenchmarkDataModule",
    "BenchmarkExamples",
    "BenchmarkScorer",
    "BiasBiosDataModule",
    "BiasBiosScorer",
    "CounterFactDataModule",
    "CounterFactScorer",
    "Evaluation",
    "HighlightedExample",
    "LostInTheMiddleDataModule",
    "LostInTheMiddleScorer",
    "PronChangeDataModule",
    "PronChangeScorer",
    "RecordError",
    "encode_examples",
    "evaluate",
    "evaluate_batch",
    "load_biasbios",
    "load_counterfact",
    "load_lost_in_the_middle",
    "load_pronchange",
    "middle_documents",
    "parse_example_subset",
]
