"""AdaSEKA routing math (SPEC §5), plain torch: expert factors, routing coefficients, the mixed projector.

Per layer and KV head, with ``q̂`` the unit query of the last prompt token (mean over the query heads that share
the KV head), each expert ``m`` scores ``c_m = Σ_{j<k} (q̂ · U_m[:, j]) S_m[j]``; experts whose head was skipped
(NaN U) are left out; ``c /= max_m |c_m|`` (uniform ``1/M`` when that is not finite); the key edit uses
``P = Σ_m c_m U_m[:, :k] U_m[:, :k]ᵀ``. Every function works on a batch of rows at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from seka_lightning.bank import ProjectionBank

log = logging.getLogger(__name__)

_EPS = 1e-8  # the reference's guard in q / (||q|| + eps) and c / (max|c| + eps), kept for its compat mode


def read_expert_config(path: str | Path) -> dict[str, str]:
    """An ``{expert: bank path}`` mapping from a YAML or JSON file (the authors' adaptive-seka-config format).

    A YAML file may also nest the mapping under ``experts:``. Relative bank paths are taken from the working
    directory when they exist there (as the reference does), else from the config file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expert config {path} does not exist; pass a YAML/JSON {{expert: bank path}} file")
    text = path.read_text(encoding="utf-8")
    try:
        loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({err})") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("experts"), dict):
        loaded = loaded["experts"]
    if not isinstance(loaded, dict) or not loaded:
        raise ValueError(
            f"{path} must hold a non-empty mapping {{expert name: bank path}}, got {type(loaded).__name__}"
        )
    experts = {}
    for name, bank in loaded.items():
        if not isinstance(name, str) or not isinstance(bank, str) or not bank.strip():
            raise ValueError(f"{path}: expert {name!r} must map a name to a bank path string, got {bank!r}")
        bank_path = Path(bank)
        if not bank_path.is_absolute() and not bank_path.exists() and (path.parent / bank_path).exists():
            bank_path = path.parent / bank_path
        experts[name] = str(bank_path)
    return experts


def resolve_experts(experts: Mapping[str, str] | str) -> dict[str, str]:
    """``experts`` as a name -> bank path dict: given directly, or read from a YAML/JSON file."""
    if isinstance(experts, str):
        return read_expert_config(experts)
    if not experts:
        raise ValueError("experts is empty; name at least one expert bank ({name: path})")
    return {str(name): str(bank) for name, bank in experts.items()}


def expert_svd(bank: ProjectionBank) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, S)`` of a bank, ``[n_layers, H, d, d]`` and ``[n_layers, H, d]`` float32.

    Expert banks store them (NaN for skipped heads). A bank with projectors only is decomposed, as the reference
    does for ``proj`` files; its skipped (all-zero) heads get NaN so they are left out like an expert's.
    """
    if bank.u_pos is not None and bank.s_pos is not None:
        return bank.u_pos.to(torch.float32), bank.s_pos.to(torch.float32)
    pos = bank.pos.to(torch.float32)
    u, s, _ = torch.linalg.svd(pos)
    zero = (pos.flatten(-2).abs().sum(-1) == 0)[..., None]
    return torch.where(zero[..., None], torch.nan, u), torch.where(zero, torch.nan, s)


@dataclass(frozen=True)
class LayerExperts:
    """The experts of one decoder layer, truncated to the top ``k`` singular directions.

    ``weighted`` ``[M, H, d]`` is ``Σ_{j<k} U_m[:, j] S_m[j]`` (zero for left-out experts), so ``c = q̂ · weighted``;
    ``bases`` ``[H, d, M, k]`` holds ``U_m[:, :k]`` (zero for left-out experts), so that a key's edit
    ``k P = Σ_m c_m (k U_m) U_mᵀ`` is two skinny matmuls (:meth:`edit`); ``valid`` ``[M, H]``.
    """

    weighted: torch.Tensor
    bases: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_factors(cls, u: torch.Tensor, s: torch.Tensor, *, top_k: int) -> LayerExperts:
        """From ``u`` ``[M, H, d, d]`` and ``s`` ``[M, H, d]`` (NaN marks a skipped head)."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, u.shape[-1])
        valid = torch.isfinite(u).flatten(-2).all(-1) & torch.isfinite(s).all(-1)  # [M, H]
        u_k = torch.where(valid[..., None, None], u[..., :k], torch.zeros_like(u[..., :k]))  # [M, H, d, k]
        s_k = torch.where(valid[..., None], s[..., :k], torch.zeros_like(s[..., :k]))  # [M, H, k]
        return cls(weighted=torch.einsum("mhdk,mhk->mhd", u_k, s_k), bases=u_k.permute(1, 2, 0, 3), valid=valid)

    def to(self, device: torch.device) -> LayerExperts:
        return LayerExperts(self.weighted.to(device), self.bases.to(device), self.valid.to(device))

    @property
    def num_experts(self) -> int:
        return int(self.valid.shape[0])

    def coefficients(self, queries: torch.Tensor, *, reference: bool = False) -> torch.Tensor:
        """Routing coefficients ``[B, H, M]`` for per-KV-head queries ``[B, H, d]`` (float32 at least).

        ``reference=True`` reproduces the authors' arithmetic: epsilons in both normalisations, and a head where
        any expert is left out falls back to uniform ``1/M`` for every expert (their ``-inf`` score turns the
        normalised vector into NaN, which triggers the fallback).
        """
        q = queries.to(torch.promote_types(queries.dtype, torch.float32))
        norm = q.norm(dim=-1, keepdim=True)
        q_hat = q / (norm + _EPS) if reference else q / norm
        raw = torch.einsum("bhd,mhd->bhm", q_hat, self.weighted.to(q.dtype))
        valid = self.valid.transpose(0, 1)[None]  # [1, H, M]
        scale = torch.where(valid, raw.abs(), torch.zeros_like(raw)).amax(-1, keepdim=True)
        coefficients = raw / (scale + _EPS) if reference else raw / scale
        ok = torch.isfinite(coefficients).all(-1, keepdim=True)
        if reference:
            ok = ok & valid.all(-1, keepdim=True)
        uniform = torch.full_like(coefficients, 1.0 / self.num_experts)
        coefficients = torch.where(ok, coefficients, uniform)
        return torch.where(valid, coefficients, torch.zeros_like(coefficients)) if not reference else coefficients

    def projection(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``P = Σ_m c_m U_m[:, :k] U_m[:, :k]ᵀ`` per row and head: ``[B, H, d, d]`` (left-out experts add 0)."""
        bases = self.bases.to(coefficients.dtype)
        return torch.einsum("hdmk,bhm,hemk->bhde", bases, coefficients, bases)

    def edit(self, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``k P`` for keys ``[R, H, d]`` whose rows carry their own coefficients ``weights`` ``[R, H, M]``:
        ``Σ_m c_m (k U_m) U_mᵀ``, the same as ``k @ projection(c)`` without forming the ``d x d`` projector."""
        bases = self.bases.to(keys.dtype)
        scores = torch.einsum("rhd,hdmk->rhmk", keys, bases) * weights[..., None]  # [R, H, M, k]
        return torch.einsum("rhmk,hdmk->rhd", scores, bases)


@dataclass(frozen=True)
class ExpertSet:
    """Named expert banks aligned by model layer id: ``factors[layer] = (U [M, H, d, d], S [M, H, d])``."""

    names: tuple[str, ...]
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]]
    num_kv_heads: int
    head_dim: int

    @classmethod
    def load(cls, experts: Mapping[str, str] | str) -> ExpertSet:
        """Load every bank of ``experts`` (name -> path, or a YAML/JSON mapping file); they must cover the same
        layers with the same head geometry."""
        paths = resolve_experts(experts)
        return cls.from_banks({name: ProjectionBank.load(path) for name, path in paths.items()})

    @classmethod
    def from_banks(cls, banks: Mapping[str, ProjectionBank]) -> ExpertSet:
        if not banks:
            raise ValueError("no expert banks given; AdaSEKA needs at least one")
        names = tuple(banks)
        first = banks[names[0]]
        for name in names[1:]:
            bank = banks[name]
            if bank.layers != first.layers or bank.pos.shape != first.pos.shape:
                raise ValueError(
                    f"expert {name!r} covers layers {bank.layers} with shape {tuple(bank.pos.shape)} but expert "
                    f"{names[0]!r} covers {first.layers} with {tuple(first.pos.shape)}; build all experts for the "
                    "same model and layers"
                )
        svd = [expert_svd(banks[name]) for name in names]
        factors = {
            layer: (torch.stack([u[i] for u, _ in svd]), torch.stack([s[i] for _, s in svd]))
            for i, layer in enumerate(first.layers)
        }
        return cls(names=names, factors=factors, num_kv_heads=first.num_kv_heads, head_dim=first.head_dim)

    @property
    def layers(self) -> list[int]:
        return list(self.factors)

    def layer(self, layer_id: int, *, top_k: int) -> LayerExperts:
        u, s = self.factors[layer_id]
        return LayerExperts.from_factors(u, s, top_k=top_k)


def kv_head_queries(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Mean of the query heads sharing each KV head (GQA): ``[..., n_q, d] -> [..., n_kv, d]``.

    Query head ``i`` reads KV head ``i // (n_q / n_kv)``, as ``repeat_kv`` in transformers lays them out.
    """
    num_q = queries.shape[-2]
    if num_q % num_kv_heads:
        raise ValueError(f"{num_q} query heads do not split into {num_kv_heads} KV heads")
    return queries.unflatten(-2, (num_kv_heads, num_q // num_kv_heads)).mean(-2)


def coefficient_entropy(coefficients: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of ``|c| / Σ|c|`` over experts, ``[...]``: 0 when one expert takes all, ``log M`` when even."""
    weights = coefficients.abs()
    p = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)
