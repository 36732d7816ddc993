"""The public functions: validate once, build the call's ``AttnSpec``, resolve the backend once,
call the registered op.

Shapes (every backend, every function)::

    q            (B, H,  Lq, D)     queries (additive: already projected, W_a s_i)
    k            (B, Hk, Lk, D)     keys    (additive: already projected, U_a h_j)
    v            (B, Hk, Lk, Dv)    values
    w            (H, D)             additive score vector per query head
    key_lengths  (B,) int32/int64   number of valid keys per batch entry, in [0, Lk]
    out          (B, H,  Lq, Dv)    in the input dtype
    lse          (B, H,  Lq)        float32 (float64 for float64 inputs), natural log

Varlen (packed) calls take q ``(total_q, H, D)``, k/v ``(total_k, Hk, ·)`` and int32
``cu_seqlens_q/k (batch+1,)``, and return out ``(total_q, H, Dv)`` and lse ``(H, total_q)``.

``H % Hk == 0``: query head ``h`` reads key/value head ``h // (H // Hk)`` (grouped
heads; ``Hk == H`` is ordinary multi-head attention). Any strides are accepted.

Allowed pairs, scores and biases: see ``fusedattn.spec``. The causal mask is aligned to the
bottom-right corner of the score matrix, as in FlashAttention >= 2.1 (equal to SDPA's
``is_causal`` when ``Lq == Lk``; when ``Lq > Lk`` the first ``Lq - Lk`` query rows see no key).
The causal offset uses the padded ``Lk``, not ``key_lengths``. A query row with no allowed
key returns zeros, ``lse = -inf`` and zero gradients.
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import backends, ops, reference
from .spec import AttnSpec

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_TINY = float(torch.finfo(torch.float32).tiny)
# auto falling back to the materializing reference warns once above this many score bytes
FALLBACK_WARN_BYTES = 32 << 20


class ReferenceFallbackWarning(UserWarning):
    """``backend="auto"`` chose the materializing reference path for a large problem."""


def _shape(t) -> tuple:
    return tuple(t.shape)


def _is_bool(x) -> bool:
    np = sys.modules.get("numpy")
    return isinstance(x, bool) or (np is not None and isinstance(x, np.bool_))


def _user_shape(t, packed: bool) -> tuple:
    """``t``'s shape as the caller passed it: a varlen call's ``(1, H, total, D)`` view is
    ``(total, H, D)``."""
    return (t.shape[2], t.shape[1], t.shape[3]) if packed else _shape(t)


class _Shapes:
    """``"q (..), k (..), v (..)"`` in an error message, formatted only when one is raised (in the
    caller's layout: ``(total, H, D)`` for varlen calls)."""

    def __init__(self, q, k, v, packed: bool = False):
        self.qkv, self.packed = (q, k, v), packed

    def __format__(self, spec) -> str:
        q, k, v = (_user_shape(t, self.packed) for t in self.qkv)
        return f"q {q}, k {k}, v {v}"


def _check_layout(name: str, t: Tensor, what: str = "") -> None:
    """A TypeError naming ``name`` for a nested or sparse tensor (``what``: its expected shape)."""
    if t.is_nested or t.layout != torch.strided:
        layout = "nested" if t.is_nested else str(t.layout)
        shape = f" of shape {what}" if what else ""
        raise TypeError(f"{name} must be a dense (strided) tensor{shape}, got a {layout} tensor")


def _check_tensor(name: str, t, ndim: int, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {what}, got {type(t).__name__}")
    _check_layout(name, t, what)
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {what} ({ndim} dims), got {_shape(t)}")


def _check_transforms(*tensors) -> None:
    """Forward-mode AD and torch.func transforms are refused (the ops have no jvp / batching rule)."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is None:
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            raise NotImplementedError(
                "fusedattn does not support torch.func transforms (grad, jacrev, jacfwd, jvp, vmap); "
                "use torch.autograd.grad or .backward() (reverse mode), or fusedattn.reference")
        if torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                "fusedattn does not support forward-mode AD (dual tensors); use reverse mode "
                "(torch.autograd.grad / .backward()) or fusedattn.reference")


def _check_window(window, causal: bool, span: int) -> tuple[int, int]:
    """(left, right) with -1 for an unbounded side; a side of at least ``span`` (Lq + Lk: no
    aligned distance reaches it) is unbounded too, so any Python int is a valid side."""
    if window is None:
        left, right = -1, -1
    else:
        if not isinstance(window, (tuple, list)) or len(window) != 2 or \
                not all(isinstance(x, numbers.Integral) and not _is_bool(x) for x in window):
            raise TypeError(f"window must be None or a pair of ints (left, right), got {window!r}")
        left, right = int(window[0]), int(window[1])
        if left < -1 or right < -1:
            raise ValueError(f"window sides must be >= -1 (-1: unbounded), got window={tuple(window)}")
        left, right = (-1 if x >= span else x for x in (left, right))
    if causal:
        if right > 0:
            raise ValueError(f"causal=True means window right = 0; got window={tuple(window)}")
        right = 0
    return left, right


def _check_scalar(name: str, x, dtype) -> float:
    if _is_bool(x) or not isinstance(x, numbers.Real):
        none = " None or" if name == "scale" else ""
        raise TypeError(f"{name} must be{none} a real number, got {type(x).__name__}")
    x = float(x)
    limit = math.inf if dtype == torch.float64 else _F32_MAX
    # comparisons, not math.isfinite: torch.compile(dynamic=True) traces a float argument as a symbol
    if not (abs(x) <= limit and abs(x) < math.inf):  # NaN fails both
        raise ValueError(f"{name} must be finite{' in float32' if limit < math.inf else ''}, got {x}")
    return x


def _validate(q, k, v, w, *, additive: bool, key_lengths=None, scale=None, softcap=0.0, causal=False,
              window=None, rel_bias=None, alibi_slopes=None, backend="auto", varlen=None) -> AttnSpec:
    """Check every argument; return the call's ``AttnSpec`` (q/k/v already in (B, H, L, D) form)."""
    named = [("q", q), ("k", k), ("v", v)] + ([("w", w)] if additive else [])
    for name, t in named:
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), "
                            f"got {t.dtype}")
    if any(t.dtype != q.dtype for _, t in named):
        dtypes = {name: t.dtype for name, t in named}
        raise TypeError(f"q, k, v{', w' if additive else ''} must share one dtype, got {dtypes}")
    if any(t.device != q.device for _, t in named):
        devices = {name: str(t.device) for name, t in named}
        raise ValueError(f"q, k, v{', w' if additive else ''} must be on one device, got {devices}")
    B, H, Lq, D = q.shape
    Bk, Hk, Lk, Dk = k.shape
    Bv, Hv, Lv, Dv = v.shape
    shapes = _Shapes(q, k, v, varlen is not None)  # formatted only for a message
    if Bk != B or Bv != B:
        raise ValueError(f"q, k and v must share the batch size B: {shapes}")
    if Hv != Hk or Lv != Lk:
        raise ValueError(f"k and v must share Hk and Lk: {shapes}")
    if Dk != D:
        raise ValueError(f"q and k must share the head dim D: {shapes}")
    if D == 0 or Dv == 0:
        raise ValueError(f"head dims D and Dv must be >= 1: {shapes}")
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"the query heads H must be a multiple of the key/value heads Hk "
                         f"(grouped heads): {shapes}")
    if additive and _shape(w) != (H, D):
        raise ValueError(f"w must have shape (H, D) = {(H, D)}, got {_shape(w)} "
                         f"(with q {_user_shape(q, varlen is not None)})")
    if key_lengths is not None:
        if not isinstance(key_lengths, Tensor):
            raise TypeError(f"key_lengths must be None or an integer tensor of shape (B,) = ({B},), "
                            f"got {type(key_lengths).__name__}")
        _check_layout("key_lengths", key_lengths)
        if key_lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"key_lengths must have dtype int32 or int64, got {key_lengths.dtype}")
        if _shape(key_lengths) != (B,):
            raise ValueError(f"key_lengths must have shape (B,) = ({B},), got {_shape(key_lengths)}")
        if key_lengths.device != q.device:
            raise ValueError(f"key_lengths is on {key_lengths.device} but q is on {q.device}")
    if additive and scale is not None:
        raise ValueError(f"scale applies to dot-product scores only (w given: additive), "
                         f"got scale={scale!r}")
    if additive and (_is_bool(softcap) or not isinstance(softcap, numbers.Real) or softcap != 0):
        raise ValueError(f"softcap applies to dot-product scores only (w given: additive), "
                         f"got softcap={softcap!r}")
    # int(D): a head dim traced as a symbol (torch.compile dynamic=True) is specialized, not sqrt-ed
    scale = 1.0 / math.sqrt(int(D)) if scale is None else _check_scalar("scale", scale, q.dtype)
    softcap = _check_scalar("softcap", softcap, q.dtype)
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0: off), got {softcap}")
    # the kernels take softcap and scale / softcap (times 2 log2 e) as float32 numbers
    if softcap > 0 and q.dtype != torch.float64 and \
            (softcap < _F32_TINY or not abs(scale) / softcap < _F32_MAX / 4):
        raise ValueError(f"softcap={softcap} is too small for float32 with scale={scale}: softcap must be "
                         f"0 or >= {_F32_TINY:.3g}, and scale / softcap below {_F32_MAX / 4:.3g}")
    if not _is_bool(causal):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    left, right = _check_window(window, bool(causal), Lq + Lk)
    nseq = B if varlen is None else varlen[0].shape[0] - 1
    if rel_bias is not None:
        _check_tensor("rel_bias", rel_bias, 2, "(H, 2M - 1)")
        if rel_bias.shape[0] != H or rel_bias.shape[1] % 2 != 1:
            raise ValueError(f"rel_bias must have shape (H, 2M - 1) = ({H}, odd), got {_shape(rel_bias)}")
        if rel_bias.dtype not in (torch.float32, q.dtype):
            raise TypeError(f"rel_bias must be float32 or the inputs' dtype {q.dtype}, got {rel_bias.dtype}")
        if rel_bias.device != q.device:
            raise ValueError(f"rel_bias is on {rel_bias.device} but q is on {q.device}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor):
            raise TypeError(f"alibi_slopes must be a float32 tensor of shape (H,) or (B, H), "
                            f"got {type(alibi_slopes).__name__}")
        _check_layout("alibi_slopes", alibi_slopes)
        if _shape(alibi_slopes) not in ((H,), (nseq, H)):
            raise ValueError(f"alibi_slopes must have shape (H,) = ({H},) or (B, H) = ({nseq}, {H}), "
                             f"got {_shape(alibi_slopes)}")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
        if alibi_slopes.requires_grad and torch.is_grad_enabled():
            raise ValueError("alibi_slopes get no gradient (fixed slopes, as in FlashAttention); pass "
                             "alibi_slopes.detach(), or a rel_bias (H, 2M - 1) for a learned bias")
    if not isinstance(backend, str) or backend not in ("auto", *backends.names()):
        raise ValueError(f"backend={backend!r} is unknown; choose one of {['auto', *backends.names()]}")
    cu_q, cu_k, mq, mk = varlen if varlen is not None else (None, None, -1, -1)
    return AttnSpec(score="additive" if additive else "dot", scale=scale, softcap=softcap,
                    window_left=left, window_right=right, key_lengths=key_lengths, rel_bias=rel_bias,
                    alibi_slopes=alibi_slopes, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                    max_seqlen_q=mq, max_seqlen_k=mk)


def _check_flag(name: str, x) -> bool:
    if not _is_bool(x):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r}")
    return bool(x)


