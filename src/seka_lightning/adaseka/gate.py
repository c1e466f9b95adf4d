"""A learned AdaSEKA router: a small gate on the routing coefficients, fit on held-out highlighted QA.

The training-free router (SPEC §5) gives per row, layer and KV head the coefficients ``c`` ``[B, H, M]``. The gate
maps them per steered layer ``l`` and expert ``m`` as

    c'_m = exp(log_scale[l, m]) · c_m + bias[l, m]

before ``P = Σ_m c'_m U_m U_mᵀ`` is mixed. It starts at the identity (``log_scale = bias = 0``, bitwise the
training-free router), ``exp(log_scale)`` learns how far to trust each expert's routing score per layer (a
per-layer, per-expert gain) and ``bias`` a fixed per-layer share of an expert regardless of the query. A left-out
expert (NaN head) still adds nothing, since its projector is zero. :class:`AdaSekaGateTrainer` fits only the gate
(the model and experts stay frozen) to maximise the teacher-forced answer log-likelihood of highlighted QA probes,
and reports the held-out loss of the gate next to the training-free router's and the unsteered model's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from seka_lightning.adaseka.experts import ExpertSet, LayerExperts
from seka_lightning.adaseka.hooks import AdaptiveSteerer, select_expert_layers
from seka_lightning.data.synthetic_qa import HighlightedQuestion, RankBatches, highlighted_questions
from seka_lightning.data.triplets import read_pairs
from seka_lightning.families import resolve_layout
from seka_lightning.files import GATE, atomic_path, check_output
from seka_lightning.layers import check_layer_mapping, check_layer_spec
from seka_lightning.lit.frozen import FrozenModelModule
from seka_lightning.lit.validator import IGNORE_INDEX, encode_questions
from seka_lightning.methods import position_ids_for

log = logging.getLogger(__name__)

GATE_FORMAT = "seka-routing-gate"


class RoutingGate(nn.Module):
    """Per steered layer and expert, ``c' = exp(log_scale) · c + bias`` on the routing coefficients.

    Called as ``gate(layer_id, coefficients [B, H, M])``, the :data:`seka_lightning.adaseka.hooks.CoefficientGate`
    protocol. Zero-initialised parameters make it the identity.
    """

    def __init__(self, layer_ids: Sequence[int], experts: Sequence[str]) -> None:
        """``layer_ids``: the model layers the router steers, in order; ``experts``: the expert names, in order."""
        super().__init__()
        if not layer_ids:
            raise ValueError("layer_ids is empty; a gate needs at least one steered layer")
        if not experts:
            raise ValueError("experts is empty; a gate needs at least one expert name")
        self.layer_ids = tuple(int(layer) for layer in layer_ids)
        self.experts = tuple(str(name) for name in experts)
        self._row = {layer: i for i, layer in enumerate(self.layer_ids)}
        shape = (len(self.layer_ids), len(self.experts))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, layer_id: int, coefficients: torch.Tensor) -> torch.Tensor:
        """The gated coefficients ``[B, H, M]`` of model layer ``layer_id``."""
        row = self._row.get(layer_id)
        if row is None:
            raise ValueError(f"the gate covers layers {list(self.layer_ids)}, not layer {layer_id}")
        if coefficients.shape[-1] != len(self.experts):
            raise ValueError(
                f"the gate holds {len(self.experts)} experts but the router gave {coefficients.shape[-1]} coefficients"
            )
        scale = self.log_scale[row].exp().to(device=coefficients.device, dtype=coefficients.dtype)
        bias = self.bias[row].to(device=coefficients.device, dtype=coefficients.dtype)
        return coefficients * scale + bias

    def save(self, path: str | Path) -> Path:
        """Write the gate as safetensors (``log_scale``, ``bias``, ``layer_ids``; expert names in the metadata),
        atomically."""
        tensors = {
            "log_scale": self.log_scale.detach().float().cpu().contiguous(),
            "bias": self.bias.detach().float().cpu().contiguous(),
            "layer_ids": torch.tensor(self.layer_ids, dtype=torch.int64),
        }
        metadata = {"format": GATE_FORMAT, "experts": json.dumps(list(self.experts))}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        return Path(path)

    @classmethod
    def load(
        cls, path: str | Path, *, layer_ids: Sequence[int] | None = None, experts: Sequence[str] | None = None
    ) -> RoutingGate:
        """Load a saved gate; with ``layer_ids`` / ``experts`` given, check it was trained for exactly those."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"routing gate {path} does not exist; train one with `seka fit` (AdaSekaGateTrainer)"
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except SafetensorError as err:
            raise ValueError(
                f"{path} is not a safetensors file ({err}); pass a gate saved by RoutingGate.save"
            ) from err
        missing = sorted({"log_scale", "bias", "layer_ids"} - set(tensors))
        if metadata.get("format") != GATE_FORMAT or missing or "experts" not in metadata:
            raise ValueError(
                f"{path} is not a routing gate (format {metadata.get('format')!r}, missing tensors {missing}); "
                "pass a gate saved by RoutingGate.save"
            )
        stored_layers = [int(layer) for layer in tensors["layer_ids"].tolist()]
        stored_experts = json.loads(metadata["experts"])
        shape = (len(stored_layers), len(stored_experts))
        for name in ("log_scale", "bias"):
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(tensors[name].shape)} but the gate lists {shape[0]} layers and "
                    f"{shape[1]} experts; the file is corrupt, retrain the gate"
                )
        if layer_ids is not None and stored_layers != [int(layer) for layer in layer_ids]:
            raise ValueError(
                f"{path} was trained for {len(stored_layers)} steered layers {stored_layers} but the router steers "
                f"{len(layer_ids)} layers {list(layer_ids)}; select the gate's layers or train a gate for these"
            )
        if experts is not None and stored_experts != list(experts):
            raise ValueError(
                f"{path} was trained for experts {stored_experts} but the router has {list(experts)}; use the same "
                "experts in the same order or train a gate for these"
            )
        gate = cls(stored_layers, stored_experts)
        with torch.no_grad():
            gate.log_scale.copy_(tensors["log_scale"])
            gate.bias.copy_(tensors["bias"])
        return gate


