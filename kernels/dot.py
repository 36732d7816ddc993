"""Fused scaled dot-product attention: FlashAttention-2-form forward and backward kernels.

Scores ``s_ij = scale * q_i . k_j`` come from ``tl.dot`` on (BLOCK_M, BLOCK_D) x (BLOCK_D, BLOCK_N)
tiles; the forward tracks the row max m of the raw products q.k (the launcher makes scale >= 0)
and weights ``exp2((qk - m) * scale * log2 e)`` (the row max gets exactly 1), lse = fl(m * scale)
+ log(l); the backward takes ``P = exp(fl(qk * scale) - lse)`` (``_mul_rn``). With SOFTCAP or BIAS
the same holds for the modified score s in natural units (``_mod_score``): max of s, weights
``exp2((s - m) log2 e)``, lse = m + log(l), P = exp(s - lse). Head dims are padded to a power of two >= 16: the launcher passes
``EVEN`` when D == BLOCK_D and Dv == BLOCK_DV (no head-dim masks); otherwise the widths are
multiples of 8 (``common._dims``) so the masks cover 16 bytes and loads stay 128-bit. Each
loop over key (or query) tiles is split in two: the tiles every row of the program sees in
full run with no mask at all; the causal-diagonal tiles and the tiles crossing key_lengths
run a masked copy (keys at or past key_lengths load as 0: padding keys may hold anything).
Pointers: 64-bit base per (batch, head, tile start), int32 offsets inside a tile (the
launcher guarantees ``row stride * 256 < 2^31``).
Flash-decoding splits and the LSE convention are the same as in ``additive.py``.
Backward: a dK/dV kernel per key tile (looping over the group's query heads and query tiles,
so grouped heads are summed without atomics) and a dQ kernel per query tile.
"""
import os

import triton
import triton.language as tl

from .common import (
    LOG2E,
    SIZE_ARGS,
    _allowed,
    _attn_fwd_epilogue,
    _bias,
    _dims,
    _drel_ends,
    _drel_program,
    _drel_tile,
    _ld,
    _mma,
    _mma_acc,
    _softcap,
)
from .dot_configs import (  # noqa: F401  (re-exported: the launcher and the compile check use dot.*)
    BWD_DKDV_CONFIGS,
    BWD_DKDV_CONFIGS_FP32,
    BWD_DQ_CONFIGS,
    BWD_DQ_CONFIGS_FP32,
    FWD_CONFIGS,
    FWD_CONFIGS_FP32,
    INTERPRET_CONFIG,
    INTERPRET_DECODE_CONFIG,
    interpret_config,
    prune_bwd_configs,
    prune_fwd_config,
    score_mods_config,
)