def _autocast(q, k, v, w):
    """Under torch.autocast, q/k/v/w (float32 or lower) follow the autocast dtype, like matmul."""
    dev = q.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return q, k, v, w
    dt = torch.get_autocast_dtype(dev)
    cast = lambda t: t if t is None or t.dtype == torch.float64 else t.to(dt)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(w)


_WARNED: set = set()


def _resolve(backend: str, spec: AttnSpec, q, k, v) -> str:
    name, skipped = backends.resolve(backend, spec, q, k, v)
    if backend == "auto" and name == "reference" and not torch.compiler.is_compiling():
        B, H, Lq, _ = q.shape
        nbytes = B * H * Lq * k.shape[2] * 4 * (q.shape[-1] if spec.additive else 1)
        key = (q.device.type, q.dtype, spec.modifiers())
        if nbytes > FALLBACK_WARN_BYTES and key not in _WARNED:
            _WARNED.add(key)
            why = "; ".join(f"{n}: {', '.join(r)}" for n, r in skipped.items()) or "no fused backend"
            warnings.warn(
                f"fusedattn: backend='auto' runs {spec} on the materializing reference path "
                f"(~{nbytes / 2**20:.0f} MiB of scores) because {why}. Pass backend='reference' to "
                "choose it explicitly, or filter fusedattn.ReferenceFallbackWarning to silence this.",
                ReferenceFallbackWarning, stacklevel=4)
    return name


