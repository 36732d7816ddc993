"""Ring attention: each rank holds a shard of the sequence; key/value shards travel around the ring.

Forward, on rank ``r`` of ``P``: at step ``t`` it holds the key/value shard of rank ``src = (r - t) mod P``;
it posts the exchange for step ``t + 1`` (send the current shard to ``r + 1``, receive the next from
``r - 1``), runs this package's fused kernel on its query shard against the current key/value shard
(one call per "block", see ``_plan``), merges the block's ``(out, lse)`` into its running result by
log-sum-exp, and then waits for the exchange. Backward runs the same ring: each block's kernel gets the
*global* ``out`` and ``lse`` (so ``P = exp(s - lse)`` and ``delta = rowsum(dO * O)`` are the final
ones and the block's ``dq``/``dk``/``dv`` are exact contributions); ``dq`` accumulates locally, and a
``dk``/``dv`` accumulator travels one hop behind its key/value shard, each rank adding its block's
contribution, so that after ``P`` hops it is back at the shard's owner. ``dw`` is all-reduced.

All calls into the op layer are in ``_resolve_backend``, ``_validate_args``, ``_block_forward`` and
``_block_backward``.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .. import api, backends, ops
from ..spec import AttnSpec
from . import sharding as sh

# ------------------------------------------------------------------ the only calls into the op layer


def _validate_args(score: str, q, k, v, w, key_lengths, scale, causal, backend) -> AttnSpec:
    """Check one rank's shards as the single-process functions do; the call's ``AttnSpec`` (no
    key_lengths: the ring turns the global lengths into per-block ones)."""
    additive = score == "additive"
    api._check_dense(q, k, v, w, additive)
    spec = api._validate(q, k, v, w, additive=additive, key_lengths=key_lengths, scale=scale, causal=causal,
                         backend=backend)
    return spec.replace(key_lengths=None, window_left=-1, window_right=-1)


def _resolve_backend(attn: AttnSpec, backend: str, q: Tensor, k: Tensor, v: Tensor) -> str:
    name = backends.select(backend, attn.replace(window_right=0), q, k, v)  # causal and not: one backend
    if name == "reference":
        raise ValueError(f"ring attention runs each block with a fused backend whose backward takes the "
                         f"global out and lse (cpu, triton); backend={backend!r} resolved to 'reference' "
                         f"for q {tuple(q.shape)} {q.dtype} on {q.device}")
    return name


def _block_spec(spec: _Spec, key_lengths, causal: bool) -> AttnSpec:
    return spec.attn.replace(key_lengths=key_lengths, window_right=0 if causal else -1)


def _block_forward(spec: _Spec, q, k, v, w, key_lengths, causal: bool) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of one block (a query slice against a key/value slice); ``out`` unrounded (float32
    for 16-bit inputs where the backend computes it so), as the merge and the backward want it."""
    return ops.forward(_block_spec(spec, key_lengths, causal), q, k, v, w, spec.backend, unrounded=True)


def _block_backward(spec: _Spec, dout, q, k, v, w, key_lengths, out, lse, causal: bool):
    """``(dq, dk, dv, dw or None)`` of one block given the GLOBAL ``out`` and ``lse`` of its query rows;
    unrounded (float32 for 16-bit inputs where the backend computes so): the caller sums the blocks'
    gradients, and blocks' dw partials are large against their sum (rounding each to bfloat16 left
    5e-3 in a dw that is 0)."""
    dq, dk, dv, dw, _ = ops.backward(_block_spec(spec, key_lengths, causal), dout, q, k, v, w, out, lse,
                                     spec.backend, unrounded=True)
    return dq, dk, dv, dw


# ------------------------------------------------------------------ communication

_WAIT = [0.0]


def comm_wait_seconds(reset: bool = False) -> float:
    """Seconds this process spent blocked on ring-attention communication (P2P waits, the argument
    check's all_gather, the ``dw`` all_reduce) since the last reset. Host time: with NCCL a wait only
    orders streams, so this undercounts there."""
    value = _WAIT[0]
    if reset:
        _WAIT[0] = 0.0
    return value


