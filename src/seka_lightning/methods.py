"""Highlighting methods behind one interface, so every method sees the same prompts, tokens and scoring.

A method turns an encoded batch (``input_ids``, ``attention_mask``, ``highlight_mask``, all ``[B, T]``, left-padded)
into next-token logits at the last prompt position and into greedy continuations. Hook-based methods (SEKA, the
random-projection ablation, key scaling, PASTA, AdaSEKA) only override :meth:`HighlightMethod.active`; methods that change
decoding itself (SPA) override :meth:`prompt_logits` and :meth:`generate`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from seka_lightning.bank import ProjectionBank
from seka_lightning.families import ModelLayout, resolve_layout
from seka_lightning.layers import LayerSpec, check_layer_mapping, check_layer_spec, select_bank_layers
from seka_lightning.steering import FusedGains, KeySteerer, check_length_scaling

Encoded = dict[str, torch.Tensor]


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what ``generate`` computes), for plain forward passes."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class HighlightMethod:
    """No highlighting: the plain model. Subclasses add their effect in :meth:`active` or override the calls."""

    name = "none"
    uses_highlight = False  # baselines that ignore the highlight see the plain prompt
    edits_decode_steps = False  # True where the effect also acts on decode steps (PASTA's bias, SPA's logit mix)

    @property
    def row_dependence(self) -> str | None:
        """Why a row's prompt-pass effect depends on the other rows of its batch, or None when it depends on the row
        alone (then running the rows one at a time changes nothing but rounding: ``prompt_pass="rows"``)."""
        return None

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        """Load or build what the method needs for this model (called once before the first batch)."""

    @contextmanager
    def active(self, model: nn.Module, enc: Encoded) -> Iterator[None]:
        """The method's effect on ``model`` for one batch (hooks, attention functions); always undone."""
        yield

    @torch.no_grad()
    def prompt_logits(self, model: nn.Module, enc: Encoded) -> torch.Tensor:
        """Next-token logits after the prompt, ``[B, V]`` (float32)."""
        with self.active(model, enc):
            out = model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                position_ids=position_ids_for(enc["attention_mask"]),
                use_cache=False,
                logits_to_keep=1,
            )
        return out.logits[:, -1].float()

    @torch.no_grad()
    def generate(self, model: nn.Module, enc: Encoded, *, max_new_tokens: int, pad_token_id: int) -> torch.Tensor:
        """Greedy continuation token ids ``[B, max_new_tokens]`` (right-padded with ``pad_token_id`` after EOS)."""
        with self.active(model, enc):
            out = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        return torch.nn.functional.pad(new, (0, max_new_tokens - new.shape[1]), value=pad_token_id)

    def describe(self) -> dict:
        """Settings recorded in result files."""
        return {"method": self.name}


