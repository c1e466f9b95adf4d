import math

import pytest

from seka_lightning.metrics import SubspanExactMatch, best_subspan_em, normalize_answer

# (prediction, gold answers, gold position, correct?), by hand:
EXAMPLES = [
    ("It is the Eiffel Tower.", ["Eiffel Tower"], 0, True),  # "it is eiffel tower" contains "eiffel tower"
    ("Paris", ["London", "U.K."], 0, False),
    ("an apple a day", ["Apple"], 4, True),  # articles dropped: "apple day"
    ("The answer is 1,000 km", ["900 km", "1000 km"], 9, True),  # second answer, comma removed
    ("Other", ["Uther"], 9, False),
]
POSITIONS = (0, 4, 9, 14)
# overall 3/5; position 0: 1/2, 4: 1/1, 9: 1/2, 14: no examples -> NaN


def test_normalize_answer() -> None:
    assert normalize_answer("The  Eiffel-Tower, Paris!") == "eiffeltower paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"


@pytest.mark.parametrize(("prediction", "answers", "position", "correct"), EXAMPLES)
def test_best_subspan_em_by_hand(prediction: str, answers: list[str], position: int, correct: bool) -> None:
    assert best_subspan_em(prediction, answers) is correct


def _check(result: dict) -> None:
    assert set(result) == {"em", "em_pos_0", "em_pos_4", "em_pos_9", "em_pos_14"}
    assert result["em"].item() == pytest.approx(3 / 5)
    assert result["em_pos_0"].item() == pytest.approx(1 / 2)
    assert result["em_pos_4"].item() == pytest.approx(1.0)
    assert result["em_pos_9"].item() == pytest.approx(1 / 2)
    assert math.isnan(result["em_pos_14"].item())


def _columns(examples: list) -> tuple[list, list, list]:
    return [e[0] for e in examples], [e[1] for e in examples], [e[2] for e in examples]


def test_metric_per_position_two_updates_and_merge(assert_same_result, assert_ranks_match) -> None:
    whole = SubspanExactMatch(positions=POSITIONS)
    whole.update(*_columns(EXAMPLES))
    _check(whole.compute())

    split = SubspanExactMatch(positions=POSITIONS)
    split.update(*_columns(EXAMPLES[:2]))
    split.update(*_columns(EXAMPLES[2:]))
    assert_same_result(split.compute(), whole.compute())

    assert_ranks_match(
        lambda: SubspanExactMatch(positions=POSITIONS),
        _columns(EXAMPLES[::2]),
        _columns(EXAMPLES[1::2]),
        whole.compute(),
    )


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_no_updates_raises() -> None:
    with pytest.raises(ValueError, match=r"SubspanExactMatch.compute\(\) found no examples"):
        SubspanExactMatch().compute()


def test_invalid_inputs_raise() -> None:
    metric = SubspanExactMatch(positions=POSITIONS)
    with pytest.raises(ValueError, match=r"gold positions \[19\] are not among the configured positions"):
        metric.update(["x"], [["x"]], [19])
    with pytest.raises(ValueError, match="answers must be a non-empty list of strings"):
        metric.update(["x"], ["x"], [0])
    with pytest.raises(ValueError, match="batch sizes differ"):
        metric.update(["x", "y"], [["x"]], [0])
    with pytest.raises(ValueError, match="positions must be distinct non-negative integers"):
        SubspanExactMatch(positions=(0, 0))
