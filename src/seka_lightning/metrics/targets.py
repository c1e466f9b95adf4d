"""First-token log-probability of a target string (BENCHMARKS.md, "Common to all").

The score of a target is the log-softmax at the last prompt position, read at the first token of the target
tokenized without special tokens and without a leading space, maximised over three casings (lower,
Capitalized, UPPER) so that a model is not penalised for the casing it prefers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def target_casings(target: str) -> list[str]:
    """The lower / Capitalized / UPPER forms of ``target``, deduplicated in that order.

    "Capitalized" upper-cases only the first character and keeps the rest as written (``"McDonald"`` stays
    ``"McDonald"``), unlike ``str.capitalize`` which would lower-case the rest.
    """
    forms = [target.lower(), target[:1].upper() + target[1:], target.upper()]
    return list(dict.fromkeys(forms))


def target_first_token_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """First-token ids of the three casings of ``target``, deduplicated (order: lower, Capitalized, UPPER).

    The target is encoded as written: no special tokens and no leading space is added, so a tokenizer that
    marks word starts (SentencePiece ``▁``) decides for itself what a bare word starts with.
    """
    if not target.strip():
        raise ValueError(f"target must be a non-empty string, got {target!r}")
    ids: list[int] = []
    for form in target_casings(target):
        encoded = tokenizer.encode(form, add_special_tokens=False)
        if not encoded:
            raise ValueError(f"the tokenizer encodes target casing {form!r} to no tokens")
        ids.append(int(encoded[0]))
    return list(dict.fromkeys(ids))


def first_token_logprob(logprobs: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """Max of ``logprobs`` over the token ``ids``: ``[V] -> []`` or ``[B, V] -> [B]``.

    ``logprobs`` must already be log-softmaxed logits at the last prompt position.
    """
    if logprobs.dim() not in (1, 2):
        raise ValueError(f"logprobs must be [V] or [B, V], got shape {tuple(logprobs.shape)}")
    if len(ids) == 0:
        raise ValueError("ids is empty; pass the target's first-token ids from target_first_token_ids()")
    vocab = logprobs.shape[-1]
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"token ids {bad} are outside the vocabulary of size {vocab}")
    index = torch.as_tensor(list(ids), dtype=torch.long, device=logprobs.device)
    return logprobs.index_select(-1, index).amax(dim=-1)


def candidate_logprobs(logprobs: torch.Tensor, candidate_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """First-token log-probs of C candidates: ``[B, V] -> [B, C]`` (``[V] -> [C]``), for top-k scoring."""
    if len(candidate_ids) == 0:
        raise ValueError("candidate_ids is empty; pass one id list per candidate label")
    return torch.stack([first_token_logprob(logprobs, ids) for ids in candidate_ids], dim=-1)
