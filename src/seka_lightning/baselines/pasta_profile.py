"""PASTA head selection by model profiling on the synthetic QA pairs (PASTA's "model profiling", SPEC §6).

Protocol. Each QA pair ``(c1, q1, a1, c2, q2, a2)`` gives four examples: for each question, both orders of the two
contexts, in the prompt ``"Context: {first} {second}\\nQuestion: {q}\\nAnswer:"`` with the context that holds the
answer highlighted, followed by ``" {answer}"``. An example's score is the answer's log-likelihood (the sum of its
teacher-forced token log-probabilities). The answer tokens are scored as if generated: their keys get no bias, as in
:class:`~seka_lightning.baselines.pasta.PastaMethod` during decoding. Each (layer, query head) pair is scored by the
mean increase of that log-likelihood over the plain model when PASTA (exclude mode, ``alpha``) steers that single
head; the ``top_k`` best pairs form the head set.

Cost: one plain forward per batch of examples plus one per candidate head, i.e. ``batches * (1 + layers * heads)``
forwards; ``heads_per_pass`` evaluates several candidates in one forward by repeating the batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from seka_lightning.baselines.pasta import attention_bias, key_bias
from seka_lightning.data.triplets import read_pairs
from seka_lightning.families import resolve_layout
from seka_lightning.files import PASTA_HEADS, check_output, write_json
from seka_lightning.highlight import encode_spans
from seka_lightning.methods import Encoded, position_ids_for
from seka_lightning.models import load_model

log = logging.getLogger(__name__)

PROMPT = "Context: {first} {second}\nQuestion: {question}\nAnswer:"


class ProfileExample(NamedTuple):
    """A highlighted QA prompt and the answer that follows it."""

    prompt: str
    highlight: tuple[int, int]
    """Character span of the context that holds the answer."""
    answer: str
    """The answer text, without its leading space."""


def profile_examples(pairs: Sequence[dict]) -> list[ProfileExample]:
    """Four examples per pair: each question, with its context first and second, that context highlighted."""
    examples: list[ProfileExample] = []
    for pair in pairs:
        for i in (1, 2):
            context, other = pair[f"context_{i}"], pair[f"context_{3 - i}"]
            for context_first in (True, False):
                first, second = (context, other) if context_first else (other, context)
                prompt = PROMPT.format(first=first, second=second, question=pair[f"question_{i}"])
                start = len("Context: ") if context_first else len(f"Context: {other} ")
                examples.append(ProfileExample(prompt, (start, start + len(context)), pair[f"answer_{i}"]))
    return examples


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[ProfileExample], *, add_special_tokens: bool = False
) -> tuple[Encoded, torch.Tensor]:
    """Left-padded ``prompt + " " + answer`` with the context highlighted, and the answer tokens' mask ``[B, T]``."""
    texts = [f"{ex.prompt} {ex.answer}" for ex in examples]
    enc = encode_spans(tokenizer, texts, [[ex.highlight] for ex in examples], add_special_tokens=add_special_tokens)
    answers = encode_spans(
        tokenizer,
        texts,
        [[(len(ex.prompt) + 1, len(text))] for ex, text in zip(examples, texts, strict=True)],
        add_special_tokens=add_special_tokens,
    )["highlight_mask"]
    lengths = answers.sum(-1)
    # Left padding puts every answer at the end of its row; the scoring below relies on it.
    suffix = torch.arange(answers.shape[1]) >= answers.shape[1] - lengths[:, None]
    if not torch.equal(answers, suffix):
        raise ValueError("an answer's tokens are not the last tokens of its prompt; check the tokenizer's offsets")
    return enc, answers


