"""Benchmark records as highlighted prompts: CounterFact, BiasBios, PronChange, lost in the middle.

Each loader reads the shared copies under ``shared/data`` and the standard public layouts, and
returns :class:`BenchmarkExamples`: plain prompts (what baselines see) with the character spans
steered methods highlight, plus the fields the benchmark's metrics need.
"""

from seka_lightning.data.benchmarks.biasbios import load_biasbios
from seka_lightning.data.benchmarks.counterfact import load_counterfact
from seka_lightning.data.benchmarks.lost_in_the_middle import load_lost_in_the_middle, middle_documents
from seka_lightning.data.benchmarks.pronchange import load_pronchange
from seka_lightning.data.benchmarks.records import BenchmarkExamples, HighlightedExample, parse_example_subset

__all__ = [
    "BenchmarkExamples",
    "HighlightedExample",
    "load_biasbios",
    "load_counterfact",
    "load_lost_in_the_middle",
    "load_pronchange",
    "middle_documents",
    "parse_example_subset",
]
