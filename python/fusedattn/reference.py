"""The reference path: plain PyTorch that materializes the scores.

This is the oracle every fused backend is tested against. It is differentiable
by autograd, supports every option of the public API, and builds the full
``(B, H, Lq, Lk)`` score matrix (and, for additive scores, the
``(B, H, Lq, Lk, A)`` tanh tensor), so it is only for small and medium sizes.

``upcast=True`` computes in float32 (float64 stays float64) and casts the output
back to the input dtype, like FlashAttention's ``attention_ref``; ``upcast=False``
computes in the input dtype. Tests use both to apply the tolerance rule.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .backends.base import lse_dtype


def allowed_mask(B: int, Lq: int, Lk: int, key_lengths: Optional[torch.Tensor], causal: bool,
                 device) -> Optional[torch.Tensor]:
    """Boolean ``(B, 1, Lq, Lk)`` mask of allowed (query, key) pairs, or None if all are.

    Key ``j`` is allowed for query ``i`` of batch ``b`` when ``j < key_lengths[b]``
    and, if ``causal``, ``j <= i + (Lk - Lq)`` (bottom-right alignment).
    """
    if key_lengths is None and not causal:
        return None
    j = torch.arange(Lk, device=device)
    mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
    if key_lengths is not None:
        mask = mask & (j.view(1, 1, 1, Lk) < key_lengths.to(device).view(B, 1, 1, 1))
    if causal:
        i = torch.arange(Lq, device=device)
        mask = mask & (j.view(1, 1, 1, Lk) <= (i + (Lk - Lq)).view(1, 1, Lq, 1))
    return mask


def zero_padding(x: torch.Tensor, key_lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero the key rows ``j >= key_lengths[b]`` of a ``(B, Hk, Lk, ·)`` tensor.

    Padded keys and values never contribute, whatever they hold (even NaN).
    """
    if key_lengths is None:
        return x
    j = torch.arange(x.shape[2], device=x.device).view(1, 1, -1, 1)
    keep = j < key_lengths.to(x.device).view(-1, 1, 1, 1)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _expand_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """(B, Hk, L, D) -> (B, H, L, D): query head h reads head h // (H // Hk)."""
    Hk = x.shape[1]
    return x if Hk == H else x.repeat_interleave(H // Hk, dim=1)


def additive_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor,
                    chunk: Optional[int] = None) -> torch.Tensor:
    """``s[b,h,i,j] = sum_a w[h,a] * tanh(q[b,h,i,a] + k[b,h',j,a])``, shape (B, H, Lq, Lk).

    ``chunk`` bounds the query rows handled at once (memory ``B*H*chunk*Lk*A``);
    None builds the whole ``(B, H, Lq, Lk, A)`` tensor, as a plain implementation does.
    """
    H = q.shape[1]
    k = _expand_heads(k, H)
    wv = w.view(1, H, 1, 1, -1)
    if chunk is None or chunk >= q.shape[2]:
        return (torch.tanh(q.unsqueeze(3) + k.unsqueeze(2)) * wv).sum(-1)
    parts = [(torch.tanh(q[:, :, s:s + chunk].unsqueeze(3) + k.unsqueeze(2)) * wv).sum(-1)
             for s in range(0, q.shape[2], chunk)]
    return torch.cat(parts, dim=2)


def dot_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``s = scale * q @ k^T`` with grouped heads expanded, shape (B, H, Lq, Lk)."""
    return torch.matmul(q, _expand_heads(k, q.shape[1]).transpose(-1, -2)) * scale


def softmax_context(s: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]):
    """Masked softmax of scores ``s`` and the context ``P @ v``.

    Returns ``(out, lse)``. Rows with no allowed key give ``out = 0`` and
    ``lse = -inf`` with zero (never NaN) gradients.
    """
    H = s.shape[1]
    v = _expand_heads(v, H)
    if s.shape[-1] == 0:  # no keys at all: zeros (still connected to the graph) and lse = -inf
        return torch.matmul(s, v), s.sum(-1) + float("-inf")
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(denom)).squeeze(-1)
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    out = torch.matmul(p / safe, v)
    return out, lse


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if upcast and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def additive_attention(q, k, v, w, *, key_lengths=None, causal=False, return_lse=False,
                       upcast=False, chunk=None):
    """Reference additive (Bahdanau) attention; see ``fusedattn.additive_attention``."""
    dtype = q.dtype
    cd = _compute_dtype(dtype, upcast)
    q, k, v, w = (t.to(cd) for t in (q, k, v, w))
    k, v = zero_padding(k, key_lengths), zero_padding(v, key_lengths)
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    s = additive_scores(q, k, w, chunk=chunk)
    out, lse = softmax_context(s, v, allowed_mask(B, Lq, Lk, key_lengths, causal, q.device))
    out = out.to(dtype)
    lse = lse.to(lse_dtype(dtype))
    return (out, lse) if return_lse else out


def dot_product_attention(q, k, v, *, scale=None, key_lengths=None, causal=False, return_lse=False,
                          upcast=False):
    """Reference scaled dot-product attention; see ``fusedattn.dot_product_attention``."""
    dtype = q.dtype
    cd = _compute_dtype(dtype, upcast)
    q, k, v = (t.to(cd) for t in (q, k, v))
    k, v = zero_padding(k, key_lengths), zero_padding(v, key_lengths)
    B, _, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    s = dot_scores(q, k, scale)
    out, lse = softmax_context(s, v, allowed_mask(B, Lq, Lk, key_lengths, causal, q.device))
    out = out.to(dtype)
    lse = lse.to(lse_dtype(dtype))
    return (out, lse) if return_lse else out
