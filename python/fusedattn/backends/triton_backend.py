"""The Triton backend: fused FlashAttention-2-style kernels from ``fusedattn.kernels``.

Runs on CUDA tensors, and on CPU tensors only when ``TRITON_INTERPRET=1`` was set before the
kernels were imported (the interpreter; used by the tests). Importing this module imports
triton and the kernels but never queries a GPU.

Host code only: checks, strides, scratch buffers, grids and launches. Per call the
launchers pick a configuration deterministically from the padded head widths, the dtype, the
compute capability and whether the call is a decode step (``Lq <= 16``);
``fusedattn.tools.gpu_compile_check`` compiles every configuration these pickers can return.

What the launchers do not do: copy K and V to zero keys past ``key_lengths`` (the kernels
mask them), or rebuild the additive key table while the same key tensor comes back
(``_key_table``). Inputs are copied only when they break the launch contract (``_aligned``:
misaligned, a head dim that is not a multiple of 8, a row stride too large for int32 tile
offsets). The dot forward runs one program per (batch, kv head) over the rows of all the
query heads that share it, so a GQA decode step reads each K/V tile once per group.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from fusedattn.kernels import additive as _add
from fusedattn.kernels import additive_bwd as _addb
from fusedattn.kernels import additive_decode as _adec
from fusedattn.kernels import dot as _dot
from fusedattn.kernels.common import _attn_bwd_preprocess, _attn_fwd_merge

from ..spec import AttnSpec
from .base import Backend, Grads

DECODE_MAX_LQ = 16
MAX_HEAD_DIM = 256
MAX_SPLITS = 64
MAX_GRID_Y = 65535  # CUDA limit on grid axis 1, which carries the (batch, head) index
# compile options of every launch: FMA contraction on (the instruction counts of the compile check
# assume it; Triton 3.10 changes the default); the interpreter ignores them
LAUNCH_OPTS = dict(enable_fp_fusion=True)


def interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (triton decides at import)."""
    return type(_add._attn_fwd_additive).__name__ == "InterpretedFunction"


def block_dim(d: int) -> int:
    """Padded power-of-two width (>= 16) of a head dimension, as the kernels tile it."""
    return max(16, triton.next_power_of_2(d))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs never use plain TF32: 3xTF32 on the GPU (fp32-level accuracy on tensor
    cores), exact fp32 under the interpreter; 16-bit inputs ignore the setting on the GPU."""
    if interpreting():
        return "ieee" if dtype == torch.float32 else "upcast"  # see kernels.common._mma
    return "tf32x3" if dtype == torch.float32 else "tf32"


def check_grid(q: torch.Tensor, k: torch.Tensor) -> None:
    """Every launch puts B*H (or B*Hk <= B*H) programs on grid axis 1 (at most 65535)."""
    B, H = q.shape[0], q.shape[1]
    if B * H > MAX_GRID_Y:
        raise ValueError(f"triton backend: batch * heads = {B} * {H} = {B * H} exceeds the CUDA grid "
                         f"limit of {MAX_GRID_Y} (q shape {tuple(q.shape)}, k shape {tuple(k.shape)}); "
                         f"split the batch")


def _arch(device: torch.device) -> int:
    """Compute capability as 80, 90, ... (the interpreter: 90, an H100)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: behave like an H100


def num_splits_for(B: int, H: int, Lq: int, Lk: int, block_m: int, block_n: int, device,
                   decode: Optional[bool] = None) -> int:
    """Flash-decoding split count: >1 only for decode steps (Lq <= 16, or ``decode``) when
    B*H*m_tiles programs would leave the GPU idle; each split keeps at least one key tile.
    H and Lq are the program heads and rows (the dot kernel: Hk and H / Hk * Lq)."""
    if not (Lq <= DECODE_MAX_LQ if decode is None else decode):
        return 1
    programs = B * H * triton.cdiv(Lq, block_m)
    n_tiles = triton.cdiv(Lk, block_n)
    want = triton.cdiv(2 * _sm_count(device), programs)
    return max(1, min(want, n_tiles, MAX_SPLITS))


def _klen(key_lengths: Optional[torch.Tensor], B: int, Lk: int, device) -> torch.Tensor:
    if key_lengths is None:
        return torch.full((B,), Lk, dtype=torch.int32, device=device)
    return _flat(key_lengths.to(device=device, dtype=torch.int32))


def _causal_shift(right: int, Lq: int, Lk: int) -> int:
    """Key j is allowed for query i iff j <= i + shift (the window's right side, causal: right = 0);
    right = -1 (unbounded): shift = Lk (always true)."""
    return Lk - Lq + right if right >= 0 else Lk


def _spec(score: str, key_lengths, causal: bool, scale: float = 1.0) -> AttnSpec:
    """The spec of a legacy launcher call (key_lengths and causal only)."""
    return AttnSpec(score=score, scale=scale, window_right=0 if causal else -1, key_lengths=key_lengths)


_DUMMY: dict = {}


