import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from seka_lightning.metrics import (
    candidate_logprobs,
    first_token_logprob,
    target_casings,
    target_first_token_ids,
)

# A word-level tokenizer whose pre-tokenizer keeps a space as a "▁" prefix, so "paris" and " paris" are
# different tokens: a leading space added by mistake would pick id 2 instead of id 1.
VOCAB = {
    "[UNK]": 0,
    "paris": 1,
    "▁paris": 2,
    "Paris": 3,
    "▁Paris": 4,
    "PARIS": 5,
    "new": 6,
    "New": 7,
    "NEW": 8,
    "▁york": 9,
    "42": 10,
    "<s>": 11,
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>")


def test_casings() -> None:
    assert target_casings("paris") == ["paris", "Paris", "PARIS"]
    assert target_casings("McDonald") == ["mcdonald", "McDonald", "MCDONALD"]
    assert target_casings("42") == ["42"]


def test_first_token_ids_no_leading_space(tokenizer: PreTrainedTokenizerFast) -> None:
    assert tokenizer.encode(" paris", add_special_tokens=False) == [2]
    assert target_first_token_ids(tokenizer, "Paris") == [1, 3, 5]


def test_first_token_ids_take_the_first_word_and_deduplicate(tokenizer: PreTrainedTokenizerFast) -> None:
    assert target_first_token_ids(tokenizer, "new york") == [6, 7, 8]
    assert target_first_token_ids(tokenizer, "42") == [10]


def test_empty_target_raises(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="target must be a non-empty string"):
        target_first_token_ids(tokenizer, "  ")


def test_first_token_logprob_is_the_max_over_casings() -> None:
    logprobs = torch.log_softmax(torch.tensor([[0.0, 1.0, 3.0, 2.0], [4.0, 0.0, 0.0, 0.0]]), dim=-1)
    # row 0: ids {1, 3} -> logits 1 and 2 -> max is logit 2; row 1: both logits 0
    z0 = math.log(math.exp(0) + math.exp(1) + math.exp(3) + math.exp(2))
    z1 = math.log(math.exp(4) + 3)
    expected = torch.tensor([2.0 - z0, 0.0 - z1])
    torch.testing.assert_close(first_token_logprob(logprobs, [1, 3]), expected)
    torch.testing.assert_close(first_token_logprob(logprobs[0], [3, 1]), expected[0])


def test_candidate_logprobs_stacks_candidates() -> None:
    logprobs = torch.log_softmax(torch.tensor([[0.0, 1.0, 3.0, 2.0]]), dim=-1)  # [1, V]
    scores = candidate_logprobs(logprobs, [[0], [1, 3], [2]])
    assert scores.shape == (1, 3)
    torch.testing.assert_close(scores[0], logprobs[0, [0, 3, 2]])


def test_bad_ids_raise() -> None:
    logprobs = torch.zeros(4)
    with pytest.raises(ValueError, match=r"token ids \[4\] are outside the vocabulary of size 4"):
        first_token_logprob(logprobs, [1, 4])
    with pytest.raises(ValueError, match="ids is empty"):
        first_token_logprob(logprobs, [])
