"""Key-scaling ablation (BENCHMARKS.md, "Ablations"): SEKA's edit with every projector replaced by the identity,
``k' = k + g k = (1 + g) k`` on highlighted prompt tokens of the selected layers, for every KV head.

It asks whether SEKA's learned subspaces matter or whether merely enlarging the highlighted keys does the same.
It runs SEKA's own steering path (:class:`~seka_lightning.steering.KeySteerer` with an identity
:class:`~seka_lightning.bank.ProjectionBank`), so hooks, layer selection and precision handling are SEKA's.
There is no negative projector: SEKA's halving ``(g+ P+ + g- P-) / 2`` does not apply, the gain is ``g = gain_pos``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from seka_lightning.bank import ProjectionBank
from seka_lightning.families import resolve_layout
from seka_lightning.methods import KeySteeringMethod


def identity_bank(layers: Sequence[int], *, num_kv_heads: int, head_dim: int, num_layers: int) -> ProjectionBank:
    """A bank whose positive projector is the identity ``[len(layers), num_kv_heads, d, d]`` (float32) everywhere."""
    eye = torch.eye(head_dim, dtype=torch.float32)
    return ProjectionBank(
        layers=list(layers),
        pos=eye.expand(len(layers), num_kv_heads, head_dim, head_dim).clone(),
        metadata={"projectors": "identity", "num_layers": num_layers},
    )


class KeyScalingMethod(KeySteeringMethod):
    """SEKA steering with ``P = I``: highlighted keys scaled by ``1 + gain_pos`` on the selected layers."""

    name = "key_scaling"

    def __init__(
        self,
        bank: str | None = None,
        *,
        gain_pos: float = 1.0,
        layers: str = "all",
        layer_mapping: str = "by_id",
        length_reference: int | None = None,
        length_power: float = 1.0,
    ) -> None:
        """
        Args:
            bank: a SEKA bank whose layers ``all`` refers to (and which ``positional`` pairs with), so the ablation
                edits exactly the layers SEKA edits; only its layer ids are used. None = ``all`` is every layer.
            gain_pos: g of ``k' = (1 + g) k`` (SEKA's g+).
            layers: ``all``, ``lastN``, ``firstN`` or comma-separated ids, as for SEKA.
            layer_mapping: ``by_id`` or ``positional``, as for SEKA (only the selected layers differ).
            length_reference: opt-in: a row with ``n`` highlighted tokens is scaled by ``1 + s g`` with
                ``s = min(1, (length_reference / n) ** length_power)``, as for SEKA; None = ``1 + g`` everywhere.
            length_power: the exponent of that strength (finite, > 0).
        """
        super().__init__(
            bank,
            gain_pos=gain_pos,
            gain_neg=None,
            layers=layers,
            layer_mapping=layer_mapping,
            length_reference=length_reference,
            length_power=length_power,
        )

    def load_bank(self, model: nn.Module | None) -> ProjectionBank:
        if model is None:
            raise ValueError("KeyScalingMethod.setup needs the model: the identity bank takes its head geometry")
        layout = resolve_layout(model)
        layer_ids = ProjectionBank.load(self.bank_path).layers if self.bank_path else range(layout.num_layers)
        return identity_bank(
            layer_ids, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, num_layers=layout.num_layers
        )

    def describe(self) -> dict:
        described = {**super().describe(), "projectors": "identity"}
        del described["gain_neg"]
        return described