def _dummy(device) -> torch.Tensor:
    """A small aligned float32 buffer passed for absent modifier tensors (never read)."""
    key = str(device)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros(16, dtype=torch.float32, device=device)
    return _DUMMY[key]


def _mods(spec: AttnSpec, B: int, H: int, Lq: int, Lk: int, device):
    """The modifiers of ``spec`` as kernel arguments: (CAUSAL_SHIFT, runtime args in kernel order
    (WINDOW_SHIFT, REL, SLOPES, REL_M[, softcap_k, softcap] for dot), constexpr flags).
    rel_bias goes as float32 (H, 2M - 1) contiguous, alibi slopes as float32 (B, H) contiguous."""
    left = spec.window_left
    shift = _causal_shift(spec.window_right, Lq, Lk)
    rb, al = spec.rel_bias, spec.alibi_slopes
    rel = _flat(rb.to(device)) if rb is not None else _dummy(device)
    slopes = _flat(al.to(device).float().expand(B, H)) if al is not None else _dummy(device)
    M = (rb.shape[-1] + 1) // 2 if rb is not None else 1
    args = [Lk - Lq - left if left >= 0 else 0, rel, slopes, M]
    flags = dict(WINDOW=left >= 0, BIAS=(1 if rb is not None else 0) | (2 if al is not None else 0))
    if not spec.additive:
        cap = float(spec.softcap)
        args += [2.0 * float(spec.scale) * _LOG2E / cap if cap > 0 else 0.0, cap]
        flags["SOFTCAP"] = cap > 0
    return shift, args, flags


_LOG2E = 1.4426950408889634


def _score_mods(spec: AttnSpec) -> bool:
    """Per-element score modifiers (dot kernels: their own configs, ``kernels.dot.score_mods_config``)."""
    return spec.softcap > 0 or spec.rel_bias is not None or spec.alibi_slopes is not None


def _drel_scratch(spec: AttnSpec, B: int, H: int, Lq: int, cfg_q: dict, device, pmass: bool):
    """(DREL, SKEW) of the dot dQ kernel (``kernels.common._drel_program``): per-program partial
    rel_bias gradients by distance (zeros, (B, H, query tiles, 2M - 1); with ``pmass``, 16-bit
    inputs, twice that: then the softmax masses) and skew scratch; dummies without rel_bias."""
    if spec.rel_bias is None:
        return _dummy(device), _dummy(device)
    n_mt = triton.cdiv(Lq, cfg_q["BLOCK_M"])
    halves = 2 if pmass else 1  # 16-bit inputs: the softmax mass by distance too (``_drel_result``)
    drel = torch.zeros(B, H, n_mt, halves * spec.rel_bias.shape[-1], dtype=torch.float32, device=device)
    skew = torch.empty(B * H * n_mt * 2 * cfg_q["BLOCK_M"] * cfg_q["BLOCK_N"], dtype=torch.float32,
                       device=device)
    return drel, skew


def _drel_result(spec: AttnSpec, drel: torch.Tensor):
    """d rel_bias (H, 2M - 1): the partials (B, H, tiles, 2M - 1) summed over batch and tiles (the dot
    dQ kernel's query tiles, the additive dK/dV kernel's key blocks) in a fixed order, in float64.

    Partials of 2 (2M - 1) hold the softmax mass by distance in their second half: each row's dS
    should sum to 0, but delta = rowsum(dO * O) comes from the output as returned (rounded to 16 bits
    for 16-bit inputs), so every row keeps a residual, and a distance bin that covers most of the
    rows' keys (a clamped end, M = 1) would add them all up. The head's total residual is taken off
    the bins in proportion to their softmax mass, as the cpu backend does (``csrc/prep.cpp``,
    ``reduce_rel``). The dot kernels sum the mass for 16-bit inputs; the additive ones do not."""
    if spec.rel_bias is None:
        return None
    n = spec.rel_bias.shape[-1]
    ds = drel[..., :n].double().sum(dim=(0, 2))
    if drel.shape[-1] == 2 * n:
        pm = drel[..., n:].double().sum(dim=(0, 2))
        res, mass = ds.sum(-1, keepdim=True), pm.sum(-1, keepdim=True)
        fix = torch.isfinite(res) & torch.isfinite(mass) & (mass > 0)
        ds = torch.where(fix, ds - res * pm / torch.where(fix, mass, 1.0), ds)
    return ds.to(spec.rel_bias.dtype)


def _drel_fold(drel: torch.Tensor, lanes: int) -> torch.Tensor:
    """Partial rows of ``kernels.common._drel_skewed`` (2M - 1 bins, then ``lanes`` below and
    ``lanes`` above lanes) as 2M - 1 bins: the lanes summed (a fixed order) into bins 0 and 2M - 2."""
    n = drel.shape[-1] - 2 * lanes
    out = drel[..., :n].clone()
    out[..., 0] += drel[..., n:n + lanes].sum(-1)
    out[..., n - 1] += drel[..., n + lanes:].sum(-1)
    return out


