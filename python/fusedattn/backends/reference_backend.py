"""The reference backend: the plain-PyTorch oracle (``fusedattn.reference``) behind the op API.

Forward materializes the scores. Backward recomputes them and applies the
softmax-attention gradient in closed form (the op layer runs below autograd, so
it cannot differentiate the forward again); ``gradcheck`` in float64 pins it to the
autograd-differentiable functions of ``fusedattn.reference``. Half-precision
inputs are computed in float32. Serves every score and modifier of ``fusedattn.spec``.
"""
from __future__ import annotations

import torch

from .. import reference
from ..spec import MODIFIERS, AttnSpec
from .base import Backend, Grads


class ReferenceBackend(Backend):
    name = "reference"
    devices = frozenset({"cpu", "cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    modifiers = frozenset(MODIFIERS) - {"varlen"}  # packed batches: one call per sequence (base class)
    description = "plain PyTorch; materializes the (B, H, Lq, Lk) scores (and the tanh tensor)"

    def forward(self, spec: AttnSpec, q, k, v, w, out32: bool = False):
        if spec.varlen:
            return super().forward(spec, q, k, v, w, out32)
        return reference.attention(q, k, v, w if spec.additive else None, scale=spec.scale,
                                   softcap=spec.softcap, key_lengths=spec.key_lengths, window=spec.window,
                                   rel_bias=spec.rel_bias, alibi_slopes=spec.alibi_slopes,
                                   return_lse=True, upcast=True)

    def backward(self, spec: AttnSpec, dout, q, k, v, w, out, lse) -> Grads:
        if spec.varlen:
            return super().backward(spec, dout, q, k, v, w, out, lse)
        dtype = q.dtype
        dout, q, k, v = _upcast(dout, q, k, v)
        kl = spec.key_lengths
        k, v = reference.zero_padding(k, kl), reference.zero_padding(v, kl)
        B, H, Lq, _ = q.shape
        Hk, Lk = k.shape[1], k.shape[2]
        ke = reference._expand_heads(k, H)
        if spec.additive:
            (w,) = _upcast(w)
            t = torch.tanh(q.unsqueeze(3) + ke.unsqueeze(2))                 # (B, H, Lq, Lk, A)
            raw = (t * w.view(1, H, 1, 1, -1)).sum(-1)
        else:
            raw = reference.dot_scores(q, k, spec.scale)
        s = raw
        if spec.softcap > 0:
            tc = torch.tanh(raw / spec.softcap)
            s = spec.softcap * tc
        bias = reference.position_bias(Lq, Lk, spec.rel_bias, spec.alibi_slopes, q.device, s.dtype)
        if bias is not None:
            s = s + bias
        mask = reference.allowed_mask(B, Lq, Lk, kl, False, q.device, spec.window)
        ds, dv = _softmax_backward(s, dout, v, mask)                        # dL / d(final score)
        drel = None
        if spec.rel_bias is not None:
            M = (spec.rel_bias.shape[-1] + 1) // 2
            idx = reference.distance(Lq, Lk, q.device).clamp(-(M - 1), M - 1) + (M - 1)
            drel = torch.zeros(H, 2 * M - 1, dtype=ds.dtype, device=ds.device)
            drel.index_add_(1, idx.reshape(-1), ds.sum(0).reshape(H, -1))
            drel = drel.to(spec.rel_bias.dtype)
        if spec.softcap > 0:
            ds = ds * (1 - tc * tc)                                          # through the soft cap
        if spec.additive:
            g = ds.unsqueeze(-1) * (1 - t * t)                                 # dS_ij (1 - t^2)
            if mask is not None:  # a NaN operand stays in the rows and keys that see it
                g = torch.where(mask.unsqueeze(-1), g, torch.zeros_like(g))
                t = torch.where(mask.unsqueeze(-1), t, torch.zeros_like(t))
            dq = g.sum(3) * w.view(1, H, 1, -1)
            dk = _sum_groups(g.sum(2) * w.view(1, H, 1, -1), Hk)
            dw = (ds.unsqueeze(-1) * t).sum(dim=(0, 2, 3))
            return Grads(dq.to(dtype), dk.to(dtype), dv.to(dtype), dw.to(dtype), drel)
        # non-finite operands reach only the rows that see them (their dS is NaN already)
        dq = torch.matmul(ds, _finite(ke)) * spec.scale
        dk = _sum_groups(torch.matmul(ds.transpose(-1, -2), _finite(q)) * spec.scale, Hk)
        return Grads(dq.to(dtype), dk.to(dtype), dv.to(dtype), None, drel)


def _upcast(*xs):
    return tuple(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs)


def _finite(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _sum_groups(x: torch.Tensor, Hk: int) -> torch.Tensor:
    """(B, H, ...) -> (B, Hk, ...): sum the query heads that share a key/value head."""
    B, H = x.shape[:2]
    return x if H == Hk else x.view(B, Hk, H // Hk, *x.shape[2:]).sum(2)


def _softmax_backward(s, dout, v, mask):
    """Given scores s (B, H, Lq, Lk), the allowed mask and dL/dout, return (dS, dv).

    Disallowed pairs get exactly zero weight and zero dS, even when a row or a key holds NaN
    (a NaN key poisons only the rows that see it, never the padding or other rows' keys).
    """
    H = s.shape[1]
    Hk = v.shape[1]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    if mask is not None:
        p = torch.where(mask, p, torch.zeros_like(p))
    ve = reference._expand_heads(v, H)
    dp = torch.matmul(dout, ve.transpose(-1, -2))
    delta = (p * dp).sum(-1, keepdim=True)                                # = rowsum(dO * O)
    ds = p * (dp - delta)
    if mask is not None:
        ds = torch.where(mask, ds, torch.zeros_like(ds))
    dv = _sum_groups(torch.matmul(p.transpose(-1, -2), dout), Hk)
    return ds, dv