def answer_loglik(model: nn.Module, enc: Encoded, answers: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-likelihood of each row's answer tokens (the row's last tokens), ``[B]`` (float32 or wider)."""
    keep = int(answers.sum(-1).max()) + 1
    logits = model(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        position_ids=position_ids_for(enc["attention_mask"]),
        use_cache=False,
        logits_to_keep=keep,
    ).logits  # [B, keep, V]: predictions for the last keep - 1 tokens
    logp = F.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    targets = enc["input_ids"][:, 1 - keep :]
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logp * answers[:, 1 - keep :]).sum(-1)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def head_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[ProfileExample],
    *,
    alpha: float = 0.01,
    batch_size: int = 8,
    heads_per_pass: int = 1,
    add_special_tokens: bool = False,
) -> torch.Tensor:
    """Mean answer log-likelihood gain of PASTA on each single (layer, query head), ``[layers, heads]`` float64."""
    layout = resolve_layout(model)
    num_heads = layout.num_query_heads
    candidates = [(layer, head) for layer in range(layout.num_layers) for head in range(num_heads)]
    device = next(model.parameters()).device
    gains = torch.zeros(layout.num_layers, num_heads, dtype=torch.float64)
    num_batches = -(-len(examples) // batch_size)
    for index, batch in enumerate(_batches(examples, batch_size)):
        log.info("profiling batch %d/%d (%d candidate heads)", index + 1, num_batches, len(candidates))
        enc, answers = encode_examples(tokenizer, batch, add_special_tokens=add_special_tokens)
        enc = {k: v.to(device) for k, v in enc.items()}
        answers = answers.to(device)
        base = answer_loglik(model, enc, answers)  # [B]
        per_key = key_bias(enc["highlight_mask"], enc["attention_mask"].bool() & ~answers, alpha=alpha)  # [B, T]
        rows, width = per_key.shape
        for group in _batches(candidates, heads_per_pass):
            # Candidate g steers rows g*B .. (g+1)*B - 1 of the repeated batch, on its own head only.
            biases: dict[int, torch.Tensor] = {}
            for g, (layer, head) in enumerate(group):
                bias = biases.setdefault(layer, per_key.new_zeros(len(group) * rows, num_heads, width))
                bias[g * rows : (g + 1) * rows, head] = per_key
            repeated = {k: v.repeat(len(group), 1) for k, v in enc.items()}
            with attention_bias(model, biases):
                steered = answer_loglik(model, repeated, answers.repeat(len(group), 1)).view(len(group), rows)
            gain = (steered - base).sum(-1).double().cpu()
            for g, (layer, head) in enumerate(group):
                gains[layer, head] += gain[g]
    return gains / len(examples)


def profile_heads(
    *,
    pretrained: str,
    data: str = "data/synthetic_qa.jsonl",
    output: str = "checkpoints/pasta_heads.json",
    max_samples: int = 64,
    top_k: int = 16,
    alpha: float = 0.01,
    batch_size: int = 8,
    dtype: str = "float32",
    heads_per_pass: int = 1,
    add_special_tokens: bool = False,
    device: str | None = None,
    overwrite: bool = False,
) -> str:
    """Score every (layer, query head) for PASTA on synthetic QA and write the ``top_k`` best as a head set.

    Args:
        pretrained: hub id, local path, or ``embedded:smollm2-135m`` / ``embedded:gemma3-270m``.
        data: JSONL of synthetic QA pairs (context_1/2, question_1/2, answer_1/2).
        output: JSON file to write: ``{"layers": {layer: [heads]}, "scores": {layer: [score per head]},
            "settings": {...}}``; ``PastaMethod(heads=output)`` reads it.
        max_samples: QA pairs to use (four prompts each).
        top_k: number of (layer, head) pairs to keep.
        alpha: PASTA's scaling coefficient in (0, 1) used while profiling.
        batch_size: prompts per forward pass.
        dtype: model dtype.
        heads_per_pass: candidate heads scored in one forward pass (the batch is repeated that many times).
        add_special_tokens: let the tokenizer add its special tokens (e.g. BOS); match the evaluation's setting.
        device: torch device; None = cuda when available, else cpu.
        overwrite: replace an existing head set at ``output``.

    Returns:
        The path written.
    """
    for field, value in (("max_samples", max_samples), ("top_k", top_k), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{field} must be >= 1, got {value}")
    if heads_per_pass < 1:
        raise ValueError(f"heads_per_pass must be >= 1, got {heads_per_pass}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    check_output(output, kind=PASTA_HEADS, inputs={"--data": data}, overwrite=overwrite)
    pairs = read_pairs(data, max_samples=max_samples)
    model, tokenizer = load_model(pretrained, dtype=dtype)
    layout = resolve_layout(model)
    total = layout.num_layers * layout.num_query_heads
    if top_k > total:
        raise ValueError(
            f"top_k={top_k} exceeds the model's {total} (layer, head) pairs "
            f"({layout.num_layers} layers x {layout.num_query_heads} heads); choose top_k <= {total}"
        )
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    examples = profile_examples(pairs)
    log.info("profiling %d heads on %d prompts from %s", total, len(examples), data)
    started = time.perf_counter()
    scores = head_scores(
        model,
        tokenizer,
        examples,
        alpha=alpha,
        batch_size=batch_size,
        heads_per_pass=heads_per_pass,
        add_special_tokens=add_special_tokens,
    )
    seconds = time.perf_counter() - started
    ranked = sorted(
        ((layer, head) for layer in range(layout.num_layers) for head in range(layout.num_query_heads)),
        key=lambda pair: (-scores[pair].item(), pair),
    )[:top_k]
    layers: dict[str, list[int]] = {}
    for layer, head in sorted(ranked):
        layers.setdefault(str(layer), []).append(head)
    result = {
        "layers": layers,
        "scores": {str(layer): scores[layer].tolist() for layer in range(layout.num_layers)},
        "settings": {
            "pretrained": pretrained,
            "data": data,
            "max_samples": max_samples,
            "pairs": len(pairs),
            "prompts": len(examples),
            "top_k": top_k,
            "alpha": alpha,
            "scale_position": "exclude",
            "dtype": dtype,
            "add_special_tokens": add_special_tokens,
            "prompt": PROMPT,
            "seconds": round(seconds, 2),
        },
    }
    write_json(output, result)
    log.info("wrote the top %d PASTA heads to %s (%.1f s)", top_k, output, seconds)
    return output
