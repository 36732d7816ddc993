"""HuggingFace transformers: fusedattn's dot-product attention as an ``attn_implementation``.

    from fusedattn.integrations import transformers as fa_hf
    fa_hf.register()                                   # name="fusedattn"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fusedattn")

``register`` adds ``attention_forward`` to transformers' ``AttentionInterface`` and, under the
same name, SDPA's boolean mask builder to ``AttentionMaskInterface``: models then hand the
attention function either no mask (plain causal or bidirectional attention) or a 4-D boolean
mask ``(B, 1 | H, Lq, Lk)``. ``attention_forward`` reads that mask, once per mask tensor (the
layers share it), into what the fused kernels take:

- dense: ``key_lengths`` (keys padded on the right, e.g. a StaticCache or right-padded
  prompts) and a window ``(left, right)`` aligned to the bottom-right corner (causal,
  sliding window);
- varlen: the query rows that see any key and the keys any row sees are packed per batch
  entry (left padding, caches with holes), then the same window per packed sequence.

The mask is checked, not assumed: the plan is used only if, for every query row, the keys it
allows are exactly the keys the mask allows (a row no key reaches gives 0, as SDPA does).
Without a mask it follows SDPA's reading of ``is_causal`` (top-left alignment: a StaticCache
prefill with ``Lq`` queries against more cache slots sees only the first ``Lq`` keys). Without a mask
but with ``cu_seq_lens_q/k`` (padding-free packing, ``DataCollatorWithFlattening(
return_flash_attn_kwargs=True)``) it runs the packed sequences as flash attention does: each sequence
alone, causal, with the sliding window per sequence.
T5-style ``position_bias`` ``(1 | B, H, Lq, Lk)`` becomes ``rel_bias`` when it depends only on
``j - i`` (Toeplitz; T5's bucketed bias is), and stays differentiable.

What it cannot serve falls back to transformers' SDPA function with a one-time
``SdpaFallbackWarning`` naming the reason (dropout > 0 while training, a float mask carrying
values other than 0 / -inf, a mask that is not padding + window, a position bias that is not
Toeplitz); ``output_attentions`` and attention sinks (``s_aux``) raise ``ValueError``. A mask or
bias that SDPA would refuse (one that does not broadcast to ``(B, H, Lq, Lk)``, an integer mask)
raises ``ValueError`` / ``TypeError`` naming it; masks that broadcast (a ``(B, 1, 1, Lk)`` padding
mask, an ``(Lq, Lk)`` mask) are read as their 4-D form.
Reading a mask costs a few passes over its ``B * Lq * Lk`` booleans per forward (not per layer),
and uses ``.tolist()``: the function is meant for eager use, not inside ``torch.compile``.
"""
from __future__ import annotations

import numbers
import warnings
import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import api

__all__ = ["SdpaFallbackWarning", "attention_forward", "register"]


class SdpaFallbackWarning(UserWarning):
    """The fusedattn attention function handed a call to transformers' SDPA function."""


_BACKEND = {"name": "auto"}
_WARNED: set = set()


