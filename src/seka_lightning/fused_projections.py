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

A projection with a bias, hooks on ``gate_proj``/``up_proj`` (which the fused MLP would skip), or weights of other
devices or dtypes is left as it is. Weights moved since (``model.to``, a state dict loaded with ``assign``) are fused
again when the block is entered.
"""

from __future__ import annotations

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
    """Whether every module is an ``nn.Linear`` without bias, all with one input width, device and dtype."""
    if not all(isinstance(m, nn.Linear) and m.bias is None for m in modules):
        return False
    weights = [m.weight for m in modules]
    return len({(w.shape[1], w.device, w.dtype) for w in weights}) == 1


class _FusedRows:
    """The weights of ``linears`` as the consecutive row blocks of one tensor (the parameters are views of it)."""

    def __init__(self, linears: tuple[nn.Linear, ...]) -> None:
        self.linears = linears
        self.sizes = [linear.out_features for linear in linears]
        self.weight = self._fuse()

    def _fuse(self) -> torch.Tensor:
        with torch.no_grad():
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
        self.rows.refresh()
        # the same bound methods every time, so a step compiled inside one block keeps its guards in the next
        for module, forward in ((self.q, self.q_forward), (self.k, self.k_forward), (self.v, self.v_forward)):
            module.forward = forward
        try:
            yield
        finally:
            self.pending = None
            for module in (self.q, self.k, self.v):
                del module.forward


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
        if any(m._forward_hooks or m._forward_pre_hooks for m in (self.mlp.gate_proj, self.mlp.up_proj)):
            yield  # the fused forward would skip these hooks: leave this MLP as it is
            return
        self.rows.refresh()
        self.mlp.forward = self.forward
        try:
            yield
        finally:
            del self.mlp.forward


class ProjectionFusion:
    """The fusable projections of one model, fused once (the weights become views; see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.qkv: list[_FusedQKV] = []
        self.mlps: list[_FusedMLP] = []
        for module in model.modules():
            parts = [getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj")]
            if all(p is not None for p in parts) and _plain_linears(*parts):
                self.qkv.append(_FusedQKV(module))
            elif type(module).__name__ in FUSED_MLP_CLASSES and _plain_linears(module.gate_proj, module.up_proj):
                self.mlps.append(_FusedMLP(module))

    def __len__(self) -> int:
        return len(self.qkv) + len(self.mlps)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within the block, the fused projections run as one matmul each; on exit the modules are as before."""
        with ExitStack() as stack:
            for part in (*self.qkv, *self.mlps):
                stack.enter_context(part.installed())
            yield