def _call(spec: AttnSpec, q, k, v, w, backend: str, return_lse):
    return_lse = _check_flag("return_lse", return_lse)
    _check_transforms(q, k, v, w, spec.rel_bias)
    name = _resolve(backend, spec, q, k, v)
    out, lse = ops.forward(spec, q, k, v, w, name)
    return (out, lse) if return_lse else out


def _check_dense(q, k, v, w, additive):
    _check_tensor("q", q, 4, "(B, H, Lq, D)")
    _check_tensor("k", k, 4, "(B, Hk, Lk, D)")
    _check_tensor("v", v, 4, "(B, Hk, Lk, Dv)")
    if additive:
        _check_tensor("w", w, 2, "(H, D)")


def additive_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, *, key_lengths: Optional[Tensor] = None,
                       causal: bool = False, window: Optional[tuple] = None,
                       rel_bias: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                       return_lse: bool = False, backend: str = "auto"):
    """Fused additive (Bahdanau) attention.

    ``out[b,h,i] = sum_j softmax_j(s[b,h,i,:]) * v[b,h',j]`` with
    ``s[b,h,i,j] = sum_a w[h,a] * tanh(q[b,h,i,a] + k[b,h',j,a])``, ``h' = h // (H // Hk)``.

    Args:
        q: ``(B, H, Lq, D)`` projected queries (``W_a s_i``; the attention dim ``A`` is ``D``).
        k: ``(B, Hk, Lk, D)`` projected keys (``U_a h_j``).
        v: ``(B, Hk, Lk, Dv)`` values.
        w: ``(H, D)`` score vector of each query head (finite).
        key_lengths: optional ``(B,)`` int32/int64 tensor of valid key counts in ``[0, Lk]``.
        causal: mask key ``j > i + (Lk - Lq)`` (bottom-right aligned, see the module docstring).
        window: ``(left, right)``: keys ``i + (Lk-Lq) - left <= j <= i + (Lk-Lq) + right`` only;
            ``-1`` is unbounded (as is a side of at least ``Lq + Lk``); with ``causal`` right must
            be -1 or 0.
        rel_bias: ``(H, 2M - 1)`` bias by clamped distance (``fusedattn.spec``); differentiable.
        alibi_slopes: ``(H,)`` or ``(B, H)`` float32: the score gains ``-slope * |d|``.
        return_lse: also return ``lse (B, H, Lq)``, the log-sum-exp of each score row
            (float32, float64 for float64 inputs; ``-inf`` for a row with no allowed key;
            not differentiable). ``attention_weights`` turns it into weights.
        backend: ``"auto"`` (the fastest usable backend for the tensors' device and the call's
            modifiers), ``"reference"``, ``"cpu"`` or ``"triton"``; see ``resolve_backend()``.

    Returns:
        ``out (B, H, Lq, Dv)`` in the input dtype, or ``(out, lse)`` with ``return_lse``.
        Gradients flow to ``q``, ``k``, ``v``, ``w`` and ``rel_bias``.
    """
    _check_dense(q, k, v, w, True)
    q, k, v, w = _autocast(q, k, v, w)
    spec = _validate(q, k, v, w, additive=True, key_lengths=key_lengths, causal=causal, window=window,
                     rel_bias=rel_bias, alibi_slopes=alibi_slopes, backend=backend)
    return _call(spec, q, k, v, w, backend, return_lse)