class GateQADataModule(L.LightningDataModule):
    """Highlighted QA probes (four per pair, :func:`highlighted_questions`) from one held-out file, split into
    disjoint parts: the first ``train_pairs`` pairs fit the gate, the next ``val_pairs`` measure it."""

    def __init__(
        self,
        path: str = "data/synthetic_qa_heldout.jsonl",
        *,
        train_pairs: int = 200,
        val_pairs: int | None = 100,
        batch_size: int = 8,
    ) -> None:
        """
        Args:
            path: held-out JSONL of QA pairs (not the file the experts were built from).
            train_pairs: pairs (from the start of the file) whose probes train the gate.
            val_pairs: the following pairs, whose probes measure it; None = no validation.
            batch_size: probes per step.
        """
        super().__init__()
        if train_pairs < 1:
            raise ValueError(f"train_pairs must be >= 1, got {train_pairs}")
        if val_pairs is not None and val_pairs < 1:
            raise ValueError(f"val_pairs must be >= 1 or None, got {val_pairs}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.train_pairs, self.val_pairs, self.batch_size = path, train_pairs, val_pairs, batch_size
        self.train_questions: list[HighlightedQuestion] = []
        self.val_questions: list[HighlightedQuestion] = []

    def setup(self, stage: str) -> None:
        if self.train_questions:
            return
        pairs = read_pairs(self.path, max_samples=self.train_pairs + (self.val_pairs or 0))
        if len(pairs) <= self.train_pairs and self.val_pairs is not None:
            raise ValueError(
                f"{self.path} holds {len(pairs)} pairs, none left for validation after train_pairs="
                f"{self.train_pairs}; lower train_pairs or set val_pairs=None"
            )
        self.train_questions = [q for pair in pairs[: self.train_pairs] for q in highlighted_questions(pair)]
        self.val_questions = [q for pair in pairs[self.train_pairs :] for q in highlighted_questions(pair)]

    def _loader(self, questions: list[HighlightedQuestion]) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        dataset = RankBatches(questions, batch_size=self.batch_size, rank=rank, world_size=world)
        return DataLoader(dataset, batch_size=None, collate_fn=list)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_questions)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_questions)


