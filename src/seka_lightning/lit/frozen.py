"""A frozen pretrained model inside a LightningModule, whole on Lightning's device or sharded with ``device_map``.

Lightning moves a LightningModule, with every registered submodule, onto its strategy's root device. A model that
accelerate/transformers spread over several GPUs (``device_map="auto"``, ``"balanced"`` or an explicit map) must
not be moved: its shards are meant to stay where they were placed. Such a model is therefore kept *outside* the
module tree (a plain attribute, not a submodule): Lightning neither moves it nor puts its weights in checkpoints.
Inputs go to the device of its input embeddings; the per-layer hooks (key capture, steering) already work on each
layer's own device.

One process drives the sharded model: it shards over the GPUs of that process, so it cannot be combined with DDP
(``--trainer.devices`` > 1) in the same run.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from transformers import PreTrainedModel

from seka_lightning.models import load_model


class FrozenModelModule(L.LightningModule):
    """Base for the LightningModules that hold one frozen model as ``self.model`` (and ``self.tokenizer``)."""

    def load_frozen_model(
        self,
        pretrained: str,
        *,
        dtype: str,
        attn_implementation: str | None = "sdpa",
        device_map: str | dict | None = None,
    ) -> None:
        """Load ``pretrained`` frozen; with ``device_map`` it is sharded and kept out of Lightning's device moves."""
        if device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # refuse before every rank loads it
            raise ValueError(self._ddp_refusal(device_map, int(os.environ["WORLD_SIZE"])))
        model, self.tokenizer = load_model(
            pretrained, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map
        )
        if device_map is None:
            self.model = model
        else:
            self.__dict__["model"] = model  # not a submodule: Lightning's `.to(root_device)` would gather the shards

    @property
    def sharded(self) -> bool:
        """True when the model was loaded with a ``device_map`` (and Lightning does not place it)."""
        return "model" in self.__dict__

    @property
    def input_device(self) -> torch.device:
        """Where the inputs go: Lightning's device, or the sharded model's input-embedding device."""
        if not self.sharded:
            return self.device
        model: PreTrainedModel = self.__dict__["model"]
        return model.get_input_embeddings().weight.device

    def setup(self, stage: str) -> None:
        if not self.sharded or self.trainer is None:
            return
        if self.trainer.world_size > 1:
            raise ValueError(self._ddp_refusal(self.hparams.get("device_map"), self.trainer.world_size))
        device = self.input_device
        if device.type == "meta":
            raise ValueError(
                "the device_map offloads the input embeddings (cpu/disk offload), which is not supported here; give "
                "the model GPUs enough (max_memory) or a device_map without offload"
            )
        if device != self.device:
            # metrics and statistics live on Lightning's device and the model returns its outputs to the inputs'
            raise ValueError(
                f"the sharded model takes its inputs on {device} but Lightning runs on {self.device}; start the "
                "device_map on the trainer's device (e.g. the embeddings on GPU 0 with --trainer.devices 1)"
            )

    @staticmethod
    def _ddp_refusal(device_map: str | dict | None, world_size: int) -> str:
        return (
            f"the model is sharded with device_map={device_map!r}, which spreads one copy over this process's GPUs, "
            f"but the run has {world_size} processes; use --trainer.devices 1 with device_map, or drop device_map "
            "to replicate the model with DDP"
        )