def dot_product_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                          softcap: float = 0.0, key_lengths: Optional[Tensor] = None, causal: bool = False,
                          window: Optional[tuple] = None, rel_bias: Optional[Tensor] = None,
                          alibi_slopes: Optional[Tensor] = None, return_lse: bool = False,
                          backend: str = "auto"):
    """Fused scaled dot-product attention: ``s[b,h,i,j] = scale * q[b,h,i] . k[b,h',j]``.

    Args:
        q: ``(B, H, Lq, D)``; k: ``(B, Hk, Lk, D)``; v: ``(B, Hk, Lk, Dv)``, ``H % Hk == 0``.
        scale: a finite real; default ``1 / sqrt(D)``.
        softcap: ``> 0`` caps the scores: ``s = softcap * tanh(s / softcap)`` (before the biases).
        key_lengths, causal, window, rel_bias, alibi_slopes, return_lse, backend: as in
            ``additive_attention``.

    Returns:
        ``out (B, H, Lq, Dv)`` in the input dtype, or ``(out, lse)`` with ``return_lse``.
    """
    _check_dense(q, k, v, None, False)
    q, k, v, _ = _autocast(q, k, v, None)
    spec = _validate(q, k, v, None, additive=False, key_lengths=key_lengths, scale=scale, softcap=softcap,
                     causal=causal, window=window, rel_bias=rel_bias, alibi_slopes=alibi_slopes,
                     backend=backend)
    return _call(spec, q, k, v, None, backend, return_lse)


