"""Fused scaled dot-product attention: FlashAttention-2-style forward and backward kernels.

Scores ``s_ij = scale * q_i . k_j`` come from ``tl.dot`` on (BLOCK_M, BLOCK_D) x (BLOCK_D, BLOCK_N)
tiles (head dims padded to a power of two >= 16 with masked loads). Masks, online softmax,
flash-decoding splits and the LSE convention are the same as in ``additive.py``.
Backward: a dK/dV kernel per key tile (looping over the group's query heads and query tiles,
so grouped heads are summed without atomics) and a dQ kernel per query tile.
"""
import triton
import triton.language as tl

from .common import SIZE_ARGS, _attn_fwd_epilogue, _attn_fwd_key_range, _mma, _online_softmax


@triton.jit
def _chunked_dot(A, stride_ar, stride_ac, offs_r, mask_r, B, stride_br, stride_bc, offs_s, mask_s, D,
                 BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_R, BLOCK_S) float32 tile of sum_{d < D} A[r, d] * B[s, d], with both operands
    loaded from memory BLOCK_DC columns at a time (a runtime loop, so only one chunk of each
    operand is live): the register-light path for wide float32 heads, whose 3xTF32 dots
    hold split (big, small) copies of their operands."""
    acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float32)
    for c in range(0, BLOCK_D, BLOCK_DC):
        offs_c = c + tl.arange(0, BLOCK_DC)
        mask_c = offs_c < D
        a = tl.load(A + offs_r[:, None] * stride_ar + offs_c[None, :] * stride_ac,
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        bt = tl.load(B + offs_s[None, :] * stride_br + offs_c[:, None] * stride_bc,
                     mask=mask_s[None, :] & mask_c[:, None], other=0.0)
        acc += _mma(a, bt, DOT_PRECISION)
    return acc

# ----------------------------------------------------------------------------------------
# configurations (GPU); the interpreter uses INTERPRET_CONFIG
# ----------------------------------------------------------------------------------------
# Each entry: (predicate on (BLOCK_D, BLOCK_DV, decode), config). The first match wins.
# Chosen with the compile check (no spills on sm_80 and sm_90). float32 inputs use 3xTF32
# dots (three MMAs on split big/small operands, fp32-level accuracy) and get their own,
# smaller tiles; at wide heads they also set BLOCK_DC < BLOCK_D: the score products
# (Q K^T, dO V^T) are summed over D chunks loaded from memory instead of keeping the whole
# Q / dO (or K / V) tile resident in registers. BLOCK_DC defaults to the full width.
FWD_CONFIGS = [
    (lambda d, dv, decode: decode, dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)),
    (lambda d, dv, decode: max(d, dv) <= 32, dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2)),
    (lambda d, dv, decode: max(d, dv) <= 64, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
    (lambda d, dv, decode: max(d, dv) <= 128, dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)),
    (lambda d, dv, decode: True, dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)),
]
FWD_CONFIGS_FP32 = [
    (lambda d, dv, decode: decode and max(d, dv) <= 64, dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)),
    (lambda d, dv, decode: decode, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_DC=32, num_warps=4, num_stages=1)),
    (lambda d, dv, decode: max(d, dv) <= 32, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
    (lambda d, dv, decode: max(d, dv) <= 64, dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=1)),
    (lambda d, dv, decode: max(d, dv) <= 128, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_DC=32, num_warps=4, num_stages=1)),
    (lambda d, dv, decode: True, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_DC=32, num_warps=4, num_stages=1)),
]
BWD_DKDV_CONFIGS = [
    (lambda d, dv: max(d, dv) <= 32, dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)),
    (lambda d, dv: max(d, dv) <= 64, dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)),
    (lambda d, dv: max(d, dv) <= 128, dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)),
    (lambda d, dv: True, dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1)),
]
BWD_DQ_CONFIGS = [
    (lambda d, dv: max(d, dv) <= 64, dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=1)),
    (lambda d, dv: max(d, dv) <= 128, dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)),
    (lambda d, dv: True, dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)),
]
BWD_DKDV_CONFIGS_FP32 = [
    (lambda d, dv: max(d, dv) <= 32, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_DC=16, num_warps=4, num_stages=1)),
    (lambda d, dv: max(d, dv) <= 64, dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)),
    (lambda d, dv: max(d, dv) <= 128, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_DC=32, num_warps=8, num_stages=1)),
    (lambda d, dv: True, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_DC=32, num_warps=8, num_stages=1)),
]
BWD_DQ_CONFIGS_FP32 = [
    (lambda d, dv: max(d, dv) <= 64, dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)),
    (lambda d, dv: max(d, dv) <= 128, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_DC=32, num_warps=8, num_stages=1)),
    (lambda d, dv: True, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_DC=32, num_warps=8, num_stages=1)),
]
# the interpreter chunks D above 64, so the tests run both the resident and the chunked path
INTERPRET_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_DC=64, num_warps=4, num_stages=1)
INTERPRET_DECODE_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_DC=64, num_warps=4, num_stages=1)


def _with_dc(cfg, BLOCK_D, BLOCK_DV):
    """Clamp BLOCK_DC (default: no chunking) to the padded width; the launcher pads D and Dv
    to one width, which BLOCK_DC divides (both are powers of two)."""
    cfg = dict(cfg)
    width = max(BLOCK_D, BLOCK_DV)
    cfg["BLOCK_DC"] = min(cfg.get("BLOCK_DC", width), width)
    return cfg


def interpret_config(BLOCK_D, BLOCK_DV, decode):
    """The configuration used under TRITON_INTERPRET=1."""
    return _with_dc(INTERPRET_DECODE_CONFIG if decode else INTERPRET_CONFIG, BLOCK_D, BLOCK_DV)


def prune_fwd_config(BLOCK_D, BLOCK_DV, fp32, decode):
    """The forward config for padded head widths, float32 inputs?, decode (Lq <= 16)?"""
    table = FWD_CONFIGS_FP32 if fp32 else FWD_CONFIGS
    return _with_dc(next(c for pred, c in table if pred(BLOCK_D, BLOCK_DV, decode)), BLOCK_D, BLOCK_DV)


def prune_bwd_configs(BLOCK_D, BLOCK_DV, fp32):
    """(dK/dV config, dQ config) for padded head widths and float32 inputs?"""
    kv_table = BWD_DKDV_CONFIGS_FP32 if fp32 else BWD_DKDV_CONFIGS
    q_table = BWD_DQ_CONFIGS_FP32 if fp32 else BWD_DQ_CONFIGS
    dkdv = next(c for pred, c in kv_table if pred(BLOCK_D, BLOCK_DV))
    dq = next(c for pred, c in q_table if pred(BLOCK_D, BLOCK_DV))
    return _with_dc(dkdv, BLOCK_D, BLOCK_DV), _with_dc(dq, BLOCK_D, BLOCK_DV)


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=SIZE_ARGS)
def _attn_fwd_dot(Q, K, V, KLEN, Out, LSE,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_os, stride_ob, stride_oh, stride_om, stride_od,
                  stride_ls, stride_lb, stride_lh, stride_lm,
                  scale, H, Hk, Lq, Lk, D, Dv, CAUSAL_SHIFT, SPLIT_N,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DV: tl.constexpr, BLOCK_DC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_M query rows of one (b, h), keys [pid_s*SPLIT_N, +SPLIT_N).
    Key j is allowed for row i iff j < KLEN[b] and j <= i + CAUSAL_SHIFT.
    BLOCK_DC < BLOCK_D: Q is not kept in registers; Q K^T is summed over D chunks."""
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_D >= 16)
    tl.static_assert(BLOCK_DV >= 16)
    tl.static_assert(BLOCK_DC == BLOCK_D or (BLOCK_DV == BLOCK_D and BLOCK_D % BLOCK_DC == 0))
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // (H // Hk)
    off_b64 = off_b.to(tl.int64)
    off_h64 = off_h.to(tl.int64)
    off_hk64 = off_hk.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < Lq
    mask_d = offs_d < D
    mask_dv = offs_dv < Dv

    q_base = Q + off_b64 * stride_qb + off_h64 * stride_qh
    if BLOCK_DC == BLOCK_D:
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K + off_b64 * stride_kb + off_hk64 * stride_kh
    v_base = V + off_b64 * stride_vb + off_hk64 * stride_vh

    # -- key range of this program --
    n_lo, n_hi, klen = _attn_fwd_key_range(KLEN, off_b, pid_m, pid_s, CAUSAL_SHIFT, SPLIT_N, BLOCK_M)

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < Lk
        # -- scores --
        if BLOCK_DC == BLOCK_D:
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=mask_n[None, :] & mask_d[:, None], other=0.0)
            s = _mma(q, kt, DOT_PRECISION) * scale
        else:
            s = _chunked_dot(q_base, stride_qm, stride_qd, offs_m, mask_m, k_base, stride_kn, stride_kd,
                             offs_n, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DC, DOT_PRECISION) * scale
        allowed = (offs_n[None, :] < klen) & (offs_n[None, :] <= offs_m[:, None] + CAUSAL_SHIFT)
        s = tl.where(allowed, s, -float("inf"))
        # -- online softmax --
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        # -- P @ V --
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION)

    # -- epilogue: empty rows give out = 0, lse = -inf --
    _attn_fwd_epilogue(acc, m_i, l_i, Out, LSE, pid_s, off_b64, off_h64, offs_m, offs_dv, mask_m, mask_dv,
                       stride_os, stride_ob, stride_oh, stride_om, stride_od,
                       stride_ls, stride_lb, stride_lh, stride_lm, BLOCK_M)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=SIZE_ARGS)
