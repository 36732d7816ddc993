"""Fused additive attention, decode steps: one program per (batch, kv head, key split).

``additive._attn_fwd_additive`` tiles the queries by BLOCK_M = 16 rows per (batch, query
head): a decode step with Lq = 1 wastes 15 of every 16 score rows (and their reciprocals,
the kernel's bottleneck), and every query head of a GQA group re-reads the same K/V tiles.
Here one program takes all ROWS_USED = (H / Hk) * Lq query rows of a kv group (row r is query
head ``hk * G + r // Lq``, decode step ``r % Lq``; ROWS_USED <= ROWS = 16) and walks its keys
in tiles of BLOCK_N: each tile's key exp-table slice (BLOCK_N, BLOCK_A) and V tile
(BLOCK_N, BLOCK_DV) are loaded once and reused for every row. Per row the score vector of the
tile is

    s_j = sum_a w_a - 2 sum_a w_a r_ja,   r_ja = 1 / (1 + e^{2 q_a} e^{2 k_ja})

computed on the whole (BLOCK_N, BLOCK_A) tile (one reciprocal per useful (row, key, feature)
triple; lanes a >= A carry w = 0), then one online-softmax step and P.V as a
(BLOCK_N,) x (BLOCK_N, BLOCK_DV) reduction. The rows' running max / sum / output live in
(ROWS,) / (ROWS, BLOCK_DV) tensors updated with ``tl.where`` on the row index.

Same numerics as the main kernel (``additive._score_rsum``): float32 exp tables from
``additive._attn_exp_table``, MUFU reciprocal (inline PTX) on the GPU and a division under the
interpreter, and the DIRECT path ``r = 1 / (1 + exp(2 (q + k)))`` for a (group, key tile)
pair in which some |q| or |k| exceeds EXP_SAFE. Modifiers: key_lengths and a right bound
``j <= i + CAUSAL_SHIFT`` per decode step i (causal, bottom-right aligned); windows with a
left edge, rel_bias and ALiBi stay on the main kernel (the launcher routes them there).
Flash-decoding: each split writes its normalized partial output and LSE, merged by
``common._attn_fwd_merge``.
"""
import triton
import triton.language as tl

from .additive import EXP_SAFE
from .common import SIZE_ARGS, _attn_fwd_epilogue, _dims, _ld, _mma, _online_softmax

ROWS = 16  # upper bound on (H / Hk) * Lq rows of one program (the launcher routes larger groups away)

# ----------------------------------------------------------------------------------------
# configurations: one padded width BLOCK_W = max(BLOCK_A, BLOCK_DV) serves both (fewer
# variants). From the compile check (no spills on sm_80 and sm_90): 16-bit inputs take 8192 key
# table elements per tile at widths 128 and 256 (64 per thread: sm_90 fp16 A = 128 with
# BLOCK_N = 64 has 5.9 instructions per triple in the row loop against 7.9 with 32), float32
# inputs (their float32 V tile and MMA operands) half that, which does not spill; BLOCK_N = 128
# at widths 16 and 32 spills.
# ----------------------------------------------------------------------------------------
DEC_CONFIGS = {16: 64, 32: 64, 64: 64, 128: 64, 256: 32}  # BLOCK_W -> BLOCK_N (16-bit inputs)
DEC_CONFIGS_FP32 = {16: 64, 32: 64, 64: 64, 128: 32, 256: 16}
INTERPRET_BLOCK_N = 32


def dec_config(block_w: int, fp32: bool, interpret: bool = False) -> dict:
    """The decode config for a padded width (the larger of the padded A and Dv), float32 inputs?"""
    n = INTERPRET_BLOCK_N if interpret else (DEC_CONFIGS_FP32 if fp32 else DEC_CONFIGS)[block_w]
    cfg = dict(ROWS=ROWS, BLOCK_N=n, BLOCK_A=block_w, BLOCK_DV=block_w, num_warps=4, num_stages=1)
    return cfg if interpret else dict(cfg, maxnreg=255)


