"""ProjectionBank: the per-layer, per-KV-head key projectors a model is steered with.

Own format: one safetensors file with the tensors and a JSON metadata header (model id, layer ids, head dim,
KV heads, hyper-parameters, head filter, N, data fingerprint, SHA-256 of its statistics). ``seka fit`` writes the
key statistics beside it (``X.stats.safetensors``). The authors' released ``.pt`` files load too:
``{"layers", "proj"}`` per positive/negative file and ``{"layers", "U_matrices", "singular_values"}`` SVD files.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seka_lightning import pretrained
from seka_lightning.files import BANK, check_output, file_sha256
from seka_lightning.projections import (
    DEFAULT_HEAD_FILTER,
    DEFAULT_MIN_DIFF,
    Projections,
    projections_from_sums,
    top_rank,
    validate_hyperparameters,
)
from seka_lightning.stats import KeySums, atomic_save_safetensors, load_safetensors

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BANK_TENSORS = ("pos", "neg", "u_pos", "s_pos", "u_neg", "s_neg", "diff")
_warned_models: set[tuple[str, str]] = set()


def stats_path_for(bank_path: str | Path) -> Path:
    """Where the sufficient statistics live beside a bank: ``bank.safetensors`` -> ``bank.stats.safetensors``."""
    path = Path(bank_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".stats.safetensors")


@dataclass
class ProjectionBank:
    """Projectors for the decoder layers ``layers`` (ids): ``pos``/``neg`` are ``[n_layers, n_kv, d, d]``.

    ``u_pos``/``s_pos`` (and ``u_neg``/``s_neg``) hold the SVD factors where known (AdaSEKA routes with them);
    ``diff`` ``[n_layers, n_kv]`` is the head-filter value; ``metadata`` says how the bank was made;
    ``statistics`` holds the key sums it was derived from where known (``build_bank``, ``from_pretrained``).
    """

    layers: list[int]
    pos: torch.Tensor
    neg: torch.Tensor | None = None
    u_pos: torch.Tensor | None = None
    s_pos: torch.Tensor | None = None
    u_neg: torch.Tensor | None = None
    s_neg: torch.Tensor | None = None
    diff: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    statistics: KeySums | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.layers = [int(layer) for layer in self.layers]
        if self.pos.ndim != 4 or self.pos.shape[-1] != self.pos.shape[-2]:
            raise ValueError(f"pos must be [n_layers, n_kv, d, d], got shape {tuple(self.pos.shape)}")
        if len(self.layers) != self.pos.shape[0]:
            raise ValueError(
                f"bank lists {len(self.layers)} layer ids but holds {self.pos.shape[0]} layers of projectors"
            )
        if len(set(self.layers)) != len(self.layers) or any(layer < 0 for layer in self.layers):
            raise ValueError(f"bank layer ids must be distinct and non-negative, got {self.layers}")
        if self.neg is not None and self.neg.shape != self.pos.shape:
            raise ValueError(f"neg shape {tuple(self.neg.shape)} differs from pos shape {tuple(self.pos.shape)}")
        for name in ("pos", "neg"):
            tensor = getattr(self, name)
            if tensor is not None and not torch.isfinite(tensor).all():
                raise ValueError(f"bank tensor {name!r} holds NaN or inf; the bank is corrupt, rebuild it")

    @property
    def num_kv_heads(self) -> int:
        return int(self.pos.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.pos.shape[-1])

    @classmethod
    def from_projections(
        cls, layers: list[int], projections: Projections, *, metadata: dict[str, Any]
    ) -> ProjectionBank:
        return cls(
            layers=list(layers),
            pos=projections.pos,
            neg=projections.neg,
            u_pos=projections.u_pos,
            s_pos=projections.s_pos,
            u_neg=projections.u_neg,
            s_neg=projections.s_neg,
            diff=projections.diff,
            metadata=metadata,
        )

    @classmethod
    def from_statistics(
        cls,
        sums: KeySums,
        *,
        layers: list[int],
        top_pct: float = 0.9,
        min_diff: float = DEFAULT_MIN_DIFF,
        head_filter: str = DEFAULT_HEAD_FILTER,
        positive_only: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> ProjectionBank:
        """Derive a bank from saved :class:`KeySums` (seconds, no model): the cheap path for hyper-parameter search.

        ``head_filter`` says how ``min_diff`` is measured (see :func:`~seka_lightning.projections.head_filter_values`:
        ``"relative"`` by default, ``"reference"`` for the reference's ``sqrt(D) / N``); a ``min_diff`` that keeps
        no head raises ``ValueError`` naming the largest head value.
        """
        projections = projections_from_sums(
            sums,
            top_pct=top_pct,
            min_diff=min_diff,
            head_filter=head_filter,
            positive_only=positive_only,
            skipped_fill=float("nan") if positive_only else 0.0,
        )
        meta = dict(metadata or {})
        meta.update(
            top_pct=top_pct,
            min_diff=min_diff,
            head_filter=head_filter,
            positive_only=positive_only,
            num_rows=int(sums.count.item()),
            heads_kept=int(projections.kept.sum().item()),
            heads_total=int(projections.kept.numel()),
        )
        if positive_only:  # routing reads U's signs: an expert built before this convention has none recorded
            meta["u_signs"] = "canonical: largest-magnitude entry positive"
        return cls.from_projections(layers, projections, metadata=meta)

    def save(self, path: str | Path) -> Path:
        """Write the bank as one safetensors file with JSON metadata (atomically)."""
        path = Path(path)
        tensors = {
            name: getattr(self, name).detach().cpu().contiguous()
            for name in BANK_TENSORS
            if getattr(self, name) is not None
        }
        metadata = {
            **self.metadata,
            "format": "seka-lightning-bank",
            "format_version": FORMAT_VERSION,
            "layers": self.layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "nan_allowed": bool(self.metadata.get("positive_only", False)),
        }
        atomic_save_safetensors(tensors, path, metadata=metadata)
        return path

    def save_with_statistics(self, path: str | Path, sums: KeySums, *, statistics_metadata: dict[str, Any]) -> Path:
        """Write the statistics (``stats_path_for(path)``), then the bank recording their SHA-256, each atomically.

        A bank and its statistics are one unit, but two files cannot be renamed at once. Rather than one folder
        (which every tool that takes a bank file would have to learn), the bank records the digest of the statistics
        it was derived from, and :meth:`load` checks it against the statistics beside it. The statistics, which cost
        the model's time, go first: a kill after them loses only the derivation (``seka derive`` redoes it in
        seconds), and a kill between the two renames leaves the old bank beside the new statistics, which
        :meth:`load` then refuses with an error naming both files, instead of steering with a stale bank.
        """
        stats_path = stats_path_for(path)
        sums.save(stats_path, metadata=statistics_metadata)
        self.metadata["statistics_sha256"] = file_sha256(stats_path)
        return self.save(path)

    @classmethod
    def load(cls, path: str | Path, neg: str | Path | None = None, *, top_pct: float = 0.9) -> ProjectionBank:
        """Load a bank: the own format (one ``.safetensors`` file), or a reference positive ``.pt`` plus its
        optional negative ``.pt``, or a reference SVD ``.pt`` (projectors rebuilt with ``top_pct``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"projection bank {path} does not exist; build one with `seka fit`")
        if path.suffix == ".safetensors":
            if neg is not None:
                raise ValueError(
                    f"{path} already holds its negative projectors; pass neg only with reference .pt files"
                )
            return cls._load_own(path)
        if path.suffix in (".pt", ".pth", ".bin"):
            return cls._load_reference(path, None if neg is None else Path(neg), top_pct=top_pct)
        raise ValueError(f"unknown bank file type {path.suffix!r} for {path}; expected .safetensors or a reference .pt")

    @classmethod
    def _load_own(cls, path: Path) -> ProjectionBank:
        tensors, metadata = load_safetensors(path)
        if metadata.get("format") != "seka-lightning-bank" or "pos" not in tensors:
            raise ValueError(
                f"{path} is a safetensors file but not a seka-lightning bank (no 'pos' tensor or format tag)"
            )
        unknown = sorted(set(tensors) - set(BANK_TENSORS))
        if unknown:
            raise ValueError(
                f"{path} holds tensors {unknown} that a bank does not have; the file is corrupt, rebuild it"
            )
        for name, tensor in tensors.items():
            _require_float(tensor, path, name)
            if torch.isinf(tensor).any():
                raise ValueError(f"{path}: tensor {name!r} holds inf; the bank is corrupt, rebuild it")
        _check_statistics_pair(path, metadata)
        layers = metadata.pop("layers")
        for key in ("format", "format_version", "num_kv_heads", "head_dim", "nan_allowed"):
            metadata.pop(key, None)
        return cls(layers=layers, metadata=metadata, **{k: v.to(torch.float32) for k, v in tensors.items()})

    @classmethod
    def _load_reference(cls, path: Path, neg: Path | None, *, top_pct: float) -> ProjectionBank:
        obj = _torch_load(path)
        if "U_matrices" in obj:
            if neg is not None:
                raise ValueError(f"{path} is an SVD file; reference SVD files carry no negative projectors")
            u = _reference_tensor(obj, path, "U_matrices")
            s = _reference_tensor(obj, path, "singular_values")
            if torch.isinf(u).any() or torch.isinf(s).any():
                raise ValueError(
                    f"{path}: 'U_matrices' or 'singular_values' holds inf; the file is corrupt, re-export it"
                )
            if u.ndim != 4 or s.shape != u.shape[:-1]:
                raise ValueError(
                    f"{path}: U_matrices {tuple(u.shape)} / singular_values {tuple(s.shape)} are not [L, H, d, d] / [L, H, d]"
                )
            # Skipped heads hold zeros (SEKA) or NaN (AdaSEKA experts); both steer nothing.
            valid = torch.isfinite(s).all(-1) & (s.sum(-1) > 0)
            safe_s = torch.where(valid[..., None], s, torch.ones_like(s))
            k = top_rank(safe_s, top_pct)
            keep = torch.arange(u.shape[-1]) < k[..., None]
            u_kept = torch.where(valid[..., None, None], u, torch.zeros_like(u)) * keep[..., None, :]
            pos = u_kept @ u_kept.transpose(-1, -2)
            layers = _reference_layers(obj, path, pos.shape[0])
            meta = {"source": str(path), "source_format": "reference-svd", "top_pct": top_pct}
            return cls(layers=layers, pos=pos, u_pos=u, s_pos=s, metadata=meta)
        pos = _reference_proj(obj, path)
        layers = _reference_layers(obj, path, pos.shape[0])
        neg_proj = None
        if neg is not None:
            neg_obj = _torch_load(neg)
            neg_proj = _reference_proj(neg_obj, neg)
            neg_layers = _reference_layers(neg_obj, neg, neg_proj.shape[0])
            if neg_layers != layers:
                raise ValueError(f"{neg} covers layers {neg_layers} but {path} covers {layers}; pass a matching pair")
        meta = {
            "source": str(path),
            "source_neg": None if neg is None else str(neg),
            "source_format": "reference-proj",
        }
        return cls(layers=layers, pos=pos, neg=neg_proj, metadata=meta)

    def check_compatible(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        model_id: str = "the model",
        strict: bool = False,
    ) -> None:
        """Raise ``ValueError`` if this bank cannot steer a model of the given shape.

        A bank built for another model of the same shape steers with that model's key directions: a warning
        naming both models (once per pair), or a ``ValueError`` with ``strict=True``.
        """
        problems = []
        if self.num_kv_heads != num_kv_heads:
            problems.append(f"{self.num_kv_heads} KV heads in the bank vs {num_kv_heads} in the model")
        if self.head_dim != head_dim:
            problems.append(f"head dim {self.head_dim} in the bank vs {head_dim} in the model")
        built_for = self.metadata.get("num_layers")
        if built_for is not None and int(built_for) != num_layers:
            problems.append(f"built for a {built_for}-layer model, {model_id} has {num_layers} layers")
        out_of_range = [layer for layer in self.layers if layer >= num_layers]
        if out_of_range:
            problems.append(f"layer ids {out_of_range} do not exist in a {num_layers}-layer model")
        if problems:
            source = self.metadata.get("model_id", "another model")
            raise ValueError(
                f"projection bank (built for {source}) does not fit {model_id}: "
                + "; ".join(problems)
                + ". Build a bank for this model with `seka fit`."
            )
        built_by = self.metadata.get("model_id")
        if built_by is None or model_id == "the model" or _same_model(str(built_by), model_id):
            return
        message = (
            f"projection bank built for {built_by} is used with {model_id}: the shapes match, but its projectors "
            f"describe the other model's keys; build a bank for {model_id} with `seka fit`"
        )
        if strict:
            raise ValueError(message)
        if (str(built_by), model_id) not in _warned_models:
            _warned_models.add((str(built_by), model_id))
            log.warning(message)

    def __repr__(self) -> str:
        return pretrained.bank_repr(self)

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write a shareable folder: ``bank.safetensors``, ``bank.stats.safetensors`` (when the statistics are
        attached) and a ``README.md`` model card, atomically; a non-empty ``directory`` needs ``overwrite=True``."""
        return pretrained.save_pretrained(self, directory, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, revision: str | None = None) -> ProjectionBank:
        """Load a folder written by :meth:`save_pretrained` (statistics attached when present), or a hub repo id
        (needs ``huggingface_hub``)."""
        return pretrained.load_pretrained(cls, name_or_path, revision=revision)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload SEKA projection bank",
    ) -> str:
        """Upload the :meth:`save_pretrained` folder to the Hugging Face Hub repo ``repo_id`` (needs
        ``huggingface_hub``); returns the commit URL."""
        return pretrained.push_to_hub(
            self, repo_id, private=private, token=token, revision=revision, commit_message=commit_message
        )


def _same_model(a: str, b: str) -> bool:
    """Whether two model ids name one model: equal, the same last path part (a hub id and its local copy), or an
    ``embedded:NAME`` id and its cache folder ``NAME-<16 hex digits>``."""
    ka, kb = (Path(x.removeprefix("embedded:")).name.lower() for x in (a, b))
    return ka == kb or any(re.fullmatch(rf"{re.escape(y)}-[0-9a-f]{{16}}", x) for x, y in ((ka, kb), (kb, ka)))


def _require_float(tensor: Any, path: Path, key: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(
            f"{path}: {key!r} is a {type(tensor).__name__}, expected a floating-point tensor; re-export the bank"
        )
    if not tensor.is_floating_point():
        raise ValueError(
            f"{path}: {key!r} holds {tensor.dtype} values, expected floating point; the file is corrupt or not a "
            "bank: rebuild or re-export it"
        )


def _reference_tensor(obj: dict[str, Any], path: Path, key: str) -> torch.Tensor:
    if key not in obj:
        raise ValueError(f"{path} has keys {sorted(obj)}; a reference SVD file needs {key!r}")
    _require_float(obj[key], path, key)
    return obj[key].to(torch.float32)


def _check_statistics_pair(path: Path, metadata: dict[str, Any]) -> None:
    """Raise if the statistics beside the bank are not the ones it records (see :meth:`ProjectionBank.save_with_statistics`)."""
    recorded = metadata.get("statistics_sha256")
    stats_path = stats_path_for(path)
    if recorded is None or not stats_path.is_file() or file_sha256(stats_path) == recorded:
        return
    raise ValueError(
        f"{path} and {stats_path} are not one pair: the bank was derived from other statistics (a build was "
        f"interrupted between writing the two, or one was replaced); re-derive the bank with `seka derive --stats "
        f"{stats_path} --output {path} --overwrite`"
    )


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path} could not be read as a torch file ({err}); the file is corrupt or not a bank"
        ) from err
    if isinstance(obj, torch.Tensor):
        obj = {"proj": obj}
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a dict with 'proj' or 'U_matrices'")
    return obj


def _reference_proj(obj: dict[str, Any], path: Path) -> torch.Tensor:
    if "proj" not in obj:
        raise ValueError(f"{path} has keys {sorted(obj)}; a reference projection file needs 'proj' (and 'layers')")
    _require_float(obj["proj"], path, "proj")
    if torch.isinf(obj["proj"]).any():
        raise ValueError(f"{path}: 'proj' holds inf; the file is corrupt, re-export it")
    proj = obj["proj"].to(torch.float32)
    # The reference accepts (d, d), (L, d, d) and (L, H, d, d); normalise to 4-D as it does.
    if proj.ndim == 2:
        proj = proj[None, None]
    elif proj.ndim == 3:
        proj = proj[:, None]
    elif proj.ndim != 4:
        raise ValueError(f"{path}: 'proj' has {proj.ndim} dims, expected 2, 3 or 4")
    return proj


def _reference_layers(obj: dict[str, Any], path: Path, count: int) -> list[int]:
    layers = obj.get("layers")
    if layers is None:
        raise ValueError(
            f"{path} has no 'layers' entry; a reference bank file lists the layer id of each projector: add them"
        )
    if isinstance(layers, torch.Tensor):
        if layers.is_floating_point() or layers.is_complex() or layers.dtype == torch.bool or layers.ndim != 1:
            raise ValueError(
                f"{path}: 'layers' is a {layers.dtype} tensor of shape {tuple(layers.shape)}, expected 1-D integer "
                "ids; save the layer ids as a list of ints"
            )
        layers = layers.tolist()
    if not isinstance(layers, list | tuple) or not all(type(layer) is int for layer in layers):
        raise ValueError(f"{path}: 'layers' must be a list of integer layer ids, got {layers!r}; save them as ints")
    if len(layers) != count:
        raise ValueError(f"{path}: 'layers' lists {len(layers)} ids but 'proj' holds {count} layers")
    return layers


def derive_bank(
    *,
    stats: str,
    output: str,
    top_pct: float = 0.9,
    min_diff: float = DEFAULT_MIN_DIFF,
    head_filter: str = DEFAULT_HEAD_FILTER,
    positive_only: bool = False,
    overwrite: bool = False,
) -> str:
    """Derive a bank for other hyper-parameters from saved key statistics, in seconds and without the model.

    Args:
        stats: a ``*.stats.safetensors`` file written beside a bank by ``seka fit``.
        output: the new bank file (``.safetensors``); never ``stats`` itself or a file of another kind.
        top_pct: fraction of the singular spectrum kept by P+, in (0, 1].
        min_diff: heads whose head-filter value is below this are skipped; one that skips every head is an error.
        head_filter: ``relative`` (default: ``sqrt(D / trace(A0))``, the RMS distance between positive and negative
            keys relative to the RMS key norm, independent of N) or ``reference`` (the reference's ``sqrt(D) / N``).
        positive_only: derive an AdaSEKA expert bank (``||h+ - h||`` filter, NaN for skipped heads).
        overwrite: replace an existing bank at ``output``.
    """
    if not output.endswith(".safetensors"):
        raise ValueError(f"output must end with .safetensors, got {output!r}")
    validate_hyperparameters(top_pct, min_diff, head_filter)
    check_output(output, kind=BANK, inputs={"--stats": stats}, overwrite=overwrite)
    beside = stats_path_for(output)
    if beside.exists() and not (Path(stats).exists() and beside.samefile(stats)):
        raise ValueError(
            f"{output} would sit beside {beside}, statistics it was not derived from, and then fail to load; "
            "choose another output path"
        )
    sums, metadata = KeySums.load(stats)
    layers = metadata.pop("layers", None)
    if layers is None:
        raise ValueError(f"{stats} has no layer ids in its metadata; it was not written by `seka fit`")
    metadata.pop("head_dim", None)
    for key in ("top_pct", "min_diff", "head_filter", "positive_only", "num_rows", "heads_kept", "heads_total"):
        metadata.pop(key, None)
    metadata["statistics_sha256"] = file_sha256(stats)
    bank = ProjectionBank.from_statistics(
        sums,
        layers=layers,
        top_pct=top_pct,
        min_diff=min_diff,
        head_filter=head_filter,
        positive_only=positive_only,
        metadata=metadata,
    )
    bank.save(output)
    log.info(
        "derived %s from %s: %d/%d heads kept (top_pct=%s, min_diff=%s, head_filter=%s)",
        output,
        stats,
        bank.metadata["heads_kept"],
        bank.metadata["heads_total"],
        top_pct,
        min_diff,
        head_filter,
    )
    return output