class _Pending:
    """Posted sends/receives; ``wait()`` returns the receive buffers."""

    def __init__(self, works, send, recv):
        self.works, self.send, self.recv = works, send, recv

    def wait(self) -> list[Tensor]:
        t0 = time.perf_counter()
        for work in self.works:
            work.wait()
        _WAIT[0] += time.perf_counter() - t0
        self.send = None  # the send buffers may be freed now
        return self.recv


class _Ring:
    def __init__(self, info: sh.GroupInfo):
        self.group = info.group
        self.next, self.prev = (info.rank + 1) % info.size, (info.rank - 1) % info.size

    def start(self, send: list[Tensor], tag: int) -> _Pending:
        """Send ``send`` to the next rank and receive tensors shaped like them from the previous one."""
        recv = [torch.empty_like(t) for t in send]
        p2p = [dist.P2POp(dist.isend, t, group=self.group, group_peer=self.next, tag=tag + i)
               for i, t in enumerate(send)]
        p2p += [dist.P2POp(dist.irecv, t, group=self.group, group_peer=self.prev, tag=tag + i)
                for i, t in enumerate(recv)]
        return _Pending(dist.batch_isend_irecv(p2p), send, recv)


# ------------------------------------------------------------------ blocks


@dataclass(frozen=True)
class _Item:
    """One kernel call: query rows ``[q0, q1)`` of the local shard against the first ``k_end`` rows of
    the key/value shard, with per-block ``key_lengths`` (None: all keys valid) and causal flag."""

    q0: int
    q1: int
    k_end: int
    causal: bool
    lengths: Optional[Tensor]


@dataclass
class _Spec:
    score: str
    info: sh.GroupInfo
    layout: str
    causal: bool
    attn: AttnSpec
    backend: str
    ring: _Ring
    plans: dict


def _block_lengths(lengths: Optional[Tensor], ids, c: int):
    """Valid keys of the concatenated chunks ``ids`` (ascending) for global ``lengths``: a prefix of
    ``sum_j clamp(len - id_j * c, 0, c)``. None when all are valid, ``False`` when none is."""
    if lengths is None:
        return None
    kl = sum(torch.clamp(lengths - cid * c, 0, c) for cid in ids)
    if bool((kl == 0).all()):
        return False
    if bool((kl == len(ids) * c).all()):
        return None
    return kl.to(torch.int32)


def _plan(rank: int, src: int, P: int, layout: str, c: int, causal: bool, lengths) -> list[_Item]:
    """The kernel calls for the local query shard against the key/value shard of rank ``src``.

    Chunk ids of a shard ascend, so for a query chunk ``a`` the key chunks ``b < a`` (full) form a
    prefix of the key shard, followed by ``b == a`` (the causal diagonal) when ``src == rank``; with
    bottom-right alignment one causal call covers "prefix + diagonal". On the own shard the chunk
    order makes the local causal mask exact, so that step is one causal call; on another rank's
    shard, query chunks that see the same non-empty prefix share one call; wholly masked pairs are
    skipped.
    """
    q_ids, k_ids = sh.chunk_ids(rank, P, layout), sh.chunk_ids(src, P, layout)
    m = len(q_ids)
    if not causal:
        raw = [(0, m, len(k_ids), False)]
    elif src == rank:
        raw = [(0, m, m, True)]
    else:
        raw = []
        for i, a in enumerate(q_ids):
            n = sum(b < a for b in k_ids)
            if n == 0:
                continue
            if raw and raw[-1][1] == i and raw[-1][2] == n:
                raw[-1] = (raw[-1][0], i + 1, n, False)
            else:
                raw.append((i, i + 1, n, False))
    items = []
    for i0, i1, n, cz in raw:
        kl = _block_lengths(lengths, k_ids[:n], c)
        if kl is not False:
            items.append(_Item(i0 * c, i1 * c, n * c, cz, kl))
    return items