@triton.jit
def _decode_scores(eq_base, W, kt, offs_n, offs_a, mask_a, rid, off_hk, G, Lq, klen, CAUSAL_SHIFT, A,
                   stride_eqh, stride_eqa, stride_wh, stride_wa,
                   ROWS: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, FAST_RCP: tl.constexpr):
    """The (ROWS, BLOCK_N) masked score tile of one key tile: row r < G * Lq from the
    (BLOCK_N, BLOCK_A) key table tile kt (e^{2k}; DIRECT: k itself), padding rows -inf."""
    s_tile = tl.full([ROWS, BLOCK_N], -float("inf"), dtype=tl.float32)
    for r in range(0, G * Lq):
        # -- row r: query head and decode step --
        h = (off_hk * G + r // Lq).to(tl.int64)
        i = r % Lq
        w2 = tl.load(W + h * stride_wh + offs_a * stride_wa, mask=mask_a, other=0.0) * -2.0
        eq_row = eq_base + h * stride_eqh + offs_a * stride_eqa + i
        # -- s_j = sum_a w_a + sum_a (-2 w_a) r_ja over the (BLOCK_N, BLOCK_A) tile --
        if DIRECT:
            xq = tl.load(eq_row + A * stride_eqa, mask=mask_a, other=0.0)
            z = tl.exp((xq[None, :] + kt) * 2.0) + 1.0
        else:
            eq = tl.load(eq_row, mask=mask_a, other=1.0)
            z = eq[None, :] * kt + 1.0
        if FAST_RCP:  # one MUFU.RCP per triple (GPU only)
            rc = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [z],
                                           dtype=tl.float32, is_pure=True, pack=1)
        else:
            rc = 1.0 / z
        s = tl.sum(w2[None, :] * rc, axis=1) - 0.5 * tl.sum(w2, axis=0)
        s = tl.where((offs_n < klen) & (offs_n <= i + CAUSAL_SHIFT), s, -float("inf"))
        s_tile = tl.where(rid[:, None] == r, s[None, :], s_tile)
    return s_tile


