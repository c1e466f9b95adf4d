"""AdaSekaSelector: the LightningModule behind ``seka validate`` for AdaSEKA's expert selection (routing statistics).

It only wires: the router is an :class:`~seka_lightning.adaseka.method.AdaSekaMethod` (experts in :mod:`.experts`,
hooks in :mod:`.hooks`); this module loads the model, runs the validation steps and counts which expert wins each
layer and head and how spread the coefficients are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torchmetrics import Metric

from seka_lightning.adaseka.experts import coefficient_entropy
from seka_lightning.adaseka.hooks import RoutingRecord
from seka_lightning.adaseka.method import AdaSekaMethod
from seka_lightning.files import write_json
from seka_lightning.highlight import encode_spans
from seka_lightning.methods import position_ids_for
from seka_lightning.models import load_model

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


class AdaSekaSelector(L.LightningModule):
    """``seka validate`` for AdaSEKA: route held-out highlighted prompts with an :class:`AdaSekaMethod` and log which
    expert wins each layer and KV head and how spread the coefficients are (``routing/*``)."""

    def __init__(
        self,
        method: AdaSekaMethod,
        *,
        pretrained: str,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        stats_output: str | None = None,
    ) -> None:
        """
        Args:
            method: the router to measure (``AdaSekaMethod`` with its experts, gain, layers, gate...).
            pretrained: the model to route (hub id, local path, or ``embedded:...``).
            dtype: model dtype.
            attn_implementation: attention implementation of the model.
            stats_output: where the routing statistics are written as JSON; None = only logged.
        """
        super().__init__()
        if not isinstance(method, AdaSekaMethod):
            raise ValueError(
                f"AdaSekaSelector measures an AdaSekaMethod's routing, got {type(method).__name__}; pass "
                "--model.method seka_lightning.adaseka.method.AdaSekaMethod with its experts"
            )
        self.save_hyperparameters(ignore=["method"])
        self.method = method
        self.routing_stats: RoutingStatistics | None = None

    def setup(self, stage: str) -> None:
        """Load the model, bind the method's experts to it and prepare the statistics."""
        if not hasattr(self, "model"):
            self.model, self.tokenizer = load_model(
                self.hparams.pretrained, dtype=self.hparams.dtype, attn_implementation=self.hparams.attn_implementation
            )
        mapping = self.method.bind(self.model)
        if self.routing_stats is None:
            experts = self.method.expert_set
            self.routing_stats = RoutingStatistics(len(mapping), experts.num_kv_heads, len(experts.names))

    @torch.no_grad()
    def validation_step(self, batch: Sequence[Mapping[str, Any]], batch_idx: int) -> None:
        """Route a batch of highlighted prompts (``{"text", "spans"}`` dicts) and add to the routing statistics."""
        batch = [example for example in batch if example["spans"]]
        if not batch:
            return
        enc = encode_spans(self.tokenizer, [e["text"] for e in batch], [[tuple(s) for s in e["spans"]] for e in batch])
        enc = {key: value.to(self.device) for key, value in enc.items()}
        record = RoutingRecord()
        with self.method.active(self.model, enc, record=record):
            self.model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                position_ids=position_ids_for(enc["attention_mask"]),
                use_cache=False,
                logits_to_keep=1,
            )
        mapping = self.method.bind(self.model)
        self.routing_stats.update(torch.stack([record.coefficients[layer] for layer in mapping]))

    def on_validation_epoch_end(self) -> None:
        stats = self.routing_stats.compute()
        win_rate = stats["win_rate"]  # [L, H, M]
        names = self.method.expert_set.names
        overall = win_rate.mean(dim=(0, 1))
        self.log("routing/entropy", stats["entropy"].mean().float(), sync_dist=False)
        for i, name in enumerate(names):
            self.log(f"routing/win_rate/{name}", overall[i].float(), sync_dist=False)
        summary = {
            "experts": list(names),
            "layers": list(self.method.bind(self.model)),
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