class TritonBackend(Backend):
    name = "triton"
    devices = frozenset({"cuda", "cpu"}) if interpreting() else frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    max_head_dim = MAX_HEAD_DIM
    modifiers = frozenset({"key_lengths", "causal", "window", "softcap", "rel_bias", "alibi"})
    description = ("fused Triton kernels (FlashAttention-2 forward/backward, online softmax, "
                   "flash-decoding); CPU tensors only under TRITON_INTERPRET=1")
    f32_out = True  # forward(out32=True): the kernels store the output in float32 (the launcher's Out)

    # -- environment ----------------------------------------------------------
    def unavailable_reason(self) -> Optional[str]:
        if interpreting():
            return None
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return "TRITON_INTERPRET=1 was set after fusedattn.kernels was imported"
        if not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
        return None

    # -- entry points (the spec's modifiers) ---------------------------------------
    def forward(self, spec, q, k, v, w, out32: bool = False):
        if spec.varlen:
            return super().forward(spec, q, k, v, w, out32)
        return _forward(spec, q, k, v, w if spec.additive else None, None, out32)

    def backward(self, spec, dout, q, k, v, w, out, lse):
        if spec.varlen:
            return super().backward(spec, dout, q, k, v, w, out, lse)
        if spec.additive:
            return Grads(*self._additive_backward(spec, dout, q, k, v, w, out, lse))
        dq, dk, dv, drel = self._dot_backward(spec, dout, q, k, v, out, lse)
        return Grads(dq, dk, dv, None, drel)

    # -- forward ----------------------------------------------------------------
    def additive_forward(self, q, k, v, w, key_lengths, causal, num_splits=None):
        return _forward(_spec("additive", key_lengths, causal), q, k, v, w, num_splits)

    def dot_forward(self, q, k, v, key_lengths, scale, causal, num_splits=None):
        return _forward(_spec("dot", key_lengths, causal, scale), q, k, v, None, num_splits)

    # -- backward ---------------------------------------------------------------
    def additive_backward(self, dout, q, k, v, w, key_lengths, causal, out, lse):
        return self._additive_backward(_spec("additive", key_lengths, causal), dout, q, k, v, w, out, lse)[:4]

    def dot_backward(self, dout, q, k, v, key_lengths, scale, causal, out, lse):
        return self._dot_backward(_spec("dot", key_lengths, causal, scale), dout, q, k, v, out, lse)[:3]

    def _additive_backward(self, spec, dout, q, k, v, w, out, lse):
        key_lengths = spec.key_lengths
        check_grid(q, k)
        A_user, Dv_user, w_dtype = q.shape[-1], v.shape[-1], w.dtype
        q, k, v, w, dout, out = _aligned(q, k, v, w.float(), dout, out)
        B, H, Lq, A = q.shape
        _, Hk, Lk, Dv = v.shape
        klen = _klen(key_lengths, B, Lk, q.device)
        shift, (window_shift, rel, slopes, rel_m), flags = _mods(spec, B, H, Lq, Lk, q.device)
        mods = dict(WINDOW=flags["WINDOW"], ALIBI=bool(flags["BIAS"] & 2), REL_BIAS=bool(flags["BIAS"] & 1))
        cfg = _addb.bwd_config(block_dim(A), q.dtype == torch.float32, interpreting(), mods["REL_BIAS"])
        BLOCK_DV = cfg["BLOCK_DV"]  # Dv is walked in chunks of this many columns
        blk, xb = cfg["BLOCK"], cfg["XB"]
        lse = _flat(lse)
        delta = _delta(out, dout, delta_shape(dict(BLOCK_M=blk, BLOCK_N=xb), BLOCK_DV, BLOCK_DV,
                                              q.dtype == torch.float32))
        eq, qmax = _bwd_table(q, torch.full((B,), Lq, dtype=torch.int32, device=q.device), cfg)
        ek, kmax = _bwd_table(k, klen, cfg)
        n_q, n_k = triton.cdiv(Lq, blk), triton.cdiv(Lk, blk)
        # every element the host reads below is written by the kernels: no zero fill
        dkt = torch.empty(B, Hk, A, _pad(Lk), dtype=torch.float32, device=q.device)
        dv32 = torch.zeros(B, Hk, _pad(Lk), triton.cdiv(Dv, BLOCK_DV) * BLOCK_DV, dtype=torch.float32,
                           device=q.device)
        dqt = torch.empty(B, H, A, _pad(Lq), dtype=torch.float32, device=q.device)
        dwt = torch.empty_like(dqt)
        # per-program scratch: dQ BLOCK x XB; dK/dV 2 (4 with rel_bias) x BLOCK x XB
        scratch = torch.empty(max(B * Hk * n_k * (4 if mods["REL_BIAS"] else 2), B * H * n_q) * blk * xb,
                              dtype=torch.float32, device=q.device)
        # d rel_bias: one partial row per (dK/dV program, query head): 2M - 1 bins + 2 x 2 XB lanes of
        # the clamped ends (kernels.common._drel_skewed, chunks of 2 XB). No softmax mass here (the
        # dK/dV kernel has no registers to spare for it: 8-byte spills on sm_90 at A = 64), so no
        # residual correction (``_drel_result``)
        drel = (torch.zeros(B, H, n_k, 2 * rel_m - 1 + 4 * xb, dtype=torch.float32, device=q.device)
                if mods["REL_BIAS"] else _dummy(q.device))
        common = dict(FAST_RCP=not interpreting(), DOT_PRECISION=dot_precision(q.dtype), **cfg, **LAUNCH_OPTS)
        tables = (*w.stride(), *eq.stride()[:2], *ek.stride()[:2], *dout.stride()[:3], *v.stride()[:3])
        rnorm = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)  # 1 / row sum of P, dQ -> dK/dV
        _addb._attn_bwd_dq_additive[(n_q, B * H)](
            w, eq, ek, qmax, kmax, klen, dout, v, lse, delta, dqt, dwt, scratch, rnorm,
            *tables, *dqt.stride()[:3], H, Hk, Lq, Lk, A, Dv, shift, window_shift, slopes, rel, rel_m,
            **common, **mods)
        _addb._attn_bwd_dkdv_additive[(n_k, B * Hk)](
            w, eq, ek, qmax, kmax, klen, dout, v, lse, delta, dkt, dv32, scratch, rnorm,
            *tables, *dkt.stride()[:3], *dv32.stride()[:3], H, Hk, Lq, Lk, A, Dv, shift, window_shift, slopes,
            rel, rel_m, drel, **common, **mods)
        dq = torch.empty(*q.shape[:-1], A_user, dtype=q.dtype, device=q.device)
        dq.copy_(dqt[:, :, :A_user, :Lq].transpose(-1, -2))
        dk = torch.empty(*k.shape[:-1], A_user, dtype=k.dtype, device=k.device)
        dk.copy_(dkt[:, :, :A_user, :Lk].transpose(-1, -2))
        dv = dv32[:, :, :Lk, :Dv_user].to(v.dtype).contiguous()
        dw = dwt[:, :, :A_user, :Lq].sum(dim=(0, 3))  # per-row partials, fixed order
        drel = _drel_fold(drel, 2 * xb) if mods["REL_BIAS"] else None
        return dq, dk, dv, dw.to(w_dtype), _drel_result(spec, drel)

    def _dot_backward(self, spec, dout, q, k, v, out, lse):
        if spec.scale < 0:  # as in _forward: s = |scale| * (-q) . k, and dq = -(d/d(-q))
            dq, dk, dv, drel = self._dot_backward(spec.replace(scale=-spec.scale), dout, -q, k, v, out, lse)
            return -dq, dk, dv, drel
        key_lengths, scale = spec.key_lengths, spec.scale
        check_grid(q, k)
        D_user, Dv_user = q.shape[-1], v.shape[-1]
        q, k, v, dout, out = _aligned(q, k, v, dout, out)
        B, H, Lq, D = q.shape
        _, Hk, Lk, Dv = v.shape
        BLOCK_D = BLOCK_DV = max(block_dim(D), block_dim(Dv))  # one width: fewer kernel variants
        if interpreting():
            cfg_kv = cfg_q = _dot.interpret_config(BLOCK_D, BLOCK_DV, False)
        else:
            cfg_kv, cfg_q = _dot.prune_bwd_configs(BLOCK_D, BLOCK_DV, q.dtype == torch.float32,
                                                   _arch(q.device), _score_mods(spec))
        klen = _klen(key_lengths, B, Lk, q.device)
        shift, margs, flags = _mods(spec, B, H, Lq, Lk, q.device)
        drel, skew = _drel_scratch(spec, B, H, Lq, cfg_q, q.device, dout.dtype != torch.float32)
        lse = _flat(lse)
        delta = _delta(out, dout, delta_shape(cfg_q, BLOCK_DV, cfg_q["BLOCK_DC"], q.dtype == torch.float32))
        dq = _empty_aligned(*q.shape, dtype=q.dtype, device=q.device)
        dk = _empty_aligned(*k.shape, dtype=k.dtype, device=k.device)
        dv = _empty_aligned(*v.shape, dtype=v.dtype, device=v.device)
        common = dict(BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, EVEN=D == BLOCK_D and Dv == BLOCK_DV,
                      DOT_PRECISION=dot_precision(q.dtype))
        grid = (triton.cdiv(Lk, cfg_kv["BLOCK_N"]), B * Hk)
        _dot._attn_bwd_dkdv_dot[grid](
            q, k, v, klen, dout, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
            float(scale), H, Hk, Lq, Lk, D, Dv, shift, *margs, **cfg_kv, **common, **flags, **LAUNCH_OPTS)
        grid = (triton.cdiv(Lq, cfg_q["BLOCK_M"]), B * H)
        _dot._attn_bwd_dq_dot[grid](
            q, k, v, klen, dout, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
            float(scale), H, Hk, Lq, Lk, D, Dv, shift, *margs, drel, skew, **cfg_q, **common, **flags,
            **LAUNCH_OPTS)
        return (dq[..., :D_user].contiguous(), dk[..., :D_user].contiguous(), dv[..., :Dv_user].contiguous(),
                _drel_result(spec, drel))


