import pytest

from seka_lightning.metrics import PronounChangeScore, has_subject_pronoun, pronoun_change, strip_echo
from seka_lightning.metrics.pronouns import pronoun_words

# (original, generation, p, a), derived by hand:
SAMPLES = [
    # she x2 (P: 2), + her (A: 3) all removed -> conv 1, 1; content {is, a, nurse, likes, job}: a, nurse, job kept
    ("She is a nurse. She likes her job.", "They are a nurse. They like their job.", 0.6, 0.6),
    # P: he x2 -> 1 left -> 1/2; A: he x2 + his = 3 -> 1 left -> 2/3; content 5 words, 4 kept -> 0.8
    ("He teaches math and he loves his students.", "They teach math and he loves their students.", 0.4, 0.8 * 2 / 3),
    # P: 1 -> 1 (conv 0); A: 1 -> 3 (clipped to 0); overlap 1
    ("She wrote books.", "She wrote her books herself.", 0.0, 0.0),
    # no pronouns -> conv 1; content {the, chef, cooks, pasta}, only pasta kept -> 1/4
    ("The chef cooks pasta.", "Pasta.", 0.25, 0.25),
    # P: she removed -> 1; A: {she, him} = 2 -> {him, him} = 2 -> 0; overlap {met} -> 1
    ("She met him.", "They met him and him.", 1.0, 0.0),
]
# p = (0.6, 0.4, 0, 0.25, 1): 4 of 5 positive, mean 2.25 / 5
# a = (0.6, 8/15, 0, 0.25, 0): 3 of 5 positive, mean (83/60) / 5
EXPECTED = {"p_score": 4 / 5, "a_score": 3 / 5, "p_mean": 0.45, "a_mean": 83 / 300}


def test_tokenization() -> None:
    assert pronoun_words("She's HIS, not hers!") == ["she", "s", "his", "not", "hers"]


@pytest.mark.parametrize(("original", "generation", "p", "a"), SAMPLES)
def test_per_sample_scores_by_hand(original: str, generation: str, p: float, a: float) -> None:
    scores = pronoun_change(original, generation)
    assert scores.p == pytest.approx(p, abs=1e-12)
    assert scores.a == pytest.approx(a, abs=1e-12)


def test_parts_of_a_sample() -> None:
    scores = pronoun_change(*SAMPLES[1][:2])
    assert (scores.p_conversion, scores.overlap) == (pytest.approx(0.5), pytest.approx(0.8))
    assert scores.a_conversion == pytest.approx(2 / 3)


def _check(result: dict) -> None:
    for key, value in EXPECTED.items():
        assert result[key].item() == pytest.approx(value, abs=1e-12), key


def test_metric_two_updates_and_merge(assert_same_result, assert_ranks_match) -> None:
    originals = [s[0] for s in SAMPLES]
    generations = [s[1] for s in SAMPLES]
    whole = PronounChangeScore()
    whole.update(originals, generations)
    _check(whole.compute())

    split = PronounChangeScore()
    split.update(originals[:2], generations[:2])
    split.update(originals[2:], generations[2:])
    assert_same_result(split.compute(), whole.compute())

    assert_ranks_match(
        PronounChangeScore, (originals[:3], generations[:3]), (originals[3:], generations[3:]), whole.compute()
    )


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_no_updates_raises() -> None:
    with pytest.raises(ValueError, match=r"PronounChangeScore.compute\(\) found no examples"):
        PronounChangeScore().compute()


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="has no non-pronoun words"):
        pronoun_change("She, he.", "They.")
    with pytest.raises(ValueError, match="batch sizes differ"):
        PronounChangeScore().update(["She is a nurse."], [])
    with pytest.raises(ValueError, match="originals is a single string"):
        PronounChangeScore().update("She is a nurse.", "They are a nurse.")


def test_strip_echo_removes_every_verbatim_copy_of_the_instruction() -> None:
    instruction = "Substitute 'she' and 'he' with 'they':"
    assert strip_echo(f"{instruction} They teach. {instruction}", instruction) == " They teach. "
    assert strip_echo("They teach.", instruction) == "They teach."
    with pytest.raises(ValueError, match="instruction is empty"):
        strip_echo("They teach.", " ")


def test_has_subject_pronoun_counts_whole_words_only() -> None:
    assert has_subject_pronoun("Then she left.") and has_subject_pronoun("HE is here")
    assert not has_subject_pronoun("Their theme: her shelter and his hero.")
