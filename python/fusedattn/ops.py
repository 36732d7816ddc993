"""The op layer: two ``torch.library`` custom ops with fake (meta) kernels and autograd::

    fusedattn::attn_fwd(q, k, v, w?, <spec tensors>, <spec scalars>, keep32, backend) -> (out, lse, out32)
    fusedattn::attn_bwd(dout, q, k, v, w?, <spec tensors>, out, lse, <spec scalars>, backend)
        -> (dq, dk, dv, dw, drel_bias)

The spec arguments are the fields of ``fusedattn.spec.AttnSpec`` in field order; the schemas
below are generated from them, so a new modifier needs no change here. ``backend`` is the
name the public function resolved (once); the backward runs the same backend. ``dw`` and
``drel_bias`` are empty tensors when the call has no ``w`` / ``rel_bias``.

``out32`` is the float32 output before rounding when ``keep32`` asks for it (a differentiable call),
for 16-bit inputs on a backend that computes it (``Backend.f32_out``), else an empty tensor: the
backward takes it as ``out``, so that ``delta = rowsum(dO * O)`` is not taken from the output
rounded to 16 bits. (From the rounded output each row's ``dS`` sums to a residual of the rounding's
size instead of ~0; ``dw`` and ``drel_bias`` sum ``dS`` over all rows and added the residuals up:
up to 2.1x the 2x rule's bound in a bfloat16 case.) It costs 4 bytes per output element kept for
the backward.

The implementations check what only the data can tell (``key_lengths`` and ``cu_seqlens``
values, a finite ``w``), handle empty sizes, and call the backend. Shapes, dtypes and devices
were checked by ``fusedattn.api``. The ops are opaque to ``torch.compile``, so the public
functions compile with ``fullgraph=True``. ``lse`` is returned but not differentiable;
double backward and forward-mode AD are refused (``api`` says so before any op runs).

Eager calls on plain tensors skip the dispatcher: ``forward``/``backward`` below run the same
implementations through a ``torch.autograd.Function`` (the custom op's Python dispatch costs
~90 us per call without autograd and ~210 us with it, against ~10 us; see ``_eager``). Every
other context (torch.compile, torch.export, fake tensors and other dispatch modes, torch
function modes, tensor subclasses, the profiler, jit tracing) goes through the op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends
from .backends.base import lse_dtype
from .spec import AttnSpec

_NT = len(AttnSpec.tensor_names())
_NS = len(AttnSpec.scalar_names())
_TENSORS = AttnSpec.schema_args("tensors")
_SCALARS = AttnSpec.schema_args("scalars")
FWD_SCHEMA = (f"(Tensor q, Tensor k, Tensor v, Tensor? w, {_TENSORS}, {_SCALARS}, bool keep32, "
              "str backend) -> (Tensor, Tensor, Tensor)")
BWD_SCHEMA = (f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? w, {_TENSORS}, Tensor out, Tensor lse, "
              f"{_SCALARS}, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


# ---------------------------------------------------------------------------- data checks


def _checked_lengths(key_lengths: Optional[Tensor], Lk: int) -> Optional[Tensor]:
    if key_lengths is None:
        return None
    if key_lengths.numel() > 0:
        lo, hi = int(key_lengths.min()), int(key_lengths.max())
        if lo < 0 or hi > Lk:
            raise ValueError(f"key_lengths must lie in [0, Lk={Lk}], got values in [{lo}, {hi}]")
    return key_lengths.to(torch.int32).contiguous()


def _checked_lengths_impl(key_lengths: Tensor, Lk: int) -> Tensor:
    return _checked_lengths(key_lengths, Lk).clone()  # an op's output may not alias its input (int32)


# the range check as an op of its own, for code outside the attention ops (attention_weights): under
# torch.compile / torch.export it runs when the graph runs (a ValueError then), so tracing reads no data
checked_lengths = torch.library.custom_op("fusedattn::checked_lengths", _checked_lengths_impl,
                                          mutates_args=(), schema="(Tensor key_lengths, SymInt Lk) -> Tensor")


@checked_lengths.register_fake
def _(key_lengths, Lk):
    return key_lengths.new_empty(key_lengths.shape, dtype=torch.int32)


def _check_cu(name: str, cu: Tensor, total: int, max_seqlen: int) -> None:
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    if vals[-1] != total:
        raise ValueError(f"{name} must end at the total length {total}, got {vals[-1]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    if any(n < 0 for n in lens):
        raise ValueError(f"{name} must be non-decreasing, got {vals}")
    longest = max(lens, default=0)
    if max_seqlen >= 0 and longest > max_seqlen:
        raise ValueError(f"max_seqlen_{name[-1]}={max_seqlen} is below the longest sequence ({longest}) "
                         f"of {name}")


def checked_spec(spec: AttnSpec, q: Tensor, k: Tensor, w: Optional[Tensor]) -> AttnSpec:
    """The value checks that need the data (done inside the op, so tracing never reads data)."""
    if spec.varlen:
        _check_cu("cu_seqlens_q", spec.cu_seqlens_q, q.shape[2], spec.max_seqlen_q)
        _check_cu("cu_seqlens_k", spec.cu_seqlens_k, k.shape[2], spec.max_seqlen_k)
    if w is not None and w.numel() and not bool(torch.isfinite(w).all()):
        bad = w[~torch.isfinite(w)].flatten()[:3].tolist()
        raise ValueError(f"w must be finite, got non-finite values such as {bad} in w of shape "
                         f"{tuple(w.shape)}")
    if spec.key_lengths is not None:
        spec = spec.replace(key_lengths=_checked_lengths(spec.key_lengths, k.shape[2]))
    return spec


def _empty(q: Tensor, v: Tensor) -> bool:
    B, H, Lq, _ = q.shape
    return B == 0 or H == 0 or Lq == 0 or v.shape[2] == 0


def _out32_dtype(q: Tensor, backend: str) -> Optional[torch.dtype]:
    """The dtype of the unrounded output ``backend`` returns for ``q``'s dtype when it differs."""
    dt = backends.fwd_out_dtype(backend, q.dtype)
    return None if dt == q.dtype else dt


