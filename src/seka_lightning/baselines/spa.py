"""Selective Prompt Anchoring (SPA; Tian & Zhang, ICML 2025) as a decoding-time baseline (SPEC §6).

Two sequences are decoded side by side: the prompt itself and an auxiliary copy in which the highlighted text is
masked. At every step the next-token logits are ``main + (s - 1) * (main - aux)``; both sequences are advanced with
the chosen token, each with its own KV cache.

Masking follows the authors' code (BENCHMARKS.md, "SPA"). Their ``anchoring`` package replaces the anchored text
with one placeholder token and hides it from attention (attention mask 0 on the placeholder) at prefill; the
generation's attention mask grows from that one, so the placeholder stays hidden at every decoding step too. That
is the default here (``mask_mode="attention"``): each contiguous highlighted run of tokens becomes one hidden
placeholder. Their evaluation scripts instead leave the mask token string (``<pad>`` for DeepSeek-Coder, ``<unk>``
for CodeLlama / CodeQwen) visible; ``mask_mode="pad"`` is that variant.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from seka_lightning.methods import Encoded, HighlightMethod, position_ids_for

log = logging.getLogger(__name__)

MASK_MODES = ("pad", "attention")


def masked_prompt(enc: Encoded, *, mask_token_id: int, mask_mode: str = "attention") -> Encoded:
    """The auxiliary prompt: every contiguous highlighted run collapsed to one ``mask_token_id`` placeholder.

    Returns left-padded ``input_ids``, ``attention_mask`` and ``position_ids`` (``[B, T_aux]``). Positions count
    the placeholder (as in the authors' code, where it is a real token of the masked text); with
    ``mask_mode="attention"`` its attention-mask entry is 0 so no query sees it. Rows without a highlight come
    back unchanged (apart from the padding width).
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    input_ids, real = enc["input_ids"], enc["attention_mask"].bool()  # [B, T]
    highlighted = enc["highlight_mask"].bool() & real
    previous = torch.nn.functional.pad(highlighted[:, :-1], (1, 0), value=False)
    placeholder = highlighted & ~previous  # first token of each highlighted run
    keep = real & (~highlighted | placeholder)
    lengths = keep.sum(1)  # [B]
    width = int(lengths.max())
    # the kept tokens of each row, left-padded to the new width
    column = width - lengths[:, None] + keep.long().cumsum(1) - 1  # [B, T]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
    rows, column = rows[keep], column[keep]
    ids = torch.where(placeholder, torch.full_like(input_ids, mask_token_id), input_ids)
    aux_ids = torch.full((input_ids.shape[0], width), mask_token_id, dtype=input_ids.dtype, device=input_ids.device)
    aux_ids[rows, column] = ids[keep]
    aux_real = torch.zeros_like(aux_ids, dtype=torch.bool)
    aux_real[rows, column] = True
    aux_attention = aux_real.clone()
    if mask_mode == "attention":
        aux_attention[rows, column] = ~placeholder[keep]
    return {
        "input_ids": aux_ids,
        "attention_mask": aux_attention.long(),
        "position_ids": position_ids_for(aux_real),
    }


def anchored_logits(main: torch.Tensor, aux: torch.Tensor, strength: float) -> torch.Tensor:
    """SPA's logits ``main + (s - 1) * (main - aux)`` in float32."""
    main, aux = main.float(), aux.float()
    return main + (strength - 1.0) * (main - aux)


@dataclass
class _DecodeStream:
    """One sequence being decoded on its own KV cache (left-padded rows, positions skipping the padding).

    The ``DynamicCache`` grows in place with every forward call.
    """

    model: nn.Module
    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, T + steps]
    next_position: torch.Tensor  # [B]

    @classmethod
    def prefill(
        cls, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[_DecodeStream, torch.Tensor]:
        """Run the prompt once; returns the stream and the next-token logits ``[B, V]``."""
        cache = DynamicCache(config=model.config)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        stream = cls(model, cache, attention_mask, position_ids[:, -1] + 1)
        return stream, out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` ``[B]`` and return the logits for the token after them ``[B, V]``."""
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.attention_mask[:, :1])], dim=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.attention_mask,
            position_ids=self.next_position[:, None],
            cache=self.cache,
            use_cache=True,
        )
        self.next_position = self.next_position + 1
        return out.logits[:, -1]


class SpaMethod(HighlightMethod):
    """Selective Prompt Anchoring: contrast the prompt with a copy whose highlighted text is masked (SPEC §6)."""

    name = "spa"
    uses_highlight = True
    edits_decode_steps = True

    def __init__(self, *, strength: float = 1.6, mask_mode: str = "attention", mask_token: str | None = None) -> None:
        """
        Args:
            strength: anchoring strength s; logits are ``main + (s - 1)(main - aux)`` (1.6; 20 on long contexts;
                1 = the plain model).
            mask_mode: ``attention`` (default): each highlighted run becomes one mask token hidden from attention, as
                in the authors' ``anchoring`` package; ``pad``: the mask token stays visible, as in their evaluation
                scripts (a variant).
            mask_token: the mask token's text (one token of the vocabulary); None = the tokenizer's pad token,
                else its unk token, else its eos token.
        """
        if not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, got {strength}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        self.strength, self.mask_mode, self.mask_token = float(strength), mask_mode, mask_token
        self.mask_token_id: int | None = None

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        if self.mask_token is not None:
            ids = tokenizer.encode(self.mask_token, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(
                    f"mask_token={self.mask_token!r} is {len(ids)} tokens for this tokenizer; "
                    "choose a string that is a single token (e.g. its pad or unk token)"
                )
            self.mask_token_id = ids[0]
            return
        for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
            if candidate is not None:
                self.mask_token_id = int(candidate)
                return
        raise ValueError("the tokenizer has no pad, unk or eos token; set mask_token to a single-token string")

    def _aux(self, enc: Encoded) -> Encoded:
        if self.mask_token_id is None:
            raise RuntimeError("SpaMethod.setup() must run before the first batch")
        return masked_prompt(enc, mask_token_id=self.mask_token_id, mask_mode=self.mask_mode)

    @torch.no_grad()
    def auxiliary_logits(self, model: nn.Module, enc: Encoded) -> torch.Tensor:
        """Next-token logits ``[B, V]`` of the auxiliary prompt (highlighted runs masked), no cache."""
        return model(**self._aux(enc), use_cache=False, logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def prompt_logits(self, model: nn.Module, enc: Encoded) -> torch.Tensor:
        masked = self.auxiliary_logits(model, enc)
        main = model(
            **_model_inputs(enc),
            position_ids=position_ids_for(enc["attention_mask"]),
            use_cache=False,
            logits_to_keep=1,
        ).logits[:, -1]
        return anchored_logits(main, masked, self.strength)

    @torch.no_grad()
    def generate(self, model: nn.Module, enc: Encoded, *, max_new_tokens: int, pad_token_id: int) -> torch.Tensor:
        """Greedy SPA decoding, ``[B, max_new_tokens]``; after EOS a row is filled with ``pad_token_id``."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        aux = self._aux(enc)
        main_stream, main_logits = _DecodeStream.prefill(
            model, enc["input_ids"], enc["attention_mask"], position_ids_for(enc["attention_mask"])
        )
        aux_stream, aux_logits = _DecodeStream.prefill(
            model, aux["input_ids"], aux["attention_mask"], aux["position_ids"]
        )
        device = enc["input_ids"].device
        eos = torch.tensor(_eos_ids(model), dtype=torch.long, device=device)
        tokens = torch.full((enc["input_ids"].shape[0], max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        unfinished = torch.ones(tokens.shape[0], dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            chosen = anchored_logits(main_logits, aux_logits, self.strength).argmax(-1)
            chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad_token_id))
            tokens[:, step] = chosen
            unfinished &= ~torch.isin(chosen, eos)
            if step == max_new_tokens - 1 or not unfinished.any():
                break
            main_logits = main_stream.step(chosen)
            aux_logits = aux_stream.step(chosen)
        return tokens

    def describe(self) -> dict:
        return {
            "method": self.name,
            "strength": self.strength,
            "mask_mode": self.mask_mode,
            "mask_token": self.mask_token,
        }


def _model_inputs(enc: Encoded) -> Encoded:
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _eos_ids(model: nn.Module) -> Sequence[int]:
    """The EOS ids ``generate`` stops on (generation config first, then the model config)."""
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(config, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []
