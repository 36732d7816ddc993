"""Additive (Bahdanau) attention backward: one reciprocal per (query, key, feature) triple per kernel.

Scores ``s_ij = sum_a w_a tanh(q_ia + k_ja) = sum_a w_a - 2 sum_a w_a r_ija`` with
``r = 1 / (1 + e^{2q} e^{2k})`` (the exp tables of ``additive._attn_exp_table``), and

    dS = P (dP - delta),  dq_ia = 4 w_a sum_j dS_ij r (1 - r),  dk_ja = 4 w_a sum_i dS_ij r (1 - r),
    dw_a = sum_ij dS_ij (1 - 2 r).

Two kernels, each a mirror of the other: the dQ kernel owns a block of query rows and walks the
keys, the dK/dV kernel owns a block of keys and walks the (query head, query) rows of its GQA
group. Inside a program each thread owns one row index ("own") and a slice of AS of the A
features (feature ``a = s * AS + a_loc``: S threads per own index, adjacent lanes), laid out as
(AS, BLOCK, S) tiles whose first axis stays in the thread. The other index advances one at a
time (all threads on the same one), so for each (own, other) pair a thread

1. computes its AS reciprocals r once and keeps them in registers,
2. sums ``w_a r`` over its features and over the S lanes (shuffles inside a warp) to the score,
3. forms P and dS (dP comes from a tensor-core product per block of XB other indices, read back
   through a small program-owned scratch), and
4. accumulates ``dS r (1 - r)`` (and, in the dQ kernel, ``dS r`` for dw) into per-thread
   registers indexed by the thread's own features.

So every reciprocal serves the score and the gradient of its triple (one MUFU per triple per
kernel, two over the backward instead of four), the gradient accumulators never leave
registers (no per-feature-column read-modify-write of global memory, no cross-warp reduction
in the loops), and P @ dO for dV stays on the tensor cores. The direct path
``r = 1 / (1 + exp(2 (x + y)))`` (one exp more per triple) serves blocks where a factor would
over- or underflow (``max|x| > 40``), as in the forward.

Score modifiers (constexpr flags; without them the kernels compile to the code they had
before): WINDOW (a left window edge: both loops bounded by it), ALIBI and REL_BIAS (per-pair
score terms). The rel_bias gradient, ``d rel_bias[h, c + M - 1] += dS_ij`` with
``c = clamp(j - i - (Lk - Lq), -(M-1), M-1)`` (diagonal sums of dS), is formed in the dK/dV kernel, whose P is already normalized by the dQ
kernel's row sums: each step stores its dS column to scratch, skewed (the cell of query xi and
key o at column o - xi + XB - 1 of row xi), and per block of XB queries ``common._drel_skewed``
sums the columns (the diagonals of the XB x BLOCK dS tile) into the program's own partial row
(fixed order, no atomics; the launcher folds the clamped lanes and sums the rows in a fixed
order).
"""
import triton
import triton.language as tl

from .common import SIZE_ARGS, _drel_skewed, _exp2x, _mma, _mma_acc

EXP_SAFE = tl.constexpr(40.0)
XB = 16  # other indices per dP block