def _fwd_meta(q: Tensor, v: Tensor, keep32: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    B, H, Lq, _ = q.shape
    dt = _out32_dtype(q, backend) if keep32 else None
    out32 = q.new_empty(0) if dt is None else q.new_empty(B, H, Lq, v.shape[-1], dtype=dt)
    return q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(B, H, Lq, dtype=lse_dtype(q.dtype)), out32


def _none_as_empty(x: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if x is None else x


# ---------------------------------------------------------------------------- forward


def _split_fwd(args):
    q, k, v, w = args[:4]
    spec = AttnSpec.from_args(args[4:4 + _NT], args[4 + _NT:4 + _NT + _NS])
    return q, k, v, w, spec, args[-2], args[-1]


def _attn_fwd_impl(*args):
    q, k, v, w, spec, keep32, backend = _split_fwd(args)
    out, lse, out32 = _fwd(spec, q, k, v, w, backend, keep32)
    return out, lse, q.new_empty(0) if out32 is None else out32


def _fwd(spec: AttnSpec, q, k, v, w, backend: str, keep32: bool = False):
    """``(out, lse, out32 or None)``; ``out32``: the unrounded output, when ``keep32`` asks for it and
    the backend computes it (see the module docstring)."""
    spec = checked_spec(spec, q, k, w)
    if _empty(q, v):
        B, H, Lq, _ = q.shape
        dt = _out32_dtype(q, backend) if keep32 else None
        return (q.new_zeros(B, H, Lq, v.shape[-1]),
                torch.full((B, H, Lq), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device),
                None if dt is None else q.new_zeros(B, H, Lq, v.shape[-1], dtype=dt))
    out, lse = backends.get(backend).forward(spec, q, k, v, w, out32=keep32)
    out, lse = out.contiguous(), lse.contiguous()  # the fake kernel's strides
    if out.dtype == q.dtype:
        return out, lse, None
    return out.to(q.dtype), lse, (out if keep32 else None)


attn_fwd = torch.library.custom_op("fusedattn::attn_fwd", _attn_fwd_impl, mutates_args=(), schema=FWD_SCHEMA)


@attn_fwd.register_fake
def _(*args):
    q, k, v, *_ = args
    return _fwd_meta(q, v, args[-2], args[-1])


# ---------------------------------------------------------------------------- backward


def _split_bwd(args):
    dout, q, k, v, w = args[:5]
    tensors = args[5:5 + _NT]
    out, lse = args[5 + _NT:7 + _NT]
    spec = AttnSpec.from_args(tensors, args[7 + _NT:7 + _NT + _NS])
    return dout, q, k, v, w, spec, out, lse, args[-1]


def _attn_bwd_impl(*args):
    dout, q, k, v, w, spec, out, lse, backend = _split_bwd(args)
    return _bwd(spec, dout, q, k, v, w, out, lse, backend)


def _bwd(spec: AttnSpec, dout, q, k, v, w, out, lse, backend: str, unrounded: bool = False):
    """The gradients in the dtypes of their inputs (``unrounded``: as the backend returns them,
    float32 for 16-bit inputs on the cpu backend)."""
    spec = checked_spec(spec, q, k, None)
    if out.dtype != q.dtype and _out32_dtype(q, backend) != out.dtype:
        out = out.to(q.dtype)  # an unrounded output (ring attention's merge) for a backend without it
    if _empty(q, v):
        g = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
             None if w is None else torch.zeros_like(w),
             None if spec.rel_bias is None else torch.zeros_like(spec.rel_bias))
    else:
        g = backends.get(backend).backward(spec, dout, q, k, v, w, out, lse)
    dq, dk, dv, dw, drb = g
    if not unrounded and dq.dtype != q.dtype:
        dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        dw = None if dw is None else dw.to(w.dtype)
    if not unrounded and drb is not None and drb.dtype != spec.rel_bias.dtype:
        drb = drb.to(spec.rel_bias.dtype)
    # contiguous, as the fake kernel promises (torch.compile's inductor asserts the strides)
    return (dq.contiguous(), dk.contiguous(), dv.contiguous(), _none_as_empty(dw, q).contiguous(),
            _none_as_empty(drb, q).contiguous())


attn_bwd = torch.library.custom_op("fusedattn::attn_bwd", _attn_bwd_impl, mutates_args=(), schema=BWD_SCHEMA)


@attn_bwd.register_fake
def _(*args):
    dout, q, k, v, w, spec, out, lse, backend = _split_bwd(args)
    c = torch.contiguous_format
    return (torch.empty_like(q, memory_format=c), torch.empty_like(k, memory_format=c),
            torch.empty_like(v, memory_format=c),
            q.new_empty(0) if w is None else torch.empty_like(w, memory_format=c),
            q.new_empty(0) if spec.rel_bias is None else torch.empty_like(spec.rel_bias, memory_format=c))


# ---------------------------------------------------------------------------- autograd


def _setup(ctx, inputs, output):
    q, k, v, w, spec, _, backend = _split_fwd(inputs)
    out, lse, out32 = output
    tensors = spec.tensor_args()
    ctx.save_for_backward(q, k, v, w, out if out32.dim() != 4 else out32, lse, *tensors)
    ctx.scalars, ctx.backend = spec.scalar_args(), backend
    ctx.mark_non_differentiable(lse, out32)


def _backward(ctx, dout, dlse, dout32):
    q, k, v, w, out, lse, *tensors = ctx.saved_tensors
    dq, dk, dv, dw, drb = attn_bwd(dout.contiguous(), q, k, v, w, *tensors, out, lse, *ctx.scalars,
                                   ctx.backend)
    return _grads_out(tensors, w, dq, dk, dv, dw, drb)


_REL = AttnSpec.tensor_names().index("rel_bias")


def _grads_out(tensors, w, dq, dk, dv, dw, drb):
    """The gradients of attn_fwd's inputs, in its argument order."""
    grads_t = [None] * _NT
    if tensors[_REL] is not None:
        grads_t[_REL] = drb
    return (dq, dk, dv, None if w is None else dw, *grads_t, *([None] * _NS), None, None)  # keep32, backend


attn_fwd.register_autograd(_backward, setup_context=_setup)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("fusedattn: double backward (gradients of gradients) is not supported; "
                              "differentiate the reference path (fusedattn.reference) instead")


def _bwd_setup(ctx, inputs, output):
    pass


attn_bwd.register_autograd(_no_double_backward, setup_context=_bwd_setup)


# ---------------------------------------------------------------------------- eager fast path


def _eager(tensors) -> bool:
    """True when a call may bypass the dispatcher: plain eager execution on plain tensors."""
    if (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or torch.autograd.profiler._is_profiler_enabled or torch.jit.is_tracing()
            or _get_current_dispatch_mode() is not None):
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


_PLAIN = (Tensor, torch.nn.Parameter)  # Parameter overrides no dispatch (modules' w and rel_bias)


class _EagerAttn(torch.autograd.Function):
    """``attn_fwd`` and its registered autograd without the dispatcher: the same implementations
    (same bits), the call's ``AttnSpec`` passed as is."""

    @staticmethod
    def forward(ctx, spec, backend, q, k, v, w, rel_bias):  # rel_bias is spec.rel_bias (its gradient)
        out, lse, out32 = _fwd(spec, q, k, v, w, backend, keep32=True)
        ctx.save_for_backward(q, k, v, w, out if out32 is None else out32, lse,
                              *spec.tensor_args())  # version-checked
        ctx.spec, ctx.backend = spec, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, w, out, lse, *tensors = ctx.saved_tensors
        spec, dout = ctx.spec, dout.contiguous()
        if torch.is_grad_enabled():  # create_graph=True: attn_bwd's autograd refuses double backward
            g = attn_bwd(dout, q, k, v, w, *tensors, out, lse, *spec.scalar_args(), ctx.backend)
        else:
            g = _bwd(spec, dout, q, k, v, w, out, lse, ctx.backend)
        dq, dk, dv, dw, drb = g
        return (None, None, dq, dk, dv, None if w is None else dw, None if spec.rel_bias is None else drb)


# ---------------------------------------------------------------------------- entry points


def forward(spec: AttnSpec, q: Tensor, k: Tensor, v: Tensor, w: Optional[Tensor], backend: str,
            unrounded: bool = False):
    """Differentiable ``(out, lse)`` through ``fusedattn::attn_fwd`` (``backend`` already resolved).
    ``unrounded=True`` (not differentiable: callers that merge blocks themselves) returns ``out`` as
    the backend computed it: float32 for 16-bit inputs on a backend with ``f32_out``."""
    tensors = spec.tensor_args()
    if unrounded:
        with torch.no_grad():
            if _eager((q, k, v, w, *tensors)):
                out, lse, out32 = _fwd(spec, q, k, v, w, backend, keep32=True)
            else:
                out, lse, out32 = attn_fwd(q, k, v, w, *tensors, *spec.scalar_args(), True, backend)
                out32 = out32 if out32.dim() == 4 else None
        return (out if out32 is None else out32), lse
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (q, k, v, w, spec.rel_bias))
    if _eager((q, k, v, w, *tensors)):
        if grad:
            return _EagerAttn.apply(spec, backend, q, k, v, w, spec.rel_bias)
        return _fwd(spec, q, k, v, w, backend)[:2]
    return attn_fwd(q, k, v, w, *tensors, *spec.scalar_args(), grad, backend)[:2]


def backward(spec: AttnSpec, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, w: Optional[Tensor], out: Tensor,
             lse: Tensor, backend: str, unrounded: bool = False):
    """``Grads``-like tuple ``(dq, dk, dv, dw|None, drel_bias|None)`` for given ``out``/``lse``
    (for callers that merge blocks themselves, e.g. ring attention). ``out`` may be the unrounded
    float32 output for 16-bit inputs (preferred: see the module docstring). ``unrounded=True``: the
    gradients as the backend computed them (float32 for 16-bit inputs on the cpu backend; for callers
    that sum them) in eager calls; other contexts round them."""
    tensors = spec.tensor_args()
    if not torch.is_grad_enabled() and _eager((dout, q, k, v, w, *tensors, out, lse)):
        dq, dk, dv, dw, drb = _bwd(spec, dout, q, k, v, w, out, lse, backend, unrounded)
    else:
        dq, dk, dv, dw, drb = attn_bwd(dout, q, k, v, w, *tensors, out, lse, *spec.scalar_args(), backend)
    return dq, dk, dv, None if w is None else dw, None if spec.rel_bias is None else drb