class AdaSekaGateTrainer(FrozenModelModule):
    """Fit a :class:`RoutingGate` for AdaSEKA: the model and experts are frozen, the gate's parameters are the only
    trainable ones; the loss is the mean negative log-likelihood per answer token of highlighted QA probes,
    steered through the gate. Validation logs ``val/nll_{gate,router,unsteered}`` (held-out loss with the gate, with
    the training-free router, without steering). The gate is saved to ``output`` when training ends."""

    def __init__(
        self,
        pretrained: str,
        experts: dict[str, str] | str,
        *,
        top_k: int = 5,
        gain: float = 1.0,
        layers: str = "all",
        layer_mapping: str = "by_id",
        lr: float = 0.05,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        chat: bool = False,
        output: str = "checkpoints/adaseka_gate.safetensors",
        overwrite: bool = False,
    ) -> None:
        """
        Args:
            pretrained: hub id, local path, or ``embedded:smollm2-135m`` / ``embedded:gemma3-270m``.
            experts: expert name -> bank path, or a YAML/JSON file holding that mapping (as AdaSekaMethod).
            top_k: singular directions per expert (k of SPEC §5).
            gain: g of ``k' = k + g k P``.
            layers: ``all`` (the experts' layers), ``lastN``, ``firstN`` or comma-separated ids.
            layer_mapping: ``by_id`` (default) or ``positional`` (the reference's pairing).
            lr: Adam learning rate of the gate.
            dtype: model dtype (float32, bfloat16, float16).
            attn_implementation: attention implementation of the model.
            chat: wrap each prompt as a user message with the tokenizer's chat template.
            output: where the trained gate is written (safetensors); pass it to ``AdaSekaMethod(gate=...)``.
            overwrite: replace an existing gate at ``output`` (checked before the model loads).
        """
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        check_layer_spec(layers)
        check_layer_mapping(layer_mapping)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        expert_files = experts if isinstance(experts, str) else list(experts.values())
        check_output(
            output,
            kind=GATE,
            inputs={"--model.experts": expert_files},
            overwrite=overwrite,
            flag="--model.overwrite true",
        )
        self.save_hyperparameters()
        self.load_frozen_model(pretrained, dtype=dtype, attn_implementation=attn_implementation)
        self.expert_set = ExpertSet.load(experts)
        self.layout = resolve_layout(self.model)
        self.mapping = select_expert_layers(self.expert_set, layers, self.layout.num_layers, layer_mapping)
        self.gate = RoutingGate(list(self.mapping), self.expert_set.names)
        self._experts: dict[int, LayerExperts] | None = None

    def train(self, mode: bool = True) -> AdaSekaGateTrainer:
        """Lightning switches to train mode for fitting; the frozen model stays in eval mode (no dropout)."""
        super().train(mode)
        self.model.eval()
        return self

    def _layer_experts(self) -> dict[int, LayerExperts]:
        """The truncated experts on this module's device, cached; built outside inference mode, since a first
        ``trainer.validate`` runs in it and its tensors could not be used for training afterwards."""
        if self._experts is None or next(iter(self._experts.values())).weighted.device != self.device:
            with torch.inference_mode(False):
                self._experts = {
                    expert_layer: self.expert_set.layer(expert_layer, top_k=self.hparams.top_k).to(self.device)
                    for expert_layer in self.mapping.values()
                }
        return self._experts

    def answer_nll(self, questions: Sequence[HighlightedQuestion], *, route: str = "gate") -> torch.Tensor:
        """Mean negative log-likelihood per answer token (scalar) of ``questions``, teacher-forced.

        ``route``: ``gate`` (steered through the gate), ``router`` (the training-free router) or ``unsteered``.
        """
        if route not in ("gate", "router", "unsteered"):
            raise ValueError(f"route must be 'gate', 'router' or 'unsteered', got {route!r}")
        enc, prompt_length = encode_questions(self.tokenizer, questions, chat=self.hparams.chat)
        enc = {key: value.to(self.device) for key, value in enc.items()}
        answer_width = enc["input_ids"].shape[1] - prompt_length
        steerer = None
        if route != "unsteered":
            steerer = AdaptiveSteerer.attach(
                self.model,
                self.expert_set,
                enc,
                gain=self.hparams.gain,
                top_k=self.hparams.top_k,
                layers=self.hparams.layers,
                layer_mapping=self.hparams.layer_mapping,
                layout=self.layout,
                layer_experts=self._layer_experts(),
                gate=self.gate if route == "gate" else None,
                query_index=prompt_length - 1,  # the last prompt token: prompts are left-, answers right-padded
            )
        try:
            logits = self.model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                position_ids=position_ids_for(enc["attention_mask"]),
                use_cache=False,
                logits_to_keep=answer_width + 1,
            ).logits
        finally:
            if steerer is not None:
                steerer.remove()
        labels = enc["labels"][:, -answer_width:]
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="mean"
        )

    def training_step(self, batch: list[HighlightedQuestion], batch_idx: int) -> torch.Tensor | None:
        if not batch:  # this rank's share ran out
            return None
        loss = self.answer_nll(batch, route="gate")
        self.log("train/nll", loss, prog_bar=True, batch_size=len(batch))
        return loss

    @torch.no_grad()
    def validation_step(self, batch: list[HighlightedQuestion], batch_idx: int) -> None:
        if not batch:
            return
        for route in ("gate", "router", "unsteered"):
            nll = self.answer_nll(batch, route=route)
            self.log(f"val/nll_{route}", nll, batch_size=len(batch), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.gate.parameters(), lr=self.hparams.lr)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = self.gate.save(self.hparams.output)
            log.info("routing gate for layers %s written to %s", list(self.gate.layer_ids), path)
