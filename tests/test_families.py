"""Tests for seka_lightning.families on tiny random-weight models of every supported family."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
)

from seka_lightning.families import (
    FAMILIES,
    LayerSites,
    ModelLayout,
    keys_view,
    queries_view,
    resolve_layout,
    with_keys,
    with_queries,
)

NUM_Q, NUM_KV, VOCAB, BATCH, SEQ = 4, 2, 64, 2, 5
COMMON = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": NUM_Q,
    "num_key_value_heads": NUM_KV,
    "vocab_size": VOCAB,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "attn_implementation": "eager",
}


def _gemma3_text_config(**overrides: object) -> Gemma3TextConfig:
    # A wide sliding window keeps every layer's attention plainly causal on SEQ tokens.
    return Gemma3TextConfig(**{**COMMON, "head_dim": 8, "sliding_window": 16, "query_pre_attn_scalar": 8, **overrides})


def _gemma3_multimodal() -> Gemma3ForConditionalGeneration:
    # The vision tower has as many attention layers as the text decoder, so discovery must
    # pick the decoder by position (get_decoder), not by count.
    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=COMMON["num_hidden_layers"],
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )
    config = Gemma3Config(
        text_config=_gemma3_text_config().to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
    )
    config._attn_implementation = "eager"
    return Gemma3ForConditionalGeneration(config)


@dataclass(frozen=True)
class Case:
    """A tiny model of one family and the numbers resolve_layout must report for it."""

    family: str
    build: Callable[[], PreTrainedModel]
    head_dim: int
    norm: str  # "none", "per_head" (weight * x̂), "per_head_gemma" ((1 + weight) * x̂), "whole"
    fused: bool = False


CASES = [
    Case("llama", lambda: LlamaForCausalLM(LlamaConfig(**COMMON, attention_bias=True)), 8, "none"),
    Case("mistral", lambda: MistralForCausalLM(MistralConfig(**COMMON, head_dim=6)), 6, "none"),
    Case("qwen2", lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)), 8, "none"),
    Case("qwen3", lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=12)), 12, "per_head"),
    Case("gemma3_text", lambda: Gemma3ForCausalLM(_gemma3_text_config()), 8, "per_head_gemma"),
    Case("gemma3", _gemma3_multimodal, 8, "per_head_gemma"),
    Case("olmo2", lambda: Olmo2ForCausalLM(Olmo2Config(**COMMON)), 8, "whole"),
    Case("phi3", lambda: Phi3ForCausalLM(Phi3Config(**COMMON)), 8, "none", fused=True),
]


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


def _randomized(model: PreTrainedModel) -> PreTrainedModel:
    """Random weights everywhere (norm weights included, which init to 1 or 0) so layouts matter."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.eval()


def _input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, SEQ))


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float, *, gemma: bool) -> torch.Tensor:
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * (1.0 + weight.double()) if gemma else normed * weight.double()


