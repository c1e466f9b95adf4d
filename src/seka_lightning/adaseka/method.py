"""AdaSekaMethod: AdaSEKA (SPEC §5) as a highlighting method, so it runs wherever SEKA does (harness, predict).

Per prompt, each selected layer and KV head is routed to a mix of expert projections and the highlighted keys are
steered with it, in the prefill pass itself. The math is in :mod:`.experts`, the hooks in :mod:`.hooks`, the
optional learned gate in :mod:`.gate`; this class loads the experts, binds them to a model and attaches the hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from seka_lightning.adaseka.experts import ExpertSet, LayerExperts
from seka_lightning.adaseka.gate import RoutingGate
from seka_lightning.adaseka.hooks import AdaptiveSteerer, RoutingRecord, select_expert_layers, validate_compat
from seka_lightning.families import ModelLayout, resolve_layout
from seka_lightning.layers import check_layer_mapping, check_layer_spec
from seka_lightning.methods import Encoded, HighlightMethod
from seka_lightning.steering import check_length_scaling


class AdaSekaMethod(HighlightMethod):
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
        gate: str | None = None,
        length_reference: int | None = None,
        length_power: float = 1.0,
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
            gate: a learned routing gate (``AdaSekaGateTrainer``'s output) applied to the coefficients; None = the
                training-free router.
            length_reference: opt-in, as SEKA's: a row with ``n`` highlighted tokens is edited with
                ``min(1, (length_reference / n) ** length_power)`` of the gain (None: full strength). A learned
                ``gate`` was trained at full strength (``AdaSekaGateTrainer`` has no such setting).
            length_power: the exponent of that strength (finite, > 0).
        """
        check_length_scaling(length_reference, length_power)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        check_layer_spec(layers)
        check_layer_mapping(layer_mapping)
        self.compat = sorted(validate_compat(compat))
        self.experts_spec, self.gate_path = experts, gate
        self.top_k, self.gain, self.layers, self.layer_mapping = top_k, gain, layers, layer_mapping
        self.length_reference, self.length_power = length_reference, length_power
        self.expert_set: ExpertSet | None = None  # loaded on the first bind
        self.routing_gate: RoutingGate | None = None
        # (model id and device, layout, truncated experts per expert layer on the model's devices, layer mapping)
        self._bound: tuple[tuple[int, torch.device], ModelLayout, dict[int, LayerExperts], dict[int, int]] | None = None

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> None:
        """Load the experts (and the gate) and bind them to ``model``."""
        self.bind(model)

    def bind(self, model: nn.Module) -> dict[int, int]:
        """Bind the experts to ``model`` (once per model and device); returns model layer id -> expert layer id."""
        key = (id(model), next(model.parameters()).device)
        if self._bound is None or self._bound[0] != key:
            if self.expert_set is None:
                self.expert_set = ExpertSet.load(self.experts_spec)
            layout = resolve_layout(model)
            mapping = select_expert_layers(self.expert_set, self.layers, layout.num_layers, self.layer_mapping)
            per_layer = {}
            for layer_id, expert_layer in mapping.items():
                device = next(layout.layers[layer_id].key_module.parameters()).device
                per_layer[expert_layer] = self.expert_set.layer(expert_layer, top_k=self.top_k).to(device)
            if self.gate_path is not None:
                gate = RoutingGate.load(self.gate_path, layer_ids=list(mapping), experts=self.expert_set.names)
                self.routing_gate = gate.requires_grad_(False).to(key[1])
            self._bound = (key, layout, per_layer, mapping)
        return self._bound[3]

    @contextmanager
    def active(self, model: nn.Module, enc: Encoded, *, record: RoutingRecord | None = None) -> Iterator[None]:
        self.bind(model)
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
            length_reference=self.length_reference,
            length_power=self.length_power,
        )
        try:
            yield
        finally:
            steerer.remove()

    @property
    def row_dependence(self) -> str | None:
        batchwise = [option for option in ("row0", "separate_pass") if option in self.compat]
        if not batchwise:
            return None
        return (
            f"compat {batchwise} reproduces the reference's batch-wide routing (row 0's query for every row; an extra "
            "pass over the padded batch without its mask)"
        )

    def describe(self) -> dict:
        extra = {} if self.gate_path is None else {"gate": self.gate_path}
        if self.length_reference is not None:  # only when set: runs without it describe themselves as before
            extra |= {"length_reference": self.length_reference, "length_power": self.length_power}
        return {
            "method": self.name,
            "experts": self.experts_spec,
            "top_k": self.top_k,
            "gain": self.gain,
            "layers": self.layers,
            "layer_mapping": self.layer_mapping,
            "compat": self.compat,
            **extra,
        }
