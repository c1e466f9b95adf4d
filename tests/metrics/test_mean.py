"""MeanScore: a float64 mean that reduces exactly across ranks, and empty groups."""

from __future__ import annotations

import math

import pytest
import torch

from seka_lightning.metrics import MeanScore


def test_mean_over_batches_and_ranks(assert_ranks_match) -> None:
    values = [0.1, 1.0, 0.0, 2.5, 1e-12]
    metric = MeanScore()
    metric.update(values[:2])
    metric.update(values[2:])
    expected = torch.tensor(math.fsum(values) / len(values), dtype=torch.float64)
    torch.testing.assert_close(metric.compute(), expected, rtol=1e-15, atol=0)
    assert_ranks_match(MeanScore, (values[:3],), (values[3:],), expected)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_empty_raises_unless_allowed() -> None:
    with pytest.raises(ValueError, match=r"MeanScore.compute\(\) found no examples"):
        MeanScore().compute()
    empty = MeanScore(allow_empty=True)
    empty.update([])
    assert math.isnan(float(empty.compute()))
    with pytest.raises(ValueError, match=r"values must be finite numbers, got \[nan\]"):
        MeanScore().update([1.0, float("nan")])