def _attn_bwd_dkdv_dot(Q, K, V, KLEN, DO, LSE, Delta, DK, DV,
                       stride_qb, stride_qh, stride_qm, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       stride_dob, stride_doh, stride_dom, stride_dod,
                       stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                       stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                       scale, H, Hk, Lq, Lk, D, Dv, CAUSAL_SHIFT,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, BLOCK_DC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_N keys of one (b, kv head); loops over the group's query heads and
    the query tiles that can see these keys. LSE and Delta are contiguous (B, H, Lq) float32.
    BLOCK_DC < BLOCK_D: K and V are not kept in registers; Q K^T and dO V^T are summed over
    D chunks."""
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

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < Lk
    mask_d = offs_d < D
    mask_dv = offs_dv < Dv

    k_base = K + off_b64 * stride_kb + off_hk64 * stride_kh
    v_base = V + off_b64 * stride_vb + off_hk64 * stride_vh
    if BLOCK_DC == BLOCK_D:
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)

    klen = tl.load(KLEN + off_b)
    m_lo = tl.maximum(pid_n * BLOCK_N - CAUSAL_SHIFT, 0)
    m_lo = (m_lo // BLOCK_M) * BLOCK_M
    m_hi = tl.where(pid_n * BLOCK_N < klen, Lq, 0)

    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, GROUP):
        off_h64 = (off_hk * GROUP + g).to(tl.int64)
        q_base = Q + off_b64 * stride_qb + off_h64 * stride_qh
        do_base = DO + off_b64 * stride_dob + off_h64 * stride_doh
        row_base = (off_b64 * H + off_h64) * Lq
        for start_m in range(m_lo, m_hi, BLOCK_M):
            offs_m = start_m + offs_m0
            mask_m = offs_m < Lq
            # -- scores and probabilities (recomputed) --
            if BLOCK_DC == BLOCK_D:
                q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                            mask=mask_m[:, None] & mask_d[None, :], other=0.0)
                s = _mma(q, tl.trans(k), DOT_PRECISION) * scale
            else:
                s = _chunked_dot(q_base, stride_qm, stride_qd, offs_m, mask_m, k_base, stride_kn, stride_kd,
                                 offs_n, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DC, DOT_PRECISION) * scale
            allowed = ((offs_n[None, :] < klen) & (offs_n[None, :] <= offs_m[:, None] + CAUSAL_SHIFT)
                       & mask_m[:, None])
            lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
            lse = tl.where(lse == -float("inf"), 0.0, lse)
            p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
            # -- dV, dS, dK --
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                         mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
            dv_acc += _mma(tl.trans(p.to(do.dtype)), do, DOT_PRECISION)
            if BLOCK_DC == BLOCK_D:
                dp = _mma(do, tl.trans(v), DOT_PRECISION)
            else:
                dp = _chunked_dot(do_base, stride_dom, stride_dod, offs_m, mask_m, v_base, stride_vn, stride_vd,
                                  offs_n, mask_n, Dv, BLOCK_M, BLOCK_N, BLOCK_DV, BLOCK_DC, DOT_PRECISION)
            delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
            ds = p * (dp - delta[:, None])
            if BLOCK_DC != BLOCK_D:
                q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                            mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            dk_acc += _mma(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION)

    dk_acc = dk_acc * scale
    tl.store(DK + off_b64 * stride_dkb + off_hk64 * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk_acc.to(DK.dtype.element_ty),
             mask=mask_n[:, None] & mask_d[None, :])
    tl.store(DV + off_b64 * stride_dvb + off_hk64 * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvd, dv_acc.to(DV.dtype.element_ty),
             mask=mask_n[:, None] & mask_dv[None, :])


@triton.jit(do_not_specialize=SIZE_ARGS)
def _attn_bwd_dq_dot(Q, K, V, KLEN, DO, LSE, Delta, DQ,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_dob, stride_doh, stride_dom, stride_dod,
                     stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                     scale, H, Hk, Lq, Lk, D, Dv, CAUSAL_SHIFT,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, BLOCK_DC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_M query rows of one (b, h); loops over the allowed key tiles.
    BLOCK_DC < BLOCK_D: Q and dO are not kept in registers; Q K^T and dO V^T are summed over
    D chunks."""
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

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < Lq
    mask_d = offs_d < D
    mask_dv = offs_dv < Dv

    q_base = Q + off_b64 * stride_qb + off_h64 * stride_qh
    do_base = DO + off_b64 * stride_dob + off_h64 * stride_doh
    if BLOCK_DC == BLOCK_D:
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                     mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
    row_base = (off_b64 * H + off_h64) * Lq
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
    lse = tl.where(lse == -float("inf"), 0.0, lse)
    delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)
    k_base = K + off_b64 * stride_kb + off_hk64 * stride_kh
    v_base = V + off_b64 * stride_vb + off_hk64 * stride_vh

    klen = tl.load(KLEN + off_b)
    n_hi = tl.minimum(klen, (pid_m + 1) * BLOCK_M + CAUSAL_SHIFT)

    dq_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < Lk
        # -- scores and probabilities (recomputed) --
        if BLOCK_DC == BLOCK_D:
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            s = _mma(q, tl.trans(k), DOT_PRECISION) * scale
        else:
            s = _chunked_dot(q_base, stride_qm, stride_qd, offs_m, mask_m, k_base, stride_kn, stride_kd,
                             offs_n, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DC, DOT_PRECISION) * scale
        allowed = ((offs_n[None, :] < klen) & (offs_n[None, :] <= offs_m[:, None] + CAUSAL_SHIFT)
                   & mask_m[:, None])
        p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
        # -- dS, dQ --
        if BLOCK_DC == BLOCK_D:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
            dp = _mma(do, tl.trans(v), DOT_PRECISION)
        else:
            dp = _chunked_dot(do_base, stride_dom, stride_dod, offs_m, mask_m, v_base, stride_vn, stride_vd,
                              offs_n, mask_n, Dv, BLOCK_M, BLOCK_N, BLOCK_DV, BLOCK_DC, DOT_PRECISION)
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        ds = p * (dp - delta[:, None])
        dq_acc += _mma(ds.to(k.dtype), k, DOT_PRECISION)

    dq_acc = dq_acc * scale
    tl.store(DQ + off_b64 * stride_dqb + off_h64 * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq_acc.to(DQ.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
