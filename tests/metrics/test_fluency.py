import random

import pytest

from seka_lightning.metrics import NGramEntropy, is_degenerate, n_gram_entropy, word_tokenize

# "the cat the cat": bigrams (the,cat) x2, (cat,the) x1 -> H2 = log2(3) - 2/3 = 0.918295834054489;
# trigrams (the,cat,the), (cat,the,cat) -> H3 = 1; score = (2/3 * H2 + 4/3 * H3) / 2
REPEAT = "the cat the cat"
REPEAT_SCORE = 0.972765278018163
# "Hello, world.": tokens Hello , world . -> 3 distinct bigrams (H2 = log2 3), 2 distinct trigrams (H3 = 1)
PUNCT = "Hello, world."
PUNCT_SCORE = 1.194987500240385
# a single word has no bigram or trigram -> 0
SHORT = "Hi"
MEAN = (REPEAT_SCORE + PUNCT_SCORE + 0.0) / 3  # 0.722584259419516


def test_word_tokenize_approximates_nltk() -> None:
    text = "Dr. Smith's well-known cat cost 3.50 dollars... don't"
    assert word_tokenize(text) == [
        "Dr",
        ".",
        "Smith",
        "'s",
        "well-known",
        "cat",
        "cost",
        "3.50",
        "dollars",
        "...",
        "don",
        "'t",
    ]


def test_n_gram_entropy_by_hand() -> None:
    assert n_gram_entropy(REPEAT) == pytest.approx(REPEAT_SCORE, abs=1e-12)
    assert n_gram_entropy(PUNCT) == pytest.approx(PUNCT_SCORE, abs=1e-12)
    assert n_gram_entropy(SHORT) == 0.0
    assert n_gram_entropy("") == 0.0


def test_case_is_kept() -> None:
    # "The cat the cat" has 3 distinct bigrams, unlike REPEAT: ROME does not lowercase
    assert n_gram_entropy("The cat the cat") > REPEAT_SCORE


def test_metric_mean_two_updates_and_merge(assert_same_result, assert_ranks_match) -> None:
    whole = NGramEntropy()
    whole.update([REPEAT, PUNCT, SHORT])
    assert whole.compute().item() == pytest.approx(MEAN, abs=1e-12)

    split = NGramEntropy()
    split.update([REPEAT])
    split.update([PUNCT, SHORT])
    assert_same_result(split.compute(), whole.compute())

    assert_ranks_match(NGramEntropy, ([REPEAT, PUNCT],), ([SHORT],), whole.compute())


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_no_updates_raises() -> None:
    with pytest.raises(ValueError, match=r"NGramEntropy.compute\(\) found no examples"):
        NGramEntropy().compute()


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="single string"):
        NGramEntropy().update(REPEAT)
    with pytest.raises(ValueError, match="equal length"):
        NGramEntropy(ns=(2, 3), weights=(1.0,))
    with pytest.raises(ValueError, match="positive integers"):
        NGramEntropy(ns=(0,), weights=(1.0,))


def reference_degenerate(text: str) -> bool:
    """Brute force: mark token positions covered by each repeated 3-gram, compare with a third of the tokens."""
    tokens = [t.lower() for t in word_tokenize(text)]
    grams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    for gram in set(grams):
        starts = [i for i, g in enumerate(grams) if g == gram]
        if len(starts) >= 2 and 3 * len({i + j for i in starts for j in range(3)}) > len(tokens):
            return True
    return False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the the the the", True),
        ("It is a fact. It is a fact. It is a fact. It is a fact.", True),  # period 5 covers 3/5
        ("One two three four five six seven eight nine ten one two three four five six seven eight nine ten", False),
        ("They write poems about rivers.", False),  # no repeated 3-gram
        ("a b", False),
        ("", False),
        ("Nine tokens here a b c a b c", True),  # "a b c" twice covers 6 of 9
        ("x y z w v u a b c a b c", True),  # 6 of 12 covered
        ("x y z w v u t s r q a b c a b c p o n m", False),  # 6 of 20 covered
    ],
)
def test_is_degenerate_rule(text: str, expected: bool) -> None:
    assert is_degenerate(text) is expected
    assert reference_degenerate(text) is expected


def test_is_degenerate_matches_brute_force_on_random_texts() -> None:
    rng = random.Random(0)
    for _ in range(300):
        text = " ".join(rng.choice("a b c d e".split()) for _ in range(rng.randint(0, 20)))
        assert is_degenerate(text) is reference_degenerate(text), text
    with pytest.raises(ValueError, match=r"n must be >= 1 and share in \(0, 1\), got n=3, share=1"):
        is_degenerate("a b c", share=1)
