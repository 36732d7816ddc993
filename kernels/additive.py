"""Fused additive (Bahdanau) attention: the forward Triton kernel and its exp-table prologue.

Scores ``s_ij = sum_a w_a * tanh(q_ia + k_ja)`` are rebuilt tile by tile and never stored.
Per (query tile, key tile) the A axis is walked one column at a time: a query column
(BLOCK_M,) and a key column (BLOCK_N,) are loaded as vectors from the float32 tables below
and the triple work is a rank-1 update of a (BLOCK_M, BLOCK_N) register tile. q and k are
read only by the prologue; the main kernel loads 16-bit data only for V, with
head-dim masks over 8 elements (``common._dims``: 128-bit loads, once per tile, so there is
no unmasked variant).

tanh without a tanh per triple::

    tanh(x + y) = 1 - 2 r,   r = 1 / (1 + e^{2x} e^{2y})
    sum_a w_a tanh(x_a + y_a) = sum_a w_a - 2 sum_a w_a r_a
    1 - tanh^2 = 4 r (1 - r)

A prologue (``_attn_exp_table``) computes ``e^{2x}`` once per element of q and of k
(O((Lq + Lk) A) exps, Cody-Waite reduced so the relative error does not grow with |x|) into
float32 tables stored transposed, (B, H, 2A, L): rows a < A hold e^{2x}, rows A + a hold x
itself (for the direct path below), so the column of a tile is a contiguous vector load; it
also writes each row's max|x|. Keys at or past key_lengths are written as x = 0, so padding
keys (which may hold NaN or inf) never reach a score or a gradient and K/V are not copied. Each triple then costs an FMA
(``1 + e^{2x} e^{2y}``), a reciprocal and an FMA. That is exact in floating point as long
as neither factor overflows or flushes: every (query tile, key tile) pair with
``max|q|, max|k| <= 40`` (both factors finite normal numbers; their product may over- or
underflow, which gives r = 0 or 1, the correct saturated limits) takes this path; any other
tile takes the DIRECT path ``r = 1 / (1 + exp(2 (x + y)))`` with one exp per triple.

Backward: ``additive_bwd.py`` (one reciprocal per triple per kernel, gradients in registers)
serves every call, every modifier included; it reuses ``_attn_exp_table``'s idea with its own
tiled tables.
"""
import triton
import triton.language as tl

from .common import (
    SIZE_ARGS,
    _allowed,
    _attn_fwd_epilogue,
    _attn_fwd_key_range,
    _bias,
    _dims,
    _exp2x,
    _ld,
    _mma,
    _online_softmax,
)

EXP_SAFE = tl.constexpr(40.0)  # |x| <= 40: e^{2x} in [1.8e-35, 5.5e34], finite and normal in float32


# ----------------------------------------------------------------------------------------
# configurations (GPU); the interpreter uses INTERPRET_CONFIG
# ----------------------------------------------------------------------------------------
# Each entry: (predicate, config); the first match wins. Chosen from the compile check: the
# largest tile without spills on sm_80 and sm_90. BLOCK_M = 16 rows x BLOCK_N = 128 columns
# puts 16 rows x 1 column of the score tile in each thread (Triton's default blocked layout),
# so a column step is 4 vector loads + 16 x (FMA, MUFU.RCP, FMA).
FWD_CONFIGS = [  # predicate on (BLOCK_DV, fp32, decode)
    (lambda dv, f32, decode: not f32 and dv <= 128,
     dict(BLOCK_M=16, BLOCK_N=128, SOFT_RCP=5, num_warps=4, num_stages=1, maxnreg=255)),
    (lambda dv, f32, decode: not f32,
     dict(BLOCK_M=16, BLOCK_N=128, SOFT_RCP=0, num_warps=8, num_stages=1, maxnreg=255)),
    (lambda dv, f32, decode: dv <= 64, dict(BLOCK_M=16, BLOCK_N=64, SOFT_RCP=0, num_warps=4, num_stages=1, maxnreg=255)),
    (lambda dv, f32, decode: True, dict(BLOCK_M=16, BLOCK_N=64, SOFT_RCP=0, num_warps=8, num_stages=1, maxnreg=255)),
]
# maxnreg=255: without it ptxas caps these kernels near 168 registers (three CTAs per SM) and
# spills a few prologue values to the stack; the cap lifted, they fit with no spill.
# SOFT_RCP (see _score_rsum): with 16-bit inputs and BLOCK_DV <= 128 the factored score loop
# waits on the MUFU unit (sm_90: 5.06 instructions and 1 MUFU op per triple; an SM issues 128
# thread-instructions but only 16 MUFU results per clock), so one column in five takes its
# reciprocal on the FMA pipes: 6.3 instructions and 0.8 MUFU ops per triple, 1.25x fewer
# clocks by that count. Loops already issue-bound (float32: 8.9; BLOCK_DV = 256: 8.75) keep 0.
# the interpreter runs the FMA-pipe reciprocal too (every 5th column), so the tests check its numbers
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, SOFT_RCP=5, num_warps=4, num_stages=1)
INTERPRET_DECODE_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, SOFT_RCP=5, num_warps=4, num_stages=1)


