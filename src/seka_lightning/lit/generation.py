"""HighlightGenerator: ``seka predict`` generates each prompt without and with a highlighting method, side by side."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from seka_lightning.capture import eager_attention
from seka_lightning.diagnostics import attention_mass
from seka_lightning.highlight import DEFAULT_MARKERS, encode_highlighted
from seka_lightning.lit.frozen import FrozenModelModule
from seka_lightning.methods import HighlightMethod, position_ids_for
from seka_lightning.steering import NoEditWarning


def max_positions(model: nn.Module) -> int | None:
    """The model's ``max_position_embeddings`` (of its text config for multimodal models), or None if unknown."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "max_position_embeddings", None)


@torch.no_grad()
def highlight_attention(
    model: nn.Module, methods: tuple[HighlightMethod, ...], enc: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Attention from the last prompt token onto the highlighted tokens, mean over layers and heads (``seka
    validate``'s ``attn_mass``, by the same :func:`~seka_lightning.diagnostics.attention_mass`), with each method
    active: float64 ``[B, len(methods)]``. One eager forward pass of the prompts per method."""
    masses = []
    with eager_attention(model):
        for method in methods:
            with method.active(model, enc):
                out = model(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    position_ids=position_ids_for(enc["attention_mask"]),
                    output_attentions=True,
                    use_cache=False,
                    logits_to_keep=1,
                )
            masses.append(attention_mass(out.attentions, enc["highlight_mask"], query_index=-1).mean(-1))
    return torch.stack(masses, 1)


class HighlightGenerator(FrozenModelModule):
    """Greedy generation of each prompt unsteered and steered by one highlighting method (SEKA, an ablation,
    AdaSEKA, PASTA, ...) on the highlighted spans."""

    def __init__(
        self,
        pretrained: str,
        method: HighlightMethod,
        *,
        max_new_tokens: int = 32,
        markers: tuple[str, str] = DEFAULT_MARKERS,
        chat: bool = False,
        add_special_tokens: bool = False,
        max_length: int | None = None,
        measure_attention: bool = False,
        dtype: str = "float32",
        device_map: str | dict | None = None,
    ) -> None:
        """
        Args:
            pretrained: hub id, local path, or ``embedded:smollm2-135m`` / ``embedded:gemma3-270m``.
            method: the steered side, e.g. ``SekaMethod`` (``--model.method SekaMethod --model.method.bank B
                --model.method.gain_pos 2``); the unsteered side is the plain model.
            max_new_tokens: tokens generated per prompt.
            markers: start and end highlight markers.
            chat: wrap each prompt as a user message with the tokenizer's chat template.
            add_special_tokens: let the tokenizer add its special tokens (e.g. BOS for base models).
            max_length: truncate prompts to this many tokens, keeping their end (None = no truncation; a prompt
                longer than the model's ``max_position_embeddings`` is then an error before any generation).
            measure_attention: record each highlighted prompt's attention on its highlight, unsteered and steered
                (:func:`highlight_attention`), for the run's summary. It costs two extra eager forward passes per
                batch that hold every layer's ``[B, heads, T, T]`` weights at once, so it is off by default (the
                shipped predict configs, with short prompts, turn it on). Methods that act on decode steps (PASTA,
                SPA) are not measured: their prompt pass is not their effect.
            dtype: model dtype.
            device_map: shard a model too large for one GPU over this process's GPUs (``auto``, ``balanced`` or a
                ``{module: device}`` map; run with ``--trainer.devices 1``); None = Lightning places the whole model.
        """
        super().__init__()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.save_hyperparameters(ignore=["method"])
        self.load_frozen_model(pretrained, dtype=dtype, device_map=device_map)
        self.plain = HighlightMethod()
        self.method = method
        self.method.setup(self.model, self.tokenizer)
        self.unhighlighted: list[int] = []  # indices of this run's prompts without a highlight
        self.prompt_count = 0

    def on_predict_start(self) -> None:
        self.unhighlighted, self.prompt_count = [], 0

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        hp = self.hparams
        enc = encode_highlighted(
            self.tokenizer,
            [record["prompt"] for record in batch],
            markers=tuple(hp.markers),
            chat=hp.chat,
            add_special_tokens=hp.add_special_tokens,
            max_length=hp.max_length,
            max_positions=max_positions(self.model),
        )
        self.prompt_count += len(batch)
        self.unhighlighted += [r["index"] for r, m in zip(batch, enc["highlight_mask"], strict=True) if not m.any()]
        enc = {k: v.to(self.input_device) for k, v in enc.items()}
        plain, steered = (self._generate(method, enc) for method in (self.plain, self.method))
        attention = self._attention(enc)
        return [
            {
                **record,
                "highlighted_tokens": int(mask.sum()),
                "unsteered": u,
                "steered": s,
                "attention_on_highlight": dict(zip(("unsteered", "steered"), a.tolist(), strict=True))
                if a is not None and mask.any()
                else None,
            }
            for record, mask, u, s, a in zip(batch, enc["highlight_mask"], plain, steered, attention, strict=True)
        ]

    def _attention(self, enc: dict[str, torch.Tensor]) -> list[torch.Tensor | None]:
        """Per prompt, the attention on its highlight unsteered and steered, or None where it is not measured."""
        if not self.hparams.measure_attention or self.method.edits_decode_steps or not enc["highlight_mask"].any():
            return [None] * enc["input_ids"].shape[0]
        return list(highlight_attention(self.model, (self.plain, self.method), enc).cpu())

    def on_predict_end(self) -> None:
        """Warn (:class:`NoEditWarning`) with a count when prompts carried no highlight: steering left them as is."""
        if self.unhighlighted:
            shown = ", ".join(map(str, self.unhighlighted[:10])) + (", ..." if len(self.unhighlighted) > 10 else "")
            start, end = self.hparams.markers
            warnings.warn(
                f"{len(self.unhighlighted)} of {self.prompt_count} prompts carry no highlight (prompts {shown}); "
                f"steering leaves them unchanged: mark the text to highlight as {start}text{end}",
                NoEditWarning,
                stacklevel=2,
            )

    def _generate(self, method: HighlightMethod, enc: dict[str, torch.Tensor]) -> list[str]:
        out = method.generate(
            self.model, enc, max_new_tokens=self.hparams.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id
        )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)
