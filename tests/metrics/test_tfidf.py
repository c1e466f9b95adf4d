import math

import pytest

from seka_lightning.metrics import TfidfConsistency, TfidfVectorizer

REFERENCES = {"nurse": ["she is a nurse", "nurse care"], "chef": ["he cooks food"]}
# Fitted on the 3 reference texts: terms are lowercase runs of >= 2 word characters ("a" is dropped).
# df(nurse) = 2, every other term df = 1; smooth idf = ln((1 + 3) / (1 + df)) + 1.
IDF1 = math.log(4 / 2) + 1  # 1.6931471805599454
IDF2 = math.log(4 / 3) + 1  # 1.2876820724517808


def _nurse_cosine() -> float:
    """Cosine of "the nurse is kind" with the mean of the two nurse references, derived by hand."""
    a, b = IDF1, IDF2
    s1, s2 = math.sqrt(2 * a * a + b * b), math.sqrt(a * a + b * b)
    # generation -> {nurse: b, is: a} / s2 (unit); reference = mean({she: a, is: a, nurse: b}/s1, {nurse: b, care: a}/s2)
    ref = {"she": a / (2 * s1), "is": a / (2 * s1), "nurse": (b / s1 + b / s2) / 2, "care": a / (2 * s2)}
    dot = (b / s2) * ref["nurse"] + (a / s2) * ref["is"]
    return dot / math.sqrt(sum(v * v for v in ref.values()))


NURSE = _nurse_cosine()
CHEF = 2 / math.sqrt(6)  # {he, cooks} (equal weights) vs {he, cooks, food} (equal weights)


def test_vectorizer_idf_and_normalisation() -> None:
    vectorizer = TfidfVectorizer.fit([t for texts in REFERENCES.values() for t in texts])
    assert vectorizer.idf["nurse"] == pytest.approx(IDF2, abs=1e-15)
    assert vectorizer.idf["she"] == pytest.approx(IDF1, abs=1e-15)
    assert "a" not in vectorizer.idf
    vector = vectorizer.transform("Nurse nurse SHE unknown")
    norm = math.sqrt((2 * IDF2) ** 2 + IDF1**2)
    assert vector == pytest.approx({"nurse": 2 * IDF2 / norm, "she": IDF1 / norm}, abs=1e-15)
    assert vectorizer.transform("zz qq") == {}


def test_similarity_by_hand() -> None:
    metric = TfidfConsistency(REFERENCES)
    assert metric.similarity("the nurse is kind", "nurse") == pytest.approx(NURSE, abs=1e-12)
    assert metric.similarity("He cooks.", "chef") == pytest.approx(CHEF, abs=1e-12)
    assert metric.similarity("xyz", "chef") == 0.0


def test_metric_mean_two_updates_and_merge(assert_same_result, assert_ranks_match) -> None:
    generations, labels = ["the nurse is kind", "He cooks.", "xyz"], ["nurse", "chef", "chef"]
    whole = TfidfConsistency(REFERENCES)
    whole.update(generations, labels)
    assert whole.compute().item() == pytest.approx((NURSE + CHEF + 0.0) / 3, abs=1e-12)

    split = TfidfConsistency(REFERENCES)
    split.update(generations[:1], labels[:1])
    split.update(generations[1:], labels[1:])
    assert_same_result(split.compute(), whole.compute())

    assert_ranks_match(
        lambda: TfidfConsistency(REFERENCES),
        (generations[:2], labels[:2]),
        (generations[2:], labels[2:]),
        whole.compute(),
    )


def test_separate_corpus_sets_the_idf() -> None:
    metric = TfidfConsistency(REFERENCES, corpus=["nurse", "nurse", "cooks"])
    # only "nurse" and "cooks" are known: "he cooks" -> {cooks}; chef reference -> {cooks} -> cosine 1
    assert metric.similarity("he cooks", "chef") == pytest.approx(1.0, abs=1e-12)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_no_updates_raises() -> None:
    with pytest.raises(ValueError, match=r"TfidfConsistency.compute\(\) found no examples"):
        TfidfConsistency(REFERENCES).compute()


def test_invalid_inputs_raise() -> None:
    metric = TfidfConsistency(REFERENCES)
    with pytest.raises(ValueError, match="label 'pilot' has no reference texts"):
        metric.update(["flies"], ["pilot"])
    with pytest.raises(ValueError, match="batch sizes differ"):
        metric.update(["a", "b"], ["nurse"])
    with pytest.raises(ValueError, match=r"references for labels \['chef'\] must be non-empty"):
        TfidfConsistency({"nurse": ["care"], "chef": []})
    with pytest.raises(ValueError, match="corpus has no terms"):
        TfidfConsistency({"nurse": ["a"]})
