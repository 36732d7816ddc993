"""The public functions: validate, then call the registered ops.

Shapes (every backend, every function)::

    q            (B, H,  Lq, D)     queries (additive: already projected, W_a s_i)
    k            (B, Hk, Lk, D)     keys    (additive: already projected, U_a h_j)
    v            (B, Hk, Lk, Dv)    values
    w            (H, D)             additive score vector per query head
    key_lengths  (B,) int32/int64   number of valid keys per batch entry, in [0, Lk]
    out          (B, H,  Lq, Dv)    in the input dtype
    lse          (B, H,  Lq)        float32 (float64 for float64 inputs), natural log

``H % Hk == 0``: query head ``h`` reads key/value head ``h // (H // Hk)`` (grouped
heads; ``Hk == H`` is ordinary multi-head attention). Any strides are accepted.

Allowed pairs: key ``j`` is visible to query ``i`` of batch ``b`` when
``j < key_lengths[b]`` and, with ``causal=True``, ``j <= i + (Lk - Lq)``: the causal
mask is aligned to the bottom-right corner of the score matrix, as in
FlashAttention >= 2.1 (equal to SDPA's ``is_causal`` when ``Lq == Lk``; when
``Lq > Lk`` the first ``Lq - Lk`` query rows see no key). The causal offset uses the
padded ``Lk``, not ``key_lengths``. A query row with no allowed key returns zeros,
``lse = -inf`` and zero gradients.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from . import backends, ops, reference

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _check_tensor(name: str, t, ndim: int, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {what}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {what} ({ndim} dims), got {_shape(t)}")


def _validate(q, k, v, w, key_lengths, scale, causal, backend, additive: bool) -> None:
    _check_tensor("q", q, 4, "(B, H, Lq, D)")
    _check_tensor("k", k, 4, "(B, Hk, Lk, D)")
    _check_tensor("v", v, 4, "(B, Hk, Lk, Dv)")
    named = [("q", q), ("k", k), ("v", v)]
    if additive:
        _check_tensor("w", w, 2, "(H, D)")
        named.append(("w", w))
    for name, t in named:
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), "
                            f"got {t.dtype}")
    dtypes = {name: t.dtype for name, t in named}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"q, k, v{', w' if additive else ''} must share one dtype, got {dtypes}")
    devices = {name: str(t.device) for name, t in named}
    if len(set(devices.values())) > 1:
        raise ValueError(f"q, k, v{', w' if additive else ''} must be on one device, got {devices}")
    B, H, Lq, D = q.shape
    Bk, Hk, Lk, Dk = k.shape
    Bv, Hv, Lv, Dv = v.shape
    shapes = f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
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
        raise ValueError(f"w must have shape (H, D) = {(H, D)}, got {_shape(w)} (with q {_shape(q)})")
    if key_lengths is not None:
        if not isinstance(key_lengths, Tensor):
            raise TypeError(f"key_lengths must be None or an integer tensor of shape (B,) = ({B},), "
                            f"got {type(key_lengths).__name__}")
        if key_lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"key_lengths must have dtype int32 or int64, got {key_lengths.dtype}")
        if _shape(key_lengths) != (B,):
            raise ValueError(f"key_lengths must have shape (B,) = ({B},), got {_shape(key_lengths)}")
        if key_lengths.device != q.device:
            raise ValueError(f"key_lengths is on {key_lengths.device} but q is on {q.device}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be None or a real number, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(backend, str) or backend not in ("auto", *backends.names()):
        raise ValueError(f"backend={backend!r} is unknown; choose one of {['auto', *backends.names()]}")


def additive_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, *, key_lengths: Optional[Tensor] = None,
                       causal: bool = False, return_lse: bool = False, backend: str = "auto"):
    """Fused additive (Bahdanau) attention.

    ``out[b,h,i] = sum_j softmax_j(s[b,h,i,:]) * v[b,h',j]`` with
    ``s[b,h,i,j] = sum_a w[h,a] * tanh(q[b,h,i,a] + k[b,h',j,a])``, ``h' = h // (H // Hk)``.

    Args:
        q: ``(B, H, Lq, D)`` projected queries (``W_a s_i``; the attention dim ``A`` is ``D``).
        k: ``(B, Hk, Lk, D)`` projected keys (``U_a h_j``).
        v: ``(B, Hk, Lk, Dv)`` values.
        w: ``(H, D)`` score vector of each query head.
        key_lengths: optional ``(B,)`` int32/int64 tensor of valid key counts in ``[0, Lk]``.
        causal: mask key ``j > i + (Lk - Lq)`` (bottom-right aligned, see the module docstring).
        return_lse: also return ``lse (B, H, Lq)``, the log-sum-exp of each score row
            (float32, float64 for float64 inputs; ``-inf`` for a row with no allowed key;
            not differentiable). ``attention_weights`` turns it into weights.
        backend: ``"auto"`` (the fastest usable backend for the tensors' device),
            ``"reference"``, ``"cpu"`` or ``"triton"``; see ``available_backends()``.

    Returns:
        ``out (B, H, Lq, Dv)`` in the input dtype, or ``(out, lse)`` with ``return_lse``.
        Gradients flow to ``q``, ``k``, ``v`` and ``w``.
    """
    _validate(q, k, v, w, key_lengths, None, causal, backend, additive=True)
    out, lse = ops.additive_fwd(q, k, v, w, key_lengths, causal, backend)
    return (out, lse) if return_lse else out


def dot_product_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                          key_lengths: Optional[Tensor] = None, causal: bool = False,
                          return_lse: bool = False, backend: str = "auto"):
    """Fused scaled dot-product attention: ``s[b,h,i,j] = scale * q[b,h,i] . k[b,h',j]``.

    Args:
        q: ``(B, H, Lq, D)``; k: ``(B, Hk, Lk, D)``; v: ``(B, Hk, Lk, Dv)``, ``H % Hk == 0``.
        scale: a finite real; default ``1 / sqrt(D)``.
        key_lengths, causal, return_lse, backend: as in ``additive_attention``.

    Returns:
        ``out (B, H, Lq, Dv)`` in the input dtype, or ``(out, lse)`` with ``return_lse``.
    """
    _validate(q, k, v, None, key_lengths, scale, causal, backend, additive=False)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = ops.dot_fwd(q, k, v, key_lengths, scale, causal, backend)
    return (out, lse) if return_lse else out


def attention_weights(q: Tensor, k: Tensor, *, w: Optional[Tensor] = None, scale: Optional[float] = None,
                      lse: Tensor, key_lengths: Optional[Tensor] = None, causal: bool = False,
                      chunk: int = 64) -> Tensor:
    """Exact softmax weights ``(B, H, Lq, Lk)`` recomputed from the ``lse`` of a forward call.

    For plots and analysis: the fused forward never stores them. ``w`` given means
    additive scores (``scale`` must then be None), else dot scores with ``scale``
    (default ``1/sqrt(D)``). ``lse`` is the ``(B, H, Lq)`` tensor returned with
    ``return_lse=True`` by the same call. Weights are 0 for disallowed pairs and for
    rows with ``lse = -inf``; each other row sums to 1. Query rows are processed
    ``chunk`` at a time, so additive scores never build more than
    ``B*H*chunk*Lk*D`` elements at once. Not differentiable.
    """
    additive = w is not None
    if additive and scale is not None:
        raise ValueError("attention_weights: pass w (additive) or scale (dot product), not both")
    _check_tensor("q", q, 4, "(B, H, Lq, D)")
    _check_tensor("k", k, 4, "(B, Hk, Lk, D)")
    # v's shape is irrelevant here; validate against a stand-in with k's (B, Hk, Lk).
    _validate(q, k, k, w, key_lengths, scale, causal, "auto", additive=additive)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    _check_tensor("lse", lse, 3, "(B, H, Lq)")
    if _shape(lse) != (B, H, Lq):
        raise ValueError(f"lse must have shape (B, H, Lq) = {(B, H, Lq)}, got {_shape(lse)}")
    if key_lengths is not None:
        ops._checked_lengths(key_lengths, Lk)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.detach().to(cd), k.detach().to(cd)
    w = w.detach().to(cd) if additive else None
    lse = lse.detach().to(cd)
    mask = reference.allowed_mask(B, Lq, Lk, key_lengths, causal, q.device)
    rows = []
    for s0 in range(0, Lq, max(1, chunk)):
        qs = q[:, :, s0:s0 + chunk]
        s = reference.additive_scores(qs, k, w) if additive else reference.dot_scores(qs, k, scale)
        row_lse = lse[:, :, s0:s0 + chunk, None]
        p = torch.where(torch.isneginf(row_lse), torch.zeros_like(s), torch.exp(s - row_lse))
        if mask is not None:
            p = p.masked_fill(~mask[:, :, s0:s0 + chunk], 0.0)
        rows.append(p)
    return torch.cat(rows, dim=2) if rows else q.new_zeros(B, H, 0, Lk)


def available_backends() -> dict:
    """``{name: None if usable in this process, else the reason it is not}``."""
    return backends.available_backends()