def _pad(n: int) -> int:
    """Row padding of the exp tables and gradient scratch (>= every BLOCK_M/BLOCK_N)."""
    return (n + 127) // 128 * 128


ALIGN = 16  # elements: every stride the kernels see is a multiple of this (see kernels.common)


def _round_up(n: int, m: int = ALIGN) -> int:
    return (n + m - 1) // m * m


def _is_aligned(t: torch.Tensor) -> bool:
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and t.shape[-1] % 8 == 0
            and all(s % ALIGN == 0 for s in t.stride()[:-1]))


def _empty_aligned(*shape: int, dtype, device) -> torch.Tensor:
    """An uninitialized tensor whose last dimension is padded to a multiple of 16 elements in
    memory (returned as a view of the real width): every stride is a multiple of 16."""
    buf = torch.empty(*shape[:-1], _round_up(shape[-1]), dtype=dtype, device=device)
    return buf[..., :shape[-1]]


def _aligned(*ts: torch.Tensor):
    """The kernels' launch contract (``kernels.common.SIZE_ARGS``): 16-byte aligned pointers,
    unit last stride, every other stride a multiple of 16 elements, and a last dimension that
    is a multiple of 8. A tensor that meets it is passed as is (strides of size-1 dimensions,
    never used, are set to 0); any other tensor (a contiguous D = 40, a sliced or transposed
    view, D = 17) is copied into a padded buffer whose last dimension is rounded up to a
    multiple of 8 with zeros (an O(L D) copy like FlashAttention's padding of the head
    dimension): the kernels' head-dim masks then cover 8 elements (16 bytes at 16 bits) at
    a time, so even masked loads are 128-bit. Callers slice results back to the user width."""
    out = []
    for t in ts:
        if t.dim() > 1 and any(n == 1 for n in t.shape[:-1]):
            t = t.as_strided(t.shape, [0 if n == 1 else st for n, st in zip(t.shape[:-1], t.stride()[:-1])]
                             + [t.stride(-1) if t.shape[-1] > 1 else 1])
        if not (_is_aligned(t) and fits_int32_tile_offsets(t)):
            d = t.shape[-1]
            buf = _empty_aligned(*t.shape[:-1], _round_up(d, 8), dtype=t.dtype, device=t.device)
            if d % 8:
                buf[..., d:].zero_()
            buf[..., :d].copy_(t)
            t = buf
        out.append(t)
    return tuple(out)