def bwd_layout(A_pad: int):
    """(AS, S, BLOCK, num_warps) for a padded feature count (a power of two >= 16): 16 features
    per thread, S = A_pad / 16 threads per own index, BLOCK own indices per program (>= 16 for
    the tensor-core products; at most 64, which bounds the dP / dV tiles)."""
    AS = 16
    S = A_pad // AS
    num_warps = {1: 2}.get(S, max(4, S // 2))
    return AS, S, 32 * num_warps // S, num_warps


def bwd_config(A_pad: int, fp32: bool, interpret: bool = False, rel_bias: bool = False) -> dict:
    """The kernels' constexprs for a padded A and float32 inputs?; BLOCK_DV: the value columns per
    tensor-core product (64; half that for float32, whose 3xTF32 products split their operands,
    and half again for the 64-row tiles of A <= 16; with rel_bias, 16-bit inputs and 64-row tiles
    (A <= 32) half again: the dK/dV kernel's (BLOCK, BLOCK_DV) dV tile then leaves the registers
    the rel_bias gradient needs, without spills on sm_80). Under the interpreter XB = BLOCK: the
    dP products are then BLOCK x BLOCK like the delta kernel's tile there (numpy's matmul may
    round an element differently in another shape; an MMA's element does not depend on the tile)."""
    AS, S, block, num_warps = bwd_layout(A_pad)
    block_dv = (16 if S == 1 else 32) if fp32 else (32 if S == 1 else 64)
    if rel_bias and not fp32 and block == 64:
        block_dv //= 2
    return dict(AS=AS, S=S, BLOCK=block, XB=max(XB, block) if interpret else XB,
                BLOCK_DV=block_dv, num_warps=num_warps, num_stages=1, maxnreg=255)


@triton.jit
def _exp_fma(x):
    """exp(x) for x <= 0 (larger x: any finite value; callers mask it) on the FMA pipes: 2^t with
    t = x log2 e split as j + f (j = round(t), |f| <= 1/2), 2^f by its degree-7 Taylor polynomial
    (relative error < 1e-8 before rounding) and 2^j put into the exponent bits; t < -126
    gives 0. The kernels take P = exp(s - lse) once per (own, other) pair in each of the S
    threads of a row, so this keeps the MUFU unit for the reciprocals (one per triple)."""
    # NaN stays NaN (a NaN query row's P, as on the reference): max/min would return the other operand
    t = tl.minimum(tl.maximum(x * 1.4426950408889634, -127.0, propagate_nan=tl.PropagateNan.ALL), 127.0,
                   propagate_nan=tl.PropagateNan.ALL)
    j = tl.floor(t + 0.5)
    f = t - j
    y = 1.5252733804059840e-05
    y = y * f + 1.5403530393381609e-04
    y = y * f + 1.3333558146428443e-03
    y = y * f + 9.6181291076284772e-03
    y = y * f + 5.5504108664821580e-02
    y = y * f + 2.4022650695910071e-01
    y = y * f + 6.9314718055994531e-01
    y = y * f + 1.0
    scale = ((j.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)  # 2^j (0 for j = -127)
    return y * tl.where(j < -126.0, 0.0, scale)


@triton.jit
def _rcp(z, FAST_RCP: tl.constexpr):
    if FAST_RCP:  # one MUFU.RCP (GPU only: inline PTX does not run under the interpreter)
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [z],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / z


@triton.jit(do_not_specialize=SIZE_ARGS + ("a_pad",))
def _bwd_exp_table(X, ET, XMAX, XLEN, stride_xb, stride_xh, stride_xl, stride_eb, stride_eh, Hx, L, A, a_pad,
                   XB: tl.constexpr, BLOCK_A: tl.constexpr):
    """The backward's tables of x (B, Hx, L, A), tiled (B, Hx, L_pad / XB, 2 a_pad, XB): for l in
    block l // XB, row a < a_pad holds exp(2 clamp(x[l, a], -40, 40)) at column l % XB and row
    a_pad + a holds x[l, a] (a_pad: A padded to the kernels' power of two, a runtime size). Features a >= A read as x = 0 (e = 1; their w is 0) and rows
    l >= XLEN[b] as x = 0 (padding keys never reach a score). XMAX[b, h, l] = max_a |x[l, a]| (inf
    for a row holding a NaN). One feature of XB consecutive rows is one 64-byte line, and a
    thread's features (a = s AS + a_loc) sit XB floats apart: the kernels address them with
    one pointer and constant offsets."""
    pid_l = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hx
    off_b64 = off_b.to(tl.int64)
    off_h64 = (off_bh % Hx).to(tl.int64)
    offs_i = tl.arange(0, XB)
    offs_l = pid_l * XB + offs_i
    mask_l = offs_l < tl.load(XLEN + off_b)
    x_base = X + off_b64 * stride_xb + off_h64 * stride_xh + offs_l[:, None].to(tl.int64) * stride_xl
    e_base = (ET + off_b64 * stride_eb + off_h64 * stride_eh + tl.cast(pid_l, tl.int64) * (2 * a_pad * XB)
              + offs_i[:, None])
    mx = tl.zeros([XB], dtype=tl.float32)
    A = (A // 8) * 8  # a multiple of 8 (launch contract): 128-bit masked loads
    for a0 in range(0, a_pad, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        x = tl.load(x_base + offs_a[None, :], mask=mask_l[:, None] & (offs_a[None, :] < A), other=0.0)
        x = x.to(tl.float32)
        mx = tl.maximum(mx, tl.max(tl.where(x == x, tl.abs(x), float("inf")), axis=1))
        in_t = offs_a[None, :] < a_pad
        tl.store(e_base + offs_a[None, :] * XB, _exp2x(tl.minimum(tl.maximum(x, -EXP_SAFE), EXP_SAFE)), mask=in_t)
        tl.store(e_base + (a_pad + offs_a[None, :]) * XB, x, mask=in_t)
    tl.store(XMAX + off_bh.to(tl.int64) * L + offs_l, mx, mask=offs_l < L)


@triton.jit
def _pair_r(eo, e_ptrs, xo, x_ptrs, xi, DIRECT: tl.constexpr, FAST_RCP: tl.constexpr):
    """r = 1 / (1 + e^{2 x_own} e^{2 x_other}) of the thread's features for the other index at
    column xi of the current table block; DIRECT: 1 / (1 + exp(2 (x_own + x_other))) from the
    inputs (blocks with a factor out of range)."""
    if DIRECT:
        z = tl.exp((tl.load(xo) + tl.load(x_ptrs + xi)) * 2.0) + 1.0
    else:
        z = eo * tl.load(e_ptrs + xi) + 1.0
    return _rcp(z, FAST_RCP)


@triton.jit
def _rel_idx(d, REL_M):
    """Index into a head's rel_bias row (2M - 1 entries) of the distance d: clamp(d, -(M-1), M-1) + M - 1."""
    return tl.minimum(tl.maximum(d, 1 - REL_M), REL_M - 1) + (REL_M - 1)


@triton.jit
def _dq_steps(dq_acc, u_acc, ds_sum, p_sum, eo, e_ptrs, xo, x_ptrs, w2, wsum, lse, delta, own, mask_m,
              dp_ptrs, x0, n_x, CAUSAL_SHIFT, WINDOW_SHIFT, DIST_SHIFT, slope, rel, REL_M,
              DIRECT: tl.constexpr, FAST_RCP: tl.constexpr, WINDOW: tl.constexpr, ALIBI: tl.constexpr,
              REL_BIAS: tl.constexpr):
    """Keys x0 .. x0 + n_x of the dQ kernel, one at a time (see the module docstring): per
    triple dq += dS r (1 - r), u += dS r (dw = sum dS - 2 u); the weights exp(s - lse) are
    divided by their row sum p_sum at the end. WINDOW: keys below own + WINDOW_SHIFT are not
    allowed; ALIBI: the score gains -slope |key - own - DIST_SHIFT|; REL_BIAS: it gains
    rel[_rel_idx(key - own - DIST_SHIFT)] (rel: this head's row of rel_bias)."""
    for xi in range(0, n_x):
        r = _pair_r(eo, e_ptrs, xo, x_ptrs, xi, DIRECT, FAST_RCP)
        s = tl.sum(tl.sum(w2 * r, axis=0), axis=1) + wsum                        # (BLOCK,)
        if ALIBI:
            s -= slope * tl.abs((x0 + xi - DIST_SHIFT - own).to(tl.float32))
        if REL_BIAS:
            s += tl.load(rel + _rel_idx(x0 + xi - DIST_SHIFT - own, REL_M))
        allowed = mask_m & (x0 + xi <= own + CAUSAL_SHIFT)
        if WINDOW:
            allowed = allowed & (x0 + xi >= own + WINDOW_SHIFT)
        p = tl.where(allowed, _exp_fma(s - lse), 0.0)
        p_sum += p
        ds = p * (tl.load(dp_ptrs + xi) - delta)
        ds_sum += ds
        ds3 = ds[None, :, None]
        dq_acc += ds3 * (r - r * r)  # r (1 - r) without cancellation (an accumulated sum dS r^2 would cancel)
        u_acc += ds3 * r
    return dq_acc, u_acc, ds_sum, p_sum


@triton.jit
def _dk_steps(acc, eo, e_ptrs, xo, x_ptrs, w2, wsum, LSE_row, RN_row, Delta_row, own, key_in,
              dp_ptrs, p_ptrs, ds_base, ds_off, ds_step, x0, n_x, CAUSAL_SHIFT, WINDOW_SHIFT, DIST_SHIFT, slope, rel,
              REL_M, DIRECT: tl.constexpr, FAST_RCP: tl.constexpr, WINDOW: tl.constexpr, ALIBI: tl.constexpr,
              REL_BIAS: tl.constexpr):
    """Queries x0 .. x0 + n_x of one head in the dK/dV kernel, one at a time (acc += dS r (1 - r));
    P^T goes to scratch. P = exp(s - lse) / p_sum with the dQ kernel's row sums (RN = 1 / p_sum).
    WINDOW, ALIBI and REL_BIAS as in ``_dq_steps`` (own: the keys, x: the query); REL_BIAS also
    stores dS to scratch for the rel_bias gradient, skewed (``common._drel_skewed``: step xi at
    ds_base + ds_off + xi * ds_step)."""
    for xi in range(0, n_x):
        x = x0 + xi
        r = _pair_r(eo, e_ptrs, xo, x_ptrs, xi, DIRECT, FAST_RCP)
        s = tl.sum(tl.sum(w2 * r, axis=0), axis=1) + wsum                        # (BLOCK,)
        if ALIBI:
            s -= slope * tl.abs((own - x - DIST_SHIFT).to(tl.float32))
        if REL_BIAS:
            s += tl.load(rel + _rel_idx(own - x - DIST_SHIFT, REL_M))
        lse_x = tl.load(LSE_row + x)
        lse_x = tl.where(lse_x == -float("inf"), float("inf"), lse_x)  # a row with no key: P = 0
        allowed = key_in & (own <= x + CAUSAL_SHIFT)
        if WINDOW:
            allowed = allowed & (own >= x + WINDOW_SHIFT)
        p = tl.where(allowed, _exp_fma(s - lse_x) * tl.load(RN_row + x), 0.0)
        tl.store(p_ptrs + xi, p)
        ds = p * (tl.load(dp_ptrs + xi) - tl.load(Delta_row + x))
        if REL_BIAS:
            tl.store(ds_base + (ds_off + xi * ds_step), ds)
        acc += ds[None, :, None] * (r - r * r)
    return acc


@triton.jit
def _dp_block(A_ptr, stride_a, n_a, B_ptr, stride_b, n_b, Dv, BLOCK: tl.constexpr, XB: tl.constexpr,
              BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK, XB) float32 tile sum_d A[r, d] B[c, d] over Dv in BLOCK_DV-column chunks (rows
    >= n_a / n_b read 0): dP = dO V^T, or dP^T = V dO^T, with the arithmetic of
    ``common._attn_bwd_preprocess`` (CHUNK = BLOCK_DV)."""
    offs_r = tl.arange(0, BLOCK)
    offs_c = tl.arange(0, XB)
    offs_d = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK, XB], dtype=tl.float32)
    for c in range(0, Dv, BLOCK_DV):
        dm = (c + offs_d)[None, :] < Dv
        a = tl.load(A_ptr + offs_r[:, None] * stride_a + (c + offs_d)[None, :], mask=(offs_r[:, None] < n_a) & dm,
                    other=0.0)
        b = tl.load(B_ptr + offs_c[:, None] * stride_b + (c + offs_d)[None, :], mask=(offs_c[:, None] < n_b) & dm,
                    other=0.0)
        acc += _mma(a, tl.trans(b), DOT_PRECISION)
    return acc


@triton.jit
def _layout(AS: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, XB: tl.constexpr):
    """Offsets of the thread tiles (AS, BLOCK, S) in a tiled table: ``feat`` the feature of each
    element times XB (its row in a table block), ``o_loc`` (BLOCK,) the own index, ``fa`` (AS, 1, S)
    the features."""
    a_loc = tl.arange(0, AS)
    s_idx = tl.arange(0, S)
    # full (AS, BLOCK, S) shape: the per-step loads of the other index's features then come in
    # the tile's own layout (a (AS, 1, S) load would get another one, and drag the tiles into it)
    fa = s_idx[None, None, :] * AS + a_loc[:, None, None]
    return fa * XB + tl.zeros([AS, BLOCK, S], dtype=tl.int32), tl.arange(0, BLOCK), fa


@triton.jit
def _own_rows(T, start, o_loc, feat, A_PAD: tl.constexpr, XB: tl.constexpr):
    """e^{2x} of the own rows start + o_loc (all features) from a tiled table, and the pointers
    to x itself (read per step by the direct path only: no registers held for it)."""
    own = start + o_loc
    ptrs = T + ((own // XB) * (2 * A_PAD * XB) + own % XB)[None, :, None] + feat
    return tl.load(ptrs), ptrs + A_PAD * XB


@triton.jit(do_not_specialize=SIZE_ARGS)
def _attn_bwd_dq_additive(W, EQ, EK, QMAX, KMAX, KLEN, DO, V, LSE, Delta, DQT, DWT, DPS, RN,
                          stride_wh, stride_wa,
                          stride_eqb, stride_eqh,
                          stride_ekb, stride_ekh,
                          stride_dob, stride_doh, stride_dom,
                          stride_vb, stride_vh, stride_vn,
                          stride_dqb, stride_dqh, stride_dqa,
                          H, Hk, Lq, Lk, A, Dv, CAUSAL_SHIFT, WINDOW_SHIFT, SLOPES, REL, REL_M,
                          AS: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, XB: tl.constexpr,
                          BLOCK_DV: tl.constexpr, FAST_RCP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          WINDOW: tl.constexpr = False, ALIBI: tl.constexpr = False,
                          REL_BIAS: tl.constexpr = False):
    """One program: BLOCK query rows of one (b, h); walks the allowed keys. EQ/EK: tiled tables
    (``_bwd_exp_table``, A_PAD = AS * S features). DQT and DWT (per-row dw partials) are float32
    (B, H, A, >=Lq) sharing the strides ``stride_dq*``; every element of rows < BLOCK * programs
    and a < A is written. DPS: float32 scratch, BLOCK x XB per program. RN (B, H, Lq): written,
    1 / row sum of P (see the end). WINDOW: keys below i + WINDOW_SHIFT are not allowed (the
    loop starts at the block holding the window's first key); ALIBI: SLOPES (B, H) float32
    contiguous, the score gains -slope |j - i - (Lk - Lq)|; REL_BIAS: REL (H, 2 REL_M - 1)
    float32 contiguous, the score gains REL[h, clamp(j - i - (Lk - Lq), -(M-1), M-1) + M - 1]
    (its gradient is summed in the dK/dV kernel, whose P is normalized)."""
    A_PAD: tl.constexpr = AS * S
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // (H // Hk)
    off_b64 = off_b.to(tl.int64)
    off_h64 = off_h.to(tl.int64)
    off_hk64 = off_hk.to(tl.int64)
    start_m = pid_m * BLOCK

    feat, o_loc, fa = _layout(AS, S, BLOCK, XB)
    own = start_m + o_loc                                            # (BLOCK,)
    eq_base = EQ + off_b64 * stride_eqb + off_h64 * stride_eqh
    ek_base = EK + off_b64 * stride_ekb + off_hk64 * stride_ekh
    eo, xo = _own_rows(eq_base, start_m, o_loc, feat, A_PAD, XB)    # (AS, BLOCK, S)
    w = tl.load(W + off_h64 * stride_wh + fa * stride_wa, mask=fa < A, other=0.0)     # (AS, 1, S)
    w2 = w * -2.0
    wsum = tl.sum(tl.sum(tl.sum(w, axis=0), axis=1), axis=0)

    row_base = (off_b64 * H + off_h64) * Lq
    mask_m = own < Lq
    lse = tl.load(LSE + row_base + own, mask=mask_m, other=0.0)
    lse = tl.where(lse == -float("inf"), 0.0, lse)
    delta = tl.load(Delta + row_base + own, mask=mask_m, other=0.0)
    q_ok = tl.max(tl.load(QMAX + row_base + own, mask=mask_m, other=0.0), axis=0) <= EXP_SAFE
    klen = tl.load(KLEN + off_b)
    n_hi = tl.minimum(klen, start_m + BLOCK + CAUSAL_SHIFT)
    n_lo = 0
    if WINDOW:
        n_lo = tl.maximum(start_m + WINDOW_SHIFT, 0) // XB * XB
    slope = 0.0
    if ALIBI:
        slope = tl.load(SLOPES + off_bh)
    rel = REL
    if REL_BIAS:
        rel = REL + off_h64 * (2 * REL_M - 1)
    kmax_base = KMAX + (off_b64 * Hk + off_hk64) * Lk

    offs_xb = tl.arange(0, XB)
    Dv = (Dv // 8) * 8  # a multiple of 8 (launch contract): 128-bit masked loads
    do_tile = DO + off_b64 * stride_dob + off_h64 * stride_doh + tl.cast(start_m, tl.int64) * stride_dom
    v_base = V + off_b64 * stride_vb + off_hk64 * stride_vh
    dps = DPS + (off_bh.to(tl.int64) * tl.num_programs(0) + pid_m) * (BLOCK * XB)

    dq_acc = tl.zeros([AS, BLOCK, S], dtype=tl.float32)
    u_acc = tl.zeros([AS, BLOCK, S], dtype=tl.float32)
    ds_sum = tl.zeros([BLOCK], dtype=tl.float32)
    p_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for x0 in range(n_lo, n_hi, XB):
        # -- dP for XB keys on the tensor cores, handed to the per-key loop through scratch --
        dp = _dp_block(do_tile, stride_dom, Lq - start_m, v_base + tl.cast(x0, tl.int64) * stride_vn, stride_vn,
                       klen - x0, Dv, BLOCK, XB, BLOCK_DV, DOT_PRECISION)
        tl.store(dps + o_loc[:, None] * XB + offs_xb[None, :], dp)
        kmax = tl.load(kmax_base + x0 + offs_xb, mask=offs_xb < n_hi - x0, other=0.0)
        blk = ek_base + tl.cast(x0 // XB, tl.int64) * (2 * A_PAD * XB) + feat       # (AS, 1, S) pointers
        tl.debug_barrier()
        n_x = tl.minimum(XB, n_hi - x0)
        if q_ok & (tl.max(kmax, axis=0) <= EXP_SAFE):
            dq_acc, u_acc, ds_sum, p_sum = _dq_steps(dq_acc, u_acc, ds_sum, p_sum, eo, blk, xo, blk + A_PAD * XB,
                                                    w2, wsum, lse, delta, own, mask_m, dps + o_loc * XB, x0, n_x,
                                                    CAUSAL_SHIFT, WINDOW_SHIFT, Lk - Lq, slope, rel, REL_M, False,
                                                    FAST_RCP, WINDOW, ALIBI, REL_BIAS)
        else:
            dq_acc, u_acc, ds_sum, p_sum = _dq_steps(dq_acc, u_acc, ds_sum, p_sum, eo, blk, xo, blk + A_PAD * XB,
                                                    w2, wsum, lse, delta, own, mask_m, dps + o_loc * XB, x0, n_x,
                                                    CAUSAL_SHIFT, WINDOW_SHIFT, Lk - Lq, slope, rel, REL_M, True,
                                                    FAST_RCP, WINDOW, ALIBI, REL_BIAS)
        tl.debug_barrier()  # the next block overwrites the dP scratch

    # -- P = exp(s - lse) / p_sum: the weights renormalized in this kernel's own arithmetic. Its
    #    scores differ from the forward's in the last bits (another summation order), which at
    #    scores ~1e4 moves exp(s - lse) by ~1e-3, and a float32 lse cannot hold log(l) below
    #    half an ulp of the row max; dividing by the row sum makes P sum to 1 here (and be 1 on
    #    a saturated row). The dK/dV kernel reads 1 / p_sum (RN) and uses the same P. --
    rn = tl.where(p_sum > 0.0, 1.0 / p_sum, 0.0)
    tl.store(RN + row_base + own, rn, mask=mask_m)
    # -- dq = 4 w sum dS r (1 - r); dw partial per row = sum dS - 2 sum dS r --
    rn3 = rn[None, :, None]
    st = fa * stride_dqa + own[None, :, None]
    dq_base = DQT + off_b64 * stride_dqb + off_h64 * stride_dqh
    dw_base = DWT + off_b64 * stride_dqb + off_h64 * stride_dqh
    tl.store(dq_base + st, dq_acc * rn3 * (w * 4.0), mask=fa < A)
    tl.store(dw_base + st, (ds_sum[None, :, None] - 2.0 * u_acc) * rn3, mask=fa < A)


@triton.jit(do_not_specialize=SIZE_ARGS)
def _attn_bwd_dkdv_additive(W, EQ, EK, QMAX, KMAX, KLEN, DO, V, LSE, Delta, DKT, DV, DPS, RN,
                            stride_wh, stride_wa,
                            stride_eqb, stride_eqh,
                            stride_ekb, stride_ekh,
                            stride_dob, stride_doh, stride_dom,
                            stride_vb, stride_vh, stride_vn,
                            stride_dkb, stride_dkh, stride_dka,
                            stride_dvb, stride_dvh, stride_dvn,
                            H, Hk, Lq, Lk, A, Dv, CAUSAL_SHIFT, WINDOW_SHIFT, SLOPES, REL, REL_M, DREL,
                            AS: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr, XB: tl.constexpr,
                            BLOCK_DV: tl.constexpr, FAST_RCP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            WINDOW: tl.constexpr = False, ALIBI: tl.constexpr = False,
                            REL_BIAS: tl.constexpr = False):
    """One program: BLOCK keys of one (b, kv head); walks the group's query heads and the queries
    that can see these keys. DKT: float32 (B, Hk, A, >=Lk), every element of keys < BLOCK * programs
    and a < A written; DV: float32 (B, Hk, >=Lk, >=Dv rounded up to BLOCK_DV), zero-initialized. DPS: float32
    scratch, 2 x BLOCK x XB per program (dP^T, then P^T for dV; 4 x with REL_BIAS: dS). LSE,
    Delta and RN (from the dQ kernel): contiguous (B, H, Lq). WINDOW / ALIBI / REL_BIAS as in the
    dQ kernel: queries above j - WINDOW_SHIFT do not see key j (the loop stops after the last
    query that sees the block). REL_BIAS also writes d rel_bias without atomics: DREL float32
    (B, H, programs, 2 REL_M - 1 + 4 XB), zero-initialized, one partial row per (program, query
    head; the layout of ``common._drel_skewed``), which the launcher sums in a fixed order: the
    steps store each block's dS tile (XB queries x BLOCK keys) skewed, and ``_drel_skewed`` sums
    its diagonals (a fixed order)."""
    A_PAD: tl.constexpr = AS * S
    pid_n = tl.program_id(0)
    off_bhk = tl.program_id(1)
    off_b = off_bhk // Hk
    off_hk = off_bhk % Hk
    GROUP = H // Hk
    off_b64 = off_b.to(tl.int64)
    off_hk64 = off_hk.to(tl.int64)
    start_n = pid_n * BLOCK

    feat, o_loc, fa = _layout(AS, S, BLOCK, XB)
    own = start_n + o_loc                                            # key index (BLOCK,)
    ek_base = EK + off_b64 * stride_ekb + off_hk64 * stride_ekh
    eo, xo = _own_rows(ek_base, start_n, o_loc, feat, A_PAD, XB)
    klen = tl.load(KLEN + off_b)
    k_ok = tl.max(tl.load(KMAX + off_bhk.to(tl.int64) * Lk + own, mask=own < Lk, other=0.0), axis=0) <= EXP_SAFE
    key_in = own < klen

    # -- queries that can see a key of this block: i >= j - CAUSAL_SHIFT (from a table block
    #    boundary); none when the block starts past klen --
    m_lo = tl.maximum(start_n - CAUSAL_SHIFT, 0) // XB * XB
    m_hi = tl.where(start_n < klen, Lq, 0)
    if WINDOW:
        m_hi = tl.minimum(m_hi, tl.maximum(start_n + BLOCK - WINDOW_SHIFT, 0))

    offs_xb = tl.arange(0, XB)
    offs_dv = tl.arange(0, BLOCK_DV)
    Dv = (Dv // 8) * 8
    v_tile = V + off_b64 * stride_vb + off_hk64 * stride_vh + tl.cast(start_n, tl.int64) * stride_vn
    dv_tile = (DV + off_b64 * stride_dvb + off_hk64 * stride_dvh + tl.cast(start_n, tl.int64) * stride_dvn
               + o_loc[:, None] * stride_dvn + offs_dv[None, :])
    NSCR: tl.constexpr = 4 if REL_BIAS else 2
    if REL_BIAS:
        tl.static_assert(XB <= BLOCK)  # the skewed dS tile, XB x (XB + BLOCK), fits 2 BLOCK x XB floats
    dps = DPS + (off_bhk.to(tl.int64) * tl.num_programs(0) + pid_n) * (NSCR * BLOCK * XB)
    pps = dps + BLOCK * XB
    # REL_BIAS: a block's dS, queries as rows, skewed (``common._drel_skewed``): XB x (XB + BLOCK) floats
    ds_off = 2 * BLOCK * XB + (XB - 1) + o_loc  # from dps: int32 offsets, no 64-bit pointer per thread

    dk_acc = tl.zeros([AS, BLOCK, S], dtype=tl.float32)
    for g in range(0, GROUP):
        off_h64 = (off_hk * GROUP + g).to(tl.int64)
        eq_base = EQ + off_b64 * stride_eqb + off_h64 * stride_eqh
        w2 = tl.load(W + off_h64 * stride_wh + fa * stride_wa, mask=fa < A, other=0.0) * -2.0
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + off_b64 * H + off_h64)
        rel = REL
        drel_p = DREL
        if REL_BIAS:
            rel = REL + off_h64 * (2 * REL_M - 1)
            drel_p = DREL + ((off_b64 * H + off_h64) * tl.num_programs(0) + pid_n) * (2 * REL_M - 1 + 4 * XB)
        wsum = -0.5 * tl.sum(tl.sum(tl.sum(w2, axis=0), axis=1), axis=0)
        do_base = DO + off_b64 * stride_dob + off_h64 * stride_doh
        row_base = (off_b64 * H + off_h64) * Lq
        acc = tl.zeros([AS, BLOCK, S], dtype=tl.float32)  # this head's sum dS r (1 - r)
        for x0 in range(m_lo, m_hi, XB):
            do_x = do_base + tl.cast(x0, tl.int64) * stride_dom
            dpT = _dp_block(v_tile, stride_vn, klen - start_n, do_x, stride_dom, Lq - x0, Dv, BLOCK, XB, BLOCK_DV,
                            DOT_PRECISION)
            tl.store(dps + o_loc[:, None] * XB + offs_xb[None, :], dpT)
            qmax = tl.load(QMAX + row_base + x0 + offs_xb, mask=offs_xb < Lq - x0, other=0.0)
            blk = eq_base + tl.cast(x0 // XB, tl.int64) * (2 * A_PAD * XB) + feat
            tl.debug_barrier()
            n_x = tl.minimum(XB, m_hi - x0)
            if k_ok & (tl.max(qmax, axis=0) <= EXP_SAFE):
                acc = _dk_steps(acc, eo, blk, xo, blk + A_PAD * XB, w2, wsum, LSE + row_base, RN + row_base,
                                Delta + row_base, own, key_in, dps + o_loc * XB, pps + o_loc * XB,
                                dps, ds_off, XB + BLOCK - 1, x0, n_x, CAUSAL_SHIFT, WINDOW_SHIFT, Lk - Lq, slope, rel,
                                REL_M, False, FAST_RCP, WINDOW, ALIBI, REL_BIAS)
            else:
                acc = _dk_steps(acc, eo, blk, xo, blk + A_PAD * XB, w2, wsum, LSE + row_base, RN + row_base,
                                Delta + row_base, own, key_in, dps + o_loc * XB, pps + o_loc * XB,
                                dps, ds_off, XB + BLOCK - 1, x0, n_x, CAUSAL_SHIFT, WINDOW_SHIFT, Lk - Lq, slope, rel,
                                REL_M, True, FAST_RCP, WINDOW, ALIBI, REL_BIAS)
            tl.debug_barrier()  # P^T of the block is in scratch
            pT = tl.load(pps + o_loc[:, None] * XB + offs_xb[None, :], mask=offs_xb[None, :] < m_hi - x0,
                         other=0.0)
            # dV (program-owned float32 rows, each element read and written by one thread) += P^T dO,
            # BLOCK_DV columns at a time: no (BLOCK, Dv) tile stays live across the steps
            for c in range(0, Dv, BLOCK_DV):
                do = tl.load(do_x + offs_xb[:, None] * stride_dom + (c + offs_dv)[None, :],
                             mask=(offs_xb[:, None] < Lq - x0) & ((c + offs_dv)[None, :] < Dv), other=0.0)
                tl.store(dv_tile + c, _mma_acc(pT.to(do.dtype), do, tl.load(dv_tile + c), DOT_PRECISION))
            tl.debug_barrier()  # the next block overwrites the scratch
            if REL_BIAS:  # d rel_bias: the block's dS (queries x keys) summed along its diagonals
                # 2 XB-column chunks (of the XB + BLOCK - 1 diagonals): no spill at BLOCK = 64 on sm_80
                _drel_skewed(pps + BLOCK * XB, n_x, start_n - x0 - (Lk - Lq), drel_p, REL_M, XB, BLOCK, 2 * XB)
        if REL_BIAS:  # dK summed over the group's heads in DKT (each element: one thread), freeing
            #           the registers of dk_acc for the rel_bias code
            dk_ptrs = DKT + off_b64 * stride_dkb + off_hk64 * stride_dkh + fa * stride_dka + own[None, :, None]
            prev = tl.load(dk_ptrs, mask=(fa < A) & (g > 0), other=0.0)
            tl.store(dk_ptrs, prev + acc * (w2 * -2.0), mask=fa < A)
        else:
            dk_acc += acc * (w2 * -2.0)  # 4 w of this head

    if not REL_BIAS:
        dk_base = DKT + off_b64 * stride_dkb + off_hk64 * stride_dkh
        tl.store(dk_base + fa * stride_dka + own[None, :, None], dk_acc, mask=fa < A)
