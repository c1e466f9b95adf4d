"""Building a projection bank from Python: ``build_bank(model, tokenizer, pairs)`` (SPEC §3).

The per-batch step (:func:`accumulate_triplets`: capture the answer tokens' keys, add them to the float64 sums,
count the triplets) is the one ``seka fit`` runs in ``ProjectionBuilder.training_step``; this module streams QA
pairs through it on an already loaded model, so the bank is the one ``seka fit`` writes for the same data, layers,
batch size and settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from seka_lightning import __version__
from seka_lightning.bank import ProjectionBank
from seka_lightning.capture import collect_triplet_keys, packing_metadata
from seka_lightning.data.triplets import (
    PAIR_FIELDS,
    ChatTriplet,
    Triplet,
    check_chat_template,
    check_length_window,
    iter_bucketed,
    triplets_from_pair,
)
from seka_lightning.families import ModelLayout, resolve_layout
from seka_lightning.layers import LayerSpec, parse_layers
from seka_lightning.models import model_id
from seka_lightning.projections import DEFAULT_HEAD_FILTER, DEFAULT_MIN_DIFF, validate_hyperparameters
from seka_lightning.provenance import weights_hash
from seka_lightning.stats import KeyStatistics, KeySums

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TripletCounts:
    """What one batch contributed: triplets whose keys were added, skipped (no answer in some text, or unequal
    answer token counts), and removed by the AdaSEKA attention filter (a subset of neither)."""

    kept: int
    skipped: int
    filtered: int


def accumulate_triplets(
    stats: KeyStatistics,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layout: ModelLayout,
    layer_ids: Sequence[int],
    batch: Sequence[Triplet],
    *,
    device: torch.device,
    positive_only: bool = False,
    attention_ratio: float | None = None,
    chat: bool = False,
    pack_tokens: int | None = None,
) -> TripletCounts:
    """Add the answer-token keys of one batch of triplets to ``stats``; the building step of ``seka fit``.
    ``chat`` wraps each text as a user message in the tokenizer's chat template first (:class:`ChatTriplet`);
    ``pack_tokens`` packs the texts into rows of that many tokens (see ``collect_triplet_keys``)."""
    if not batch:
        return TripletCounts(kept=0, skipped=0, filtered=0)
    keys = collect_triplet_keys(
        model,
        tokenizer,
        layout,
        layer_ids,
        [ChatTriplet(triplet, tokenizer) for triplet in batch] if chat else batch,
        device=device,
        positive_only=positive_only,
        attention_ratio=attention_ratio,
        pack_tokens=pack_tokens,
    )
    if keys is None:
        return TripletCounts(kept=0, skipped=len(batch), filtered=0)
    if keys.kept:
        # Positive-only statistics never see a negative text; the neutral keys stand in for it, so the negative
        # sums (unused by expert banks) are well defined.
        negative = keys.neutral if keys.negative is None else keys.negative
        stats.update(keys.neutral, keys.positive, negative)
    return TripletCounts(kept=keys.kept, skipped=len(batch) - keys.kept, filtered=keys.skipped_attention)


def no_statistics_error(filtered: int) -> ValueError:
    """The error for a build in which no triplet was kept (``filtered`` of them by the attention filter)."""
    if filtered:
        return ValueError(
            f"the attention filter removed all {filtered} triplets that had their answer in every text; "
            "lower attention_ratio or set it to None"
        )
    return ValueError(
        "no triplet had its answer in all three texts, so there are no statistics; check the data "
        "(answers must be verbatim spans of their contexts)"
    )


@dataclass
class BankStatistics:
    """The sufficient statistics of a build and what is needed to derive banks from them without the model:
    the layer ids, the head dim and the build's metadata (model, counts, data fingerprint)."""

    sums: KeySums
    layers: list[int]
    head_dim: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_bank(
        self,
        *,
        top_pct: float = 0.9,
        min_diff: float = DEFAULT_MIN_DIFF,
        head_filter: str = DEFAULT_HEAD_FILTER,
        positive_only: bool | None = None,
    ) -> ProjectionBank:
        """Derive a bank (one SVD per head); ``positive_only`` defaults to how the statistics were collected."""
        if positive_only is None:
            positive_only = not self.metadata.get("negative_text", True)
        bank = ProjectionBank.from_statistics(
            self.sums,
            layers=self.layers,
            top_pct=top_pct,
            min_diff=min_diff,
            head_filter=head_filter,
            positive_only=positive_only,
            metadata=dict(self.metadata),
        )
        bank.statistics = self.sums
        return bank


