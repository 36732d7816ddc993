"""Kernels shared by the additive and dot-product paths.

- ``_attn_bwd_preprocess``: ``delta = rowsum(dO * O)`` in float32 (the FlashAttention-2
  backward preamble), with the arithmetic of the kernels' dP (see its docstring).
- ``_attn_fwd_merge``: flash-decoding epilogue; merges per-split partial outputs by their
  log-sum-exp.
- ``_online_softmax``, ``_attn_fwd_key_range``, ``_attn_fwd_epilogue``: the parts of the
  forward kernels that do not depend on the score type.
- ``_exp2x``: ``exp(2x)`` with a Cody-Waite range reduction, so the relative error does not
  grow with ``|x|`` (a plain ``tl.exp`` multiplies by log2(e) first and loses ~|2x|*2^-24).
- score modifiers (``fusedattn.spec``), shared by both scores: ``_allowed`` (key_lengths, the
  causal / right window bound ``j <= i + CAUSAL_SHIFT`` and, WINDOW, the left bound
  ``j >= i + WINDOW_SHIFT``), ``_bias`` (rel_bias and ALiBi at the distance
  ``d = j - i - (Lk - Lq)``), ``_softcap`` (dot) and ``_drel_tile`` / ``_drel_skewed`` (the
  deterministic rel_bias gradient: diagonal sums of a dS tile).
"""
import os

import triton
import triton.language as tl

LN2_HI = tl.constexpr(0.693145751953125)  # 0x3f317200: 15 significant bits, so k * LN2_HI is exact for |k| < 512
LN2_LO = tl.constexpr(1.428606765330187e-06)
TWO_LOG2E = tl.constexpr(2.8853900817779268)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# kernels decorated for the interpreter (decided at import, as triton does): no inline PTX there
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

# Launch contract (the compile check compiles exactly this specialization):
# - size arguments (lengths, head counts, widths, causal shift, split size) are never
#   specialized: Triton would otherwise compile extra variants for values equal to 1 or
#   divisible by 16;
# - every pointer is 16-byte aligned and every stride argument is a multiple of 16 elements,
#   with unit strides for the last dimension (the host launcher copies other inputs into padded
#   buffers), so loads vectorize and the checked "divisible by 16" variant is the one that runs.
SIZE_ARGS = ("H", "Hk", "Hx", "Lq", "Lk", "L", "A", "D", "Dv", "CAUSAL_SHIFT", "SPLIT_N", "NUM_SPLITS",
             "WINDOW_SHIFT", "REL_M")


@triton.jit
def _exp2x(x):
    """exp(2x) for |x| <= 40 (callers check the range), relative error ~ a few ulp."""
    k = tl.floor(x * TWO_LOG2E + 0.5)
    f = (x * 2.0 - k * LN2_HI) - k * LN2_LO
    return tl.exp(f) * tl.exp2(k)


