"""Every ``min_diff`` the project ships (the default, the configs, the README) keeps heads on both embedded models
under the default (relative) head filter: a shipped threshold that skips every head would build a bank that steers
nothing. Slow: it builds statistics on the real models (24 synthetic QA pairs each, CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from seka_lightning import build_statistics
from seka_lightning.data.triplets import read_pairs
from seka_lightning.projections import DEFAULT_MIN_DIFF, head_filter_values

REPO = Path(__file__).resolve().parents[1]


def shipped_min_diffs() -> set[float]:
    """The default, every ``min_diff`` in configs/**/*.yaml, and every ``min_diff`` value the README shows."""
    values = {DEFAULT_MIN_DIFF}

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "min_diff" and isinstance(value, int | float):
                    values.add(float(value))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for config in REPO.glob("configs/**/*.yaml"):
        walk(yaml.safe_load(config.read_text()))
    readme = (REPO / "README.md").read_text()
    values |= {float(v) for v in re.findall(r"min_diff[ =]+([0-9]*\.?[0-9]+)", readme)}
    return values


def test_the_shipped_values_are_found():
    values = shipped_min_diffs()
    assert DEFAULT_MIN_DIFF in values and 0.1 in values  # the default and the README's `seka derive` example


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_every_shipped_min_diff_keeps_heads(name):
    from seka_lightning.models import load_model

    try:
        model, tokenizer = load_model(f"embedded:{name}")
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"embedded model {name} is not installed here ({err})")
    statistics = build_statistics(model, tokenizer, read_pairs(REPO / "data" / "synthetic_qa.jsonl", max_samples=24))
    diff = head_filter_values(statistics.sums, head_filter="relative")  # [L, H]
    for min_diff in sorted(shipped_min_diffs()):
        kept = int((diff >= min_diff).sum())
        assert kept > 0, f"min_diff {min_diff} keeps no head of {name} (largest value {float(diff.max()):.4f})"