MAX_TILE_ROWS = 256  # the largest BLOCK_M / BLOCK_N of any config


def fits_int32_tile_offsets(t: torch.Tensor) -> bool:
    """The kernels form a 64-bit base pointer per (batch, head, tile start) and int32 offsets
    inside a tile: ``row * stride(-2) + column`` for row < MAX_TILE_ROWS. True when that stays
    below 2^31, so a view whose total extent is far beyond 2^31 elements (Lk = 512K keys of
    32 heads x 128 in a (B, L, H, D) buffer) runs as is; a view with a larger row stride is
    copied by ``_aligned``. Looks at strides only: works on meta tensors (no storage)."""
    return t.dim() < 2 or abs(t.stride(-2)) * MAX_TILE_ROWS + t.shape[-1] < 2 ** 31


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor (indexed without strides: lse, key lengths) at a 16-byte aligned
    address, float32 unless it is an int32 tensor."""
    t = t.contiguous() if t.dtype == torch.int32 else t.float().contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _exp_table(x: torch.Tensor, xlen: torch.Tensor):
    """(T, XMAX): T (B, Hx, 2A, L padded to 128) float32, transposed: rows a < A hold
    exp(2 clamp(x, +-40)), rows A + a hold x; XMAX = max_a |x| as float32 (B, Hx, L). Rows at
    or past xlen[b] (int32 per batch) read as x = 0. The launcher checks 2A x padded L < 2^31
    (the kernels index one (batch, head) table with int32 offsets)."""
    B, Hx, L, A = x.shape
    et = torch.empty(B, Hx, 2 * A, _pad(L), dtype=torch.float32, device=x.device)
    if 2 * A * et.shape[-1] >= 2 ** 31:
        raise ValueError(f"triton backend: additive attention over {L} positions x {A} features per head "
                         f"exceeds the 2^31-element table limit (x shape {tuple(x.shape)})")
    xmax = torch.empty(B, Hx, L, dtype=torch.float32, device=x.device)
    BLOCK_L, BLOCK_A = 64, min(64, A & -A)  # the largest power of two <= 64 dividing A (_aligned: >= 8)
    if A % BLOCK_A or BLOCK_A < 8:
        raise ValueError(f"triton backend: the key/query table needs a feature width that is a multiple of 8 "
                         f"(the launcher pads it), got x shape {tuple(x.shape)}")
    _add._attn_exp_table[(et.shape[-1] // BLOCK_L, B * Hx)](
        x, et, xmax, xlen, *x.stride(), *et.stride()[:3], Hx, L, A,
        BLOCK_L=BLOCK_L, BLOCK_A=BLOCK_A, num_warps=4, **LAUNCH_OPTS)
    return et, xmax


_TABLE_CACHE: list = []  # [(weakref to the key tensor's root, signature, (table, xmax))], most recent last
TABLE_CACHE_SIZE = 2


def _key_table(k: torch.Tensor, klen: torch.Tensor, key_lengths: Optional[torch.Tensor]):
    """``_exp_table`` of the keys, reused while the same key tensor (same storage, view and
    version counter, i.e. not modified in place) comes back with the same key_lengths tensor
    (or none): a decoder attending to a fixed encoder memory builds the table once, not at
    every step. At most TABLE_CACHE_SIZE tables are kept; an entry dies with its tensors (weak
    references), and no device value is read (no synchronization)."""
    import weakref
    root = k._base if k._base is not None else k
    kl = key_lengths if key_lengths is None or key_lengths._base is None else key_lengths._base
    sig = (k.data_ptr(), k.storage_offset(), tuple(k.shape), tuple(k.stride()), k.dtype, k.device, k._version,
           None if kl is None else (key_lengths.data_ptr(), tuple(key_lengths.shape), key_lengths._version))
    for i, (refs, s, val) in enumerate(_TABLE_CACHE):
        if s == sig and refs[0]() is root and (kl is None or refs[1]() is kl):
            _TABLE_CACHE.append(_TABLE_CACHE.pop(i))
            return val
    val = _exp_table(k, klen)
    _TABLE_CACHE.append(((weakref.ref(root), None if kl is None else weakref.ref(kl)), sig, val))
    del _TABLE_CACHE[:-TABLE_CACHE_SIZE]
    return val


def _bwd_table(x: torch.Tensor, xlen: torch.Tensor, cfg: dict):
    """(T, XMAX) for the additive backward (``additive_bwd._bwd_exp_table``): T (B, Hx, L_pad / XB,
    2 A_pad, XB) float32, XMAX (B, Hx, L) float32."""
    B, Hx, L, A = x.shape
    a_pad, xb = cfg["AS"] * cfg["S"], cfg["XB"]
    t = torch.empty(B, Hx, _pad(L) // xb, 2 * a_pad, xb, dtype=torch.float32, device=x.device)
    if t[0, 0].numel() >= 2 ** 31:
        raise ValueError(f"triton backend: additive attention over {L} positions x {A} features per head "
                         f"exceeds the 2^31-element table limit (x shape {tuple(x.shape)})")
    xmax = torch.empty(B, Hx, L, dtype=torch.float32, device=x.device)
    _addb._bwd_exp_table[(t.shape[2], B * Hx)](
        x, t, xmax, xlen, *x.stride()[:3], *t.stride()[:2], Hx, L, A, a_pad,
        XB=xb, BLOCK_A=64, num_warps=4, **LAUNCH_OPTS)
    return t, xmax


def delta_shape(bwd_cfg: dict, width: int, chunk: int, fp32: bool) -> dict:
    """(ROWS, COLS, CHUNK) of the delta kernel for a dQ kernel config: its BLOCK_M x BLOCK_N
    tile (COLS at least ROWS) under the interpreter, whose numpy matmul may round by shape; a
    fixed 64 x 64 (32 x 32 above 128 columns, or above 64 for float32) on the GPU, where an MMA's result per
    element does not depend on the tile shape. CHUNK: the dP products' K step (the dot
    kernels' BLOCK_DC, the additive kernels' Dv chunk), at most ``width``."""
    if interpreting():
        rows = bwd_cfg["BLOCK_M"]
        return dict(ROWS=rows, COLS=max(rows, bwd_cfg["BLOCK_N"]), CHUNK=min(chunk, width))
    rows = 32 if (fp32 and width > 64) or width > 128 else 64
    return dict(ROWS=rows, COLS=rows, CHUNK=min(chunk, width))


def delta_warps(o32: bool) -> int:
    """Warps of the delta kernel: 8 with a float32 O (its tile and remainder spilled 48 bytes at 4
    warps on sm_80, 64 x 64 rows x 128 columns)."""
    return 8 if o32 else 4


def _delta(out: torch.Tensor, dout: torch.Tensor, shape: dict) -> torch.Tensor:
    """delta = rowsum(dO * O) in float32, contiguous (B, H, Lq), with the dP arithmetic; ``out`` in
    dO's dtype or, for 16-bit dO, the forward's float32 output (``O32``: its rounding remainder
    added)."""
    B, H, Lq, Dv = out.shape
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=out.device)
    o32 = out.dtype == torch.float32 and dout.dtype != torch.float32
    _attn_bwd_preprocess[(triton.cdiv(Lq, shape["ROWS"]), B * H)](
        out, dout, delta, *out.stride(), *dout.stride(), H, Lq, Dv,
        **shape, DOT_PRECISION=dot_precision(dout.dtype), O32=o32, num_warps=delta_warps(o32), maxnreg=255,
        **LAUNCH_OPTS)
    return delta


def _split_outputs(q, Lk, Dv, num_splits, block_n, out32=False):
    """Flash-decoding: ``num_splits`` key ranges of whole ``block_n`` tiles (fewer when the keys run
    out) and the output buffers: ``(num_splits, split_n, out, lse, o_buf, l_buf)``; with several splits
    the kernels write float32 partials into ``o_buf``/``l_buf`` for ``_attn_fwd_merge``, else into
    ``out``/``lse`` themselves. ``out32``: ``out`` in float32 (the kernels' stores cast to Out's type)."""
    B, H, Lq = q.shape[:3]
    n_tiles = triton.cdiv(Lk, block_n)
    num_splits = max(1, min(int(num_splits), n_tiles))
    split_n = triton.cdiv(n_tiles, num_splits) * block_n
    num_splits = triton.cdiv(Lk, split_n)
    out = _empty_aligned(B, H, Lq, Dv, dtype=torch.float32 if out32 else q.dtype, device=q.device)
    lse = _empty_aligned(B, H, Lq, dtype=torch.float32, device=q.device)
    if num_splits == 1:
        return num_splits, split_n, out, lse, out, lse
    o_buf = _empty_aligned(num_splits, B, H, Lq, Dv, dtype=torch.float32, device=q.device)
    l_buf = _empty_aligned(num_splits, B, H, Lq, dtype=torch.float32, device=q.device)
    return num_splits, split_n, out, lse, o_buf, l_buf


def _split_strides(o_buf, l_buf):
    """The kernels' output stride arguments: split stride (0 for the final buffers), then (b, h, m, d)
    of the output and (b, h, m) of the LSE."""
    split = o_buf.dim() == 5
    return (o_buf.stride(0) if split else 0, *o_buf.stride()[-4:], l_buf.stride(0) if split else 0,
            *l_buf.stride()[-3:])


def _forward(spec, q, k, v, w, num_splits, out32=False):
    """Shared forward launcher: single pass, or flash-decoding splits + LSE merge. ``out32``: the
    output in float32 (kept for the backward's delta; see ``fusedattn.ops``)."""
    if spec.score == "dot" and spec.scale < 0:  # the kernels track the row max of q . k:
        q, spec = -q, spec.replace(scale=-spec.scale)  # scale * q . k = |scale| * (-q) . k
    score, key_lengths, scale = spec.score, spec.key_lengths, spec.scale
    check_grid(q, k)
    Dv_user = v.shape[-1]
    q, k, v = _aligned(q, k, v)
    if w is not None:
        (w,) = _aligned(w.float())  # float32: 4-byte loads, one per column
    B, H, Lq, D = q.shape
    _, Hk, Lk, Dv = v.shape
    BLOCK_D, BLOCK_DV = block_dim(D), block_dim(Dv)
    if score == "additive" and decode_route(spec, H, Hk, Lq):
        return _forward_additive_decode(spec, q, k, v, w, num_splits, Dv_user, out32)
    if score == "dot":
        BLOCK_D = BLOCK_DV = max(BLOCK_D, BLOCK_DV)  # one width: fewer kernel variants
    decode = Lq <= DECODE_MAX_LQ
    kern = _add if score == "additive" else _dot
    if interpreting() and score == "dot":
        cfg = _dot.interpret_config(BLOCK_D, BLOCK_DV, decode)
    elif interpreting():
        cfg = dict(kern.INTERPRET_DECODE_CONFIG if decode else kern.INTERPRET_CONFIG)
    elif score == "additive":
        cfg = _add.prune_fwd_config(BLOCK_DV, q.dtype == torch.float32, decode)
    else:
        cfg = _dot.prune_fwd_config(BLOCK_D, BLOCK_DV, q.dtype == torch.float32, decode, _arch(q.device),
                                    _score_mods(spec))
    # the dot kernel's rows are (query head of a kv group, query) pairs: B * Hk programs of
    # H / Hk * Lq rows each, so a GQA decode step shares each K/V tile among the group's heads
    heads, rows = (Hk, H // Hk * Lq) if score == "dot" else (H, Lq)
    if num_splits is None:
        num_splits = num_splits_for(B, heads, rows, Lk, cfg["BLOCK_M"], cfg["BLOCK_N"], q.device, decode)
    num_splits, split_n, out, lse, o_buf, l_buf = _split_outputs(q, Lk, Dv, num_splits, cfg["BLOCK_N"], out32)
    klen = _klen(key_lengths, B, Lk, q.device)
    shift, margs, flags = _mods(spec, B, H, Lq, Lk, q.device)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), B * heads, num_splits)
    if score == "additive":
        eq, qmax = _exp_table(q, torch.full((B,), Lq, dtype=torch.int32, device=q.device))
        ek, kmax = _key_table(k, klen, key_lengths)
        _add._attn_fwd_additive[grid](
            q, k, v, w, eq, ek, qmax, kmax, klen, o_buf, l_buf,
            *q.stride(), *k.stride(), *v.stride(), *w.stride(),
            *eq.stride()[:3], *ek.stride()[:3], *_split_strides(o_buf, l_buf),
            H, Hk, Lq, Lk, D, Dv, shift, split_n, *margs,
            BLOCK_DV=BLOCK_DV, FAST_RCP=not interpreting(), DOT_PRECISION=dot_precision(q.dtype),
            **cfg, **flags, **LAUNCH_OPTS)
    else:
        _dot._attn_fwd_dot[grid](
            q, k, v, klen, o_buf, l_buf,
            *q.stride(), *k.stride(), *v.stride(), *_split_strides(o_buf, l_buf),
            float(scale), H, Hk, Lq, Lk, D, Dv, shift, split_n, *margs,
            BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, EVEN=D == BLOCK_D and Dv == BLOCK_DV,
            DOT_PRECISION=dot_precision(q.dtype), **cfg, **flags, **LAUNCH_OPTS)
    if num_splits > 1:
        _attn_fwd_merge[(Lq, B * H)](
            o_buf, l_buf, out, lse, *o_buf.stride(), *l_buf.stride(), *out.stride(), *lse.stride(),
            H, Lq, Dv, num_splits, BLOCK_DV=BLOCK_DV, num_warps=1, **LAUNCH_OPTS)
    return out[..., :Dv_user].contiguous(), lse.contiguous()