@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr):
    """tl.dot with float32 accumulation. DOT_PRECISION "upcast" (used only under the
    interpreter, whose numpy dot mishandles bfloat16 and is slow for float16) multiplies the
    operands as float32: the same numbers a tensor core computes from 16-bit operands."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _ld(ptrs, offs_r, n_r, offs_c, n_c, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """Load a (rows, cols) tile; rows >= n_r and (MASK_C) cols >= n_c read as 0. Unmasked
    loads are 128-bit: the launch contract makes every row start 16-byte aligned, and n_c is
    a multiple of 8 (see ``_dims``)."""
    if MASK_R and MASK_C:
        return tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)
    elif MASK_R:
        return tl.load(ptrs, mask=offs_r[:, None] < n_r, other=0.0)
    elif MASK_C:
        return tl.load(ptrs, mask=offs_c[None, :] < n_c, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _dims(D, Dv):
    """D and Dv as multiples of 8 the compiler can see (the launcher pads them to one), so a
    head-dim mask is constant over 8 consecutive elements and masked loads stay 128-bit."""
    return (D // 8) * 8, (Dv // 8) * 8


@triton.jit
def _mma_acc(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b (float32 accumulator), the accumulating form of ``_mma``."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One key tile of the forward's online softmax over the (already masked) scores s.

    Returns ``(p, alpha, m_new, l_new)``: the tile's unnormalized weights, the factor that
    rescales the running output, the new row max and row sum. Rows with no allowed key so far
    keep m = -inf and l = 0 (their max is replaced by 0 before the exp, so no NaN)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _attn_fwd_key_range(KLEN, off_b, pid_m, pid_s, CAUSAL_SHIFT, SPLIT_N, BLOCK_M: tl.constexpr):
    """[n_lo, n_hi): the keys query tile ``pid_m`` of split ``pid_s`` can see (below the batch's
    key length and, when causal, up to the tile's last row + CAUSAL_SHIFT); also returns klen."""
    klen = tl.load(KLEN + off_b)
    n_lo = pid_s * SPLIT_N
    n_hi = tl.minimum(klen, (pid_m + 1) * BLOCK_M + CAUSAL_SHIFT)
    return n_lo, tl.minimum(n_hi, n_lo + SPLIT_N), klen


@triton.jit
def _attn_fwd_epilogue(acc, m_i, l_i, Out, LSE, pid_s, off_b64, off_h64, offs_m, offs_dv, mask_m, mask_dv,
                       stride_os, stride_ob, stride_oh, stride_om, stride_od,
                       stride_ls, stride_lb, stride_lh, stride_lm, BLOCK_M: tl.constexpr):
    """Normalize and store one tile's output and natural-log LSE (of split ``pid_s``); rows
    with no allowed key get out = 0 and lse = -inf."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    # approximate (2 ulp) reciprocal: no IEEE-division slow-path call (and its stack frame)
    out = acc * tl.fdiv(tl.full([BLOCK_M], 1.0, tl.float32), l_safe, ieee_rounding=False)[:, None]
    lse = tl.where(l_i == 0.0, -float("inf"), m_i + tl.log(l_safe))
    # off_h64 may be a scalar or one head per row (the dot forward packs a GQA group's heads)
    o_rows = off_h64 * stride_oh + offs_m.to(tl.int64) * stride_om
    o_ptrs = (Out + pid_s.to(tl.int64) * stride_os + off_b64 * stride_ob + o_rows[:, None]
              + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])
    l_ptrs = LSE + pid_s.to(tl.int64) * stride_ls + off_b64 * stride_lb + off_h64 * stride_lh + offs_m * stride_lm
    tl.store(l_ptrs, lse, mask=mask_m)


@triton.jit(do_not_specialize=SIZE_ARGS)
def _attn_bwd_preprocess(O, DO, Delta,
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         H, Lq, Dv,
                         ROWS: tl.constexpr, COLS: tl.constexpr, CHUNK: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, O32: tl.constexpr):
    """Delta[b, h, i] = sum_d O[b, h, i, d] * dO[b, h, i, d] (float32, Delta contiguous),
    computed with the same arithmetic as the backward kernels' dP = dO V^T: a (ROWS, COLS)
    ``_mma`` tile (the dQ kernel's BLOCK_M x BLOCK_N under the interpreter) summed over Dv in
    CHUNK-column steps, whose diagonal is taken. Where the softmax is saturated (O_i equal to
    one value row v_j) the kernels' dP_ij - delta_i is then exactly 0, as the materializing
    reference's P * (dP - sum P dP) is, instead of a rounding difference that a large q, k or
    w multiplies into dq and dk. (A row sum in another order differs from the MMA by ~1 ulp of
    |dO| |v|.) ROWS <= COLS; rows ROWS..COLS of the O tile are zero.

    O32: O is the forward's float32 output and dO 16-bit. The MMA then takes O rounded to dO's
    type (the arithmetic above) and the rounding's remainder O - round(O), exact in float32, is
    added per row: delta is the float32 output's, so O's 16-bit rounding no longer leaves each
    row's dS a residual that dw and d rel_bias (sums over all rows) add up (the forward's P @ V,
    which takes P in 16 bits, still leaves a smaller one). A saturated row's O is the 16-bit v_j
    exactly: remainder 0, the exact cancellation above kept."""
    tl.static_assert(ROWS <= COLS)
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    start = pid_m * ROWS
    offs_r = tl.arange(0, ROWS)
    offs_c = tl.arange(0, COLS)
    do_base = DO + off_b * stride_dob + off_h * stride_doh + tl.cast(start, tl.int64) * stride_dom
    o_base = O + off_b * stride_ob + off_h * stride_oh + tl.cast(start, tl.int64) * stride_om
    n_rows = tl.minimum(Lq - start, ROWS)
    _, Dv = _dims(Dv, Dv)  # a multiple of 8 (launch contract): 128-bit masked loads
    acc = tl.zeros([ROWS, COLS], dtype=tl.float32)
    rem = tl.zeros([ROWS], dtype=tl.float32)  # O32: sum_d dO (O - round(O))
    for c in range(0, Dv, CHUNK):
        offs_d = c + tl.arange(0, CHUNK)
        mask_r = (offs_r[:, None] < n_rows) & (offs_d[None, :] < Dv)
        do = tl.load(do_base + offs_r[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=mask_r,
                     other=0.0)
        o = tl.load(o_base + offs_c[:, None] * stride_om + offs_d[None, :] * stride_od,
                    mask=(offs_c[:, None] < n_rows) & (offs_d[None, :] < Dv), other=0.0)
        if O32:
            o_hi = o.to(DO.dtype.element_ty)
            acc += _mma(do, tl.trans(o_hi), DOT_PRECISION)
            if ROWS == COLS:  # the GPU's shapes: the O tile's rows are dO's
                rem += tl.sum(do.to(tl.float32) * (o - o_hi.to(tl.float32)), axis=1)
            else:  # the interpreter's wider O tile: load dO's rows of O
                o_r = tl.load(o_base + offs_r[:, None] * stride_om + offs_d[None, :] * stride_od, mask=mask_r,
                              other=0.0)
                rem += tl.sum(do.to(tl.float32) * (o_r - o_r.to(DO.dtype.element_ty).to(tl.float32)), axis=1)
        else:
            acc += _mma(do, tl.trans(o), DOT_PRECISION)
    delta = tl.sum(tl.where(offs_r[:, None] == offs_c[None, :], acc, 0.0), axis=1) + rem
    tl.store(Delta + off_bh.to(tl.int64) * Lq + start + offs_r, delta, mask=offs_r < n_rows)


@triton.jit(do_not_specialize=SIZE_ARGS)
def _attn_fwd_merge(OP, LSEP, Out, LSE,
                    stride_ps, stride_pb, stride_ph, stride_pm, stride_pd,
                    stride_ls, stride_lb, stride_lh, stride_lm,
                    stride_ob, stride_oh, stride_om, stride_od,
                    stride_lseb, stride_lseh, stride_lsem,
                    H, Lq, Dv, NUM_SPLITS,
                    BLOCK_DV: tl.constexpr):
    """Merge NUM_SPLITS normalized partial outputs (OP, fp32) with their LSEs (LSEP).

    out = sum_s exp(lse_s - lse) * o_s with lse = logsumexp_s lse_s; rows whose splits are
    all empty (lse_s = -inf) get out = 0 and lse = -inf. One program per (b, h, query row).
    """
    off_m = tl.program_id(0).to(tl.int64)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < Dv
    lsep = LSEP + off_b * stride_lb + off_h * stride_lh + off_m * stride_lm
    op = OP + off_b * stride_pb + off_h * stride_ph + off_m * stride_pm + offs_d * stride_pd
    # -- online merge over splits, in a fixed order --
    m = tl.full([], -float("inf"), tl.float32)
    l = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        lse_s = tl.load(lsep + s * stride_ls)
        o_s = tl.load(op + s * stride_ps, mask=mask_d, other=0.0)
        m_new = tl.maximum(m, lse_s)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        beta = tl.exp(lse_s - m_safe)
        l = l * alpha + beta
        acc = acc * alpha + beta * o_s
        m = m_new
    # -- epilogue --
    l_safe = tl.where(l == 0.0, 1.0, l)
    out = acc * tl.fdiv(1.0, l_safe, ieee_rounding=False)
    lse = tl.where(l == 0.0, -float("inf"), m + tl.log(l_safe))
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + off_m * stride_om + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=mask_d)
    tl.store(LSE + off_b * stride_lseb + off_h * stride_lseh + off_m * stride_lsem, lse)


# ----------------------------------------------------------------------------------------
# score modifiers (constexpr-gated: kernels without them compile to the code they had before)
# ----------------------------------------------------------------------------------------
@triton.jit
def _allowed(offs_q, offs_k, klen, CAUSAL_SHIFT, WINDOW_SHIFT, WINDOW: tl.constexpr, TRANS: tl.constexpr):
    """Boolean tile: key offs_k allowed for query offs_q (rows are queries, or keys when TRANS):
    ``k < klen``, ``k <= q + CAUSAL_SHIFT`` and, WINDOW, ``k >= q + WINDOW_SHIFT``."""
    if TRANS:
        qq = offs_q[None, :]
        kk = offs_k[:, None]
    else:
        qq = offs_q[:, None]
        kk = offs_k[None, :]
    ok = (kk < klen) & (kk <= qq + CAUSAL_SHIFT)
    if WINDOW:
        ok = ok & (kk >= qq + WINDOW_SHIFT)
    return ok


@triton.jit
def _bias(offs_q, offs_k, DIST_SHIFT, REL, rel_row, REL_M, slope, BIAS: tl.constexpr, TRANS: tl.constexpr):
    """Position bias tile (float32) at d = k - q - DIST_SHIFT: BIAS & 1 adds
    ``REL[rel_row + clamp(d, -(M-1), M-1) + M - 1]`` (REL: rel_bias as float32 (H, 2M - 1),
    contiguous; rel_row = h * (2M - 1), a scalar or a column broadcastable to the tile; the
    index is clamped, so no mask), BIAS & 2 adds ``-slope * |d|`` with d formed in float32 from
    per-row and per-column conversions (exact below 2^24; no int-to-float conversion per element)."""
    if BIAS & 2:
        kf = offs_k.to(tl.float32)
        qf = (offs_q + DIST_SHIFT).to(tl.float32)
        if TRANS:
            ab = -slope * tl.abs(kf[:, None] - qf[None, :])
        else:
            ab = -slope * tl.abs(kf[None, :] - qf[:, None])
    if BIAS & 1:
        if TRANS:
            d = offs_k[:, None] - offs_q[None, :] - DIST_SHIFT
        else:
            d = offs_k[None, :] - offs_q[:, None] - DIST_SHIFT
        idx = tl.minimum(tl.maximum(d, 1 - REL_M), REL_M - 1) + (REL_M - 1)
        b = tl.load(REL + (rel_row + idx))
        if BIAS & 2:
            b = b + ab
    else:
        b = ab
    return b


@triton.jit
def _softcap(qk, softcap_k, softcap, POLY: tl.constexpr):
    """Soft-capped dot score in natural units, s = softcap tanh(x) with x = scale qk / softcap
    (softcap_k = 2 scale log2(e) / softcap: 2|x| log2(e) = |qk softcap_k|), and g = 1 - tanh(x)^2
    (the backward's factor through the cap). No tanh instruction: for |x| >= 0.6 (every x
    without POLY),
    with e = 2^(-2|x| log2 e) in (0, 1] and r = 1 / (1 + e) (one MUFU.EX2, one MUFU.RCP; no
    overflow, saturates to +-softcap and g = 0 without NaN), tanh|x| = 1 - 2 e r and
    g = 4 e r^2 (no cancellation on either sign); below 0.6, where 1 - 2 e r cancels (its absolute
    error, ulp(1), would be a large relative error of a small score), tanh(x) = x + x^3 P(x^2) with
    a degree-4 least-squares P (float32 Horner: 1.3 ulp on [0, 0.6], FMA only) and
    g = (1 - t)(1 + t). POLY is for float32 inputs (about 12 instructions per pair more); for
    16-bit inputs the score's absolute error softcap ulp(1) is far below the inputs' rounding."""
    a = qk * softcap_k
    e = tl.math.exp2(-tl.abs(a))
    z = 1.0 + e
    if INTERPRET:
        r = 1.0 / z
    else:  # one MUFU.RCP (rcp.approx: 1 ulp)
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [z], dtype=tl.float32, is_pure=True,
                                      pack=1)
    er = e * r
    t_big = 1.0 - 2.0 * er
    t = tl.where(a < 0, -t_big, t_big)
    g = 4.0 * er * r
    if POLY:
        x = a * 0.34657359027997264  # ln(2) / 2
        x2 = x * x
        p = -0.005995491519570351 * x2 + 0.020877007395029068
        p = p * x2 - 0.0538061261177063
        p = p * x2 + 0.133321613073349
        p = p * x2 - 0.3333330452442169
        t_small = x + x * (x2 * p)
        small = tl.abs(x) < 0.6
        t = tl.where(small, t_small, t)
        g = tl.where(small, (1.0 - t_small) * (1.0 + t_small), g)
    return softcap * t, g


@triton.jit
def _drel_tile(ds, d0, SKEW, DRELP, REL_M, below, above, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add a dS tile (BLOCK_M queries x BLOCK_N keys, zero where not allowed) to the program's
    partial rel_bias gradient DRELP (float32, 2M - 1 entries by clamped distance) without
    atomics: the sums along the tile's diagonals (equal distance) are formed by storing the tile
    skewed into the program's scratch SKEW (the shorter side as rows, column e = offset of the
    diagonal) and reading it back in two (rows, longer side) chunks summed over the rows, a fixed
    order. d0 is the distance of tile element (0, 0); distances below -(M-1) / above M-1 go to the
    running scalars ``below`` / ``above`` (the caller writes them once, ``_drel_ends``), and a
    tile wholly in one clamped range (long rows, small M) is one sum. Barriers separate the
    store, the loads and the next tile's store."""
    tl.static_assert(BLOCK_M >= 2 and BLOCK_N >= 2)
    EW: tl.constexpr = BLOCK_M + BLOCK_N  # row width of SKEW (> the BLOCK_M + BLOCK_N - 1 diagonals)
    ii = tl.arange(0, BLOCK_M)
    jj = tl.arange(0, BLOCK_N)
    if d0 + (BLOCK_N - 1) <= 1 - REL_M:  # the whole tile clamps to rel_bias[0]
        below += tl.sum(tl.sum(ds, axis=1), axis=0)
    elif d0 - (BLOCK_M - 1) >= REL_M - 1:  # ... to rel_bias[2M - 2]
        above += tl.sum(tl.sum(ds, axis=1), axis=0)
    elif BLOCK_N <= BLOCK_M:  # rows: keys jj; e = ii - jj + BLOCK_N - 1, d = d0 + BLOCK_N - 1 - e
        tl.store(SKEW + (jj[None, :] * EW + (ii[:, None] - jj[None, :] + (BLOCK_N - 1))), ds)
        tl.debug_barrier()
        for c in tl.static_range(2):
            e = c * BLOCK_M + ii
            src = e[None, :] + jj[:, None] - (BLOCK_N - 1)  # the query row of (jj, e)
            x = tl.load(SKEW + (jj[:, None] * EW + e[None, :]), mask=(src >= 0) & (src < BLOCK_M), other=0.0)
            col = tl.sum(x, axis=0)
            d = d0 + (BLOCK_N - 1) - e
            below += tl.sum(tl.where(d < 1 - REL_M, col, 0.0), axis=0)
            above += tl.sum(tl.where(d > REL_M - 1, col, 0.0), axis=0)
            inr = (d >= 1 - REL_M) & (d <= REL_M - 1) & (e < BLOCK_M + BLOCK_N - 1)
            ptr = DRELP + (d + (REL_M - 1))
            tl.store(ptr, tl.load(ptr, mask=inr, other=0.0) + col, mask=inr)
        tl.debug_barrier()
    else:  # rows: queries ii; e = jj - ii + BLOCK_M - 1, d = d0 + e - (BLOCK_M - 1)
        tl.store(SKEW + (ii[:, None] * EW + (jj[None, :] - ii[:, None] + (BLOCK_M - 1))), ds)
        tl.debug_barrier()
        for c in tl.static_range(2):
            e = c * BLOCK_N + jj
            src = e[None, :] + ii[:, None] - (BLOCK_M - 1)  # the key column of (ii, e)
            x = tl.load(SKEW + (ii[:, None] * EW + e[None, :]), mask=(src >= 0) & (src < BLOCK_N), other=0.0)
            col = tl.sum(x, axis=0)
            d = d0 + e - (BLOCK_M - 1)
            below += tl.sum(tl.where(d < 1 - REL_M, col, 0.0), axis=0)
            above += tl.sum(tl.where(d > REL_M - 1, col, 0.0), axis=0)
            inr = (d >= 1 - REL_M) & (d <= REL_M - 1) & (e < BLOCK_M + BLOCK_N - 1)
            ptr = DRELP + (d + (REL_M - 1))
            tl.store(ptr, tl.load(ptr, mask=inr, other=0.0) + col, mask=inr)
        tl.debug_barrier()
    return below, above


@triton.jit
def _drel_skewed(SKEW, n_rows, d0, DRELP, REL_M, ROWS: tl.constexpr, COLS: tl.constexpr, CH: tl.constexpr):
    """The read half of ``_drel_tile`` for a dS tile that its producer already stored skewed:
    element (r, c) (distance d0 + c - r) at SKEW[r (ROWS + COLS) + c - r + ROWS - 1]; rows >= n_rows
    and the cells outside the tile are never read (they may hold anything). The diagonals are
    summed over the rows in CH-column chunks (a fixed order) and added to the program's own row
    DRELP by read-modify-write, which holds 2M - 1 bins and then 2 CH lanes: a diagonal beyond
    -(M-1) goes to lane e % CH of the first CH ("below"), one beyond M - 1 to lane e % CH of the
    second ("above"), so every address of one store is distinct and no scalar stays live; the
    launcher adds the lanes to bins 0 and 2M - 2. The producer's stores and these loads must be
    separated by a barrier, and these loads and stores from the next tile's."""
    rr = tl.arange(0, ROWS)
    lane = tl.arange(0, CH)
    for c in tl.static_range((ROWS + COLS - 1 + CH - 1) // CH):
        e = c * CH + lane
        src = e[None, :] + rr[:, None] - (ROWS - 1)  # the column of (r, e)
        x = tl.load(SKEW + (rr[:, None] * (ROWS + COLS) + e[None, :]),
                    mask=(src >= 0) & (src < COLS) & (rr[:, None] < n_rows), other=0.0)
        col = tl.sum(x, axis=0)
        d = d0 + e - (ROWS - 1)
        idx = tl.where(d < 1 - REL_M, 2 * REL_M - 1 + lane,
                       tl.where(d > REL_M - 1, 2 * REL_M - 1 + CH + lane, d + (REL_M - 1)))
        ok = e < ROWS + COLS - 1
        tl.store(DRELP + idx, tl.load(DRELP + idx, mask=ok, other=0.0) + col, mask=ok)


@triton.jit
def _drel_ends(DRELP, REL_M, below, above):
    """DRELP[0] += below, DRELP[2M - 2] += above (one entry when M = 1); after ``_drel_tile``'s
    closing barrier."""
    two = tl.arange(0, 2)
    idx = two * (2 * REL_M - 2)
    val = tl.where(two == 0, below + tl.where(REL_M == 1, above, 0.0), above)
    ok = (two == 0) | (idx > 0)
    tl.store(DRELP + idx, tl.load(DRELP + idx, mask=ok, other=0.0) + val, mask=ok)


@triton.jit
def _drel_program(DREL, SKEW, pid, REL_M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PMASS: tl.constexpr):
    """(partial row, skew scratch) of program ``pid`` (int64): DREL rows of 2M - 1 float32
    (zero-initialized: dS sums by distance; with PMASS 2 (2M - 1): then the softmax mass), SKEW
    blocks of 2 BLOCK_M BLOCK_N floats (>= the smaller tile side x (BLOCK_M + BLOCK_N), what
    ``_drel_tile`` uses)."""
    return DREL + pid * ((2 * REL_M - 1) * (2 if PMASS else 1)), SKEW + pid * (2 * BLOCK_M * BLOCK_N)