def prune_fwd_config(BLOCK_DV, fp32, decode):
    """The forward config for a padded value width, float32 inputs?, decode (Lq <= 16)?"""
    return next(dict(c) for pred, c in FWD_CONFIGS if pred(BLOCK_DV, fp32, decode))


# ----------------------------------------------------------------------------------------
# exponential tables (prologue)
# ----------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=SIZE_ARGS)
def _attn_exp_table(X, ET, XMAX, XLEN,
                    stride_xb, stride_xh, stride_xl, stride_xd,
                    stride_eb, stride_eh, stride_ea,
                    Hx, L, A,
                    BLOCK_L: tl.constexpr, BLOCK_A: tl.constexpr):
    """The (B, Hx, 2A, >=L) float32 table of x (B, Hx, L, A), transposed so a column of a tile
    is contiguous: ET[b, h, a, l] = exp(2 * clamp(x[b, h, l, a], -40, 40)) and
    ET[b, h, A + a, l] = x[b, h, l, a] (read by the direct-tanh path), plus
    XMAX[b, h, l] = max_a |x[b, h, l, a]| (inf for a row holding a NaN). Rows l >= XLEN[b]
    (keys past key_lengths, and the padding up to the table's width, which the main kernels
    read unmasked) are written as x = 0 (e^0 = 1, max 0), so whatever they hold (NaN, inf)
    never reaches a score or a gradient. BLOCK_A divides A (the launcher picks it so: A is a
    multiple of 8), so the loads carry only the row mask and are 128-bit for 16-bit inputs."""
    pid_l = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hx
    off_b64 = off_b.to(tl.int64)
    off_h64 = (off_bh % Hx).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    xlen = tl.load(XLEN + off_b)
    mask_l = offs_l < xlen
    x_base = X + off_b64 * stride_xb + off_h64 * stride_xh + offs_l[:, None].to(tl.int64) * stride_xl
    e_base = ET + off_b64 * stride_eb + off_h64 * stride_eh + offs_l[:, None]
    mx = tl.zeros([BLOCK_L], dtype=tl.float32)
    for a0 in range(0, A, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        x = tl.load(x_base + offs_a[None, :] * stride_xd, mask=mask_l[:, None], other=0.0).to(tl.float32)
        # a NaN counts as out of range, so its row takes the direct path and stays NaN
        # (the clamp below would turn it into a finite number)
        mx = tl.maximum(mx, tl.max(tl.where(x == x, tl.abs(x), float("inf")), axis=1))
        e = _exp2x(tl.minimum(tl.maximum(x, -EXP_SAFE), EXP_SAFE))
        tl.store(e_base + offs_a[None, :] * stride_ea, e)
        tl.store(e_base + (A + offs_a[None, :]) * stride_ea, x)
    tl.store(XMAX + off_bh.to(tl.int64) * L + offs_l, mx, mask=offs_l < L)


# ----------------------------------------------------------------------------------------
# score helpers: a "row" side (tile rows: queries) and a "col" side (tile columns: keys)
# ----------------------------------------------------------------------------------------
@triton.jit
def _w_sum(W_h, stride_wa, A):
    total = tl.zeros([], dtype=tl.float32)
    for a in range(0, A):
        total += tl.load(W_h + a * stride_wa).to(tl.float32)
    return total


@triton.jit
def _score_rsum(XE, YE, X, Y, offs_x, offs_y, mask_x, mask_y,
                stride_xea, stride_yea, stride_xl, stride_yl, stride_xd, stride_yd, W_h, stride_wa, A,
                BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr,
                DIRECT: tl.constexpr, FAST_RCP: tl.constexpr, SOFT_RCP: tl.constexpr):
    """sum_a (-2 w_a) r_a over all A columns, (BLOCK_X, BLOCK_Y) float32, with
    r = 1 / (1 + e^{2(x_ia + y_ja)}) (tanh = 1 - 2 r). XE/YE (exp tables) and X/Y (inputs) are
    scalar base pointers; offs_* are int32 row indices (int32 offsets instead of pointer
    tensors save two registers per element).

    SOFT_RCP = k > 0 (factored path only): of every k columns, k - 1 take the MUFU reciprocal
    and one a reciprocal on the FMA pipes, so a loop that would wait on the MUFU unit (16
    results per clock and SM against 128 FMA lanes) shares the work between both. That
    reciprocal: z clamped to 2^126 (so the seed below is a normal number; an infinite z then
    gives 1.2e-38 instead of 0), a bit-trick seed 0x7EF311C3 - bits(z) (relative error < 5.1 %
    for z >= 1) and three Newton steps r += r (1 - z r) (relative error < 6e-8, about 0.5 ulp).
    """
    acc = tl.zeros([BLOCK_X, BLOCK_Y], dtype=tl.float32)
    a_lo = 0
    if not DIRECT and SOFT_RCP > 0:
        a_lo = A - A % SOFT_RCP
        for a0 in range(0, a_lo, SOFT_RCP):
            for u in tl.static_range(SOFT_RCP):
                w2 = tl.load(W_h + (a0 + u) * stride_wa).to(tl.float32) * -2.0
                ex = tl.load(XE + (offs_x + (a0 + u) * stride_xea))
                ey = tl.load(YE + (offs_y + (a0 + u) * stride_yea))
                z = ex[:, None] * ey[None, :] + 1.0
                if u == SOFT_RCP - 1:  # _rcp_newton, inlined (interpreter call cost)
                    zc = tl.minimum(z, 8.507059e37)
                    r = (0x7EF311C3 - zc.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
                    r = r + r * (1.0 - zc * r)
                    r = r + r * (1.0 - zc * r)
                    r = r + r * (1.0 - zc * r)
                elif FAST_RCP:
                    r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [z],
                                                  dtype=tl.float32, is_pure=True, pack=1)
                else:
                    r = 1.0 / z
                acc += w2 * r
    for a in range(a_lo, A):
        w2 = tl.load(W_h + a * stride_wa).to(tl.float32) * -2.0
        # -- r = 1 / (1 + e^{2(x_ia + y_ja)}) for column a (inlined: the interpreter pays ~1 ms
        #    per nested jit call) --
        if DIRECT:
            x = tl.load(X + (offs_x + a * stride_xd))
            y = tl.load(Y + (offs_y + a * stride_yd))
            z = tl.exp((x[:, None] + y[None, :]) * 2.0) + 1.0
        else:
            # tables are padded (finite values) to a multiple of 128 rows: no masks, vector loads
            ex = tl.load(XE + (offs_x + a * stride_xea))
            ey = tl.load(YE + (offs_y + a * stride_yea))
            z = ex[:, None] * ey[None, :] + 1.0
        if FAST_RCP:  # one MUFU.RCP (GPU only: inline PTX does not run under the interpreter)
            r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [z],
                                          dtype=tl.float32, is_pure=True, pack=1)
        else:
            r = 1.0 / z
        acc += w2 * r
    return acc


