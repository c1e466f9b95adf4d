"""HighlightGenerator: ``seka predict`` generates each prompt unsteered and steered, side by side."""

from __future__ import annotations

import torch

from seka_lightning.highlight import DEFAULT_MARKERS, encode_highlighted
from seka_lightning.lit.frozen import FrozenModelModule
from seka_lightning.methods import HighlightMethod, SekaMethod


class HighlightGenerator(FrozenModelModule):
    """Greedy generation with and without SEKA key steering on the highlighted spans."""

    def __init__(
        self,
        pretrained: str,
        bank: str,
        *,
        neg: str | None = None,
        gain_pos: float = 1.0,
        gain_neg: float | None = None,
        layers: str = "all",
        layer_mapping: str = "by_id",
        max_new_tokens: int = 32,
        markers: tuple[str, str] = DEFAULT_MARKERS,
        chat: bool = False,
        add_special_tokens: bool = False,
        dtype: str = "float32",
        device_map: str | dict | None = None,
    ) -> None:
        """
        Args:
            pretrained: hub id, local path, or ``embedded:smollm2-135m`` / ``embedded:gemma3-270m``.
            bank: projection bank (``.safetensors`` from ``seka fit``, or a reference ``*_pos_proj.pt``).
            neg: the reference negative ``.pt`` to pair with a reference positive file.
            gain_pos: g+ of SPEC §4.
            gain_neg: g- of SPEC §4 (with a negative bank the edit is ``(g+P+ + g-P-) / 2``); None = positive only.
            layers: ``all`` (the bank's layers), ``lastN``, ``firstN`` or comma-separated ids.
            layer_mapping: ``by_id`` (default) or ``positional`` (the reference's pairing).
            max_new_tokens: tokens generated per prompt.
            markers: start and end highlight markers.
            chat: wrap each prompt as a user message with the tokenizer's chat template.
            add_special_tokens: let the tokenizer add its special tokens (e.g. BOS for base models).
            dtype: model dtype.
            device_map: shard a model too large for one GPU over this process's GPUs (``auto``, ``balanced`` or a
                ``{module: device}`` map; run with ``--trainer.devices 1``); None = Lightning places the whole model.
        """
        super().__init__()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.save_hyperparameters()
        self.load_frozen_model(pretrained, dtype=dtype, device_map=device_map)
        self.plain = HighlightMethod()
        self.seka = SekaMethod(
            bank, neg=neg, gain_pos=gain_pos, gain_neg=gain_neg, layers=layers, layer_mapping=layer_mapping
        )
        self.seka.setup(self.model, self.tokenizer)

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        hp = self.hparams
        enc = encode_highlighted(
            self.tokenizer,
            [record["prompt"] for record in batch],
            markers=tuple(hp.markers),
            chat=hp.chat,
            add_special_tokens=hp.add_special_tokens,
        )
        enc = {k: v.to(self.input_device) for k, v in enc.items()}
        plain, steered = (self._generate(method, enc) for method in (self.plain, self.seka))
        return [
            {**record, "highlighted_tokens": int(mask.sum()), "unsteered": u, "steered": s}
            for record, mask, u, s in zip(batch, enc["highlight_mask"], plain, steered, strict=True)
        ]

    def _generate(self, method: HighlightMethod, enc: dict[str, torch.Tensor]) -> list[str]:
        out = method.generate(
            self.model, enc, max_new_tokens=self.hparams.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id
        )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)