# ---------------------------------------------------------------------------- varlen


def _check_varlen(q, k, v, w, additive, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    _check_tensor("q", q, 3, "(total_q, H, D)")
    _check_tensor("k", k, 3, "(total_k, Hk, D)")
    _check_tensor("v", v, 3, "(total_k, Hk, Dv)")
    if additive:
        _check_tensor("w", w, 2, "(H, D)")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_tensor(name, cu, 1, "(batch + 1,)")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.shape[0] < 1:
            raise ValueError(f"{name} must have at least one entry (batch + 1), got {_shape(cu)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q {_shape(cu_seqlens_q)} and cu_seqlens_k {_shape(cu_seqlens_k)} "
                         "must have one shape (batch + 1,)")
    ms = []
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is None:
            ms.append(-1)
            continue
        if _is_bool(m) or not isinstance(m, numbers.Integral):
            raise TypeError(f"{name} must be None or an int >= 0, got {type(m).__name__} {m!r}")
        if m < 0:
            raise ValueError(f"{name} must be None or an int >= 0, got {m!r}")
        ms.append(int(m))
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must share total_k: k {_shape(k)}, v {_shape(v)}")
    # (total, H, D) -> (1, H, total, D) views: one packed "batch" the backends split by cu_seqlens
    qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    return qb, kb, vb, (cu_seqlens_q, cu_seqlens_k, ms[0], ms[1])


def _varlen_out(res, return_lse):
    out, lse = res if isinstance(res, tuple) else (res, None)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_lse else out


def additive_attention_varlen(q: Tensor, k: Tensor, v: Tensor, w: Tensor, cu_seqlens_q: Tensor,
                              cu_seqlens_k: Tensor, *, max_seqlen_q: Optional[int] = None,
                              max_seqlen_k: Optional[int] = None, causal: bool = False,
                              window: Optional[tuple] = None, rel_bias: Optional[Tensor] = None,
                              alibi_slopes: Optional[Tensor] = None, return_lse: bool = False,
                              backend: str = "auto"):
    """Additive attention over a packed batch (FlashAttention's varlen layout).

    q ``(total_q, H, D)``, k ``(total_k, Hk, D)``, v ``(total_k, Hk, Dv)``; ``cu_seqlens_q/k`` int32
    ``(batch+1,)`` starting at 0, non-decreasing, ending at the totals: sequence ``b`` is rows
    ``cu_seqlens[b]:cu_seqlens[b+1]``. Causal, window and biases align per sequence; empty
    sequences are allowed. Returns ``out (total_q, H, Dv)`` (and ``lse (H, total_q)``).
    """
    qb, kb, vb, varlen = _check_varlen(q, k, v, w, True, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k)
    qb, kb, vb, w = _autocast(qb, kb, vb, w)
    spec = _validate(qb, kb, vb, w, additive=True, causal=causal, window=window, rel_bias=rel_bias,
                     alibi_slopes=alibi_slopes, backend=backend, varlen=varlen)
    return _varlen_out(_call(spec, qb, kb, vb, w, backend, True), _check_flag("return_lse", return_lse))


def dot_product_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                 *, max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                                 scale: Optional[float] = None, softcap: float = 0.0, causal: bool = False,
                                 window: Optional[tuple] = None, rel_bias: Optional[Tensor] = None,
                                 alibi_slopes: Optional[Tensor] = None, return_lse: bool = False,
                                 backend: str = "auto"):
    """Dot-product attention over a packed batch; see ``additive_attention_varlen``."""
    qb, kb, vb, varlen = _check_varlen(q, k, v, None, False, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k)
    qb, kb, vb, _ = _autocast(qb, kb, vb, None)
    spec = _validate(qb, kb, vb, None, additive=False, scale=scale, softcap=softcap, causal=causal,
                     window=window, rel_bias=rel_bias, alibi_slopes=alibi_slopes, backend=backend,
                     varlen=varlen)
    return _varlen_out(_call(spec, qb, kb, vb, None, backend, True), _check_flag("return_lse", return_lse))