# Under the interpreter tl.dot is numpy's matmul, whose summation order depends on the operands'
# orientation (seen on AMD Zen 3: k.q^T and q.k^T differ in the last bit): there the dK/dV loop forms
# q.k^T as the forward does and transposes it, so a saturated row's exp(fl(qk scale) - lse) is exactly
# 1 in the backward as in the forward. The GPU build keeps k.q^T (a transpose there is a layout
# conversion per tile); whether its MMAs sum both orientations alike is not verified without a GPU.
_QK_AS_FWD = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# ----------------------------------------------------------------------------------------
# tile helpers
# ----------------------------------------------------------------------------------------
@triton.jit
def _mul_rn(a, b, DOT_PRECISION: tl.constexpr):
    """a * b rounded to float32 on its own: the compiler never contracts it with a following
    add into an FMA (PTX mul.rn; on the interpreter, the numpy product). The softmax is taken
    on the rounded scores s = fl(q . k * scale), as the float32 reference does: the backward's
    exp(s - lse) is then exactly 1 on a saturated row (lse = s_max), where an exact product
    minus a float32 lse near 1e4 would be off by the lse's rounding (~1e-3)."""
    if DOT_PRECISION == "tf32" or DOT_PRECISION == "tf32x3":
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b + tl.zeros_like(a)],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _mod_score(qk, offs_q, offs_k, scale, DIST_SHIFT, REL, rel_row, REL_M, slope, softcap_k, softcap,
               SOFTCAP: tl.constexpr, BIAS: tl.constexpr, TRANS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The modified score in natural units (``fusedattn.spec``: softcap, then the position
    biases) and the softcap's factor 1 - tanh^2 (``common._softcap``; qk itself when not SOFTCAP). Without
    SOFTCAP the product is rounded on its own (``_mul_rn``) before the bias is added, as the
    float32 reference forms ``scale * q.k + bias``. Forward and backward form it identically."""
    if SOFTCAP:
        s, r = _softcap(qk, softcap_k, softcap, DOT_PRECISION == "ieee" or DOT_PRECISION == "tf32x3")
    else:
        s = _mul_rn(qk, scale, DOT_PRECISION)
        r = qk
    if BIAS > 0:
        s += _bias(offs_q, offs_k, DIST_SHIFT, REL, rel_row, REL_M, slope, BIAS, TRANS)
    return s, r


@triton.jit
def _chunked_dot(A, a_rows, offs_r, n_r, B, b_rows, offs_s, n_s, D,
                 BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DC: tl.constexpr, EVEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_R, BLOCK_S) float32 tile of sum_{d < D} A[r, d] * B[s, d]; row r of A starts at
    ``A + a_rows[r]`` and is valid when offs_r[r] < n_r (B likewise). Both operands are loaded
    BLOCK_DC columns at a time (a runtime loop: only one chunk of each is live): the
    register-light path for wide float32 heads, whose 3xTF32 dots hold split (big, small)
    copies of their operands."""
    acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float32)
    for c in range(0, BLOCK_D, BLOCK_DC):
        offs_c = c + tl.arange(0, BLOCK_DC)
        a = _ld(A + a_rows[:, None] + offs_c[None, :], offs_r, n_r, offs_c, D, True, not EVEN)
        b = _ld(B + b_rows[:, None] + offs_c[None, :], offs_s, n_s, offs_c, D, True, not EVEN)
        acc += _mma(a, tl.trans(b), DOT_PRECISION)
    return acc


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------
@triton.jit
def _fwd_loop(acc, m_i, l_i, q, q_base, q_rows, q_idx, n_q, k_base, v_base, lo, hi, offs_m, offs_n0, offs_d,
              offs_dv, klen, D, Dv, CAUSAL_SHIFT, qk_scale, scale, stride_kn, stride_vn,
              WINDOW_SHIFT, DIST_SHIFT, REL, rel_row, REL_M, slope, softcap_k, softcap,
              MASKED: tl.constexpr, EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DC: tl.constexpr,
              DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, BIAS: tl.constexpr):
    """Key tiles [lo, hi) of the online softmax. Without SOFTCAP / BIAS, m_i is the running max of
    the raw products q . k (the launcher makes scale >= 0) and the weights are
    exp2((q . k - m_i) scale log2 e); with them, m_i is the running max of the modified score s in
    natural units (``_mod_score``) and the weights are exp2((s - m_i) log2 e). Either way the row
    max itself gets weight exactly 1.
    offs_m: the query index of each row (causal mask); q_rows / q_idx < n_q: row offsets and
    validity for the chunked path. MASKED: the tiles on the causal diagonal or past key_lengths
    (loads of keys >= klen read 0, so padding keys holding NaN or inf never reach P @ V); the
    others run with no mask at all."""
    k_offs = offs_n0[:, None] * stride_kn + offs_d[None, :]
    v_offs = offs_n0[:, None] * stride_vn + offs_dv[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        kb = k_base + tl.cast(start_n, tl.int64) * stride_kn
        vb = v_base + tl.cast(start_n, tl.int64) * stride_vn
        n_ok = klen - start_n  # keys of this tile below key_lengths
        if BLOCK_DC == BLOCK_D:
            k = _ld(kb + k_offs, offs_n0, n_ok, offs_d, D, MASKED, not EVEN)
            qk = _mma(q, tl.trans(k), DOT_PRECISION)
        else:
            qk = _chunked_dot(q_base, q_rows, q_idx, n_q, kb, offs_n0 * stride_kn, offs_n0, n_ok, D,
                              BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DC, EVEN, DOT_PRECISION)
        # weights exp2((q.k - m) * scale log2 e): the row max itself gets exactly 1, so a saturated
        # (one-hot) row gives out = v exactly and the backward's dP - delta cancels there
        if MASKED:
            offs_n = start_n + offs_n0
            allowed = _allowed(offs_m, offs_n, klen, CAUSAL_SHIFT, WINDOW_SHIFT, WINDOW, False)
            if SOFTCAP or BIAS > 0:
                x, _ = _mod_score(qk, offs_m, offs_n, scale, DIST_SHIFT, REL, rel_row, REL_M, slope, softcap_k,
                                  softcap, SOFTCAP, BIAS, False, DOT_PRECISION)
                c = LOG2E
            else:
                x = qk
                c = qk_scale
            m_new = tl.maximum(m_i, tl.max(tl.where(allowed, x, -float("inf")), axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            p = tl.where(allowed, tl.math.exp2((x - m_safe[:, None]) * c), 0.0)
        elif SOFTCAP or BIAS > 0:
            # every key allowed, finite modified scores
            x, _ = _mod_score(qk, offs_m, start_n + offs_n0, scale, DIST_SHIFT, REL, rel_row, REL_M, slope,
                              softcap_k, softcap, SOFTCAP, BIAS, False, DOT_PRECISION)
            c = LOG2E
            m_new = tl.maximum(m_i, tl.max(x, axis=1))
            m_safe = m_new
            p = tl.math.exp2((x - m_safe[:, None]) * c)
        else:
            # every key allowed: m_new is finite
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            m_safe = m_new
            c = qk_scale
            p = tl.math.exp2((qk - m_safe[:, None]) * c)
        alpha = tl.where(m_i == -float("inf"), 0.0, tl.math.exp2((m_i - m_safe) * c))
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _ld(vb + v_offs, offs_n0, n_ok, offs_dv, Dv, MASKED, not EVEN)
        acc = _mma_acc(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=SIZE_ARGS)
def _attn_fwd_dot(Q, K, V, KLEN, Out, LSE,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_os, stride_ob, stride_oh, stride_om, stride_od,
                  stride_ls, stride_lb, stride_lh, stride_lm,
                  scale, H, Hk, Lq, Lk, D, Dv, CAUSAL_SHIFT, SPLIT_N,
                  WINDOW_SHIFT, REL, SLOPES, REL_M, softcap_k, softcap,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DV: tl.constexpr, BLOCK_DC: tl.constexpr, EVEN: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                  BIAS: tl.constexpr):
    """One program: BLOCK_M rows of one (b, kv head), keys [pid_s*SPLIT_N, +SPLIT_N); row r is
    query r % Lq of query head kv_head * (H / Hk) + r // Lq (grid axis 1: B * Hk, axis 0:
    cdiv(H / Hk * Lq, BLOCK_M)). Key j is allowed for query i iff j < KLEN[b] and
    j <= i + CAUSAL_SHIFT. EVEN: D == BLOCK_D
    and Dv == BLOCK_DV (no head-dim masks). BLOCK_DC < BLOCK_D: Q is not kept in registers;
    Q K^T is summed over D chunks. Unit last strides (stride_*d) are assumed.
    Modifiers (constexpr-gated): WINDOW also requires j >= i + WINDOW_SHIFT (key tiles left of
    every row's window are skipped, the straddling ones masked); SOFTCAP caps the scores
    (softcap_k = 2 scale log2 e / softcap); BIAS & 1 adds rel_bias (REL: float32 (H, 2 REL_M - 1)
    contiguous), BIAS & 2 ALiBi (SLOPES: float32 (B, H) contiguous)."""
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_D >= 16)
    tl.static_assert(BLOCK_DV >= 16)
    tl.static_assert(BLOCK_DC == BLOCK_D or (BLOCK_DV == BLOCK_D and BLOCK_D % BLOCK_DC == 0))
    pid_m = tl.program_id(0)
    off_bhk = tl.program_id(1)
    pid_s = tl.program_id(2)
    off_b = off_bhk // Hk
    off_hk = off_bhk % Hk
    GROUP = H // Hk
    off_b64 = off_b.to(tl.int64)
    off_hk64 = off_hk.to(tl.int64)
    D, Dv = _dims(D, Dv)

    # -- rows: the (head of the group, query) pairs g * Lq + i, so the query heads sharing a kv
    #    head share its K/V tiles (a decode step fills BLOCK_M rows with GROUP x Lq queries) --
    n_rows = GROUP * Lq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = rows % Lq  # query index
    off_h64 = (off_hk * GROUP + rows // Lq).to(tl.int64)  # query head
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_base = Q + off_b64 * stride_qb
    q_rows = off_h64 * stride_qh + offs_m.to(tl.int64) * stride_qm
    if BLOCK_DC == BLOCK_D:
        q = _ld(q_base + q_rows[:, None] + offs_d[None, :], rows, n_rows, offs_d, D, True, not EVEN)
    else:
        q = tl.zeros([BLOCK_M, BLOCK_D], dtype=Q.dtype.element_ty)  # unused
    k_base = K + off_b64 * stride_kb + off_hk64 * stride_kh
    v_base = V + off_b64 * stride_vb + off_hk64 * stride_vh
    qk_scale = scale * LOG2E

    # -- key range: [n_lo, n_hi) seen by some row, [n_lo, n_full) by every row of the tile --
    r0 = pid_m * BLOCK_M
    r1 = tl.minimum(r0 + BLOCK_M, n_rows) - 1
    one_head = (r0 // Lq) == (r1 // Lq)
    i_min = tl.where(one_head, r0 % Lq, 0)
    i_max = tl.where(one_head, r1 % Lq, Lq - 1)
    klen = tl.load(KLEN + off_b)
    n_lo = pid_s * SPLIT_N
    n_hi = tl.minimum(tl.minimum(klen, i_max + 1 + CAUSAL_SHIFT), n_lo + SPLIT_N)
    n_free = tl.minimum(klen, i_min + CAUSAL_SHIFT + 1)
    # WINDOW: [n_lo, n_mid) straddles the left bound (masked), then as without it
    n_mid = n_lo
    if WINDOW:
        n_lo = tl.maximum(n_lo, tl.maximum(i_min + WINDOW_SHIFT, 0) // BLOCK_N * BLOCK_N)
        n_mid = tl.maximum(tl.minimum((tl.maximum(i_max + WINDOW_SHIFT, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N,
                                      n_hi), n_lo)
    n_full = tl.maximum(n_mid + (tl.minimum(n_free, n_hi) - n_mid) // BLOCK_N * BLOCK_N, n_mid)

    # -- modifiers: per-row head (rows may span the heads of a group) --
    rel_row = 0
    slope = 0.0
    if BIAS > 0:
        h_row = tl.minimum(off_hk * GROUP + rows // Lq, H - 1)
        rel_row = (h_row * (2 * REL_M - 1))[:, None]
        if BIAS & 2:
            slope = tl.load(SLOPES + off_b * H + h_row)[:, None]

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if WINDOW:
        acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, q_base, q_rows, rows, n_rows, k_base, v_base, n_lo, n_mid,
                                  offs_m, offs_n0, offs_d, offs_dv, klen, D, Dv, CAUSAL_SHIFT, qk_scale, scale,
                                  stride_kn, stride_vn, WINDOW_SHIFT, Lk - Lq, REL, rel_row, REL_M, slope,
                                  softcap_k, softcap, True, EVEN, BLOCK_M, BLOCK_N, BLOCK_D,
                                  BLOCK_DV, BLOCK_DC, DOT_PRECISION, WINDOW, SOFTCAP, BIAS)
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, q_base, q_rows, rows, n_rows, k_base, v_base, n_mid, n_full,
                              offs_m, offs_n0, offs_d, offs_dv, klen, D, Dv, CAUSAL_SHIFT, qk_scale, scale,
                              stride_kn, stride_vn, WINDOW_SHIFT, Lk - Lq, REL, rel_row, REL_M, slope,
                              softcap_k, softcap, False, EVEN, BLOCK_M, BLOCK_N, BLOCK_D,
                              BLOCK_DV, BLOCK_DC, DOT_PRECISION, WINDOW, SOFTCAP, BIAS)
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, q_base, q_rows, rows, n_rows, k_base, v_base, n_full, n_hi,
                              offs_m, offs_n0, offs_d, offs_dv, klen, D, Dv, CAUSAL_SHIFT, qk_scale, scale,
                              stride_kn, stride_vn, WINDOW_SHIFT, Lk - Lq, REL, rel_row, REL_M, slope,
                              softcap_k, softcap, True, EVEN, BLOCK_M, BLOCK_N, BLOCK_D,
                              BLOCK_DV, BLOCK_DC, DOT_PRECISION, WINDOW, SOFTCAP, BIAS)

    # -- epilogue: empty rows give out = 0, lse = -inf. lse = s_max + log(l) with s_max =
    #    fl(m_i * scale), the rounded score the backward recomputes (see _mul_rn): one rounding,
    #    and s_max itself on a saturated row. The row heads are recomputed here rather than
    #    kept live (as int64) across the loops --
    if SOFTCAP or BIAS > 0:
        m_hi = m_i  # already the (modified) score in natural units
    else:
        m_hi = _mul_rn(m_i, scale, DOT_PRECISION)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    off_h64 = (off_hk * GROUP + rows // Lq).to(tl.int64)
    _attn_fwd_epilogue(acc, m_hi, l_i, Out, LSE, pid_s, off_b64, off_h64, rows % Lq, offs_dv,
                       rows < n_rows, offs_dv < Dv,
                       stride_os, stride_ob, stride_oh, stride_om, stride_od,
                       stride_ls, stride_lb, stride_lh, stride_lm, BLOCK_M)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------
@triton.jit
def _bwd_probs(qk, lse, offs_m, offs_n, klen, CAUSAL_SHIFT, scale,
               WINDOW_SHIFT, DIST_SHIFT, REL, rel_row, REL_M, slope, softcap_k, softcap,
               MASKED: tl.constexpr, TRANS: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
               BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """P (or P^T when TRANS: rows are keys) from raw scores and the natural-log lse per query,
    and the softcap's factor 1 - tanh^2 (``_mod_score``; qk when not SOFTCAP): exp(s - lse) with s the score in
    natural units as the forward formed it (fl(q.k * scale), see _mul_rn, or the modified score),
    so a saturated row gets P = 1 exactly. Two FP32 instructions per pair more than
    exp2(q.k * scale log2 e - lse log2 e), which rounds lse twice more."""
    if SOFTCAP or BIAS > 0:
        s, r = _mod_score(qk, offs_m, offs_n, scale, DIST_SHIFT, REL, rel_row, REL_M, slope, softcap_k, softcap,
                          SOFTCAP, BIAS, TRANS, DOT_PRECISION)
    else:
        s = _mul_rn(qk, scale, DOT_PRECISION)
        r = qk
    if TRANS:
        p = tl.math.exp2((s - lse[None, :]) * LOG2E)
    else:
        p = tl.math.exp2((s - lse[:, None]) * LOG2E)
    if MASKED:
        p = tl.where(_allowed(offs_m, offs_n, klen, CAUSAL_SHIFT, WINDOW_SHIFT, WINDOW, TRANS), p, 0.0)
    return p, r


@triton.jit
def _dkdv_loop(dk_acc, dv_acc, k, v, q_base, do_base, k_base, v_base, LSE, Delta, row_base,
               it_lo, it_hi, m_first, m_skip, m_second, offs_m0, offs_n, offs_n0, n_ok, offs_d, offs_dv,
               klen, Lq, D, Dv, CAUSAL_SHIFT, scale, stride_qm, stride_dom, stride_kn, stride_vn,
               WINDOW_SHIFT, DIST_SHIFT, REL, rel_row, REL_M, slope, softcap_k, softcap,
               MASKED: tl.constexpr, EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DC: tl.constexpr,
               DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, BIAS: tl.constexpr):
    """Query tiles it_lo..it_hi of one key tile: tile t starts at m_first + t * BLOCK_M, and
    tiles from index m_skip on jump to m_second (the masked loop covers the causal diagonal
    tiles and the query tail with one body). Rows >= Lq load as 0 and contribute nothing."""
    q_offs = offs_m0[:, None] * stride_qm + offs_d[None, :]
    do_offs = offs_m0[:, None] * stride_dom + offs_dv[None, :]
    for t in range(it_lo, it_hi):
        if MASKED:
            start_m = tl.where(t < m_skip, m_first + t * BLOCK_M, m_second + (t - m_skip) * BLOCK_M)
        else:
            start_m = m_first + t * BLOCK_M
        offs_m = start_m + offs_m0
        qb = q_base + tl.cast(start_m, tl.int64) * stride_qm
        dob = do_base + tl.cast(start_m, tl.int64) * stride_dom
        m_ok = Lq - start_m
        if BLOCK_DC == BLOCK_D:
            q = _ld(qb + q_offs, offs_m0, m_ok, offs_d, D, MASKED, not EVEN)
            if _QK_AS_FWD:
                qkT = tl.trans(_mma(q, tl.trans(k), DOT_PRECISION))
            else:
                qkT = _mma(k, tl.trans(q), DOT_PRECISION)
        else:
            qkT = _chunked_dot(k_base, offs_n0 * stride_kn, offs_n0, n_ok, qb, offs_m0 * stride_qm, offs_m0, m_ok,
                               D, BLOCK_N, BLOCK_M, BLOCK_D, BLOCK_DC, EVEN, DOT_PRECISION)
        lse = tl.load(LSE + row_base + offs_m, mask=offs_m < Lq, other=0.0)
        pT, rT = _bwd_probs(qkT, lse, offs_m, offs_n, klen, CAUSAL_SHIFT, scale, WINDOW_SHIFT, DIST_SHIFT, REL,
                            rel_row, REL_M, slope, softcap_k, softcap, MASKED, True, WINDOW, SOFTCAP, BIAS,
                            DOT_PRECISION)
        do = _ld(dob + do_offs, offs_m0, m_ok, offs_dv, Dv, MASKED, not EVEN)
        dv_acc = _mma_acc(pT.to(do.dtype), do, dv_acc, DOT_PRECISION)
        if BLOCK_DC == BLOCK_D:
            dpT = _mma(v, tl.trans(do), DOT_PRECISION)
        else:
            dpT = _chunked_dot(v_base, offs_n0 * stride_vn, offs_n0, n_ok, dob, offs_m0 * stride_dom, offs_m0,
                               m_ok, Dv, BLOCK_N, BLOCK_M, BLOCK_DV, BLOCK_DC, EVEN, DOT_PRECISION)
        delta = tl.load(Delta + row_base + offs_m, mask=offs_m < Lq, other=0.0)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * rT  # through the cap: rT = 1 - tanh^2 (``common._softcap``)
        if BLOCK_DC != BLOCK_D:
            q = _ld(qb + q_offs, offs_m0, m_ok, offs_d, D, MASKED, not EVEN)
        dk_acc = _mma_acc(dsT.to(q.dtype), q, dk_acc, DOT_PRECISION)
    return dk_acc, dv_acc


@triton.jit(do_not_specialize=SIZE_ARGS)
def _attn_bwd_dkdv_dot(Q, K, V, KLEN, DO, LSE, Delta, DK, DV,
                       stride_qb, stride_qh, stride_qm, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       stride_dob, stride_doh, stride_dom, stride_dod,
                       stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                       stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                       scale, H, Hk, Lq, Lk, D, Dv, CAUSAL_SHIFT,
                       WINDOW_SHIFT, REL, SLOPES, REL_M, softcap_k, softcap,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, BLOCK_DC: tl.constexpr, EVEN: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                       BIAS: tl.constexpr):
    """One program: BLOCK_N keys of one (b, kv head); loops over the group's query heads and
    the query tiles that can see these keys. LSE and Delta are contiguous (B, H, Lq) float32.
    Query tiles strictly below the causal diagonal of a key tile that lies below key_lengths
    run unmasked; the diagonal tiles, the query tail and key tiles crossing key_lengths run
    masked. BLOCK_DC < BLOCK_D: K and V are not kept in registers. Modifiers as in
    ``_attn_fwd_dot`` (WINDOW: query tiles past every key's left bound are skipped, those
    straddling it masked); the rel_bias gradient is the dQ kernel's."""
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_D >= 16)
    tl.static_assert(BLOCK_DV >= 16)
    tl.static_assert(BLOCK_DC == BLOCK_D or (BLOCK_DV == BLOCK_D and BLOCK_D % BLOCK_DC == 0))
    pid_n = tl.program_id(0)
    off_bhk = tl.program_id(1)
    off_b = off_bhk // Hk
    off_hk = off_bhk % Hk
    GROUP = H // Hk
    off_b64 = off_b.to(tl.int64)
    off_hk64 = off_hk.to(tl.int64)
    D, Dv = _dims(D, Dv)

    start_n = pid_n * BLOCK_N
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_n0
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    klen = tl.load(KLEN + off_b)
    n_ok = klen - start_n  # keys past key_lengths load as 0: their dK and dV are 0
    k_base = K + off_b64 * stride_kb + off_hk64 * stride_kh + tl.cast(start_n, tl.int64) * stride_kn
    v_base = V + off_b64 * stride_vb + off_hk64 * stride_vh + tl.cast(start_n, tl.int64) * stride_vn
    if BLOCK_DC == BLOCK_D:
        k = _ld(k_base + offs_n0[:, None] * stride_kn + offs_d[None, :], offs_n0, n_ok, offs_d, D,
                True, not EVEN)
        v = _ld(v_base + offs_n0[:, None] * stride_vn + offs_dv[None, :], offs_n0, n_ok, offs_dv, Dv,
                True, not EVEN)
    else:
        k = tl.zeros([BLOCK_N, BLOCK_D], dtype=K.dtype.element_ty)  # unused
        v = tl.zeros([BLOCK_N, BLOCK_DV], dtype=V.dtype.element_ty)

    # -- query tiles: [m_lo, m_free) on the causal diagonal (masked), [m_free, m_tail) free,
    #    [m_tail, Lq) the partial last tile (masked); all masked when the key tile crosses klen --
    m_lo = tl.maximum(start_n - CAUSAL_SHIFT, 0) // BLOCK_M * BLOCK_M
    m_hi = tl.where(start_n < klen, Lq, 0)
    m_end = tl.maximum(m_lo, (m_hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    # first query tile whose first row sees the tile's last key
    m_free = tl.maximum(start_n + BLOCK_N - 1 - CAUSAL_SHIFT, 0)
    m_free = tl.minimum(tl.maximum((m_free + BLOCK_M - 1) // BLOCK_M * BLOCK_M, m_lo), m_end)
    m_tail = tl.maximum(m_free, m_hi // BLOCK_M * BLOCK_M)
    if WINDOW:
        # rows i <= start_n + BLOCK_N - 1 - WINDOW_SHIFT see a key of the tile; tiles of rows all
        # <= start_n - WINDOW_SHIFT see every key (left side); the rest of the range is masked
        m_hi = tl.minimum(m_hi, tl.maximum(start_n + BLOCK_N - WINDOW_SHIFT, 0))
        m_end = tl.maximum(m_lo, (m_hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
        m_free = tl.minimum(m_free, m_end)
        m_wfree = tl.maximum(start_n - WINDOW_SHIFT + 1, 0) // BLOCK_M * BLOCK_M
        m_tail = tl.maximum(m_free, tl.minimum(tl.minimum(m_tail, m_wfree), m_end))
    if start_n + BLOCK_N > klen:
        m_free = m_end  # the whole key tile is masked
        m_tail = m_end
    n_diag = (m_free - m_lo) // BLOCK_M
    n_free = (m_tail - m_free) // BLOCK_M
    n_tail = (m_end - m_tail) // BLOCK_M

    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        off_h64 = off_h.to(tl.int64)
        q_base = Q + off_b64 * stride_qb + off_h64 * stride_qh
        do_base = DO + off_b64 * stride_dob + off_h64 * stride_doh
        row_base = (off_b64 * H + off_h64) * Lq
        rel_row = 0
        slope = 0.0
        if BIAS > 0:
            rel_row = off_h * (2 * REL_M - 1)
            if BIAS & 2:
                slope = tl.load(SLOPES + off_b * H + off_h)
        dk_acc, dv_acc = _dkdv_loop(dk_acc, dv_acc, k, v, q_base, do_base, k_base, v_base, LSE, Delta, row_base,
                                    0, n_free, m_free, 0, 0, offs_m0, offs_n, offs_n0, n_ok, offs_d, offs_dv,
                                    klen, Lq, D, Dv, CAUSAL_SHIFT, scale, stride_qm, stride_dom,
                                    stride_kn, stride_vn, WINDOW_SHIFT, Lk - Lq, REL, rel_row, REL_M, slope,
                                    softcap_k, softcap, False, EVEN, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
                                    BLOCK_DC, DOT_PRECISION, WINDOW, SOFTCAP, BIAS)
        dk_acc, dv_acc = _dkdv_loop(dk_acc, dv_acc, k, v, q_base, do_base, k_base, v_base, LSE, Delta, row_base,
                                    0, n_diag + n_tail, m_lo, n_diag, m_tail, offs_m0, offs_n, offs_n0, n_ok,
                                    offs_d, offs_dv, klen, Lq, D, Dv, CAUSAL_SHIFT, scale, stride_qm,
                                    stride_dom, stride_kn, stride_vn, WINDOW_SHIFT, Lk - Lq, REL, rel_row, REL_M,
                                    slope, softcap_k, softcap, True, EVEN, BLOCK_M, BLOCK_N, BLOCK_D,
                                    BLOCK_DV, BLOCK_DC, DOT_PRECISION, WINDOW, SOFTCAP, BIAS)

    dk_acc = dk_acc * scale
    dk_ptrs = (DK + off_b64 * stride_dkb + off_hk64 * stride_dkh + tl.cast(start_n, tl.int64) * stride_dkn
               + offs_n0[:, None] * stride_dkn + offs_d[None, :])
    dv_ptrs = (DV + off_b64 * stride_dvb + off_hk64 * stride_dvh + tl.cast(start_n, tl.int64) * stride_dvn
               + offs_n0[:, None] * stride_dvn + offs_dv[None, :])
    n_in = Lk - start_n
    if EVEN:
        tl.store(dk_ptrs, dk_acc.to(DK.dtype.element_ty), mask=offs_n0[:, None] < n_in)
        tl.store(dv_ptrs, dv_acc.to(DV.dtype.element_ty), mask=offs_n0[:, None] < n_in)
    else:
        tl.store(dk_ptrs, dk_acc.to(DK.dtype.element_ty), mask=(offs_n0[:, None] < n_in) & (offs_d[None, :] < D))
        tl.store(dv_ptrs, dv_acc.to(DV.dtype.element_ty),
                 mask=(offs_n0[:, None] < n_in) & (offs_dv[None, :] < Dv))


@triton.jit
def _dq_loop(dq_acc, q, do, lse, delta, q_base, do_base, k_base, v_base, lo, hi, offs_m, offs_n0,
             offs_d, offs_dv, klen, Lq, D, Dv, CAUSAL_SHIFT, scale, stride_qm, stride_dom, stride_kn,
             stride_vn, WINDOW_SHIFT, DIST_SHIFT, REL, rel_row, REL_M, slope, softcap_k, softcap,
             start_m, drel_p, skew_p, below, above, pbelow, pabove,
             MASKED: tl.constexpr, PMASS: tl.constexpr, EVEN: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DC: tl.constexpr,
             DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, BIAS: tl.constexpr):
    k_offs = offs_n0[:, None] * stride_kn + offs_d[None, :]
    v_offs = offs_n0[:, None] * stride_vn + offs_dv[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        kb = k_base + tl.cast(start_n, tl.int64) * stride_kn
        vb = v_base + tl.cast(start_n, tl.int64) * stride_vn
        n_ok = klen - start_n
        k = _ld(kb + k_offs, offs_n0, n_ok, offs_d, D, MASKED, not EVEN)
        if BLOCK_DC == BLOCK_D:
            qk = _mma(q, tl.trans(k), DOT_PRECISION)
        else:
            qk = _chunked_dot(q_base, offs_m.to(tl.int64) * stride_qm, offs_m, Lq, kb, offs_n0 * stride_kn, offs_n0,
                              n_ok, D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DC, EVEN, DOT_PRECISION)
        p, r = _bwd_probs(qk, lse, offs_m, start_n + offs_n0, klen, CAUSAL_SHIFT, scale, WINDOW_SHIFT,
                          DIST_SHIFT, REL, rel_row, REL_M, slope, softcap_k, softcap, MASKED, False, WINDOW,
                          SOFTCAP, BIAS, DOT_PRECISION)
        if BLOCK_DC == BLOCK_D:
            v = _ld(vb + v_offs, offs_n0, n_ok, offs_dv, Dv, MASKED, not EVEN)
            dp = _mma(do, tl.trans(v), DOT_PRECISION)
        else:
            dp = _chunked_dot(do_base, offs_m.to(tl.int64) * stride_dom, offs_m, Lq, vb, offs_n0 * stride_vn,
                              offs_n0, n_ok, Dv, BLOCK_M, BLOCK_N, BLOCK_DV, BLOCK_DC, EVEN, DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if BIAS & 1:  # d rel_bias: dS of the final score, summed along the tile's diagonals; for 16-bit
            # inputs also the softmax mass P per distance (the row's second half: the launcher's
            # residual correction, ``_drel_result``; float32 inputs have no residual worth it)
            below, above = _drel_tile(ds, start_n - start_m - DIST_SHIFT, skew_p, drel_p, REL_M, below, above,
                                      BLOCK_M, BLOCK_N)
            if PMASS:
                pbelow, pabove = _drel_tile(p, start_n - start_m - DIST_SHIFT, skew_p, drel_p + (2 * REL_M - 1),
                                            REL_M, pbelow, pabove, BLOCK_M, BLOCK_N)
        if SOFTCAP:
            ds = ds * r  # through the cap: r = 1 - tanh^2 (``common._softcap``)
        dq_acc = _mma_acc(ds.to(k.dtype), k, dq_acc, DOT_PRECISION)
    return dq_acc, below, above, pbelow, pabove


@triton.jit(do_not_specialize=SIZE_ARGS)
def _attn_bwd_dq_dot(Q, K, V, KLEN, DO, LSE, Delta, DQ,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_dob, stride_doh, stride_dom, stride_dod,
                     stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                     scale, H, Hk, Lq, Lk, D, Dv, CAUSAL_SHIFT,
                     WINDOW_SHIFT, REL, SLOPES, REL_M, softcap_k, softcap, DREL, SKEW,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, BLOCK_DC: tl.constexpr, EVEN: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                     BIAS: tl.constexpr):
    """One program: BLOCK_M query rows of one (b, h); loops over the allowed key tiles, the
    ones every row sees unmasked. BLOCK_DC < BLOCK_D: Q and dO are not kept in registers.
    Modifiers as in ``_attn_fwd_dot``; BIAS & 1 also writes this program's partial rel_bias
    gradient (``common._drel_program``: DREL (B, H, cdiv(Lq, BLOCK_M), 2M - 1) float32 zeros, the
    dS sums by distance, and for 16-bit inputs (PMASS) twice that: then the softmax mass by
    distance; SKEW scratch), which the launcher sums in a fixed order and corrects for the rows'
    residuals (``_drel_result``)."""
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_D >= 16)
    tl.static_assert(BLOCK_DV >= 16)
    tl.static_assert(BLOCK_DC == BLOCK_D or (BLOCK_DV == BLOCK_D and BLOCK_D % BLOCK_DC == 0))
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // (H // Hk)
    off_b64 = off_b.to(tl.int64)
    off_h64 = off_h.to(tl.int64)
    off_hk64 = off_hk.to(tl.int64)
    D, Dv = _dims(D, Dv)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < Lq

    q_base = Q + off_b64 * stride_qb + off_h64 * stride_qh
    do_base = DO + off_b64 * stride_dob + off_h64 * stride_doh
    if BLOCK_DC == BLOCK_D:
        q = _ld(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :], offs_m, Lq, offs_d, D,
                True, not EVEN)
        do = _ld(do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :], offs_m, Lq, offs_dv, Dv,
                 True, not EVEN)
    else:
        q = tl.zeros([BLOCK_M, BLOCK_D], dtype=Q.dtype.element_ty)  # unused
        do = tl.zeros([BLOCK_M, BLOCK_DV], dtype=DO.dtype.element_ty)
    row_base = (off_b64 * H + off_h64) * Lq
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
    lse = tl.where(lse == -float("inf"), 0.0, lse)
    delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
    k_base = K + off_b64 * stride_kb + off_hk64 * stride_kh
    v_base = V + off_b64 * stride_vb + off_hk64 * stride_vh

    klen = tl.load(KLEN + off_b)
    n_hi = tl.minimum(klen, start_m + BLOCK_M + CAUSAL_SHIFT)
    n_free = tl.minimum(klen, start_m + CAUSAL_SHIFT + 1)
    n_full = tl.maximum(tl.minimum(n_free, n_hi) // BLOCK_N * BLOCK_N, 0)

    # -- modifiers --
    rel_row = 0
    slope = 0.0
    if BIAS > 0:
        rel_row = off_h * (2 * REL_M - 1)
        if BIAS & 2:
            slope = tl.load(SLOPES + off_bh)
    drel_p = DREL
    skew_p = SKEW
    below = tl.zeros([], dtype=tl.float32)
    above = tl.zeros([], dtype=tl.float32)
    pbelow = tl.zeros([], dtype=tl.float32)
    pabove = tl.zeros([], dtype=tl.float32)
    PMASS: tl.constexpr = DO.dtype.element_ty != tl.float32
    if BIAS & 1:
        drel_p, skew_p = _drel_program(DREL, SKEW, off_bh.to(tl.int64) * tl.num_programs(0) + pid_m, REL_M,
                                       BLOCK_M, BLOCK_N, PMASS)

    dq_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_lo = 0
    if WINDOW:
        # [n_lo, n_mid): tiles straddling the left bound of some row (masked); tiles left of
        # every row's window are skipped
        i_max = tl.minimum(start_m + BLOCK_M, Lq) - 1
        n_lo = tl.maximum(start_m + WINDOW_SHIFT, 0) // BLOCK_N * BLOCK_N
        n_mid = tl.maximum(tl.minimum((tl.maximum(i_max + WINDOW_SHIFT, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N,
                                      n_hi), n_lo)
        dq_acc, below, above, pbelow, pabove = _dq_loop(
            dq_acc, q, do, lse, delta, q_base, do_base, k_base, v_base, n_lo, n_mid, offs_m, offs_n0, offs_d,
            offs_dv, klen, Lq, D, Dv, CAUSAL_SHIFT, scale, stride_qm, stride_dom, stride_kn, stride_vn,
            WINDOW_SHIFT, Lk - Lq, REL, rel_row, REL_M, slope, softcap_k, softcap, start_m, drel_p, skew_p,
            below, above, pbelow, pabove, True, PMASS, EVEN, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_DC, DOT_PRECISION,
            WINDOW,
            SOFTCAP, BIAS)
        n_lo = n_mid
        n_full = tl.maximum(n_full, n_mid)
    dq_acc, below, above, pbelow, pabove = _dq_loop(
        dq_acc, q, do, lse, delta, q_base, do_base, k_base, v_base, n_lo, n_full, offs_m, offs_n0, offs_d,
        offs_dv, klen, Lq, D, Dv, CAUSAL_SHIFT, scale, stride_qm, stride_dom, stride_kn, stride_vn,
        WINDOW_SHIFT, Lk - Lq, REL, rel_row, REL_M, slope, softcap_k, softcap, start_m, drel_p, skew_p,
        below, above, pbelow, pabove, False, PMASS, EVEN, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_DC, DOT_PRECISION,
        WINDOW,
        SOFTCAP, BIAS)
    dq_acc, below, above, pbelow, pabove = _dq_loop(
        dq_acc, q, do, lse, delta, q_base, do_base, k_base, v_base, n_full, n_hi, offs_m, offs_n0, offs_d,
        offs_dv, klen, Lq, D, Dv, CAUSAL_SHIFT, scale, stride_qm, stride_dom, stride_kn, stride_vn,
        WINDOW_SHIFT, Lk - Lq, REL, rel_row, REL_M, slope, softcap_k, softcap, start_m, drel_p, skew_p,
        below, above, pbelow, pabove, True, PMASS, EVEN, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, BLOCK_DC, DOT_PRECISION,
        WINDOW,
        SOFTCAP, BIAS)
    if BIAS & 1:
        _drel_ends(drel_p, REL_M, below, above)
        if PMASS:
            _drel_ends(drel_p + (2 * REL_M - 1), REL_M, pbelow, pabove)

    dq_acc = dq_acc * scale
    dq_ptrs = (DQ + off_b64 * stride_dqb + off_h64 * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm
               + offs_d[None, :])
    if EVEN:
        tl.store(dq_ptrs, dq_acc.to(DQ.dtype.element_ty), mask=mask_m[:, None])
    else:
        tl.store(dq_ptrs, dq_acc.to(DQ.dtype.element_ty), mask=mask_m[:, None] & (offs_d[None, :] < D))