@triton.jit(do_not_specialize=SIZE_ARGS)
def _attn_fwd_additive_decode(V, W, EQ, EK, QMAX, KMAX, KLEN, Out, LSE,
                              stride_vb, stride_vh, stride_vn, stride_vd,
                              stride_wh, stride_wa,
                              stride_eqb, stride_eqh, stride_eqa,
                              stride_ekb, stride_ekh, stride_eka,
                              stride_os, stride_ob, stride_oh, stride_om, stride_od,
                              stride_ls, stride_lb, stride_lh, stride_lm,
                              H, Hk, Lq, Lk, A, Dv, CAUSAL_SHIFT, SPLIT_N,
                              ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr,
                              BLOCK_DV: tl.constexpr, FAST_RCP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (1, B * Hk, splits). Program (b, hk, split) computes the rows r < (H / Hk) * Lq
    (<= ROWS) of kv group hk against keys [split * SPLIT_N, + SPLIT_N); key j is allowed for
    row r (decode step i = r % Lq) iff j < KLEN[b] and j <= i + CAUSAL_SHIFT. EQ/EK, QMAX/KMAX:
    the transposed exp tables and row max|x| of ``additive._attn_exp_table`` (rows past the
    key length hold x = 0). Writes the normalized output and natural-log LSE of its split;
    rows with no allowed key get out = 0, lse = -inf."""
    tl.static_assert(ROWS <= 16)
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_N <= 128)  # the exp tables are padded to 128 rows: unmasked key loads
    tl.static_assert(BLOCK_A >= 16)
    tl.static_assert(BLOCK_DV >= 16)
    off_bk = tl.program_id(1)
    pid_s = tl.program_id(2)
    off_b = off_bk // Hk
    off_hk = off_bk % Hk
    G = H // Hk
    off_b64 = off_b.to(tl.int64)
    off_hk64 = off_hk.to(tl.int64)

    rid = tl.arange(0, ROWS)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, BLOCK_A)
    offs_dv = tl.arange(0, BLOCK_DV)
    _, Dv = _dims(A, Dv)
    mask_a = offs_a < A
    mask_dv = offs_dv < Dv
    mask_r = rid < G * Lq
    heads = off_hk * G + rid // Lq  # per row: query head and decode step
    steps = rid % Lq

    eq_base = EQ + off_b64 * stride_eqb
    ek_base = EK + off_b64 * stride_ekb + off_hk64 * stride_ekh
    ek_offs = offs_n0[:, None] + offs_a[None, :] * stride_eka  # (BLOCK_N, BLOCK_A), transposed table
    kmax_base = KMAX + (off_b64 * Hk + off_hk64) * Lk
    v_base = V + off_b64 * stride_vb + off_hk64 * stride_vh
    v_offs = offs_n0[:, None] * stride_vn + offs_dv[None, :]
    QMAX_b = QMAX + off_b64 * H * Lq

    # -- key range of this split (the last decode step sees the most keys) --
    klen = tl.load(KLEN + off_b)
    n_lo = pid_s * SPLIT_N
    n_hi = tl.minimum(tl.minimum(klen, Lq + CAUSAL_SHIFT), n_lo + SPLIT_N)
    # the group's rows take the factored path iff all their |q| <= EXP_SAFE
    qmax = tl.load(QMAX_b + heads * Lq + steps, mask=mask_r, other=0.0)
    q_ok = tl.max(qmax, axis=0) <= EXP_SAFE

    m_i = tl.full([ROWS], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32)
    # tile index loop: start_n = t * BLOCK_N is then a multiple of BLOCK_N the compiler can see
    # (SPLIT_N is one too), so the key table and V loads stay vector loads
    for t in range(n_lo // BLOCK_N, tl.cdiv(n_hi, BLOCK_N)):
        start_n = t * BLOCK_N
        offs_n = start_n + offs_n0
        # -- the tile's keys and values: loaded once, used by every row --
        kmax = tl.load(kmax_base + offs_n, mask=offs_n < Lk, other=0.0)
        if q_ok & (tl.max(kmax, axis=0) <= EXP_SAFE):
            ek = tl.load(ek_base + start_n + ek_offs, mask=mask_a[None, :], other=1.0)
            s = _decode_scores(eq_base, W, ek, offs_n, offs_a, mask_a, rid, off_hk, G, Lq, klen, CAUSAL_SHIFT,
                               A, stride_eqh, stride_eqa, stride_wh, stride_wa, ROWS, BLOCK_N, False, FAST_RCP)
        else:
            xk = tl.load(ek_base + A * stride_eka + start_n + ek_offs, mask=mask_a[None, :], other=0.0)
            s = _decode_scores(eq_base, W, xk, offs_n, offs_a, mask_a, rid, off_hk, G, Lq, klen, CAUSAL_SHIFT,
                               A, stride_eqh, stride_eqa, stride_wh, stride_wa, ROWS, BLOCK_N, True, FAST_RCP)
        # -- online softmax and P @ V for all rows at once (one MMA tile of ROWS rows) --
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        v = _ld(v_base + tl.cast(start_n, tl.int64) * stride_vn + v_offs, offs_n0, klen - start_n, offs_dv, Dv,
                True, True)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION)

    # -- epilogue: per row (head, step); empty rows give out = 0, lse = -inf --
    _attn_fwd_epilogue(acc, m_i, l_i, Out, LSE, pid_s, off_b64, heads.to(tl.int64), steps, offs_dv, mask_r,
                       mask_dv, stride_os, stride_ob, stride_oh, stride_om, stride_od,
                       stride_ls, stride_lb, stride_lh, stride_lm, ROWS)
