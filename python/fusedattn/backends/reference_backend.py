"""The reference backend: the plain-PyTorch oracle (``fusedattn.reference``) behind the op API.

Forward materializes the scores. Backward recomputes them and applies the
softmax-attention gradient in closed form (the op layer runs below autograd, so
it cannot differentiate the forward again); ``gradcheck`` in float64 pins it to the
autograd-differentiable functions of ``fusedattn.reference``. Half-precision
inputs are computed in float32.
"""
from __future__ import annotations

import torch

from .. import reference
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    devices = frozenset({"cpu", "cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    description = "plain PyTorch; materializes the (B, H, Lq, Lk) scores (and the tanh tensor)"

    def additive_forward(self, q, k, v, w, key_lengths, causal):
        return reference.additive_attention(q, k, v, w, key_lengths=key_lengths, causal=causal,
                                            return_lse=True, upcast=True)

    def additive_backward(self, dout, q, k, v, w, key_lengths, causal, out, lse):
        dtype = q.dtype
        dout, q, k, v, w = _upcast(dout, q, k, v, w)
        k, v = reference.zero_padding(k, key_lengths), reference.zero_padding(v, key_lengths)
        H, Hk = q.shape[1], k.shape[1]
        ke = reference._expand_heads(k, H)
        t = torch.tanh(q.unsqueeze(3) + ke.unsqueeze(2))                 # (B, H, Lq, Lk, A)
        s = (t * w.view(1, H, 1, 1, -1)).sum(-1)
        ds, dv = _softmax_backward(s, dout, v, key_lengths, causal)
        g = ds.unsqueeze(-1) * (1 - t * t)                                 # dS_ij (1 - t^2)
        dq = g.sum(3) * w.view(1, H, 1, -1)
        dk = _sum_groups(g.sum(2) * w.view(1, H, 1, -1), Hk)
        dw = (ds.unsqueeze(-1) * t).sum(dim=(0, 2, 3))
        return tuple(x.to(dtype) for x in (dq, dk, dv, dw))

    def dot_forward(self, q, k, v, key_lengths, scale, causal):
        return reference.dot_product_attention(q, k, v, scale=scale, key_lengths=key_lengths,
                                               causal=causal, return_lse=True, upcast=True)

    def dot_backward(self, dout, q, k, v, key_lengths, scale, causal, out, lse):
        dtype = q.dtype
        dout, q, k, v = _upcast(dout, q, k, v)
        k, v = reference.zero_padding(k, key_lengths), reference.zero_padding(v, key_lengths)
        H, Hk = q.shape[1], k.shape[1]
        ke = reference._expand_heads(k, H)
        s = reference.dot_scores(q, k, scale)
        ds, dv = _softmax_backward(s, dout, v, key_lengths, causal)
        dq = torch.matmul(ds, ke) * scale
        dk = _sum_groups(torch.matmul(ds.transpose(-1, -2), q) * scale, Hk)
        return tuple(x.to(dtype) for x in (dq, dk, dv))


def _upcast(*xs):
    return tuple(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs)


def _sum_groups(x: torch.Tensor, Hk: int) -> torch.Tensor:
    """(B, H, ...) -> (B, Hk, ...): sum the query heads that share a key/value head."""
    B, H = x.shape[:2]
    return x if H == Hk else x.view(B, Hk, H // Hk, *x.shape[2:]).sum(2)


def _softmax_backward(s, dout, v, key_lengths, causal):
    """Given scores s (B, H, Lq, Lk) and dL/dout, return (dS, dv)."""
    B, H, Lq, Lk = s.shape
    Hk = v.shape[1]
    mask = reference.allowed_mask(B, Lq, Lk, key_lengths, causal, s.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    ve = reference._expand_heads(v, H)
    dp = torch.matmul(dout, ve.transpose(-1, -2))
    delta = (p * dp).sum(-1, keepdim=True)                                # = rowsum(dO * O)
    ds = p * (dp - delta)
    dv = _sum_groups(torch.matmul(p.transpose(-1, -2), dout), Hk)
    return ds, dv