def _linear(x: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    bias = None if module.bias is None else module.bias.double()
    return F.linear(x, module.weight.double(), bias)


def _reference(case: Case, attention: nn.Module, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE (keys [B, T, n_kv, d], queries [B, T, n_q, d]) from the attention input, in float64."""
    d = case.head_dim
    x = x.double()
    if case.fused:
        qkv = _linear(x, attention.qkv_proj)  # [B, T, (n_q + 2 n_kv) d], queries first
        q, k = qkv[..., : NUM_Q * d], qkv[..., NUM_Q * d : (NUM_Q + NUM_KV) * d]
    else:
        q, k = _linear(x, attention.q_proj), _linear(x, attention.k_proj)
    if case.norm == "whole":
        q = _rms(q, attention.q_norm.weight, eps, gemma=False)
        k = _rms(k, attention.k_norm.weight, eps, gemma=False)
    q, k = q.unflatten(-1, (NUM_Q, d)), k.unflatten(-1, (NUM_KV, d))
    if case.norm.startswith("per_head"):
        gemma = case.norm == "per_head_gemma"
        q = _rms(q, attention.q_norm.weight, eps, gemma=gemma)
        k = _rms(k, attention.k_norm.weight, eps, gemma=gemma)
    return k, q


def _capture(
    model: PreTrainedModel, layout: ModelLayout, input_ids: torch.Tensor
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Run the model once; return each layer's attention input and its key/query views (one per call)."""
    inputs: list[torch.Tensor] = [torch.empty(0)] * layout.num_layers
    keys: list[list[torch.Tensor]] = [[] for _ in layout.layers]
    queries: list[list[torch.Tensor]] = [[] for _ in layout.layers]

    def input_hook(layer_id: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[layer_id] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        return hook

    def site_hook(sites: LayerSites, out: list[torch.Tensor], view: Callable[..., torch.Tensor]) -> Callable:
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            out.append(view(output, sites, layout).clone())

        return hook

    handles = []
    for sites in layout.layers:
        i = sites.layer_id
        handles.append(sites.attention.register_forward_pre_hook(input_hook(i), with_kwargs=True))
        handles.append(sites.key_module.register_forward_hook(site_hook(sites, keys[i], keys_view)))
        handles.append(sites.query_module.register_forward_hook(site_hook(sites, queries[i], queries_view)))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, keys, queries


@pytest.mark.parametrize("case", CASES, ids=[c.family for c in CASES])
def test_layout_geometry(case: Case) -> None:
    model = case.build()
    layout = resolve_layout(model)
    assert layout.family == case.family
    assert layout.num_layers == COMMON["num_hidden_layers"]
    assert (layout.num_query_heads, layout.num_kv_heads, layout.head_dim) == (NUM_Q, NUM_KV, case.head_dim)
    assert [s.layer_id for s in layout.layers] == list(range(layout.num_layers))
    text_model = model.model.language_model if case.family == "gemma3" else model.model
    for sites, layer in zip(layout.layers, text_model.layers, strict=True):
        assert sites.attention is layer.self_attn


@pytest.mark.parametrize("case", CASES, ids=[c.family for c in CASES])
def test_sites_hold_pre_rope_keys_and_queries(case: Case) -> None:
    model = _randomized(case.build())
    layout = resolve_layout(model)
    eps = model.config.get_text_config(decoder=True).rms_norm_eps
    inputs, keys, queries = _capture(model, layout, _input_ids())
    for sites in layout.layers:
        i = sites.layer_id
        assert len(keys[i]) == 1 and len(queries[i]) == 1, "each site must fire once per layer forward"
        ref_k, ref_q = _reference(case, sites.attention, inputs[i], eps)
        assert keys[i][0].shape == (BATCH, SEQ, NUM_KV, case.head_dim)
        assert queries[i][0].shape == (BATCH, SEQ, NUM_Q, case.head_dim)
        torch.testing.assert_close(keys[i][0].double(), ref_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(queries[i][0].double(), ref_q, rtol=1e-5, atol=1e-5)


def _zeroing_hook(sites: LayerSites, layout: ModelLayout, part: str) -> Callable:
    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        if part == "key":
            return with_keys(output, torch.zeros_like(keys_view(output, sites, layout)), sites, layout)
        return with_queries(output, torch.zeros_like(queries_view(output, sites, layout)), sites, layout)

    return hook


@pytest.mark.parametrize("part", ["key", "query"])
@pytest.mark.parametrize("case", CASES, ids=[c.family for c in CASES])
def test_rewritten_site_reaches_attention(case: Case, part: str) -> None:
    """Zero keys (or queries) written through the site make every attention row uniform over its causal
    prefix, which proves the site feeds the attention logits (RoPE of a zero vector is zero)."""
    model = _randomized(case.build())
    layout = resolve_layout(model)
    handles = [
        (s.key_module if part == "key" else s.query_module).register_forward_hook(_zeroing_hook(s, layout, part))
        for s in layout.layers
    ]
    try:
        with torch.no_grad():
            attentions = model(input_ids=_input_ids(), output_attentions=True).attentions
    finally:
        for handle in handles:
            handle.remove()
    uniform = torch.tril(torch.ones(SEQ, SEQ)) / torch.arange(1, SEQ + 1).unsqueeze(1)
    assert len(attentions) == layout.num_layers
    for weights in attentions:  # [B, n_q, T, T]
        torch.testing.assert_close(weights, uniform.expand_as(weights))


@pytest.mark.parametrize("case", CASES, ids=[c.family for c in CASES])
def test_with_keys_round_trip_and_untouched_columns(case: Case) -> None:
    layout = resolve_layout(case.build())
    sites = layout.layers[0]
    d = case.head_dim
    if sites.key_layout == "head_major":
        output = torch.randn(BATCH, NUM_KV, SEQ, d)
    elif sites.key_layout == "token_major":
        output = torch.randn(BATCH, SEQ, NUM_KV, d)
    else:
        width = (NUM_Q + 2 * NUM_KV) * d if case.fused else NUM_KV * d
        output = torch.randn(BATCH, SEQ, width)
    assert torch.equal(with_keys(output, keys_view(output, sites, layout), sites, layout), output)
    new_keys = torch.randn(BATCH, SEQ, NUM_KV, d, dtype=torch.float64)
    replaced = with_keys(output, new_keys, sites, layout)
    assert replaced.dtype == output.dtype
    torch.testing.assert_close(keys_view(replaced, sites, layout), new_keys.float())
    if case.fused:  # queries and values of the fused projection are kept
        assert torch.equal(replaced[..., : NUM_Q * d], output[..., : NUM_Q * d])
        assert torch.equal(replaced[..., (NUM_Q + NUM_KV) * d :], output[..., (NUM_Q + NUM_KV) * d :])
    keys_view(output, sites, layout)[0, 1, 1] = 7.0  # a view: writes land in the output
    assert (with_keys(output, keys_view(output, sites, layout), sites, layout) == 7.0).sum() == d


def test_with_keys_rejects_wrong_shape() -> None:
    layout = resolve_layout(LlamaForCausalLM(LlamaConfig(**COMMON)))
    sites = layout.layers[0]
    output = torch.randn(BATCH, SEQ, NUM_KV * 8)
    with pytest.raises(ValueError, match=re.escape("replacement heads have shape (2, 5, 4, 8), expected (2, 5, 2, 8)")):
        with_keys(output, torch.zeros(BATCH, SEQ, NUM_Q, 8), sites, layout)


def test_discovery_finds_llama_like_model() -> None:
    model = _randomized(LlamaForCausalLM(LlamaConfig(**COMMON)))
    model.config.model_type = "my_private_llama"
    layout = resolve_layout(model)
    assert layout.family == "discovered"
    assert layout.num_layers == COMMON["num_hidden_layers"]
    assert all(s.key_module is s.attention.k_proj and s.query_module is s.attention.q_proj for s in layout.layers)
    inputs, keys, queries = _capture(model, layout, _input_ids())
    llama = CASES[0]
    for sites in layout.layers:
        ref_k, ref_q = _reference(llama, sites.attention, inputs[sites.layer_id], model.config.rms_norm_eps)
        torch.testing.assert_close(keys[sites.layer_id][0].double(), ref_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(queries[sites.layer_id][0].double(), ref_q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["olmo2", "phi3"])
def test_discovery_picks_whole_projection_norm_and_fused_qkv(family: str) -> None:
    case = next(c for c in CASES if c.family == family)
    model = _randomized(case.build())
    model.config.model_type = f"unknown_{family}"
    layout = resolve_layout(model)
    assert layout.family == "discovered"
    inputs, keys, _ = _capture(model, layout, _input_ids())
    for sites in layout.layers:
        ref_k, _ = _reference(case, sites.attention, inputs[sites.layer_id], model.config.rms_norm_eps)
        torch.testing.assert_close(keys[sites.layer_id][0].double(), ref_k, rtol=1e-5, atol=1e-5)


def test_discovery_refuses_per_head_norm_of_unknown_order() -> None:
    """A per-head k_norm may run before (Qwen3) or after (Gemma-3) the head transpose; discovery must
    not guess. The Gemma-3 wrapper also checks that the text decoder, not the vision tower, is chosen."""
    model = _gemma3_multimodal()
    model.config.model_type = "unknown_gemma"
    with pytest.raises(ValueError, match=re.escape("Gemma3Attention.k_norm normalises 8 features")):
        resolve_layout(model)


def test_unknown_module_raises_documented_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4)]))
    expected = (
        "cannot locate decoder layers in Sequential (model_type=None): model_type is not in the family "
        f"table {sorted(FAMILIES)}, and no nn.ModuleList was found whose children have an attention "
        "submodule ['self_attn', 'attention', 'attn'] with k_proj and q_proj or qkv_proj"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        resolve_layout(model)


def test_head_count_mismatch_is_reported() -> None:
    model = LlamaForCausalLM(LlamaConfig(**COMMON))
    model.config.num_key_value_heads = NUM_Q
    with pytest.raises(
        ValueError,
        match=re.escape(
            "llama: layer 0: LlamaAttention.k_proj has 16 features but the config implies 32 = "
            "num_key_value_heads=4 x head_dim=8"
        ),
    ):
        resolve_layout(model)


def test_layer_sites_rejects_slice_on_per_head_layout() -> None:
    module = nn.Identity()
    with pytest.raises(ValueError, match=re.escape("LayerSites.key_slice needs key_layout 'flat'")):
        LayerSites(0, module, module, slice(0, 4), module, None, key_layout="token_major")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_base_model_without_lm_head_resolves_to_the_same_sites(family: str) -> None:
    case = next(c for c in CASES if c.family == family)
    model = case.build()
    full, base = resolve_layout(model), resolve_layout(model.model)
    assert base.family == family
    assert [s.key_module for s in base.layers] == [s.key_module for s in full.layers]
    assert [s.query_module for s in base.layers] == [s.query_module for s in full.layers]