def check_pair(pair: object, index: int) -> dict:
    """Raise ``ValueError`` naming record ``index`` and the field if ``pair`` is not a synthetic-QA record."""
    if not isinstance(pair, dict):
        raise ValueError(f"pair {index} is a {type(pair).__name__}, expected a dict with keys {list(PAIR_FIELDS)}")
    for key in PAIR_FIELDS:
        if key not in pair:
            raise ValueError(f"pair {index} is missing key {key!r}; each pair needs {list(PAIR_FIELDS)}")
        if not isinstance(pair[key], str) or not pair[key].strip():
            raise ValueError(f"pair {index}: {key!r} must be a non-empty string, got {pair[key]!r}")
    return pair


def _checked_triplets(pairs: Iterable[dict], digest: Any) -> Iterator[Triplet]:
    """Validated pairs -> their triplets (two per pair, in order), pulling pairs only as triplets are needed; each
    record also goes into the SHA-256 ``digest``."""
    if isinstance(pairs, (str, bytes, Path, dict)):
        raise ValueError(
            f"pairs must be an iterable of QA pair dicts, got a {type(pairs).__name__}; read a JSONL file with "
            "seka_lightning.data.triplets.read_pairs(path)"
        )
    count = 0
    for index, pair in enumerate(pairs):
        digest.update((json.dumps(check_pair(pair, index), sort_keys=True, ensure_ascii=False) + "\n").encode())
        count += 1
        yield from triplets_from_pair(pair)
    if count == 0:
        raise ValueError(f"pairs is empty; pass at least one QA pair dict with keys {list(PAIR_FIELDS)}")


