"""Steering cannot leak: other threads' forwards stay unsteered, nested steering is refused, no-op gains warn."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import pytest
import torch

from seka_lightning import ProjectionBank, encode_highlighted, steer
from seka_lightning.adaseka.experts import ExpertSet
from seka_lightning.adaseka.hooks import adaptive_steer
from seka_lightning.baselines.pasta import attention_bias
from seka_lightning.steering import NoEditWarning

PROMPTS = [
    "Previously the keepers carried **silver lanterns** across the north harbor. What do they carry?",
    "The **golden tower** stands in the valley.",
]


def random_bank(layers: list[int], *, seed: int = 0, zero_layers: tuple[int, ...] = ()) -> ProjectionBank:
    """Rank-4 projectors on 2 KV heads of dim 16; ``zero_layers`` hold only skipped (all-zero) heads."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(layers), 2, 16, 16, generator=gen))
    pos = q[..., :4] @ q[..., :4].transpose(-1, -2)
    for i, layer in enumerate(layers):
        if layer in zero_layers:
            pos[i] = 0.0
    return ProjectionBank(layers=layers, pos=pos, metadata={"num_layers": 3})


def random_experts() -> ExpertSet:
    banks = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        gen = torch.Generator().manual_seed(seed)
        u, _ = torch.linalg.qr(torch.randn(3, 2, 16, 16, generator=gen))
        s = torch.rand(3, 2, 16, generator=gen).sort(-1, descending=True).values * 3
        pos = u[..., :4] @ u[..., :4].transpose(-1, -2)
        banks[name] = ProjectionBank(
            layers=[0, 1, 2], pos=pos, u_pos=u, s_pos=s, metadata={"positive_only": True, "num_layers": 3}
        )
    return ExpertSet.from_banks(banks)


def logits(model, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


def in_thread(fn: Callable[[], object], name: str = "other") -> object:
    """Run ``fn`` in a new thread, wait for it, and return its result or raise its exception."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as err:  # handed back to the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def seka_block(model, enc):
    return steer(model, random_bank([0, 1, 2]), enc["highlight_mask"], gain_pos=3.0)


def adaseka_block(model, enc):
    return adaptive_steer(model, random_experts(), enc, gain=3.0, top_k=4)


def pasta_block(model, enc):
    per_key = torch.where(enc["highlight_mask"], 0.0, -4.0).to(torch.float64)  # [B, P]
    return attention_bias(model, {1: per_key[:, None].expand(-1, 4, -1).clone()})


BLOCKS = {"SEKA": seka_block, "AdaSEKA": adaseka_block, "PASTA": pasta_block}


@pytest.mark.parametrize("method", list(BLOCKS))
def test_another_threads_forward_is_not_steered(method, tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    plain = logits(tiny_model, enc)
    with BLOCKS[method](tiny_model, enc):
        steered = logits(tiny_model, enc)
        elsewhere = in_thread(lambda: logits(tiny_model, enc))
        steered_again = logits(tiny_model, enc)  # the other thread's pass did not disturb this block's state
    assert not torch.allclose(steered, plain)  # the block steers its own thread
    assert torch.equal(elsewhere, plain)
    assert torch.equal(steered_again, steered)
    assert hook_count(tiny_model) == 0
    assert tiny_model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("outer", list(BLOCKS))
@pytest.mark.parametrize("inner", list(BLOCKS))
def test_nested_steering_is_refused_with_the_reason(outer, inner, tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    plain = logits(tiny_model, enc)
    with BLOCKS[outer](tiny_model, enc):
        steered = logits(tiny_model, enc)
        expected = (
            f"cannot start {inner}: {outer} is already active on this model in this thread; nested steering would "
            "apply both edits (SEKA twice is k(I+G)^2, not k(I+G)), so exit the outer block before steering again"
        )
        with pytest.raises(RuntimeError) as err, BLOCKS[inner](tiny_model, enc):
            pass
        assert str(err.value) == expected
        assert torch.equal(logits(tiny_model, enc), steered)  # the refused block left the outer one intact
    assert hook_count(tiny_model) == 0
    assert torch.equal(logits(tiny_model, enc), plain)
    with BLOCKS[inner](tiny_model, enc):  # the model is free again
        pass


def test_steering_from_a_second_thread_is_refused(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    with seka_block(tiny_model, enc):
        with pytest.raises(RuntimeError) as err:
            in_thread(lambda: adaseka_block(tiny_model, enc).__enter__(), name="worker-1")
        assert hook_count(tiny_model) == 3  # only the SEKA block's own hooks
    assert str(err.value) == (
        f"cannot start AdaSEKA: SEKA is active on this model in thread {threading.current_thread().name!r}; a model "
        "is steered by one thread at a time (its hooks belong to the model), so wait for that block to end or give "
        "each thread its own copy of the model"
    )
    assert hook_count(tiny_model) == 0


def test_a_thread_steers_once_the_other_is_done(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    with seka_block(tiny_model, enc):
        here = logits(tiny_model, enc)

    def steered_in_thread() -> torch.Tensor:
        with seka_block(tiny_model, enc):
            return logits(tiny_model, enc)

    assert torch.equal(in_thread(steered_in_thread), here)


def test_a_failed_attach_releases_the_model(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    short = enc["highlight_mask"][:, 1:]
    with pytest.raises(ValueError, match="the highlight mask covers"), steer(tiny_model, random_bank([0, 1, 2]), short):
        logits(tiny_model, enc)
    with seka_block(tiny_model, enc):  # not left claimed
        pass
    assert hook_count(tiny_model) == 0


@pytest.mark.parametrize(
    ("bank", "kwargs", "layers"),
    [
        (random_bank([0, 1, 2]), {"gain_pos": 0.0}, [0, 1, 2]),
        (random_bank([0, 1, 2], zero_layers=(1, 2)), {"gain_pos": 2.0, "layers": "last2"}, [1, 2]),
    ],
    ids=["zero-gain", "only-skipped-heads"],
)
def test_gains_that_edit_nothing_warn(bank, kwargs, layers, tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    plain = logits(tiny_model, enc)
    with pytest.warns(NoEditWarning) as record, steer(tiny_model, bank, enc["highlight_mask"], **kwargs) as steerer:
        steered = logits(tiny_model, enc)
    assert steerer.layer_ids == []
    assert torch.equal(steered, plain)
    assert [str(w.message) for w in record] == [
        f"SEKA steering edits nothing: the fused gains (gain_pos={kwargs['gain_pos']}, gain_neg=None) are zero on "
        f"every selected layer {layers} (zero gains, or only skipped heads there); raise the gains or select layers "
        "whose bank heads are kept"
    ]


def test_gains_that_edit_some_layer_do_not_warn(tiny_model, tokenizer):
    enc = encode_highlighted(tokenizer, PROMPTS)
    bank = random_bank([0, 1, 2], zero_layers=(1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoEditWarning)
        with steer(tiny_model, bank, enc["highlight_mask"], gain_pos=2.0) as steerer:
            pass
    assert steerer.layer_ids == [0]


def test_the_thread_check_compiles_without_a_graph_break(tiny_model, tokenizer):
    """Under torch.compile (transformers' compiled decode traces the hooks) the check must not break the graph."""
    enc = encode_highlighted(tokenizer, PROMPTS)
    with seka_block(tiny_model, enc) as steerer:
        claim = steerer.claim

        def edit(x: torch.Tensor) -> torch.Tensor:
            return x * 2 if claim.here() else x

        compiled = torch.compile(edit, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
        assert torch.equal(in_thread(lambda: edit(torch.ones(3))), torch.ones(3))  # eager: other threads pass
