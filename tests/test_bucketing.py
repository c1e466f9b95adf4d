"""Length bucketing (``length_window``): batches of similar-length texts pad less; the statistics are the same sums
in another order, equal to float64 rounding on a float64 model."""

from __future__ import annotations

import pytest
import torch

from seka_lightning.build import build_statistics
from seka_lightning.data.synthetic_qa import SyntheticQADataModule
from seka_lightning.data.triplets import iter_bucketed, iter_triplets, read_pairs


def _longest(triplet) -> int:
    return max(len(text) for text in triplet.texts())


def test_each_run_is_sorted_by_its_longest_text_and_keeps_its_triplets(qa_file):
    triplets = list(iter_triplets(read_pairs(qa_file)))  # 48
    bucketed = list(iter_bucketed(iter(triplets), batch_size=4, window=5))  # runs of 20, 20, 8
    for start in (0, 20, 40):
        run, original = bucketed[start : start + 20], triplets[start : start + 20]
        assert sorted(run) == sorted(original)  # a triplet never leaves its run
        assert [_longest(t) for t in run] == sorted(_longest(t) for t in original)
    assert bucketed != triplets, "the test data must have texts out of length order"
    assert list(iter_bucketed(iter(triplets), batch_size=4, window=None)) == triplets


def _padded_slots(tokenizer, triplets, batch_size: int) -> int:
    """Token slots of the passes: each batch's three texts per triplet, padded to the batch's longest."""
    total = 0
    for start in range(0, len(triplets), batch_size):
        texts = [text for triplet in triplets[start : start + batch_size] for text in triplet.texts()]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        total += len(lengths) * max(lengths)
    return total


def test_bucketing_cuts_padding_and_keeps_the_float64_sums(tiny_model, tokenizer, qa_file):
    pairs = read_pairs(qa_file)
    for i, pair in enumerate(pairs):  # contexts of 0 to 6 extra sentences, out of order
        for key in ("context_1", "context_2"):
            pair[key] += " The river keeps its stones." * ((5 * i + len(key)) % 7)
    triplets = list(iter_triplets(pairs))
    bucketed = list(iter_bucketed(triplets, batch_size=4, window=6))
    assert _padded_slots(tokenizer, bucketed, 4) < 0.95 * _padded_slots(tokenizer, triplets, 4)

    model = tiny_model.double()
    plain = build_statistics(model, tokenizer, pairs, batch_size=4)
    sorted_ = build_statistics(model, tokenizer, pairs, batch_size=4, length_window=6)
    assert sorted_.metadata == plain.metadata and plain.metadata["triplets_used"] > 0
    for name, value in plain.sums.tensors().items():
        torch.testing.assert_close(sorted_.sums.tensors()[name], value, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("window", [0, -2, 1.5, True])
def test_a_bad_length_window_names_the_fix(window, tiny_model, tokenizer, qa_file):
    message = "length_window must be a number of batches >= 1 (e.g. 8), or None to keep the data order"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_statistics(tiny_model, tokenizer, read_pairs(qa_file, max_samples=1), length_window=window)
    with pytest.raises(ValueError, match="length_window must be a number of batches"):
        SyntheticQADataModule(str(qa_file), length_window=window)


def test_the_data_module_batches_the_bucketed_order(qa_file):
    datamodule = SyntheticQADataModule(str(qa_file), batch_size=4, length_window=3)
    datamodule.setup("fit")
    triplets = list(iter_triplets(read_pairs(qa_file)))
    assert datamodule.triplets == list(iter_bucketed(triplets, batch_size=4, window=3)) != triplets
