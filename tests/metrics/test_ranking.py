import pytest
import torch

from seka_lightning.metrics import TopKAccuracy, gold_rank

# Gold ranks by hand (ties go to the lower candidate index, as argmax does):
# row 0: gold 1 is the max                          -> rank 0
# row 1: gold 2 (0.3) is below 0.5, 0.4, 0.6        -> rank 3
# row 2: gold 2 (0.7) ties with index 1 (0.7)       -> rank 1 (argmax picks index 1)
# row 3: gold 0 (0.3) is below 0.9 only; ties later -> rank 1
SCORES = torch.tensor(
    [
        [0.1, 0.9, 0.3, 0.2],
        [0.5, 0.4, 0.3, 0.6],
        [0.2, 0.7, 0.7, 0.1],
        [0.3, 0.3, 0.9, 0.3],
    ]
)
TARGET = torch.tensor([1, 2, 2, 0])


def test_gold_rank_breaks_ties_like_argmax() -> None:
    assert gold_rank(SCORES, TARGET).tolist() == [0, 3, 1, 1]
    assert (gold_rank(SCORES, TARGET) == 0).tolist() == (SCORES.argmax(dim=1) == TARGET).tolist()


def test_top1_top3_by_hand() -> None:
    metric = TopKAccuracy()
    metric.update(SCORES, TARGET)
    result = metric.compute()
    assert result["top1"].item() == pytest.approx(1 / 4)
    assert result["top3"].item() == pytest.approx(3 / 4)


def test_configurable_k() -> None:
    metric = TopKAccuracy(top_k=(2, 4))
    metric.update(SCORES, TARGET)
    result = metric.compute()
    assert set(result) == {"top2", "top4"}
    assert result["top2"].item() == pytest.approx(3 / 4)
    assert result["top4"].item() == pytest.approx(1.0)


def test_two_updates_equal_one_and_merge(assert_same_result, assert_ranks_match) -> None:
    whole = TopKAccuracy()
    whole.update(SCORES, TARGET)
    split = TopKAccuracy()
    split.update(SCORES[:1], TARGET[:1])
    split.update(SCORES[1:], TARGET[1:])
    assert_same_result(split.compute(), whole.compute())

    assert_ranks_match(TopKAccuracy, (SCORES[:3], TARGET[:3]), (SCORES[3:], TARGET[3:]), whole.compute())


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_no_updates_raises() -> None:
    with pytest.raises(ValueError, match=r"TopKAccuracy.compute\(\) found no examples"):
        TopKAccuracy().compute()


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="top_k must be distinct positive integers"):
        TopKAccuracy(top_k=(0, 1))
    metric = TopKAccuracy(top_k=(1, 5))
    with pytest.raises(ValueError, match=r"top_k=5 exceeds the number of candidates \(4\)"):
        metric.update(SCORES, TARGET)
    metric = TopKAccuracy()
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        metric.update(SCORES, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="contain NaN"):
        metric.update(torch.full((4, 4), float("nan")), TARGET)
