"""One matmul where a layer runs several over the same input: attention's q/k/v, and the MLP's gate/up.

At batch 1 a decode step is a chain of matrix-vector products, each reading one weight matrix; cuBLAS reads a small
matrix at a lower rate than a large one (a Qwen3-8B layer's seven weight matmuls ran at 77% of the copy rate, its
1.24 GB LM head at 100%: ``docs/performance.md``). :class:`ProjectionFusion` stores the q/k/v weights of each
attention, and the gate/up weights of each MLP, as the row blocks of one tensor: the parameters become views of it,
so no memory is added and ``state_dict`` is unchanged. Within :meth:`ProjectionFusion.active`:

- ``q_proj`` computes ``x @ [W_q; W_k; W_v]^T`` once and keeps the key and value columns; ``k_proj`` and ``v_proj``
  return them when called on the same input (any other input, or a different call order, gets their own matmul).
  Hooks run as before: they wrap each module's call, not its forward, so SEKA's key edit and AdaSEKA's query read see
  the same outputs.
- each MLP of a known family (``down(act(gate(x)) * up(x))``) computes gate and up in one matmul.

Left as they are (for a call, or for good): projections that are not plain ``nn.Linear`` without bias or whose
weights differ in device or dtype; modules with their own instance-level ``forward`` (accelerate's hooks, wrappers);
the MLP when ``gate_proj``/``up_proj`` carry hooks or global module hooks exist (the fused MLP does not call them);
every projection while autograd would record a weight that requires grad (the fused matmul reads a detached tensor).
Weights moved since (``model.to``, a state dict loaded with ``assign``) are fused again when the block is next entered;
until then the fused tensor of the old weights stays allocated. :meth:`ProjectionFusion.of` keeps one fusion per model,
so decoders built one after another share it instead of each fusing (and holding) a copy.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FUSED_MLP_CLASSES", "ProjectionFusion"]

FUSED_MLP_CLASSES = frozenset(
    {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP", "Olmo2MLP"}
)
"""MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, the form the fused MLP computes."""


def _plain_linears(*modules: object) -> bool:
    """Whether every module is a plain ``nn.Linear`` (not a quantized subclass) without bias and without its own
    instance-level ``forward``, all with one input width, device and dtype."""
    if not all(type(m) is nn.Linear and m.bias is None and "forward" not in vars(m) for m in modules):
        return False
    weights = [m.weight for m in modules]
    return len({(w.shape[1], w.device, w.dtype) for w in weights}) == 1


def _records_grad(*modules: nn.Module) -> bool:
    """Whether autograd would record a matmul with one of the modules' weights now."""
    return torch.is_grad_enabled() and any(m.weight.requires_grad for m in modules)


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


@contextmanager
def _forwards(pairs: tuple[tuple[nn.Module, object], ...]) -> Iterator[None]:
    """Within the block, each module of ``pairs`` runs its paired forward (an instance attribute, deleted on exit)."""
    for module, forward in pairs:
        module.forward = forward
    try:
        yield
    finally:
        for module, _ in pairs:
            del module.forward


class _FusedRows:
    """The weights of ``linears`` as the consecutive row blocks of one tensor (the parameters are views of it)."""

    def __init__(self, linears: tuple[nn.Linear, ...]) -> None:
        self.linears = linears
        self.sizes = [linear.out_features for linear in linears]
        self.weight = self._fuse()

    def _fuse(self) -> torch.Tensor:
        # outside inference mode: weights fused inside it (Lightning's predict loop) would become inference tensors
        with torch.inference_mode(False), torch.no_grad():
            fused = torch.cat([linear.weight.detach() for linear in self.linears])
            offset = 0
            for linear, rows in zip(self.linears, self.sizes, strict=True):
                linear.weight.data = fused[offset : offset + rows]  # the old storage is freed
                offset += rows
        return fused

    def current(self) -> bool:
        """Whether each weight is still its block of the fused tensor (not moved, cast or replaced since)."""
        offset = 0
        for linear, rows in zip(self.linears, self.sizes, strict=True):
            w = linear.weight
            if w.untyped_storage().data_ptr() != self.weight.untyped_storage().data_ptr():
                return False
            if w.shape != (rows, self.weight.shape[1]) or w.stride() != self.weight.stride():
                return False
            if w.storage_offset() != self.weight.storage_offset() + offset * self.weight.shape[1]:
                return False
            offset += rows
        return True

    def refresh(self) -> None:
        if not self.current():
            self.weight = self._fuse()