# ---------------------------------------------------------------------------- introspection


class Resolution(NamedTuple):
    """Which backend a call would use, and why each backend tried before it was passed over."""

    backend: str
    skipped: dict
    spec: AttnSpec


def resolve_backend(q: Tensor, k: Tensor, v: Tensor, w: Optional[Tensor] = None, *, backend: str = "auto",
                    **modifiers) -> Resolution:
    """The backend ``additive_attention`` (``w`` given) or ``dot_product_attention`` would run for
    these tensors and keyword arguments (``scale``, ``softcap``, ``key_lengths``, ``causal``,
    ``window``, ``rel_bias``, ``alibi_slopes``), with the reasons the others were skipped."""
    additive = w is not None
    allowed = ("scale", "softcap", "key_lengths", "causal", "window", "rel_bias", "alibi_slopes")
    for name in modifiers:
        if name not in allowed:
            raise TypeError(f"resolve_backend() got an unexpected keyword argument {name!r} "
                            f"(accepted: backend, {', '.join(allowed)})")
    _check_dense(q, k, v, w, additive)
    spec = _validate(q, k, v, w, additive=additive, backend=backend, **modifiers)
    name, skipped = backends.resolve(backend, spec, q, k, v)
    return Resolution(name, skipped, spec)


def available_backends() -> dict:
    """``{name: None if usable in this process, else the reason it is not}``."""
    return backends.available_backends()


# ---------------------------------------------------------------------------- weights


