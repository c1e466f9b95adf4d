"""PASTA (Zhang et al., "Tell Your Model Where to Attend", ICLR 2024): attention steering on chosen heads (SPEC §6).

For each chosen (layer, query head) pair, PASTA adds ``log(alpha)`` to the attention logits from every query to every
non-highlighted *prompt* key ("exclude" mode), which multiplies their post-softmax weights by ``alpha`` before
renormalisation. "include" mode instead adds ``-log(alpha)`` to the highlighted keys. Keys of generated tokens carry
no bias in either mode, and padding keys stay masked.

The bias needs the attention logits, so it lives in an attention function registered with transformers' attention
interface under :data:`PASTA_ATTENTION`: plain SDPA with an additive ``[B, H, 1, Tk]`` bias on the layers that have
one (other layers: plain SDPA), with the same masks transformers builds for ``"sdpa"`` (sliding windows included).
:func:`attention_bias` switches a model to it for one block and always switches back.

On CUDA in float32 the biased calls do not go through SDPA but through :func:`math_attention`, the same
``softmax(q k^T s + mask + bias) v`` written out. For a float bias in float32, SDPA's only fused CUDA kernel is the
memory-efficient one, and it faulted with an illegal memory access (in the SDPA call, under ``CUDA_LAUNCH_BLOCKING=1``)
at the same batch of two runs of Gemma-3-270M's lost-in-the-middle slice 0:300 (float32, head_dim 256, 8 prompts of
about 3,700 tokens; torch 2.11.0+cu130 on an H200). Written out, the call holds the scores and the probabilities,
each ``[B, H, Tq, Tk]`` in float32, beside the bias mask of that size which transformers builds for SDPA anyway.
SDPA's own math backend would do the same, but selecting it (``torch.nn.attention.sdpa_kernel``) flips process-wide
flags, which would reach the other threads that PASTA lets run the model unsteered. Elsewhere (CPU, half precision)
the biased calls stay on SDPA.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface, PreTrainedTokenizerBase
from transformers.integrations.sdpa_attention import create_position_bias_mask, repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from seka_lightning.families import attention_configs, resolve_layout
from seka_lightning.methods import Encoded, HighlightMethod
from seka_lightning.steering import ModelClaim, claim_model

PASTA_ATTENTION = "pasta_sdpa"
"""Name of the attention implementation (contains ``sdpa`` so transformers checks the model supports SDPA)."""

SCALE_POSITIONS = ("exclude", "include")

HeadSet = dict[int, list[int]]


class _LayerBias:
    """One layer's additive bias on the prompt keys, ``[B, H, P]``, and where the layer's keys start.

    The keys an attention call sees are the most recent ``Tk`` positions ending at the current query (dynamic caches,
    full or sliding-window, and cache-less passes), so tracking how many positions the layer has processed maps key
    index ``j`` to absolute position ``end - Tk + j``; positions ``>= P`` are generated tokens and get no bias.
    """

    def __init__(self, prompt_bias: torch.Tensor, claim: ModelClaim) -> None:
        self.prompt_bias = prompt_bias  # [B, H, P]
        self.claim = claim  # only its thread's attention calls get the bias
        self.end = 0

    def bias(self, query_len: int, key_len: int, batch: int) -> torch.Tensor | None:
        """The ``[B, H, 1, Tk]`` bias for this call, or None when no prompt key is in view."""
        rows, _, prompt_len = self.prompt_bias.shape
        if batch != rows:
            raise ValueError(
                f"PASTA got a batch of {batch} rows but the highlight mask has {rows}; beam search and "
                "num_return_sequences > 1 expand the batch, run PASTA with greedy single-sequence decoding"
            )
        if query_len == key_len:  # no cached keys: a fresh pass over the whole sequence
            if key_len != prompt_len:
                raise ValueError(
                    f"the model sees {key_len} tokens but the highlight mask has {prompt_len}; pass the "
                    "highlight mask encoded with these input_ids"
                )
            self.end = key_len
        else:
            self.end += query_len
        start = max(self.end - key_len, 0)  # a static cache holds all positions from 0
        if start >= prompt_len:
            return None
        window = self.prompt_bias[..., start : min(prompt_len, start + key_len)]
        return F.pad(window, (0, key_len - window.shape[-1])).unsqueeze(2)


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, _LayerBias] = weakref.WeakKeyDictionary()


def pasta_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """SDPA with the PASTA bias of ``module``'s layer added to the logits (plain SDPA where the layer has none, and
    in threads other than the one that started the block)."""
    state = _ACTIVE.get(module)
    if state is not None and not state.claim.here():
        state = None
    bias = None if state is None else state.bias(query.shape[2], key.shape[2], query.shape[0])
    if bias is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bias = bias.to(device=query.device, dtype=query.dtype)
    if avoids_sdpa(query):
        return math_attention(module, query, key, value, attention_mask, bias, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, position_bias=bias, **kwargs)


def avoids_sdpa(query: torch.Tensor) -> bool:
    """Whether a biased call runs :func:`math_attention` rather than SDPA: float32 on CUDA (the module docstring)."""
    return query.device.type == "cuda" and query.dtype == torch.float32


def math_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    bias: torch.Tensor,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """``softmax(q k^T s + mask + bias) v`` with plain matmuls (the softmax in float32 at least), the mask and the
    bias combined as transformers' SDPA path combines them (:func:`create_position_bias_mask`); returns
    ``[B, Tq, H, d]`` as the attention interface's functions do. Inference only: no dropout, no soft-capping."""
    if kwargs.get("softcap") is not None or dropout:
        raise ValueError(
            f"PASTA's attention takes neither soft-capping nor dropout (got softcap={kwargs.get('softcap')}, "
            f"dropout={dropout}); run the model in eval mode, with a family that does not soft-cap its logits"
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = (
        query.shape[2] > 1
        and attention_mask is None
        and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    )
    mask = create_position_bias_mask(bias, attention_mask, causal, query, key)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale + mask
    probs = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register :func:`pasta_attention_forward` and SDPA's mask builder under :data:`PASTA_ATTENTION` (idempotent)."""
    AttentionInterface.register(PASTA_ATTENTION, pasta_attention_forward)
    AttentionMaskInterface.register(PASTA_ATTENTION, sdpa_mask)


def key_bias(
    highlight_mask: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    alpha: float,
    scale_position: str = "exclude",
) -> torch.Tensor:
    """Additive logit bias per key, ``[B, T]`` float64: ``log(alpha)`` on non-highlighted prompt keys ("exclude"), or
    ``-log(alpha)`` on highlighted ones ("include"); 0 elsewhere (keys outside ``prompt_mask``, e.g. an answer)."""
    _check_alpha(alpha)
    if scale_position not in SCALE_POSITIONS:
        raise ValueError(f"scale_position must be one of {SCALE_POSITIONS}, got {scale_position!r}")
    highlight, prompt = highlight_mask.bool(), prompt_mask.bool()
    # float64 so a float64 model sees log(alpha) exactly; each call casts to the model's dtype.
    log_alpha = torch.tensor(math.log(alpha), dtype=torch.float64, device=highlight.device)
    zero = torch.zeros((), dtype=torch.float64, device=highlight.device)
    if scale_position == "exclude":
        return torch.where(prompt & ~highlight, log_alpha, zero)
    return torch.where(prompt & highlight, -log_alpha, zero)


@contextmanager
def attention_bias(model: nn.Module, biases: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Run ``model`` with an additive bias ``biases[layer]`` (``[B, H, P]``, per query head and prompt key) on the
    attention logits of those layers; the model's attention implementation and all state are restored on exit.

    The model is claimed for the block (:func:`~seka_lightning.steering.claim_model`): a nested or concurrent
    steering block raises ``RuntimeError``, and attention calls of other threads get no bias (they run plain SDPA).
    """
    register_attention()
    layout = resolve_layout(model)
    unknown = sorted(set(biases) - set(range(layout.num_layers)))
    if unknown:
        raise ValueError(f"biases: layers {unknown} are outside 0..{layout.num_layers - 1}")
    modules = [layout.layers[layer].attention for layer in biases]
    for layer, bias in biases.items():
        if bias.ndim != 3 or bias.shape[1] != layout.num_query_heads:
            raise ValueError(
                f"biases[{layer}] must be [B, {layout.num_query_heads}, P] (batch, query heads, prompt keys), "
                f"got {tuple(bias.shape)}"
            )
    configs = attention_configs(model)
    claim = claim_model(layout, "PASTA")
    before = {id(config): config._attn_implementation_internal for config in configs}
    try:
        if model.config._attn_implementation != PASTA_ATTENTION:
            model.set_attn_implementation(PASTA_ATTENTION)
        if any(getattr(m, "config", model.config)._attn_implementation != PASTA_ATTENTION for m in modules):
            raise ValueError(
                f"{type(model).__name__} cannot switch its attention implementation at run time, so PASTA cannot "
                "apply; use a model whose attention goes through transformers' AttentionInterface"
            )
        for module, bias in zip(modules, biases.values(), strict=True):
            _ACTIVE[module] = _LayerBias(bias, claim)
        yield
    finally:
        for module in modules:
            _ACTIVE.pop(module, None)
        for config in configs:
            config._attn_implementation_internal = before[id(config)]
        claim.release()


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(
            f"alpha must be in (0, 1), got {alpha}; PASTA multiplies the non-highlighted weights by alpha (0.01 in SPEC §6)"
        )


def read_heads(path: str | Path) -> HeadSet:
    """Head set from a JSON file: the profiler's ``{"layers": {layer: [heads]}, ...}`` or a bare ``{layer: [heads]}``
    (the reference's ``pastalib/config`` files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PASTA head file {path} does not exist; write one with `seka pasta-profile`")
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("layers"), dict):
        data = data["layers"]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{layer: [heads]}}, got {type(data).__name__}")
    return parse_heads(data)


def parse_heads(heads: Mapping[int | str, object]) -> HeadSet:
    """``{layer: [heads]}`` with integer ids (JSON's string keys accepted); layers without heads are dropped."""
    parsed: HeadSet = {}
    for key, value in heads.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"heads: layer key {key!r} is not an integer layer id") from None
        if not isinstance(value, list | tuple) or not all(
            isinstance(h, int) and not isinstance(h, bool) for h in value
        ):
            raise ValueError(f"heads: layer {layer} must map to a list of integer head ids, got {value!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"heads: layer {layer} repeats a head id in {list(value)}")
        if layer in parsed:
            raise ValueError(f"heads: layer {layer} is given twice")
        if value:
            parsed[layer] = sorted(value)
    return parsed


def check_heads(heads: HeadSet, *, num_layers: int, num_heads: int) -> None:
    """Every layer and query head id exists in a model with ``num_layers`` layers and ``num_heads`` query heads."""
    for layer, layer_heads in heads.items():
        if not 0 <= layer < num_layers:
            raise ValueError(f"heads: layer {layer} is outside 0..{num_layers - 1} (the model has {num_layers} layers)")
        bad = [h for h in layer_heads if not 0 <= h < num_heads]
        if bad:
            raise ValueError(
                f"heads: layer {layer} has head ids {bad} outside 0..{num_heads - 1} "
                f"(the model has {num_heads} query heads per layer)"
            )


class PastaMethod(HighlightMethod):
    """PASTA on a profiled set of (layer, query head) pairs (SPEC §6)."""

    name = "pasta"
    uses_highlight = True
    edits_decode_steps = True

    def __init__(
        self, heads: dict[int, list[int]] | str, *, alpha: float = 0.01, scale_position: str = "exclude"
    ) -> None:
        """
        Args:
            heads: layer id -> query head ids to steer, or a JSON file of them (``seka pasta-profile`` output, or
                a bare ``{"layer": [heads]}`` object).
            alpha: PASTA's scaling coefficient in (0, 1): non-highlighted prompt keys get ``alpha`` times the weight.
            scale_position: ``exclude`` (add ``log(alpha)`` to non-highlighted prompt keys, the paper's default) or
                ``include`` (add ``-log(alpha)`` to highlighted keys).
        """
        _check_alpha(alpha)
        if scale_position not in SCALE_POSITIONS:
            raise ValueError(f"scale_position must be one of {SCALE_POSITIONS}, got {scale_position!r}")
        self.heads_spec: HeadSet | str = heads if isinstance(heads, str) else parse_heads(heads)
        self.alpha, self.scale_position = alpha, scale_position
        self.heads: HeadSet | None = None  # checked against the model in setup()

    def setup(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        heads = read_heads(self.heads_spec) if isinstance(self.heads_spec, str) else self.heads_spec
        layout = resolve_layout(model)
        check_heads(heads, num_layers=layout.num_layers, num_heads=layout.num_query_heads)
        self.heads = heads

    @contextmanager
    def active(self, model: nn.Module, enc: Encoded) -> Iterator[None]:
        if self.heads is None:
            raise RuntimeError("PastaMethod.setup() must run before the first batch")
        per_key = key_bias(
            enc["highlight_mask"], enc["attention_mask"], alpha=self.alpha, scale_position=self.scale_position
        )  # [B, P]
        num_heads = resolve_layout(model).num_query_heads
        biases = {}
        for layer, layer_heads in self.heads.items():
            bias = per_key.new_zeros(per_key.shape[0], num_heads, per_key.shape[1])
            bias[:, layer_heads] = per_key[:, None]
            biases[layer] = bias
        with attention_bias(model, biases):
            yield

    def describe(self) -> dict:
        return {
            "method": self.name,
            "heads": self.heads_spec,
            "alpha": self.alpha,
            "scale_position": self.scale_position,
        }
