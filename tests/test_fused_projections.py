"""ProjectionFusion: q/k/v and gate/up as one matmul each, with the weights as views (no memory added)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from bench.generation import random_bank, random_prompts
from bench.shapes import get_shape, random_model
from tests.conftest import tiny_llama
from torch import nn

from seka_lightning.fast_decode import StaticGreedyDecoder
from seka_lightning.fused_projections import ProjectionFusion
from seka_lightning.methods import HighlightMethod, SekaMethod

CPU = torch.device("cpu")


def _gemma3(vocab_size: int) -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], attn_implementation="sdpa",
        pad_token_id=0, bos_token_id=2, eos_token_id=None,
    )  # fmt: skip
    return Gemma3ForCausalLM(config).eval()


def _models() -> dict[str, nn.Module]:
    return {
        "llama": tiny_llama(512),
        "qwen3": random_model(get_shape("tiny"), device=CPU, dtype=torch.float32),
        "gemma3": _gemma3(512),
    }


def _storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_fused_forward_equals_the_plain_one_in_float64_and_adds_no_memory(family: str) -> None:
    model = _models()[family].double()
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    bytes_before = _storage_bytes(model)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    fusion = ProjectionFusion(model)
    layers = model.config.num_hidden_layers
    assert (len(fusion.qkv), len(fusion.mlps)) == (layers, layers)
    # the weights are views of the fused tensors: the same values, one storage per group, no byte added
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    assert _storage_bytes(model) == bytes_before
    attn = fusion.qkv[0]
    assert attn.q.weight.untyped_storage().data_ptr() == attn.v.weight.untyped_storage().data_ptr()
    with torch.no_grad(), fusion.active():
        assert all("forward" in vars(m) for m in (attn.q, attn.k, attn.v, fusion.mlps[0].mlp))
        fused = model(input_ids=ids).logits
    assert not any("forward" in vars(m) for m in (attn.q, attn.k, attn.v, fusion.mlps[0].mlp))  # restored
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-10)


def test_a_fused_model_saves_and_loads_as_before(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    model = tiny_llama(512)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    ProjectionFusion(model)
    model.save_pretrained(tmp_path)  # views of one storage are saved as separate tensors
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).state_dict()
    assert loaded.keys() == before.keys() and all(torch.equal(loaded[k], before[k]) for k in before)


def test_k_and_v_on_another_input_get_their_own_matmul() -> None:
    model = tiny_llama(512).double()
    fusion = ProjectionFusion(model)
    attn = fusion.qkv[0]
    x, other = torch.randn(2, 3, 64, dtype=torch.float64), torch.randn(2, 3, 64, dtype=torch.float64)
    with torch.no_grad(), fusion.active():
        k_first = attn.k(x)  # before any q: its own matmul
        attn.q(x)
        torch.testing.assert_close(attn.k(other), other @ attn.k.weight.T, rtol=0, atol=1e-12)  # not x's keys
        torch.testing.assert_close(attn.v(x), x @ attn.v.weight.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(k_first, x @ attn.k.weight.T, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="^inside$"), fusion.active():
        raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in model.modules())  # restored after an exception too


def test_fusing_under_inference_mode_keeps_trainable_weights_and_gradients_bypass_fusion() -> None:
    """Lightning's predict loop builds decoders under inference mode: the fused weights must stay normal tensors.
    While autograd records weights that require grad, the projections run unfused, so gradients reach them."""
    model = tiny_llama(512)
    with torch.inference_mode():
        fusion = ProjectionFusion(model)
    attn = fusion.qkv[0]
    assert not attn.q.weight.is_inference() and not fusion.mlps[0].rows.weight.is_inference()
    attn.q.weight.requires_grad_(True)
    x = torch.randn(1, 2, 64)
    with fusion.active():
        assert "forward" not in vars(attn.q)  # recording gradients for q's weight: not fused
        attn.q(x).sum().backward()
    assert attn.q.weight.grad is not None and attn.q.weight.grad.abs().sum() > 0


def test_modules_with_their_own_forward_are_left_alone() -> None:
    model = tiny_llama(512)
    attn = model.model.layers[0].self_attn
    calls = []

    def wrapper(x: torch.Tensor, _q=attn.q_proj) -> torch.Tensor:
        calls.append(1)
        return nn.Linear.forward(_q, x)

    attn.q_proj.forward = wrapper
    fusion = ProjectionFusion(model)
    assert len(fusion.qkv) == model.config.num_hidden_layers - 1  # layer 0's q/k/v are not fused
    with torch.no_grad(), fusion.active():
        model(input_ids=torch.tensor([[3, 4, 5]]))
    assert calls == [1] and vars(attn.q_proj)["forward"] is wrapper  # called, and still in place


def test_decoders_on_one_model_share_one_fusion() -> None:
    model = tiny_llama(512)
    first = StaticGreedyDecoder(model, batch_size=1, max_cache_len=16, compile=False, fuse_projections=True)
    storage = first.fusion.qkv[0].rows.weight.untyped_storage().data_ptr()
    second = StaticGreedyDecoder(model, batch_size=2, max_cache_len=16, compile=False, fuse_projections=True)
    assert second.fusion is first.fusion is ProjectionFusion.of(model)
    assert first.fusion.qkv[0].rows.current()  # not fused a second time
    assert first.fusion.qkv[0].rows.weight.untyped_storage().data_ptr() == storage


def test_weights_moved_since_are_fused_again_and_hooked_mlps_are_left_alone() -> None:
    model = tiny_llama(512)
    fusion = ProjectionFusion(model)
    model.double()  # new storages: the fused tensors are stale
    assert not fusion.qkv[0].rows.current()
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    calls = []
    mlp = fusion.mlps[1].mlp
    handle = mlp.gate_proj.register_forward_hook(lambda module, args, out: calls.append(out.dtype))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        calls.clear()
        with fusion.active():
            assert fusion.qkv[0].rows.current() and fusion.qkv[0].rows.weight.dtype == torch.float64
            assert "forward" not in vars(mlp)  # a fused MLP would skip the hook on gate_proj
            fused = model(input_ids=ids).logits
    handle.remove()
    assert calls == [torch.float64]
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-10)


def test_seka_steers_the_same_through_fused_projections(tmp_path: Path) -> None:
    """SEKA's key hook and AdaSEKA's query read wrap the projections' calls: under fusion they see, and edit, the
    same tensors (float64 logits of the steered prompt pass)."""
    from seka_lightning.adaseka.method import AdaSekaMethod

    shape = get_shape("tiny")
    model = random_model(shape, device=CPU, dtype=torch.float64)
    bank = random_bank(shape, rank=8, seed=0).save(tmp_path / "bank.safetensors")
    experts = {
        f"e{i}": str(random_bank(shape, rank=8, seed=1 + i, positive_only=True).save(tmp_path / f"e{i}.safetensors"))
        for i in range(2)
    }
    enc = random_prompts(2, 48, documents=4, highlighted=2, vocab_size=shape.vocab_size, seed=0)
    for method in (SekaMethod(str(bank), gain_pos=4.0), AdaSekaMethod(experts, gain=4.0)):
        method.setup(model, None)
        plain = method.prompt_logits(model, enc)
        assert not torch.allclose(plain, HighlightMethod().prompt_logits(model, enc))  # the steering shows
        fusion = ProjectionFusion(model)
        with fusion.active():
            fused = method.prompt_logits(model, enc)
        torch.testing.assert_close(fused, plain, rtol=0, atol=1e-10)


@pytest.mark.parametrize("compile", [False, True])
def test_the_decoder_with_fused_projections_gives_the_generate_tokens(tmp_path: Path, compile: bool) -> None:
    shape = get_shape("tiny")
    model = random_model(shape, device=CPU, dtype=torch.float32)
    seka = SekaMethod(str(random_bank(shape, rank=8, seed=0).save(tmp_path / "bank.safetensors")), gain_pos=4.0)
    seka.setup(model, None)
    enc = random_prompts(2, 96, documents=6, highlighted=3, vocab_size=shape.vocab_size, seed=0)
    plain = HighlightMethod().generate(model, enc, max_new_tokens=6, pad_token_id=0)
    steered = seka.generate(model, enc, max_new_tokens=6, pad_token_id=0)
    assert not torch.equal(plain, steered)
    decoder = StaticGreedyDecoder(
        model, batch_size=2, max_cache_len=102, compile=compile, backend="eager", fuse_projections=True
    )
    assert decoder.fusion is not None and len(decoder.fusion) == 2 * shape.num_layers
    for _ in range(2):
        assert torch.equal(decoder.generate(HighlightMethod(), enc, max_new_tokens=6, pad_token_id=0), plain)
        assert torch.equal(decoder.generate(seka, enc, max_new_tokens=6, pad_token_id=0), steered)
    assert not any("forward" in vars(m) for m in model.modules())  # every forward restored after each call


def test_a_fused_layer_runs_four_weight_matmuls_in_place_of_seven_eagerly_and_compiled() -> None:
    """The fused path is the one taken, eagerly and inside a compiled decode step (where dynamo traces the shared
    q/k/v result): per layer q/k/v, o, gate/up and down, plus the LM head."""
    from torch.overrides import TorchFunctionMode

    shape = get_shape("tiny")
    model = random_model(shape, device=CPU, dtype=torch.float32)
    layers = shape.num_layers

    class CountLinear(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            CountLinear.calls += func is torch.nn.functional.linear
            return func(*args, **(kwargs or {}))

    ids = torch.randint(3, shape.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    fusion = ProjectionFusion(model)
    for active, expected in ((False, 7 * layers + 1), (True, 4 * layers + 1)):
        CountLinear.calls = 0
        with torch.no_grad(), CountLinear(), fusion.active() if active else nullcontext():
            model(input_ids=ids)
        assert CountLinear.calls == expected

    graphs: list[int] = []

    def count_backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(sum(node.target is torch._C._nn.linear for node in gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    decoder = StaticGreedyDecoder(
        model, batch_size=1, max_cache_len=24, backend=count_backend, mode=None, fuse_projections=True
    )
    enc = random_prompts(1, 12, documents=2, highlighted=1, vocab_size=shape.vocab_size, seed=0)
    decoder.generate(HighlightMethod(), enc, max_new_tokens=4, pad_token_id=0)
    assert graphs == [4 * layers + 1]  # one graph for every decode step, with the fused matmuls