def attention_weights(q: Tensor, k: Tensor, *, w: Optional[Tensor] = None, scale: Optional[float] = None,
                      lse: Optional[Tensor] = None, key_lengths: Optional[Tensor] = None,
                      causal: bool = False,
                      softcap: float = 0.0, window: Optional[tuple] = None, rel_bias: Optional[Tensor] = None,
                      alibi_slopes: Optional[Tensor] = None, chunk: int = 64) -> Tensor:
    """Exact softmax weights ``(B, H, Lq, Lk)`` of a call, recomputed ``chunk`` query rows at a time.

    For plots, analysis and alignment losses: the fused forward never stores them. ``w`` given
    means additive scores (``scale`` must then be None), else dot scores with ``scale`` (default
    ``1/sqrt(D)``); the modifiers are those of the forward call. Weights are 0 for disallowed
    pairs and for rows with no allowed key; each other row sums to 1. Differentiable with respect
    to ``q``, ``k``, ``w`` and ``rel_bias``: each chunk is recomputed in the backward
    (checkpointed), so memory stays ``O(B*H*chunk*Lk)`` (``*D`` for additive) beyond the result.
    ``lse`` (the ``(B, H, Lq)`` float tensor from ``return_lse=True``) is optional: when given
    and no gradient is needed, rows are normalized by it; otherwise each row's softmax is
    recomputed exactly.
    """
    additive = w is not None
    if additive and scale is not None:
        raise ValueError("attention_weights: pass w (additive) or scale (dot product), not both")
    if _is_bool(chunk) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    _check_tensor("q", q, 4, "(B, H, Lq, D)")
    _check_tensor("k", k, 4, "(B, Hk, Lk, D)")
    if additive:
        _check_tensor("w", w, 2, "(H, D)")
    q, k, _, w = _autocast(q, k, None, w)  # as the attention functions do (the nn modules' weights)
    # v's shape is irrelevant here; validate against a stand-in with k's (B, Hk, Lk).
    spec = _validate(q, k, k, w, additive=additive, key_lengths=key_lengths, scale=scale, softcap=softcap,
                     causal=causal, window=window, rel_bias=rel_bias, alibi_slopes=alibi_slopes)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    devices = backends.get("reference").devices  # the reference formulas, chunk by chunk
    if q.device.type not in devices:
        raise ValueError(f"attention_weights runs on {sorted(devices)} tensors, got q on {q.device}")
    if lse is not None:
        _check_tensor("lse", lse, 3, "(B, H, Lq)")
        if _shape(lse) != (B, H, Lq):
            raise ValueError(f"lse must have shape (B, H, Lq) = {(B, H, Lq)}, got {_shape(lse)}")
        if not lse.dtype.is_floating_point:
            raise TypeError(f"lse must be a floating tensor (float32 from return_lse=True), got {lse.dtype}")
        if lse.device != q.device:
            raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
    if key_lengths is not None:
        key_lengths = ops.checked_lengths(key_lengths, Lk)  # int32, in [0, Lk] (or a ValueError)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, w, rel_bias))
    mask = reference.allowed_mask(B, Lq, Lk, key_lengths, False, q.device, spec.window)

    def rows(qs, k, w, rb, s0, m):
        s = reference.scores(qs.to(cd), k.to(cd), None if w is None else w.to(cd), scale=spec.scale,
                             softcap=spec.softcap, rel_bias=None if rb is None else rb.to(cd),
                             alibi_slopes=alibi_slopes, row0=s0, Lq=Lq)
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        if s.shape[-1] == 0:  # no keys: an empty row of weights (amax has nothing to reduce)
            return s
        if lse is not None and not need_grad:
            row_lse = lse[:, :, s0:s0 + qs.shape[2], None].to(cd)
            p = torch.where(torch.isneginf(row_lse), torch.zeros_like(s), torch.exp(s - row_lse))
        else:
            mx = s.amax(-1, keepdim=True)
            p = torch.exp(s - torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx))
            den = p.sum(-1, keepdim=True)
            p = p / torch.where(den == 0, torch.ones_like(den), den)
        return p if m is None else p.masked_fill(~m, 0.0)

    out = []
    for s0 in range(0, Lq, chunk):
        qs = q[:, :, s0:s0 + chunk]
        m = None if mask is None else mask[:, :, s0:s0 + chunk]
        if need_grad:
            out.append(torch.utils.checkpoint.checkpoint(rows, qs, k, w, rel_bias, s0, m,
                                                         use_reentrant=False))
        else:
            with torch.no_grad():
                out.append(rows(qs, k, w, rel_bias, s0, m))
    return torch.cat(out, dim=2) if out else q.new_zeros(B, H, 0, Lk, dtype=cd)