@triton.jit
def _scores(XE, YE, X, Y, offs_x, offs_y, mask_x, mask_y,
            stride_xea, stride_yea, stride_xl, stride_yl, stride_xd, stride_yd, W_h, stride_wa, A, wsum, fast,
            BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, FAST_RCP: tl.constexpr, SOFT_RCP: tl.constexpr):
    """Score tile sum_a w_a tanh(x_ia + y_ja); ``fast`` (a scalar) picks the factored path."""
    if fast:
        acc = _score_rsum(XE, YE, X, Y, offs_x, offs_y, mask_x, mask_y,
                          stride_xea, stride_yea, stride_xl, stride_yl, stride_xd, stride_yd, W_h, stride_wa, A,
                          BLOCK_X, BLOCK_Y, False, FAST_RCP, SOFT_RCP)
    else:
        acc = _score_rsum(XE, YE, X, Y, offs_x, offs_y, mask_x, mask_y,
                          stride_xea, stride_yea, stride_xl, stride_yl, stride_xd, stride_yd, W_h, stride_wa, A,
                          BLOCK_X, BLOCK_Y, True, FAST_RCP, 0)
    return acc + wsum


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=SIZE_ARGS)
def _attn_fwd_additive(Q, K, V, W, EQ, EK, QMAX, KMAX, KLEN, Out, LSE,
                       stride_qb, stride_qh, stride_qm, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       stride_wh, stride_wa,
                       stride_eqb, stride_eqh, stride_eqa,
                       stride_ekb, stride_ekh, stride_eka,
                       stride_os, stride_ob, stride_oh, stride_om, stride_od,
                       stride_ls, stride_lb, stride_lh, stride_lm,
                       H, Hk, Lq, Lk, A, Dv, CAUSAL_SHIFT, SPLIT_N,
                       WINDOW_SHIFT, REL, SLOPES, REL_M,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
                       FAST_RCP: tl.constexpr, SOFT_RCP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       WINDOW: tl.constexpr, BIAS: tl.constexpr):
    """One program: BLOCK_M query rows of one (b, h), keys [pid_s*SPLIT_N, +SPLIT_N).
    Rows of V at or past key_lengths load as 0, so padding keys holding NaN or inf never reach
    P @ V; the head-dim mask covers 8 elements at a time (128-bit loads), once per key tile.

    Key j is allowed for row i iff j < KLEN[b] and j <= i + CAUSAL_SHIFT
    (CAUSAL_SHIFT = Lk - Lq when causal, Lk otherwise). EQ/EK are the transposed exp tables
    and QMAX/KMAX the row max|x| from ``_attn_exp_table``. Writes the normalized output and
    the natural-log LSE of its split (the final result when there is a single split).
    Modifiers (constexpr-gated; ``fusedattn.spec``): WINDOW also requires j >= i + WINDOW_SHIFT
    (key tiles left of the tile's window are skipped); BIAS & 1 adds rel_bias (REL float32
    (H, 2 REL_M - 1) contiguous), BIAS & 2 ALiBi (SLOPES float32 (B, H) contiguous).
    """
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_DV >= 16)
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
    offs_dv = tl.arange(0, BLOCK_DV)
    _, Dv = _dims(A, Dv)
    mask_m = offs_m < Lq
    mask_dv = offs_dv < Dv
    v_offs = offs_n0[:, None] * stride_vn + offs_dv[None, :]

    eq_base = EQ + off_b64 * stride_eqb + off_h64 * stride_eqh
    xq_base = eq_base + A * stride_eqa  # rows A..2A of the table: x itself (float32)
    ek_base = EK + off_b64 * stride_ekb + off_hk64 * stride_ekh
    xk_base = ek_base + A * stride_eka
    kmax_base = KMAX + (off_b64 * Hk + off_hk64) * Lk
    v_base = V + off_b64 * stride_vb + off_hk64 * stride_vh
    W_h = W + off_h64 * stride_wh

    # -- key range of this program --
    n_lo, n_hi, klen = _attn_fwd_key_range(KLEN, off_b, pid_m, pid_s, CAUSAL_SHIFT, SPLIT_N, BLOCK_M)
    if WINDOW:
        n_lo = tl.maximum(n_lo, tl.maximum(pid_m * BLOCK_M + WINDOW_SHIFT, 0) // BLOCK_N * BLOCK_N)
    rel_row = 0
    slope = 0.0
    if BIAS > 0:
        rel_row = off_h * (2 * REL_M - 1)
        if BIAS & 2:
            slope = tl.load(SLOPES + off_bh)

    wsum = _w_sum(W_h, stride_wa, A)
    qmax = tl.load(QMAX + off_bh.to(tl.int64) * Lq + offs_m, mask=mask_m, other=0.0)
    q_ok = tl.max(qmax, axis=0) <= EXP_SAFE

    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < Lk
        # -- scores --
        kmax = tl.load(kmax_base + offs_n, mask=mask_n, other=0.0)
        fast = q_ok & (tl.max(kmax, axis=0) <= EXP_SAFE)
        s = _scores(eq_base, ek_base, xq_base, xk_base, offs_m, offs_n, mask_m, mask_n,
                    stride_eqa, stride_eka, 1, 1, stride_eqa, stride_eka,
                    W_h, stride_wa, A, wsum, fast,
                    BLOCK_M, BLOCK_N, FAST_RCP, SOFT_RCP)
        if BIAS > 0:
            s += _bias(offs_m, offs_n, Lk - Lq, REL, rel_row, REL_M, slope, BIAS, False)
        allowed = _allowed(offs_m, offs_n, klen, CAUSAL_SHIFT, WINDOW_SHIFT, WINDOW, False)
        s = tl.where(allowed, s, -float("inf"))
        # -- online softmax --
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        # -- P @ V --
        v = _ld(v_base + tl.cast(start_n, tl.int64) * stride_vn + v_offs, offs_n0, klen - start_n, offs_dv, Dv,
                True, True)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION)

    # -- epilogue: empty rows give out = 0, lse = -inf --
    _attn_fwd_epilogue(acc, m_i, l_i, Out, LSE, pid_s, off_b64, off_h64, offs_m, offs_dv, mask_m, mask_dv,
                       stride_os, stride_ob, stride_oh, stride_om, stride_od,
                       stride_ls, stride_lb, stride_lh, stride_lm, BLOCK_M)
