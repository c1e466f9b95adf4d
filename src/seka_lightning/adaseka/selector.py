"""AdaSekaSelector: AdaSEKA as a highlighting method (evaluation harness) and as ``seka validate`` routing statistics.

The routing math is in :mod:`seka_lightning.adaseka` and the hooks in :mod:`seka_lightning.routing`; this module
only wires them: it loads the experts, binds them to a model, and for validation counts which expert wins each
layer and head and how spread the coefficients are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric
from transformers import PreTrainedTokenizerBase

from seka_lightning.adaseka import ExpertSet, LayerExperts, coefficient_entropy
from seka_lightning.families import ModelLayout, resolve_layout
from seka_lightning.files import write_json
from seka_lightning.highlight import encode_spans
from seka_lightning.lit.gate import RoutingGate
from seka_lightning.methods import Encoded, HighlightMethod, position_ids_for
from seka_lightning.models import load_model
from seka_lightning.routing import AdaptiveSteerer, RoutingRecord, select_expert_layers, validate_compat
from seka_lightning.steering import LAYER_MAPPINGS

log = logging.getLogger(__name__)


class RoutingStatistics(Metric):
    """Per selected layer and KV head, how often each expert has the largest coefficient, and the summed
    coefficient entropy; all states are sums, so DDP reduction is exact."""

    full_state_update = False

    def __init__(self, num_layers: int, num_heads: int, num_experts: int) -> None:
        super().__init__()
        self.add_state("wins", torch.zeros(num_layers, num_heads, num_experts, dtype=torch.float64), "sum")
        self.add_state("entropy", torch.zeros(num_layers, dtype=torch.float64), "sum")
        self.add_state("rows", torch.zeros((), dtype=torch.float64), "sum")

    def update(self, coefficients: torch.Tensor) -> None:
        """Add ``[L, B, H, M]`` coefficients of B routed prompts."""
        winners = torch.nn.functional.one_hot(coefficients.argmax(-1), coefficients.shape[-1])  # [L, B, H, M]
        self.wins += winners.sum(1).to(torch.float64)
        self.entropy += coefficient_entropy(coefficients.to(torch.float64)).mean(-1).sum(-1)
        self.rows += coefficients.shape[1]

    def compute(self) -> dict[str, torch.Tensor]:
        rows = self.rows.clamp_min(1)
        return {"win_rate": self.wins / rows, "entropy": self.entropy / rows}


class AdaSekaSelector(L.LightningModule, HighlightMethod):
    """AdaSEKA (SPEC §5): per prompt, route each layer and KV head to a mix of expert projections and steer the
    highlighted keys with it, in the prefill pass itself."""

    name = "adaseka"
    uses_highlight = True

    def __init__(
        self,
        experts: dict[str, str] | str,
        *,
        top_k: int = 5,
        gain: float = 1.0,
        layers: str = "all",
        layer_mapping: str = "by_id",
        compat: list[str] | None = None,
        pretrained: str | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        stats_output: str | None = None,
        gate: str | None = None,
    ) -> None:
        """
        Args:
            experts: expert name -> bank path (``seka fit`` with ``positive_only``, or reference ``*_pos_svd.pt``),
                or a YAML/JSON file holding that mapping (the authors' adaptive-seka-config format).
            top_k: singular directions per expert used for routing and for the mixed projector (k of SPEC §5).
            gain: g of ``k' = k + g k P``.
            layers: ``all`` (the experts' layers), ``lastN``, ``firstN`` or comma-separated ids.
            layer_mapping: ``by_id`` (default) or ``positional`` (the reference pairs the i-th stored layer with the
                i-th selected layer).
            compat: reference behaviours to reproduce: ``row0`` (route every row with row 0's query),
                ``separate_pass`` (queries from an extra forward pass, as the reference), ``output_hidden_state``
                (queries from the layer's output hidden state; implies separate_pass), ``reference_coefficients``
                (the reference's epsilons and uniform fallback on heads with a left-out expert).
            pretrained: the model to load for ``seka validate``; the evaluation harness passes its own model.
            dtype: model dtype when ``pretrained`` is loaded.
            attn_implementation: attention implementation when ``pretrained`` is loaded.
            stats_output: where ``seka validate`` writes the routing statistics as JSON; None = only logged.
            gate: a learned routing gate (``AdaSekaGateTrainer``'s output) applied to the coefficients; None = the
                training-free router.
        """
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if layer_mapping not in LAYER_MAPPINGS:
            raise ValueError(f"layer_mapping must be one of {LAYER_MAPPINGS}, got {layer_mapping!r}")
        self.compat = sorted(validate_compat(compat))
        self.save_hyperparameters()
        self.experts_spec = experts
        self.top_k, self.gain, self.layers, self.layer_mapping = top_k, gain, layers, layer_mapping
        self.expert_set: ExpertSet | None = None
        # (model id and device, layout, truncated experts per expert layer on the model's devices, layer mapping)
        self._bound: tuple[tuple[int, torch.device], ModelLayout, dict[int, LayerExperts], dict[int, int]] | None = None
        self.routing_stats: RoutingStatistics | None = None
        self.routing_gate: RoutingGate | None = None

    def setup(
        self,
        model: nn.Module | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        stage: str | None = None,
    ) -> None:
        """Harness use: ``setup(model, tokenizer)`` binds the experts to ``model``. Lightning calls
        ``setup(stage=...)``: the ``pretrained`` model is loaded and bound, and the statistics are prepared."""
        if model is None:
            if self.hparams.pretrained is None:
                raise ValueError("seka validate needs model.init_args.pretrained (the model to route)")
            if not hasattr(self, "model"):
                self.model, self.tokenizer = load_model(
                    self.hparams.pretrained,
                    dtype=self.hparams.dtype,
                    attn_implementation=self.hparams.attn_implementation,
                )
            model = self.model
        self._bind(model)
        if stage is not None and self.routing_stats is None:
            _, _, _, mapping = self._bound
            self.routing_stats = RoutingStatistics(
                len(mapping), self.expert_set.num_kv_heads, len(self.expert_set.names)
            )

    def _bind(self, model: nn.Module) -> None:
        key = (id(model), next(model.parameters()).device)
        if self._bound is not None and self._bound[0] == key:
            return
        if self.expert_set is None:
            self.expert_set = ExpertSet.load(self.experts_spec)
        layout = resolve_layout(model)
        mapping = select_expert_layers(self.expert_set, self.layers, layout.num_layers, self.layer_mapping)
        per_layer = {}
        for layer_id, expert_layer in mapping.items():
            device = next(layout.layers[layer_id].key_module.parameters()).device
            per_layer[expert_layer] = self.expert_set.layer(expert_layer, top_k=self.top_k).to(device)
        if self.hparams.gate is not None:
            gate = RoutingGate.load(self.hparams.gate, layer_ids=list(mapping), experts=self.expert_set.names)
            self.routing_gate = gate.requires_grad_(False).to(key[1])
        self._bound = (key, layout, per_layer, mapping)

    @contextmanager
    def active(self, model: nn.Module, enc: Encoded, *, record: RoutingRecord | None = None) -> Iterator[None]:
        if self.expert_set is None:
            raise RuntimeError("AdaSekaSelector.setup(model, tokenizer) must run before the first batch")
        self._bind(model)
        _, layout, per_layer, _ = self._bound
        steerer = AdaptiveSteerer.attach(
            model,
            self.expert_set,
            enc,
            gain=self.gain,
            top_k=self.top_k,
            layers=self.layers,
            layer_mapping=self.layer_mapping,
            compat=self.compat,
            record=record,
            layout=layout,
            layer_experts=per_layer,
            gate=self.routing_gate,
        )
        try:
            yield
        finally:
            steerer.remove()

    def describe(self) -> dict:
        gate = {} if self.hparams.gate is None else {"gate": self.hparams.gate}
        return {
            "method": self.name,
            "experts": self.experts_spec,
            "top_k": self.top_k,
            "gain": self.gain,
            "layers": self.layers,
            "layer_mapping": self.layer_mapping,
            "compat": self.compat,
            **gate,
        }

    @torch.no_grad()
    def validation_step(self, batch: Sequence[Mapping[str, Any]], batch_idx: int) -> None:
        """Route a batch of highlighted prompts (``{"text", "spans"}`` dicts) and add to the routing statistics."""
        batch = [example for example in batch if example["spans"]]
        if not batch:
            return
        enc = encode_spans(self.tokenizer, [e["text"] for e in batch], [[tuple(s) for s in e["spans"]] for e in batch])
        enc = {key: value.to(self.device) for key, value in enc.items()}
        record = RoutingRecord()
        with self.active(self.model, enc, record=record):
            self.model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                position_ids=position_ids_for(enc["attention_mask"]),
                use_cache=False,
                logits_to_keep=1,
            )
        _, _, _, mapping = self._bound
        self.routing_stats.update(torch.stack([record.coefficients[layer] for layer in mapping]))

    def on_validation_epoch_end(self) -> None:
        stats = self.routing_stats.compute()
        win_rate = stats["win_rate"]  # [L, H, M]
        names = self.expert_set.names
        overall = win_rate.mean(dim=(0, 1))
        self.log("routing/entropy", stats["entropy"].mean().float(), sync_dist=False)
        for i, name in enumerate(names):
            self.log(f"routing/win_rate/{name}", overall[i].float(), sync_dist=False)
        _, _, _, mapping = self._bound
        summary = {
            "experts": list(names),
            "layers": list(mapping),
            "rows": int(self.routing_stats.rows.item()),
            "win_rate": {name: float(overall[i]) for i, name in enumerate(names)},
            "entropy_per_layer": stats["entropy"].tolist(),
            "winner_per_layer_head": [[names[int(m)] for m in layer] for layer in win_rate.argmax(-1)],
            "win_rate_per_layer_head": win_rate.tolist(),
        }
        log.info("routing: win rate %s, mean coefficient entropy %.3f", summary["win_rate"], stats["entropy"].mean())
        if self.hparams.stats_output and self.trainer.is_global_zero:
            write_json(self.hparams.stats_output, summary)
        self.routing_stats.reset()