def _merge(out: Tensor, lse: Tensor, o_b: Tensor, l_b: Tensor) -> None:
    """Fold a block's ``(o_b, l_b)`` into the running ``(out, lse)`` in place, stably.

    ``out += sigmoid(l_b - lse) * (o_b - out)`` and ``lse = max + log1p(exp(min - max))`` written as
    ``max - logsigmoid(max - min)``; a row empty so far (``lse = -inf``) takes the block's values, an
    empty block row (``l_b = -inf``) changes nothing, and a row empty in both stays ``0`` / ``-inf``.
    """
    l_b = l_b.to(lse.dtype)
    d = torch.where(torch.isneginf(l_b), l_b, l_b - lse)
    out.lerp_(o_b.to(out.dtype), torch.sigmoid(d).unsqueeze(-1).to(out.dtype))
    hi, lo = torch.maximum(lse, l_b), torch.minimum(lse, l_b)
    lse.copy_(torch.where(torch.isneginf(lo), hi, hi - F.logsigmoid(hi - lo)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ring_forward(spec: _Spec, q: Tensor, k: Tensor, v: Tensor, w) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` with ``out`` in the accumulation dtype (float32 for 16-bit inputs): the caller
    rounds it and the backward takes it unrounded (``fusedattn.ops``: delta from the rounded output
    leaves each row's dS a residual that dw and drel_bias add up)."""
    B, H, Lq, _ = q.shape
    acc = _acc_dtype(q.dtype)
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((B, H, Lq), float("-inf"), dtype=acc, device=q.device)
    k, v = k.contiguous(), v.contiguous()
    P, rank = spec.info.size, spec.info.rank
    for t in range(P):
        pending = spec.ring.start([k, v], tag=0) if t < P - 1 else None
        for it in spec.plans[(rank - t) % P]:
            o_b, l_b = _block_forward(spec, q[:, :, it.q0:it.q1], k[:, :, :it.k_end], v[:, :, :it.k_end], w,
                                      it.lengths, it.causal)
            _merge(out[:, :, it.q0:it.q1], lse[:, :, it.q0:it.q1], o_b, l_b)
            del o_b, l_b
        if pending is not None:
            k, v = pending.wait()
    return out, lse


# The cpu backend's backward keeps 8 private dq buffers of the call's query rows (for a fixed
# reduction order); running the backward of a block in query pieces keeps that scratch small
# (per-rank peak of the fwd+bwd call: see docs/ARCHITECTURE.md).
_BWD_PIECES = {"cpu": 8}


def _pieces(it: _Item, rows: int):
    """``it`` as calls of at most ``rows`` query rows: ``(q0, q1, k_end, lengths)``. A causal item's
    rows ``[a, b)`` see the keys ``j <= i + k_end - n_q``, i.e. a bottom-right causal call on the first
    ``k_end - (n_q - b)`` keys; pieces that see no key are skipped."""
    n_q = it.q1 - it.q0
    for a in range(0, n_q, rows):
        b = min(n_q, a + rows)
        k_end = it.k_end - (n_q - b) if it.causal else it.k_end
        kl = it.lengths
        if kl is not None and k_end < it.k_end:
            kl = torch.clamp(kl, max=k_end)
            if bool((kl == 0).all()):
                continue
        yield it.q0 + a, it.q0 + b, k_end, kl


def _block_grads(spec: _Spec, src: int, dout, q, k, v, w, out, lse, dq: Tensor, acc_kv):
    """Add this step's contributions into ``dq`` and into the key/value accumulators returned by
    ``acc_kv()`` (called after the first kernel call, so a pending receive overlaps it); return
    ``(dk_acc, dv_acc, dw or None)``."""
    pieces = _BWD_PIECES.get(spec.backend, 1) if spec.info.size > 1 else 1  # world size 1: the plain call
    rows = max(1, -(-q.shape[2] // pieces))
    dk = dv = dw = None
    for it in spec.plans[src]:
        for q0, q1, k_end, lengths in _pieces(it, rows):
            r = slice(q0, q1)
            kv = slice(0, k_end)
            gq, gk, gv, gw = _block_backward(spec, dout[:, :, r], q[:, :, r], k[:, :, kv], v[:, :, kv], w,
                                             lengths, out[:, :, r], lse[:, :, r], it.causal)
            dq[:, :, r] += gq
            if dk is None:
                dk, dv = acc_kv()
            dk[:, :, kv] += gk
            dv[:, :, kv] += gv
            if gw is not None:
                dw = gw.to(dq.dtype) if dw is None else dw.add_(gw)
            del gq, gk, gv
    if dk is None:
        dk, dv = acc_kv()
    return dk, dv, dw


def _zeros_pair(k: Tensor, v: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return (torch.zeros(k.shape, dtype=dtype, device=k.device),
            torch.zeros(v.shape, dtype=dtype, device=v.device))


def _ring_backward(spec: _Spec, dout, q, k, v, w, out, lse):
    acc = lse.dtype
    P, rank = spec.info.size, spec.info.rank
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dw_total = None
    k, v = k.contiguous(), v.contiguous()
    pending_dkv = None
    for t in range(P):
        pending_kv = spec.ring.start([k, v], tag=0) if t < P - 1 else None
        if t == 0:  # the accumulator of the own shard starts here
            acc_kv = functools.partial(_zeros_pair, k, v, acc)
        else:       # the accumulator of shard src arrives from the previous rank
            acc_kv = pending_dkv.wait
        dk_acc, dv_acc, dw = _block_grads(spec, (rank - t) % P, dout, q, k, v, w, out, lse, dq, acc_kv)
        if dw is not None:
            dw_total = dw if dw_total is None else dw_total.add_(dw)
        if P > 1:
            pending_dkv = spec.ring.start([dk_acc, dv_acc], tag=2)
            del dk_acc, dv_acc
        if pending_kv is not None:
            k, v = pending_kv.wait()
    if P > 1:  # one more hop brings each accumulator home
        dk_acc, dv_acc = pending_dkv.wait()
    if w is not None:
        if dw_total is None:
            dw_total = torch.zeros(w.shape, dtype=acc, device=w.device)
        if P > 1:
            t0 = time.perf_counter()
            dist.all_reduce(dw_total, group=spec.info.group)
            _WAIT[0] += time.perf_counter() - t0
    dw_out = None if w is None else dw_total.to(w.dtype)
    return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype), dw_out


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, spec):
        out, lse = _ring_forward(spec, q, k, v, w)
        ctx.save_for_backward(q, k, v, w, out, lse)  # unrounded
        ctx.spec = spec
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, w, out, lse = ctx.saved_tensors
        dq, dk, dv, dw = _ring_backward(ctx.spec, dout, q, k, v, w, out, lse)
        return dq, dk, dv, dw, None


# ------------------------------------------------------------------ public functions


def _shape_fields(name: str, t, ndim: int) -> dict:
    dense = isinstance(t, Tensor) and not t.is_nested and t.layout == torch.strided  # (its error: _validate)
    dims = list(t.shape) if dense and t.dim() == ndim else [-1] * ndim
    fields = {f"{name}.shape[{i}]": d for i, d in enumerate(dims)}
    fields[f"{name}.dtype"] = sh.dtype_code(t.dtype) if isinstance(t, Tensor) else -1
    fields[f"{name}.requires_grad"] = int(isinstance(t, Tensor) and t.requires_grad)
    return fields


def _bits_hash(t: Tensor) -> int:
    """A hash of ``t``'s values, the same in every process (of its bytes as ints: NaN too)."""
    b = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
    return hash(tuple(b.tolist())) & ((1 << 62) - 1)


def _prepare(score, q, k, v, w, scale, group, causal, key_lengths, layout, backend, return_lse) -> _Spec:
    info = sh.group_info(group)
    error, name, lengths, c, attn = None, None, None, 0, None
    try:
        api._check_flag("return_lse", return_lse)
        sh.check_layout(layout)
        attn = _validate_args(score, q, k, v, w, key_lengths, scale, causal, backend)
        Lq, Lk = q.shape[2], k.shape[2]
        if Lq != Lk:
            raise ValueError(f"q and k/v must be shards of one sequence (same local length), got "
                             f"q {tuple(q.shape)}, k {tuple(k.shape)}")
        L = Lq * info.size
        c = sh.check_length(L, info.size, layout, "global sequence")
        if key_lengths is not None:
            lengths = key_lengths.to(torch.int64)
            lo, hi = (int(lengths.min()), int(lengths.max())) if lengths.numel() else (0, 0)
            if lo < 0 or hi > L:
                raise ValueError(f"key_lengths are global lengths and must lie in [0, L={L}] "
                                 f"(P={info.size} shards of {Lq}), got values in [{lo}, {hi}]")
        name = _resolve_backend(attn, backend, q, k, v)
    except (ValueError, TypeError) as e:
        error = e
    fields = {"group.size": info.size}
    if info.group is not None:
        fields["group.ranks"] = hash(tuple(dist.get_process_group_ranks(info.group))) & ((1 << 62) - 1)
    for n, t, nd in (("q", q, 4), ("k", k, 4), ("v", v, 4)) + ((("w", w, 2),) if score == "additive" else ()):
        fields.update(_shape_fields(n, t, nd))
    # read only once they passed the checks (a meta or sparse tensor must reach agree(), not raise here)
    kl = lengths.cpu() if lengths is not None and error is None else None
    fields.update({
        "score": int(score == "additive"), "causal": int(causal) if isinstance(causal, bool) else -1,
        "layout": sh.LAYOUTS.index(layout) if layout in sh.LAYOUTS else -1,
        "backend": -1 if name is None else backends.names().index(name),
        "scale": sh.float_bits(attn.scale) if attn is not None else -1,
        "grad_enabled": int(torch.is_grad_enabled()),
        "key_lengths.given": int(kl is not None),
        "key_lengths.sum": int(kl.sum()) if kl is not None and kl.dim() == 1 else -1,
        "key_lengths.weighted_sum": int((kl * torch.arange(1, kl.numel() + 1)).sum())
        if kl is not None and kl.dim() == 1 else -1,
        # the values themselves (sums alone let [1, 2, 3] and [2, 0, 4] agree): a hash of the tuple,
        # the same in every process for ints
        "key_lengths.hash": hash(tuple(kl.tolist())) & ((1 << 62) - 1) if kl is not None else -1,
        # w is replicated: one rank's other w would mix two models' scores (and dw is all-reduced)
        "w.hash": _bits_hash(w) if score == "additive" and error is None else -1,
        "return_lse": int(return_lse) if api._is_bool(return_lse) else -1,
    })
    t0 = time.perf_counter()
    what = "ring_additive_attention" if score == "additive" else "ring_dot_product_attention"
    sh.agree(info, error, fields, what=what, like=q if isinstance(q, Tensor) else None)
    _WAIT[0] += time.perf_counter() - t0
    plans = {src: _plan(info.rank, src, info.size, layout, c, causal, lengths) for src in range(info.size)}
    return _Spec(score, info, layout, causal, attn, name, _Ring(info), plans)


def ring_additive_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, *, group=None,
                            causal: bool = False, key_lengths: Optional[Tensor] = None,
                            layout: str = "zigzag", return_lse: bool = False, backend: str = "auto"):
    """Additive attention over a sequence sharded across the ranks of ``group`` (ring attention).

    ``q (B, H, L/P, D)``, ``k (B, Hk, L/P, D)``, ``v (B, Hk, L/P, Dv)`` are this rank's shards (see
    ``shard_sequence``) of global ``(B, ·, L, ·)`` tensors in ``layout``; ``w (H, D)`` is the same on every
    rank (compared by value). Returns this rank's shard of the single-process
    ``fusedattn.additive_attention`` output (and of its ``lse`` with ``return_lse``). ``key_lengths (B,)``
    are global lengths in ``[0, L]``; ``causal`` is bottom-right on the global sequence (``Lq == Lk``, so
    ``j <= i``). A collective: every rank of the group calls it with the same options and shard shapes
    (checked: a ``ValueError`` on every rank otherwise), and calls ``backward`` too. Differentiable in
    ``q, k, v`` (own shards) and ``w`` (the all-reduced total, identical on every rank). ``group=None``:
    the default group, or a single process when torch.distributed is not initialized.
    """
    spec = _prepare("additive", q, k, v, w, None, group, causal, key_lengths, layout, backend, return_lse)
    out, lse = _RingAttention.apply(q, k, v, w, spec)
    return (out, lse) if return_lse else out


def ring_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None,
                               group=None, causal: bool = False, key_lengths: Optional[Tensor] = None,
                               layout: str = "zigzag", return_lse: bool = False, backend: str = "auto"):
    """Scaled dot-product attention over a sharded sequence; as ``ring_additive_attention`` with
    ``s = scale * q . k`` (default ``scale = 1 / sqrt(D)``) instead of the additive score."""
    spec = _prepare("dot", q, k, v, None, scale, group, causal, key_lengths, layout, backend, return_lse)
    out, lse = _RingAttention.apply(q, k, v, None, spec)
    return (out, lse) if return_lse else out