LAST_ADDITIVE_KERNEL: list = []  # name of the additive forward kernel of the latest call (tests read it)


def decode_route(spec: AttnSpec, H: int, Hk: int, Lq: int) -> bool:
    """The additive forward takes ``kernels.additive_decode`` for decode steps (Lq <= DECODE_MAX_LQ)
    whose kv group fits one program ((H / Hk) * Lq <= 16 rows) and that use no window left edge,
    rel_bias or ALiBi; every other call runs ``kernels.additive._attn_fwd_additive``."""
    plain = spec.window_left < 0 and spec.rel_bias is None and spec.alibi_slopes is None
    route = plain and Lq <= DECODE_MAX_LQ and H // Hk * Lq <= _adec.ROWS
    LAST_ADDITIVE_KERNEL[:] = ["_attn_fwd_additive_decode" if route else "_attn_fwd_additive"]
    return route


def _forward_additive_decode(spec, q, k, v, w, num_splits, Dv_user, out32=False):
    """``_forward`` for ``decode_route`` calls (q, k, v, w already aligned): one program per
    (batch, kv head, key split) over the group's (H / Hk) * Lq rows, then the LSE merge."""
    B, H, Lq, A = q.shape
    _, Hk, Lk, Dv = v.shape
    width = max(block_dim(A), block_dim(Dv))
    cfg = _adec.dec_config(width, q.dtype == torch.float32, interpreting())
    rows = H // Hk * Lq
    if num_splits is None:
        num_splits = num_splits_for(B, Hk, rows, Lk, cfg["ROWS"], cfg["BLOCK_N"], q.device, True)
    num_splits, split_n, out, lse, o_buf, l_buf = _split_outputs(q, Lk, Dv, num_splits, cfg["BLOCK_N"], out32)
    klen = _klen(spec.key_lengths, B, Lk, q.device)
    shift = _causal_shift(spec.window_right, Lq, Lk)
    eq, qmax = _exp_table(q, torch.full((B,), Lq, dtype=torch.int32, device=q.device))
    ek, kmax = _key_table(k, klen, spec.key_lengths)
    _adec._attn_fwd_additive_decode[(1, B * Hk, num_splits)](
        v, w, eq, ek, qmax, kmax, klen, o_buf, l_buf,
        *v.stride(), *w.stride(), *eq.stride()[:3], *ek.stride()[:3], *_split_strides(o_buf, l_buf),
        H, Hk, Lq, Lk, A, Dv, shift, split_n, FAST_RCP=not interpreting(),
        DOT_PRECISION=dot_precision(q.dtype), **cfg, **LAUNCH_OPTS)
    if num_splits > 1:
        _attn_fwd_merge[(Lq, B * H)](
            o_buf, l_buf, out, lse, *o_buf.stride(), *l_buf.stride(), *out.stride(), *lse.stride(),
            H, Lq, Dv, num_splits, BLOCK_DV=block_dim(Dv), num_warps=1, **LAUNCH_OPTS)
    return out[..., :Dv_user].contiguous(), lse.contiguous()
