import math

import pytest
import torch

from seka_lightning.metrics import TargetPreference


def _log(*p: float) -> torch.Tensor:
    return torch.tensor([math.log(x) for x in p], dtype=torch.float64)


# Paraphrase fixture: case A has 2 prompts, case B has 3.
# A: P(new) = (0.5, 0.1), P(old) = (0.2, 0.3) -> won 1/2, margin (0.3 - 0.2) / 2 = 0.05
# B: P(new) = (0.4, 0.4, 0.4), P(old) = (0.1, 0.2, 0.5) -> won 2/3, margin (0.3 + 0.2 - 0.1) / 3 = 0.4 / 3
# score = (1/2 + 2/3) / 2 = 7/12 (a flat mean over the 5 prompts would be 3/5)
# magnitude = (0.05 + 0.4/3) / 2 = 0.55 / 6
PARAPHRASE_SCORE = 7 / 12
PARAPHRASE_MAGNITUDE = 0.55 / 6


def _padded() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    new = torch.stack(
        [torch.cat([_log(0.5, 0.1), torch.tensor([float("nan")], dtype=torch.float64)]), _log(0.4, 0.4, 0.4)]
    )
    old = torch.stack([torch.cat([_log(0.2, 0.3), torch.tensor([0.0], dtype=torch.float64)]), _log(0.1, 0.2, 0.5)])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return new, old, mask


def test_efficacy_one_prompt_per_case() -> None:
    metric = TargetPreference()
    # wins: 0.6 > 0.3 yes, 0.2 > 0.4 no, 0.5 > 0.1 yes -> 2/3; margins 0.3 - 0.2 + 0.4 -> 0.5 / 3
    metric.update(_log(0.6, 0.2, 0.5), _log(0.3, 0.4, 0.1))
    result = metric.compute()
    assert result["score"].item() == pytest.approx(2 / 3, abs=1e-12)
    assert result["magnitude"].item() == pytest.approx(0.5 / 3, abs=1e-12)


def test_tie_is_not_a_win() -> None:
    metric = TargetPreference()
    metric.update(_log(0.25), _log(0.25))
    assert metric.compute()["score"].item() == 0.0


def test_paraphrase_padded_batch_averages_per_case_first() -> None:
    metric = TargetPreference()
    metric.update(*_padded()[:2], mask=_padded()[2])
    result = metric.compute()
    assert result["score"].item() == pytest.approx(PARAPHRASE_SCORE, abs=1e-12)
    assert result["magnitude"].item() == pytest.approx(PARAPHRASE_MAGNITUDE, abs=1e-12)


def test_two_updates_equal_one(assert_same_result) -> None:
    split = TargetPreference()
    split.update(_log(0.5, 0.1)[None], _log(0.2, 0.3)[None])
    split.update(_log(0.4, 0.4, 0.4)[None], _log(0.1, 0.2, 0.5)[None])
    whole = TargetPreference()
    new, old, mask = _padded()
    whole.update(new, old, mask=mask)
    assert_same_result(split.compute(), whole.compute())
    assert split.compute()["score"].item() == pytest.approx(PARAPHRASE_SCORE, abs=1e-12)


def test_merged_ranks_equal_one_metric(assert_ranks_match) -> None:
    whole = TargetPreference()
    new, old, mask = _padded()
    whole.update(new, old, mask=mask)
    assert_ranks_match(
        TargetPreference,
        (_log(0.5, 0.1)[None], _log(0.2, 0.3)[None]),
        (_log(0.4, 0.4, 0.4)[None], _log(0.1, 0.2, 0.5)[None]),
        whole.compute(),
    )


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_no_updates_raises() -> None:
    with pytest.raises(ValueError, match=r"TargetPreference.compute\(\) found no examples"):
        TargetPreference().compute()


def test_invalid_inputs_raise() -> None:
    metric = TargetPreference()
    with pytest.raises(ValueError, match="must have one shape"):
        metric.update(_log(0.5, 0.5), _log(0.5))
    with pytest.raises(ValueError, match="at least one prompt with mask=True"):
        metric.update(_log(0.5, 0.5)[None], _log(0.5, 0.5)[None], mask=torch.tensor([[False, False]]))
    with pytest.raises(ValueError, match="mask is only for padded"):
        metric.update(_log(0.5), _log(0.5), mask=torch.tensor([True]))
    with pytest.raises(ValueError, match="NaN at unmasked positions"):
        metric.update(torch.tensor([float("nan")]), _log(0.5))