def _triplet_batches(
    pairs: Iterable[dict], batch_size: int, digest: Any, *, length_window: int | None = None
) -> Iterator[list[Triplet]]:
    """Validated pairs -> batches of ``batch_size`` triplets, as ``seka fit`` batches them (bucketed by length
    within runs of ``length_window`` batches when given, see ``iter_bucketed``)."""
    batch: list[Triplet] = []
    triplets = _checked_triplets(pairs, digest)
    for triplet in iter_bucketed(triplets, batch_size=batch_size, window=length_window):
        batch.append(triplet)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _model_dtype(model: nn.Module) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def build_statistics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Iterable[dict],
    *,
    layers: LayerSpec = "all",
    batch_size: int = 16,
    positive_only: bool = False,
    attention_ratio: float | None = None,
    length_window: int | None = None,
    chat: bool = False,
    pack_tokens: int | None = None,
) -> BankStatistics:
    """Stream synthetic-QA ``pairs`` (dicts with ``context_1/2``, ``question_1/2``, ``answer_1/2``; a generator is
    fine, memory stays one batch) through ``model`` and return the float64 key statistics of SPEC §3.

    ``batch_size`` triplets (two per pair) go through the model per pass; ``positive_only`` and ``attention_ratio``
    are the AdaSEKA expert settings of ``seka fit`` (see ``ProjectionBuilder``); ``length_window`` batches texts of
    similar length together (``seka fit``'s ``--data.length_window``; off by default, see ``iter_bucketed``);
    ``chat`` builds from the texts wrapped as user messages in the tokenizer's chat template (for instruct models);
    ``pack_tokens`` packs each pass's texts into rows of that many tokens instead of one padded row per text
    (``seka fit``'s ``--model.pack_tokens``; causal models; the same statistics with far less padding, up to the
    rounding of other matmul shapes in bf16/fp16).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_length_window(length_window)
    if attention_ratio is not None and not attention_ratio > 0:
        raise ValueError(f"attention_ratio must be > 0 (the reference uses 1.2) or None, got {attention_ratio}")
    if chat:
        check_chat_template(tokenizer, model_id(model))
    layout = resolve_layout(model)
    layer_ids = parse_layers(layers, layout.num_layers)
    device = _input_device(model)
    stats = KeyStatistics(len(layer_ids), layout.num_kv_heads, layout.head_dim).to(device)
    digest = hashlib.sha256()
    kept = skipped = filtered = 0
    for batch in _triplet_batches(pairs, batch_size, digest, length_window=length_window):
        counts = accumulate_triplets(
            stats,
            model,
            tokenizer,
            layout,
            layer_ids,
            batch,
            device=device,
            positive_only=positive_only,
            attention_ratio=attention_ratio,
            chat=chat,
            pack_tokens=pack_tokens,
        )
        kept, skipped, filtered = kept + counts.kept, skipped + counts.skipped, filtered + counts.filtered
    if kept == 0:
        raise no_statistics_error(filtered)
    config = getattr(model, "config", None)
    metadata = {
        "model_id": model_id(model),
        "model_revision": getattr(config, "_commit_hash", None),
        "weights_sha256": weights_hash(source)["sha256"] if (source := getattr(config, "name_or_path", None)) else None,
        "family": layout.family,
        "num_layers": layout.num_layers,
        "feature": "none",
        "triplets_used": kept,
        "triplets_skipped": skipped,
        "negative_text": not positive_only,
        "attention_ratio": attention_ratio,
        "triplets_filtered_attention": filtered,
        "chat": chat,
        "data_fingerprint": digest.hexdigest(),
        "seka_lightning_version": __version__,
        "model_dtype": _model_dtype(model),
        **packing_metadata(pack_tokens),
    }
    sums = KeySums(**{name: value.detach().cpu() for name, value in stats.compute().tensors().items()})
    log.info("collected key statistics of %d triplets (%d skipped) on layers %s", kept, skipped, layer_ids)
    return BankStatistics(sums=sums, layers=layer_ids, head_dim=layout.head_dim, metadata=metadata)


def build_bank(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Iterable[dict],
    *,
    layers: LayerSpec = "all",
    top_pct: float = 0.9,
    min_diff: float = DEFAULT_MIN_DIFF,
    head_filter: str = DEFAULT_HEAD_FILTER,
    batch_size: int = 16,
    positive_only: bool = False,
    attention_ratio: float | None = None,
    length_window: int | None = None,
    chat: bool = False,
    pack_tokens: int | None = None,
) -> ProjectionBank:
    """Build a SEKA bank (an AdaSEKA expert with ``positive_only``) for a loaded ``model`` from QA ``pairs``: the
    bank ``seka fit`` writes for the same data and settings. The statistics stay attached (``bank.statistics``), so
    ``bank.save_pretrained`` writes them too and other ``top_pct``/``min_diff`` can be derived without the model.
    ``chat`` builds from chat-template-wrapped texts and ``pack_tokens`` packs the texts of each pass into rows of
    that many tokens (see :func:`build_statistics`)."""
    validate_hyperparameters(top_pct, min_diff, head_filter)
    statistics = build_statistics(
        model,
        tokenizer,
        pairs,
        layers=layers,
        batch_size=batch_size,
        positive_only=positive_only,
        attention_ratio=attention_ratio,
        length_window=length_window,
        chat=chat,
        pack_tokens=pack_tokens,
    )
    return statistics.to_bank(top_pct=top_pct, min_diff=min_diff, head_filter=head_filter, positive_only=positive_only)
