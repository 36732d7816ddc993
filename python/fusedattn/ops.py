"""The op layer: ``torch.library`` custom ops with fake (meta) kernels and autograd.

Four ops, one per score type and direction::

    fusedattn::additive_fwd(q, k, v, w, key_lengths?, causal, backend) -> (out, lse)
    fusedattn::additive_bwd(dout, q, k, v, w, key_lengths?, out, lse, causal, backend) -> (dq, dk, dv, dw)
    fusedattn::dot_fwd(q, k, v, key_lengths?, scale, causal, backend) -> (out, lse)
    fusedattn::dot_bwd(dout, q, k, v, key_lengths?, out, lse, scale, causal, backend) -> (dq, dk, dv)

Their implementations are device-generic: they check what only the data can
tell (``key_lengths`` values), handle empty sizes, resolve ``backend`` ("auto" or
a name) against the tensors and call that backend's launcher. Shapes, dtypes and
devices were checked by the public functions in ``fusedattn.api``. Because the
ops are opaque to ``torch.compile``, the public functions compile with
``fullgraph=True``. ``lse`` is returned but not differentiable.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .backends.base import lse_dtype


def _checked_lengths(key_lengths: Optional[Tensor], Lk: int) -> Optional[Tensor]:
    if key_lengths is None:
        return None
    if key_lengths.numel() > 0:
        lo, hi = int(key_lengths.min()), int(key_lengths.max())
        if lo < 0 or hi > Lk:
            raise ValueError(f"key_lengths must lie in [0, Lk={Lk}], got values in [{lo}, {hi}]")
    return key_lengths.to(torch.int32).contiguous()


def _empty(q: Tensor, v: Tensor) -> bool:
    B, H, Lq, _ = q.shape
    return B == 0 or Lq == 0 or v.shape[2] == 0


def _empty_forward(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    B, H, Lq, _ = q.shape
    out = q.new_zeros(B, H, Lq, v.shape[-1])
    lse = torch.full((B, H, Lq), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    return out, lse


def _fwd_meta(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    B, H, Lq, _ = q.shape
    return q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(B, H, Lq, dtype=lse_dtype(q.dtype))


# ---------------------------------------------------------------------------- additive


@torch.library.custom_op("fusedattn::additive_fwd", mutates_args=())
def additive_fwd(q: Tensor, k: Tensor, v: Tensor, w: Tensor, key_lengths: Optional[Tensor],
                 causal: bool, backend: str) -> tuple[Tensor, Tensor]:
    key_lengths = _checked_lengths(key_lengths, k.shape[2])
    if _empty(q, v):
        return _empty_forward(q, v)
    impl = backends.get(backends.select(backend, "additive", q, k, v))
    return impl.additive_forward(q, k, v, w, key_lengths, causal)


@additive_fwd.register_fake
def _(q, k, v, w, key_lengths, causal, backend):
    return _fwd_meta(q, v)


@torch.library.custom_op("fusedattn::additive_bwd", mutates_args=())
def additive_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Tensor, key_lengths: Optional[Tensor],
                 out: Tensor, lse: Tensor, causal: bool, backend: str
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    key_lengths = _checked_lengths(key_lengths, k.shape[2])
    if _empty(q, v):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(w)
    impl = backends.get(backends.select(backend, "additive", q, k, v))
    return tuple(impl.additive_backward(dout, q, k, v, w, key_lengths, causal, out, lse))


@additive_bwd.register_fake
def _(dout, q, k, v, w, key_lengths, out, lse, causal, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(w)


def _additive_setup(ctx, inputs, output):
    q, k, v, w, key_lengths, causal, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, w, key_lengths, out, lse)
    ctx.causal, ctx.backend = causal, backend
    ctx.mark_non_differentiable(lse)


def _additive_backward(ctx, dout, dlse):
    q, k, v, w, key_lengths, out, lse = ctx.saved_tensors
    dq, dk, dv, dw = additive_bwd(dout, q, k, v, w, key_lengths, out, lse, ctx.causal, ctx.backend)
    return dq, dk, dv, dw, None, None, None


additive_fwd.register_autograd(_additive_backward, setup_context=_additive_setup)


# ---------------------------------------------------------------------------- dot product


@torch.library.custom_op("fusedattn::dot_fwd", mutates_args=())
def dot_fwd(q: Tensor, k: Tensor, v: Tensor, key_lengths: Optional[Tensor], scale: float, causal: bool,
            backend: str) -> tuple[Tensor, Tensor]:
    key_lengths = _checked_lengths(key_lengths, k.shape[2])
    if _empty(q, v):
        return _empty_forward(q, v)
    impl = backends.get(backends.select(backend, "dot", q, k, v))
    return impl.dot_forward(q, k, v, key_lengths, scale, causal)


@dot_fwd.register_fake
def _(q, k, v, key_lengths, scale, causal, backend):
    return _fwd_meta(q, v)


@torch.library.custom_op("fusedattn::dot_bwd", mutates_args=())
def dot_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, key_lengths: Optional[Tensor], out: Tensor,
            lse: Tensor, scale: float, causal: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    key_lengths = _checked_lengths(key_lengths, k.shape[2])
    if _empty(q, v):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    impl = backends.get(backends.select(backend, "dot", q, k, v))
    return tuple(impl.dot_backward(dout, q, k, v, key_lengths, scale, causal, out, lse))


@dot_bwd.register_fake
def _(dout, q, k, v, key_lengths, out, lse, scale, causal, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _dot_setup(ctx, inputs, output):
    q, k, v, key_lengths, scale, causal, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_lengths, out, lse)
    ctx.scale, ctx.causal, ctx.backend = scale, causal, backend
    ctx.mark_non_differentiable(lse)


def _dot_backward(ctx, dout, dlse):
    q, k, v, key_lengths, out, lse = ctx.saved_tensors
    dq, dk, dv = dot_bwd(dout, q, k, v, key_lengths, out, lse, ctx.scale, ctx.causal, ctx.backend)
    return dq, dk, dv, None, None, None, None


dot_fwd.register_autograd(_dot_backward, setup_context=_dot_setup)