def register(name: str = "fusedattn", backend: str = "auto") -> str:
    """Register ``attention_forward`` (and SDPA's mask builder) under ``name`` with transformers;
    returns ``name``, to pass as ``attn_implementation``. ``backend`` is fusedattn's backend
    (``"auto"``: the fastest usable one; see ``fusedattn.resolve_backend``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if backend != "auto":
        from .. import backends

        if backend not in backends.names():
            raise ValueError(f"backend={backend!r} is unknown; choose one of {['auto', *backends.names()]}")
    _BACKEND["name"] = backend
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


# ---------------------------------------------------------------------------- reading the mask


class _Plan(NamedTuple):
    window: tuple                  # (left, right), -1 unbounded
    key_lengths: Optional[Tensor]  # dense: (B,) int64, or None when every key is valid
    rows: Optional[Tensor]         # varlen: (B, Lq) bool, the query rows computed
    cols: Optional[Tensor]         # varlen: (B, Lk) bool, the keys used
    cu_q: Optional[Tensor]
    cu_k: Optional[Tensor]
    max_q: int
    max_k: int
    shift: Optional[int]           # j - i = d + shift for every computed pair (None: not one shift)


def _window(lo, hi, p, n, has_keys, considered):
    """The (left, right) window that gives each considered row exactly the key range [lo, hi]
    (positions p, n valid keys), or None. Rows without keys must get an empty range."""
    n1 = (n - 1).unsqueeze(1)
    unclipped_r = has_keys & (hi < n1)
    unclipped_l = has_keys & (lo > 0)
    right = int((hi - p)[unclipped_r].max()) if bool(unclipped_r.any()) else -1
    left = int((p - lo)[unclipped_l].max()) if bool(unclipped_l.any()) else -1
    if (bool(unclipped_r.any()) and right < 0) or (bool(unclipped_l.any()) and left < 0):
        return None
    elo = (p - left).clamp(min=0) if left >= 0 else torch.zeros_like(p)
    ehi = torch.minimum(p + right, n1) if right >= 0 else n1.expand_as(p)
    nonempty = elo <= ehi
    ok = torch.where(has_keys, nonempty & (elo == lo) & (ehi == hi), ~nonempty)
    return (left, right) if bool(ok[considered].all()) else None


def _as_4d(name: str, t: Tensor, B: int, H: int, Lq: int, Lk: int) -> Tensor:
    """``t`` as a ``(1 | B, 1 | H, Lq, Lk)`` view, if it broadcasts to ``(B, H, Lq, Lk)`` as SDPA's
    ``attn_mask`` must; else a ValueError naming ``name``."""
    full = (B, H, Lq, Lk)
    if t.dim() > 4 or any(a not in (1, b) for a, b in zip(reversed(t.shape), reversed(full))):
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to (B, H, Lq, Lk) = {full} "
                         f"(query {(B, H, Lq)}, key length {Lk})")
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.expand(t.shape[0], t.shape[1], Lq, Lk)


def _bool_mask(mask: Tensor, B: int, H: int, Lq: int, Lk: int):
    """(B, Lq, Lk) bool from an SDPA-style mask (broadcastable to (B, H, Lq, Lk)), or a reason
    string (a mask SDPA takes and the fused kernels do not)."""
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"attention_mask must be a bool or floating tensor (as SDPA's attn_mask), "
                        f"got {mask.dtype}")
    mask = _as_4d("attention_mask", mask, B, H, Lq, Lk)
    if mask.dtype != torch.bool:
        lowest = torch.finfo(mask.dtype).min / 2
        allowed = mask == 0
        if not bool((allowed | (mask <= lowest)).all()):
            return "a float attention_mask carrying values other than 0 and -inf (an additive bias)"
        mask = allowed
    if mask.shape[1] > 1:
        if not bool((mask == mask[:, :1]).all()):
            return "an attention_mask that differs between heads"
    return mask[:, 0].expand(B, Lq, Lk)


def _plan(m: Tensor):
    """A dense or varlen plan that reproduces the (B, Lq, Lk) boolean mask exactly, or a reason."""
    B, Lq, Lk = m.shape
    dev = m.device
    cnt = m.sum(-1)
    has = cnt > 0
    colany = m.any(1)
    nk = colany.sum(1)
    mu = m.to(torch.uint8)
    first = mu.argmax(-1)
    last = Lk - 1 - mu.flip(-1).argmax(-1)
    jr = torch.arange(Lk, device=dev)
    ir = torch.arange(Lq, device=dev).expand(B, Lq)
    # dense: keys [0, n_b) with n_b one past the last key any row sees (right padding, or keys
    # that no row's window reaches), every query row, the window in unpacked positions
    n = torch.where(has, last + 1, 0).amax(1) if Lq else nk
    if bool(((cnt == last - first + 1) | ~has).all()):
        win = _window(first, last, ir + (Lk - Lq), n, has, torch.ones_like(has))
        if win is not None:
            kl = None if bool((n == Lk).all()) else n
            return _Plan(win, kl, None, None, None, None, -1, -1, Lk - Lq)
    # varlen: pack the rows that see a key and the keys any row sees
    nq = has.sum(1)
    kpos = colany.cumsum(1) - 1
    qpos = has.cumsum(1) - 1
    lo, hi = kpos.gather(1, first), kpos.gather(1, last)
    if not bool(((cnt == hi - lo + 1) | ~has).all()):
        return "an attention_mask whose rows are not one run of the valid keys (not padding + window)"
    win = _window(lo, hi, qpos + (nk - nq).unsqueeze(1), nk, has, has)
    if win is None:
        return "an attention_mask that is not padding + one causal/sliding window for all rows"
    # one shift j - i = d + shift for every pair when rows and keys are runs (for rel_bias)
    qs = torch.where(has, ir - qpos, -1).amax(1)
    ks = torch.where(colany, jr - kpos, -1).amax(1)
    runs = bool(((ir - qpos == qs.unsqueeze(1)) | ~has).all()) and \
        bool(((jr - kpos == ks.unsqueeze(1)) | ~colany).all())
    shifts = torch.unique((nk - nq + ks - qs)[nq > 0])
    shift = int(shifts[0]) if runs and shifts.numel() == 1 else (0 if runs and shifts.numel() == 0 else None)
    zero = torch.zeros(1, dtype=torch.int32, device=dev)
    cu_q = torch.cat([zero, nq.cumsum(0).to(torch.int32)])
    cu_k = torch.cat([zero, nk.cumsum(0).to(torch.int32)])
    return _Plan(win, None, has, colany, cu_q, cu_k, int(nq.max()) if B else 0, int(nk.max()) if B else 0,
                 shift)


class _Memo:
    """The last few results per tensor object (the layers of one forward share a mask / bias)."""

    def __init__(self, size: int = 4):
        self.size, self.entries = size, []

    def get(self, t: Tensor, key, fn):
        for ref, version, k, val in self.entries:
            if ref() is t and version == t._version and k == key:
                return val
        val = fn()
        self.entries = [e for e in self.entries if e[0]() is not None][-(self.size - 1):]
        self.entries.append((weakref.ref(t), t._version, key, val))
        return val


_MASKS = _Memo()
_BIASES = _Memo()


def _toeplitz(pb: Tensor, B: int, H: int, Lq: int, Lk: int):
    """``t (H, Lq + Lk - 1)`` with ``pb[b, h, i, j] == t[h, j - i + Lq - 1]``, "zero" for an all-zero
    bias, or a reason (differentiable: t gathers entries of pb)."""
    pb = _as_4d("position_bias", pb, B, H, Lq, Lk)
    with torch.no_grad():
        if not bool(pb.any()):
            return "zero"
        if pb.shape[0] > 1 and not bool((pb == pb[:1]).all()):
            return "a position_bias that differs between batch entries"
    delta = torch.arange(-(Lq - 1), Lk, device=pb.device)
    t = pb[0][:, (-delta).clamp(min=0), delta.clamp(min=0)]                    # (Hp, Lq + Lk - 1)
    with torch.no_grad():
        idx = torch.arange(Lk, device=pb.device) - torch.arange(Lq, device=pb.device).unsqueeze(1) + Lq - 1
        if not torch.equal(t[:, idx], pb[0]):
            return "a position_bias that does not depend on j - i alone (not Toeplitz)"
    return t.expand(H, -1)


def _rel_bias(t: Tensor, Lq: int, Lk: int, shift: int) -> Tensor:
    """fusedattn's ``rel_bias (H, 2M-1)``: entry ``d + M - 1`` is ``t`` at ``j - i = d + shift``."""
    M = Lq + Lk + abs(shift)
    delta = (torch.arange(-(M - 1), M, device=t.device) + shift).clamp(-(Lq - 1), Lk - 1)
    return t[:, delta + Lq - 1].float()


