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
from .spec import distance


def allowed_mask(B: int, Lq: int, Lk: int, key_lengths: Optional[torch.Tensor], causal: bool,
                 device, window: tuple = (-1, -1)) -> Optional[torch.Tensor]:
    """Boolean ``(B, 1, Lq, Lk)`` mask of allowed (query, key) pairs, or None if all are.

    Key ``j`` is allowed for query ``i`` of batch ``b`` when ``j < key_lengths[b]`` and
    ``-left <= d <= right`` with ``d = j - i - (Lk - Lq)`` (bottom-right alignment) for
    ``window = (left, right)`` (``-1``: unbounded); ``causal`` sets ``right = 0``.
    """
    left, right = window
    if causal:
        right = 0
    if key_lengths is None and left < 0 and right < 0:
        return None
    mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
    if key_lengths is not None:
        j = torch.arange(Lk, device=device)
        mask = mask & (j.view(1, 1, 1, Lk) < key_lengths.to(device).view(B, 1, 1, 1))
    d = distance(Lq, Lk, device)
    if left >= 0:
        mask = mask & (d >= -left)
    if right >= 0:
        mask = mask & (d <= right)
    return mask


def position_bias(Lq: int, Lk: int, rel_bias: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
                  device, dtype, row0: int = 0, rows: Optional[int] = None) -> Optional[torch.Tensor]:
    """The additive score bias ``(1 or B, H, Lq, Lk)`` of ``rel_bias`` and ``alibi_slopes``, or None.

    ``rel_bias (H, 2M-1)`` adds ``rel_bias[h, clamp(d, -(M-1), M-1) + M - 1]``; ``alibi_slopes``
    ``(H,)`` or ``(B, H)`` adds ``-slope * |d|``; ``d = j - i - (Lk - Lq)``; only query rows
    ``row0 : row0 + rows`` when ``rows`` is given.
    """
    if rel_bias is None and alibi_slopes is None:
        return None
    d = distance(Lq, Lk, device, row0, rows)
    bias = None
    if rel_bias is not None:
        M = (rel_bias.shape[-1] + 1) // 2
        idx = d.clamp(-(M - 1), M - 1) + (M - 1)
        bias = rel_bias.to(dtype)[:, idx].unsqueeze(0)                       # (1, H, Lq, Lk)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype)
        slopes = slopes.view(1, -1, 1, 1) if slopes.dim() == 1 else slopes.view(*slopes.shape, 1, 1)
        ab = -slopes * d.abs().to(dtype)
        bias = ab if bias is None else bias + ab
    return bias


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
    wv = w.reshape(1, H, 1, 1, w.shape[-1])
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


def scores(q, k, w=None, *, scale: float = 1.0, softcap: float = 0.0, rel_bias=None, alibi_slopes=None,
           chunk: Optional[int] = None, row0: int = 0, Lq: Optional[int] = None) -> torch.Tensor:
    """The final scores ``(B, H, Lq, Lk)`` before masking: additive (``w`` given) or dot, then
    ``softcap`` (dot), then the position biases (see ``fusedattn.spec``). ``q`` may hold only the
    query rows ``row0 : row0 + q.shape[2]`` of a call with ``Lq`` rows (for the biases' distances)."""
    s = additive_scores(q, k, w, chunk=chunk) if w is not None else dot_scores(q, k, scale)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    Lq = q.shape[2] if Lq is None else Lq
    bias = position_bias(Lq, k.shape[2], rel_bias, alibi_slopes, q.device, s.dtype, row0, q.shape[2])
    return s if bias is None else s + bias


def attention(q, k, v, w=None, *, scale=None, softcap=0.0, key_lengths=None, causal=False, window=(-1, -1),
              rel_bias=None, alibi_slopes=None, return_lse=False, upcast=False, chunk=None):
    """Reference attention with every modifier: additive when ``w`` is given, else dot product.

    Differentiable by autograd (also to ``rel_bias``). See ``fusedattn.spec`` for the semantics.
    """
    dtype = q.dtype
    cd = _compute_dtype(dtype, upcast)
    q, k, v = (t.to(cd) for t in (q, k, v))
    w = None if w is None else w.to(cd)
    k, v = zero_padding(k, key_lengths), zero_padding(v, key_lengths)
    B, _, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    s = scores(q, k, w, scale=scale, softcap=softcap, rel_bias=rel_bias, alibi_slopes=alibi_slopes,
               chunk=chunk)
    out, lse = softmax_context(s, v, allowed_mask(B, Lq, Lk, key_lengths, causal, q.device, window))
    out = out.to(dtype)
    lse = lse.to(lse_dtype(dtype))
    return (out, lse) if return_lse else out


def additive_attention(q, k, v, w, *, key_lengths=None, causal=False, return_lse=False, upcast=False,
                       chunk=None, **modifiers):
    """Reference additive (Bahdanau) attention; see ``fusedattn.additive_attention``."""
    return attention(q, k, v, w, key_lengths=key_lengths, causal=causal, return_lse=return_lse,
                     upcast=upcast, chunk=chunk, **modifiers)


def dot_product_attention(q, k, v, *, scale=None, key_lengths=None, causal=False, return_lse=False,
                          upcast=False, **modifiers):
    """Reference scaled dot-product attention; see ``fusedattn.dot_product_attention``."""
    return attention(q, k, v, None, scale=scale, key_lengths=key_lengths, causal=causal,
                     return_lse=return_lse, upcast=upcast, **modifiers)


def attention_varlen(q, k, v, w=None, *, cu_seqlens_q, cu_seqlens_k, alibi_slopes=None, return_lse=False,
                     **kw):
    """Reference packed (varlen) attention: q ``(total_q, H, D)``, k/v ``(total_k, Hk, ·)``; each
    sequence ``b`` (rows ``cu_seqlens[b]:cu_seqlens[b+1]``) is attended on its own with ``attention``.
    Returns ``out (total_q, H, Dv)`` and, with ``return_lse``, ``lse (H, total_q)``."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        ab = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        o, l = attention(qb, kb, vb, w, alibi_slopes=ab, return_lse=True, **kw)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    out = torch.cat(outs, 0) if outs else q.new_zeros(0, q.shape[1], v.shape[-1])
    lse = torch.cat(lses, 1) if lses else q.new_zeros(q.shape[1], 0, dtype=lse_dtype(q.dtype))
    return (out, lse) if return_lse else out