class KeySteeringMethod(HighlightMethod):
    """SEKA's key edit with a projection bank (SPEC §4): the settings SEKA and its ablations share, declared once.

    Subclasses say where the bank comes from (:meth:`load_bank`); the hooks, the layer selection and the fused gains
    are the same for all of them.
    """

    uses_highlight = True

    def __init__(
        self,
        bank: str | None,
        *,
        gain_pos: float = 1.0,
        gain_neg: float | None = None,
        layers: LayerSpec = "all",
        layer_mapping: str = "by_id",
        length_reference: int | None = None,
        length_power: float = 1.0,
    ) -> None:
        """
        Args:
            bank: projection bank file (``.safetensors`` from ``seka fit`` or a reference ``*_pos_proj.pt``).
            gain_pos: g+ of SPEC §4.
            gain_neg: g- (with a negative bank the edit is ``(g+P+ + g-P-) / 2``); None = positive projector only.
            layers: ``all`` (the bank's layers), ``lastN``, ``firstN`` or comma-separated ids.
            layer_mapping: ``by_id`` or ``positional`` (the reference's pairing).
            length_reference: with it, a row with ``n`` highlighted tokens gets ``k + s k G`` with
                ``s = min(1, (length_reference / n) ** length_power)``, so long highlights are edited less
                (opt-in; None = every row at full strength, as SPEC §4).
            length_power: the exponent of that strength (finite, > 0).
        """
        if not math.isfinite(gain_pos):
            raise ValueError(f"gain_pos must be a finite number, got {gain_pos}")
        if gain_neg is not None and not math.isfinite(gain_neg):
            raise ValueError(f"gain_neg must be a finite number or None, got {gain_neg}")
        check_layer_spec(layers)
        check_layer_mapping(layer_mapping)
        check_length_scaling(length_reference, length_power)
        self.bank_path = bank
        self.gain_pos, self.gain_neg = gain_pos, gain_neg
        self.layers, self.layer_mapping = layers, layer_mapping
        self.length_reference, self.length_power = length_reference, length_power
        self.bank: ProjectionBank | None = None  # loaded by setup()
        self._fused: FusedGains | None = None
        self._layout: ModelLayout | None = None

    def load_bank(self, model: nn.Module | None) -> ProjectionBank:
        """The bank this method steers with, for ``model`` (called once, by :meth:`setup`)."""
        raise NotImplementedError

    def setup(self, model: nn.Module | None, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Load the bank; with ``model`` None only the bank is loaded and the layout is found at the first batch."""
        if self.bank is None:
            self.bank = self.load_bank(model)
        self._layout = None if model is None else resolve_layout(model)

    def source_files(self) -> dict[str, str | None]:
        """The files the method reads, by argument name (for output-path checks)."""
        return {"bank": self.bank_path}

    def layer_mapping_for(self, num_layers: int) -> dict[int, int]:
        """Model layer id -> bank index of the layers this method edits (after :meth:`setup`)."""
        if self.bank is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its layers are known")
        return select_bank_layers(self.bank, self.layers, num_layers, self.layer_mapping)

    @contextmanager
    def active(self, model: nn.Module, enc: Encoded) -> Iterator[None]:
        if self.bank is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before the first batch")
        device = enc["highlight_mask"].device
        if self._fused is None or self._fused.gains.device != device:
            # fused once per device, not per batch: no per-call CPU work or host-to-device copies
            self._fused = FusedGains.build(self.bank, gain_pos=self.gain_pos, gain_neg=self.gain_neg, device=device)
        steerer = KeySteerer.attach(
            model,
            self.bank,
            enc["highlight_mask"],
            gain_pos=self.gain_pos,
            gain_neg=self.gain_neg,
            layers=self.layers,
            layer_mapping=self.layer_mapping,
            fused=self._fused,
            layout=self._layout,
            length_reference=self.length_reference,
            length_power=self.length_power,
        )
        try:
            yield
        finally:
            steerer.remove()

    def describe(self) -> dict:
        """The settings; the length scaling only when it is on, so default runs record what they always did."""
        described = {
            "method": self.name,
            "bank": self.bank_path,
            "gain_pos": self.gain_pos,
            "gain_neg": self.gain_neg,
            "layers": self.layers,
            "layer_mapping": self.layer_mapping,
        }
        if self.length_reference is not None:
            described |= {"length_reference": self.length_reference, "length_power": self.length_power}
        return described


class SekaMethod(KeySteeringMethod):
    """SEKA key steering with a projection bank (SPEC §4)."""

    name = "seka"

    def __init__(
        self,
        bank: str,
        *,
        neg: str | None = None,
        gain_pos: float = 1.0,
        gain_neg: float | None = None,
        layers: str = "all",
        layer_mapping: str = "by_id",
        length_reference: int | None = None,
        length_power: float = 1.0,
    ) -> None:
        """
        Args:
            bank: projection bank file (``.safetensors`` from ``seka fit`` or a reference ``*_pos_proj.pt``).
            neg: reference negative ``.pt`` paired with a reference positive file.
            gain_pos: g+ of SPEC §4.
            gain_neg: g- (with a negative bank the edit is ``(g+P+ + g-P-) / 2``); None = positive projector only.
            layers: ``all`` (the bank's layers), ``lastN``, ``firstN`` or comma-separated ids.
            layer_mapping: ``by_id`` or ``positional`` (the reference's pairing).
            length_reference: opt-in: rows with more highlighted tokens are edited by
                ``min(1, (length_reference / n) ** length_power)`` of ``k G`` (:class:`KeySteeringMethod`).
            length_power: the exponent of that strength (finite, > 0).
        """
        super().__init__(
            bank,
            gain_pos=gain_pos,
            gain_neg=gain_neg,
            layers=layers,
            layer_mapping=layer_mapping,
            length_reference=length_reference,
            length_power=length_power,
        )
        self.neg_path = neg

    def load_bank(self, model: nn.Module | None) -> ProjectionBank:
        return ProjectionBank.load(self.bank_path, neg=self.neg_path)

    def source_files(self) -> dict[str, str | None]:
        return {**super().source_files(), "neg": self.neg_path}

    def describe(self) -> dict:
        return {**super().describe(), "neg": self.neg_path}