class _FusedQKV:
    """Forwards for one attention's q/k/v projections that share one matmul (see the module docstring)."""

    def __init__(self, attention: nn.Module) -> None:
        self.q, self.k, self.v = attention.q_proj, attention.k_proj, attention.v_proj
        self.rows = _FusedRows((self.q, self.k, self.v))
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def q_forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.rows.weight).split(self.rows.sizes, dim=-1)
        self.pending = (x, k, v)
        return q

    def k_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pending is not None and self.pending[0] is x:
            return self.pending[1]
        return F.linear(x, self.k.weight)

    def v_forward(self, x: torch.Tensor) -> torch.Tensor:
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] is x:
            return pending[2]
        return F.linear(x, self.v.weight)

    @contextmanager
    def installed(self) -> Iterator[None]:
        if not _plain_linears(self.q, self.k, self.v) or _records_grad(self.q, self.k, self.v):
            yield  # changed since (a wrapper forward, another dtype) or recording gradients: left as it is
            return
        self.rows.refresh()
        # the same bound methods every time, so a step compiled inside one block keeps its guards in the next
        try:
            with _forwards(((self.q, self.q_forward), (self.k, self.k_forward), (self.v, self.v_forward))):
                yield
        finally:
            self.pending = None


class _FusedMLP:
    """A forward for one MLP that computes gate and up in one matmul."""

    def __init__(self, mlp: nn.Module) -> None:
        self.mlp = mlp
        self.rows = _FusedRows((mlp.gate_proj, mlp.up_proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.rows.weight).split(self.rows.sizes, dim=-1)
        return self.mlp.down_proj(self.mlp.act_fn(gate) * up)

    @contextmanager
    def installed(self) -> Iterator[None]:
        parts = (self.mlp.gate_proj, self.mlp.up_proj)
        hooked = _global_hooks() or any(m._forward_hooks or m._forward_pre_hooks for m in parts)
        if hooked or "forward" in vars(self.mlp) or not _plain_linears(*parts) or _records_grad(*parts):
            yield  # the fused forward would skip these hooks or that forward, or lose gradients: left as it is
            return
        self.rows.refresh()
        with _forwards(((self.mlp, self.forward),)):
            yield


_FUSIONS: weakref.WeakKeyDictionary[nn.Module, ProjectionFusion] = weakref.WeakKeyDictionary()


class ProjectionFusion:
    """The fusable projections of one model, fused once (the weights become views; see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.qkv: list[_FusedQKV] = []
        self.mlps: list[_FusedMLP] = []
        for module in model.modules():
            parts = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")]
            if all(p is not None for p in parts) and _plain_linears(*parts):
                self.qkv.append(_FusedQKV(module))
                continue
            gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
            if type(module).__name__ in FUSED_MLP_CLASSES and gate is not None and _plain_linears(gate, up):
                self.mlps.append(_FusedMLP(module))

    @classmethod
    def of(cls, model: nn.Module) -> ProjectionFusion:
        """The model's one fusion (made on first use): decoders built one after another share it."""
        fusion = _FUSIONS.get(model)
        if fusion is None:
            fusion = _FUSIONS[model] = cls(model)
        return fusion

    def __len__(self) -> int:
        return len(self.qkv) + len(self.mlps)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within the block, the fused projections run as one matmul each; on exit the modules are as before."""
        with ExitStack() as stack:
            for part in (*self.qkv, *self.mlps):
                stack.enter_context(part.installed())
            yield
