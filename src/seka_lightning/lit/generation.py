"""HighlightGenerator: ``seka predict`` generates each prompt without and with a highlighting method, side by side."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from seka_lightning.highlight import DEFAULT_MARKERS, encode_highlighted
from seka_lightning.lit.frozen import FrozenModelModule
from seka_lightning.methods import HighlightMethod
from seka_lightning.steering import NoEditWarning


def max_positions(model: nn.Module) -> int | None:
    """The model's ``max_position_embeddings`` (of its text config for multimodal models), or None if unknown."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "max_position_embeddings", None)


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
        return [
            {**record, "highlighted_tokens": int(mask.sum()), "unsteered": u, "steered": s}
            for record, mask, u, s in zip(batch, enc["highlight_mask"], plain, steered, strict=True)
        ]

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
