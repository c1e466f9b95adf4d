"""Which decoder layers a method edits: the layer spec (``all``, ``lastN``, ``firstN``, ids) and its pairing with
the layers a bank or an expert set stores. One module, used by SEKA, its ablations, AdaSEKA and the builder."""

from __future__ import annotations

import re
from collections.abc import Sequence

from seka_lightning.bank import ProjectionBank

LayerSpec = str | Sequence[int]
LAYER_MAPPINGS = ("by_id", "positional")
_SPEC_HELP = "use 'all', 'lastN', 'firstN', or comma-separated layer ids"


def parse_layers(spec: LayerSpec, num_layers: int) -> list[int]:
    """Resolve ``"all"``, ``"lastN"``, ``"firstN"``, ``"3,5,7"`` or a list of ids against ``num_layers`` layers."""
    if not isinstance(spec, str):
        layers = [int(layer) for layer in spec]
    elif spec == "all":
        layers = list(range(num_layers))
    elif match := re.fullmatch(r"(last|first)(\d+)", spec):
        count = int(match.group(2))
        if not 0 < count <= num_layers:
            raise ValueError(f"layers={spec!r}: N must be between 1 and {num_layers} (the model's layer count)")
        layers = list(range(num_layers - count, num_layers)) if match.group(1) == "last" else list(range(count))
    else:
        try:
            layers = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"layers={spec!r} is not understood; {_SPEC_HELP}") from None
    if not layers:
        raise ValueError(f"layers={spec!r} selects no layer")
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"layers={spec!r}: ids {bad} are outside 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers={spec!r} repeats a layer id")
    return layers


def check_layer_spec(spec: LayerSpec) -> None:
    """Raise ``ValueError`` naming ``layers`` when ``spec`` cannot select layers of any model (checked at
    construction; the ids are checked against the model's layer count once it is known)."""
    if isinstance(spec, str):
        if spec == "all" or re.fullmatch(r"(last|first)[1-9]\d*", spec):
            return
        parts = [part.strip() for part in spec.split(",") if part.strip()]
        if parts and all(part.isdigit() for part in parts):
            return
        raise ValueError(f"layers={spec!r} is not understood; {_SPEC_HELP}")
    if not spec or not all(isinstance(layer, int) and layer >= 0 for layer in spec):
        raise ValueError(f"layers={list(spec)!r} must be a non-empty list of non-negative layer ids")


def check_layer_mapping(mapping: str) -> None:
    """Raise ``ValueError`` naming ``layer_mapping`` unless it is one of :data:`LAYER_MAPPINGS`."""
    if mapping not in LAYER_MAPPINGS:
        raise ValueError(f"layer_mapping must be one of {LAYER_MAPPINGS}, got {mapping!r}")


def select_stored_layers(
    stored: Sequence[int], spec: LayerSpec, num_layers: int, mapping: str, *, holder: str
) -> dict[int, int]:
    """Map model layer id -> index into ``stored`` (the layers a bank or an expert set was built on).

    ``by_id`` applies each stored layer's matrices to that same layer (``"all"`` = every stored layer).
    ``positional`` reproduces the reference: the i-th stored layer goes to the i-th selected model layer.
    ``holder`` names what stores them in errors (``bank``, ``expert set``).
    """
    check_layer_mapping(mapping)
    if mapping == "positional":
        selected = parse_layers(spec, num_layers)
        if len(selected) > len(stored):
            raise ValueError(
                f"layer_mapping='positional' pairs {len(selected)} selected layers with only {len(stored)} "
                f"stored matrices; select at most as many layers as the {holder} holds"
            )
        return {layer: i for i, layer in enumerate(selected)}
    selected = list(stored) if spec == "all" else parse_layers(spec, num_layers)
    index = {layer: i for i, layer in enumerate(stored)}
    missing = [layer for layer in selected if layer not in index]
    if missing:
        raise ValueError(
            f"layers {missing} are not in the {holder} (it covers {list(stored)}); choose layers the {holder} has, "
            f"build a {holder} on those layers, or use layer_mapping='positional' for the reference's pairing"
        )
    return {layer: index[layer] for layer in selected}


def select_bank_layers(bank: ProjectionBank, spec: LayerSpec, num_layers: int, mapping: str) -> dict[int, int]:
    """Map model layer id -> index into the bank's stacks (:func:`select_stored_layers` on ``bank.layers``)."""
    return select_stored_layers(bank.layers, spec, num_layers, mapping, holder="bank")