# ---------------------------------------------------------------------------- the attention function


def _fallback(reason: str, module, query, key, value, attention_mask, dropout, scaling, is_causal,
              position_bias, softcap, sliding_window, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"fusedattn attention: {reason}; this call (and others like it) runs transformers' "
                      "sdpa attention instead (warned once per reason)", SdpaFallbackWarning, stacklevel=3)
    if softcap is not None:
        kwargs = {**kwargs, "softcap": softcap}
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, position_bias=position_bias,
                                  sliding_window=sliding_window, **kwargs)


def _packed_kwargs_forward(query, key, value, scaling, causal, window, position_bias, softcap, kwargs):
    """Padding-free packing as transformers hands it to flash attention (``DataCollatorWithFlattening(
    return_flash_attn_kwargs=True)``): ``B == 1`` and the sequences' boundaries in ``cu_seq_lens_q/k``;
    runs the packed batch through the varlen function, each sequence alone with the causal mask or
    window the model asks for, as flash attention does."""
    B, H, Lq, _ = query.shape
    Lk = key.shape[2]
    cu = [kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")]
    for n, (name, t) in enumerate((("cu_seq_lens_q", cu[0]), ("cu_seq_lens_k", cu[1]))):
        if t is None:
            cu[n] = cu[1 - n]  # flash attention's rule: one of them stands for both
        elif not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            got = type(t).__name__ if not isinstance(t, Tensor) else (t.dtype, tuple(t.shape))
            raise ValueError(f"{name} must be a 1-D integer tensor, got {got}")
    cu_q, cu_k = (t.to(device=query.device, dtype=torch.int32) for t in cu)
    if B != 1 or int(cu_q[-1]) != Lq or int(cu_k[-1]) != Lk:
        raise ValueError("fusedattn attention serves cu_seq_lens_q/k for a packed batch (padding-free "
                         f"training): batch 1 with cu_seq_lens_q[-1] == Lq and cu_seq_lens_k[-1] == Lk; got "
                         f"query {tuple(query.shape)}, key {tuple(key.shape)}, cu_seq_lens_q[-1]="
                         f"{int(cu_q[-1])}, cu_seq_lens_k[-1]={int(cu_k[-1])} (continuous batching and paged "
                         "caches are not supported)")
    if position_bias is not None:
        raise ValueError("fusedattn attention takes no position_bias with cu_seq_lens_q/k (packed sequences)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, H, D)
    out = api.dot_product_attention_varlen(q, k, v, cu_q, cu_k, scale=scaling, softcap=float(softcap or 0.0),
                                           causal=causal, window=window, backend=_BACKEND["name"])
    return out[None].contiguous(), None


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, position_bias: Optional[Tensor] = None,
                      softcap: Optional[float] = None, sliding_window: Optional[int] = None,
                      s_aux: Optional[Tensor] = None, **kwargs):
    """transformers' attention-function contract: query ``(B, H, Lq, D)``, key/value
    ``(B, Hk, Lk, ·)``, an SDPA-style mask or None -> ``(out (B, Lq, H, Dv) contiguous, None)``."""
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
        raise ValueError("fusedattn attention never forms the attention weights, so output_attentions=True "
                         "cannot be served; load the model with attn_implementation='eager' for them, or "
                         "recompute them with fusedattn.attention_weights")
    if s_aux is not None:
        raise ValueError("fusedattn attention does not support attention sinks (s_aux)")
    packed_kw = any(kwargs.get(n) is not None for n in ("cu_seq_lens_q", "cu_seq_lens_k"))
    for name, t in (("query", query), ("key", key), ("value", value)):
        api._check_tensor(name, t, 4, "(B, H, L, D)")
    for name, t in (("attention_mask", attention_mask), ("position_bias", position_bias)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be None or a torch.Tensor, got {type(t).__name__}")
    if api._is_bool(dropout) or not isinstance(dropout, numbers.Real) or not 0 <= dropout <= 1:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    if is_causal is not None and not api._is_bool(is_causal):
        raise TypeError(f"is_causal must be None or a bool, got {type(is_causal).__name__} {is_causal!r}")
    args = (module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias, softcap,
            sliding_window, kwargs)
    if dropout > 0:
        return _fallback(f"attention dropout {dropout} > 0 (training)", *args)
    B, H, Lq, _ = query.shape
    Lk = key.shape[2]
    if packed_kw and attention_mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        window = None
        if sliding_window is not None:  # flash attention's window_size=(sliding_window - 1, ...)
            window = (int(sliding_window) - 1, 0 if causal else int(sliding_window) - 1)
        return _packed_kwargs_forward(query, key, value, scaling, causal, window, position_bias, softcap,
                                      kwargs)
    Lk_bias = Lk  # a position_bias covers the keys as passed (before a StaticCache prefill's crop below)
    causal, window, plan = False, None, None
    if attention_mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and Lq > 1
        if causal and Lk > Lq:      # SDPA's top-left causal: keys past Lq are unseen (StaticCache prefill)
            key, value, Lk = key[:, :, :Lq], value[:, :, :Lq], Lq
        elif causal and Lk < Lq:    # top-left j <= i is the bottom-right window (-1, Lq - Lk)
            causal, window = False, (-1, Lq - Lk)
        shift = Lk - Lq
    else:
        def make():
            m = _bool_mask(attention_mask, B, H, Lq, Lk)
            return m if isinstance(m, str) else _plan(m)

        plan = _MASKS.get(attention_mask, (B, H, Lq, Lk), make)
        if packed_kw:  # the mask over the whole packed row (a sliding window's): its window, per sequence
            if isinstance(plan, str) or plan.rows is not None or plan.key_lengths is not None:
                raise ValueError("fusedattn attention takes cu_seq_lens_q/k (packed sequences) with no mask "
                                 "or with a causal / sliding-window mask over the packed row, not padding")
            causal = plan.window == (-1, 0)
            window = None if causal or plan.window == (-1, -1) else plan.window
            return _packed_kwargs_forward(query, key, value, scaling, causal, window, position_bias, softcap,
                                          kwargs)
        if isinstance(plan, str):
            return _fallback(plan, *args)
        shift = plan.shift
        causal = plan.window == (-1, 0)
        window = None if causal or plan.window == (-1, -1) else plan.window
    rel_bias = None
    if position_bias is not None:
        pb_rows, pb_cols = Lq, Lk_bias
        t = _BIASES.get(position_bias, (B, H, pb_rows, pb_cols),
                        lambda: _toeplitz(position_bias, B, H, pb_rows, pb_cols))
        if isinstance(t, str) and t != "zero":
            return _fallback(t, *args)
        if not isinstance(t, str):
            if shift is None:
                return _fallback("a position_bias with an attention_mask whose packed rows or keys are not "
                                 "contiguous runs", *args)
            rel_bias = _rel_bias(t, pb_rows, pb_cols, shift)
    common = dict(scale=scaling, softcap=float(softcap or 0.0), causal=causal, window=window,
                  rel_bias=rel_bias, backend=_BACKEND["name"])
    if plan is None or plan.rows is None:
        kl = None if plan is None else plan.key_lengths
        out = api.dot_product_attention(query, key, value, key_lengths=kl, **common)
        return out.transpose(1, 2).contiguous(), None
    q = query.transpose(1, 2)[plan.rows]                                   # (total_q, H, D)
    k, v = key.transpose(1, 2)[plan.cols], value.transpose(1, 2)[plan.cols]
    packed = api.dot_product_attention_varlen(q, k, v, plan.cu_q, plan.cu_k, max_seqlen_q=plan.max_q,
                                              max_seqlen_k=plan.max_k, **common)
    out = packed.new_zeros(B, Lq, H, value.shape[-1])
    out[plan.rows] = packed
    return out, None
