"""Launch configurations of the dot-product kernels (``dot.py``): the per-(head width, dtype,
decode, arch) tables, the interpreter configs and the score-modifier variant
(``score_mods_config``). Re-exported by ``dot``."""

# ----------------------------------------------------------------------------------------
# configurations (GPU); the interpreter uses INTERPRET_CONFIG
# ----------------------------------------------------------------------------------------
# Each entry: (predicate on (BLOCK_D, BLOCK_DV, decode?, arch), config). The first match wins.
# Chosen with the compile check (no spills on sm_80 and sm_90; the sm_90 rows meet the
# amortized-instruction targets of docs/PERFORMANCE.md). float32 inputs use 3xTF32
# dots (three MMAs on split big/small operands, fp32-level accuracy) and get their own,
# smaller tiles; at wide heads they also set BLOCK_DC < BLOCK_D: the score products
# (Q K^T, dO V^T) are summed over D chunks loaded from memory instead of keeping the whole
# Q / dO (or K / V) tile resident in registers. BLOCK_DC defaults to the full width.
FWD_CONFIGS = [  # predicate on (BLOCK_D, BLOCK_DV, decode, arch)
    # maxnreg: at 256 columns ptxas otherwise caps the decode kernel at 168 registers and spills
    (lambda d, dv, decode, arch: decode and max(d, dv) > 128,
     dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1, maxnreg=255)),
    (lambda d, dv, decode, arch: decode, dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)),
    (lambda d, dv, decode, arch: max(d, dv) <= 32 and arch >= 90,
     dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2)),
    (lambda d, dv, decode, arch: max(d, dv) <= 32, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
    (lambda d, dv, decode, arch: max(d, dv) <= 64 and arch >= 90,
     dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)),
    (lambda d, dv, decode, arch: max(d, dv) <= 64, dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)),
    (lambda d, dv, decode, arch: max(d, dv) <= 128 and arch >= 90,
     dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)),
    (lambda d, dv, decode, arch: max(d, dv) <= 128, dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)),
    (lambda d, dv, decode, arch: arch >= 90, dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)),
    (lambda d, dv, decode, arch: True, dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)),
]
FWD_CONFIGS_FP32 = [
    (lambda d, dv, decode, arch: decode and max(d, dv) <= 64,
     dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1, maxnreg=255)),
    (lambda d, dv, decode, arch: decode, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_DC=32, num_warps=4, num_stages=1)),
    (lambda d, dv, decode, arch: max(d, dv) <= 32 and arch >= 90,
     dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
    (lambda d, dv, decode, arch: max(d, dv) <= 32, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)),
    (lambda d, dv, decode, arch: max(d, dv) <= 64, dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=1)),
    (lambda d, dv, decode, arch: max(d, dv) <= 128,
     dict(BLOCK_M=16, BLOCK_N=32, BLOCK_DC=32, num_warps=4, num_stages=1)),
    (lambda d, dv, decode, arch: True, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_DC=32, num_warps=4, num_stages=1)),
]
BWD_DKDV_CONFIGS = [  # predicate on (BLOCK_D, BLOCK_DV, arch)
    (lambda d, dv, arch: max(d, dv) <= 32, dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)),
    (lambda d, dv, arch: max(d, dv) <= 64 and arch >= 90, dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)),
    (lambda d, dv, arch: max(d, dv) <= 64, dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)),
    (lambda d, dv, arch: max(d, dv) <= 128 and arch >= 90, dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2)),
    (lambda d, dv, arch: max(d, dv) <= 128, dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1)),
    (lambda d, dv, arch: True, dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1)),
]
BWD_DQ_CONFIGS = [
    (lambda d, dv, arch: max(d, dv) <= 64, dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=1)),
    (lambda d, dv, arch: max(d, dv) <= 128 and arch >= 90, dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)),
    (lambda d, dv, arch: max(d, dv) <= 128, dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)),
    (lambda d, dv, arch: True, dict(BLOCK_M=32, BLOCK_N=16, BLOCK_DC=128, num_warps=4, num_stages=1)),
]
BWD_DKDV_CONFIGS_FP32 = [
    (lambda d, dv, arch: max(d, dv) <= 32, dict(BLOCK_M=32, BLOCK_N=32, BLOCK_DC=16, num_warps=4, num_stages=1)),
    (lambda d, dv, arch: max(d, dv) <= 64, dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)),
    (lambda d, dv, arch: max(d, dv) <= 128, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_DC=32, num_warps=8, num_stages=1)),
    (lambda d, dv, arch: True, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_DC=16, num_warps=8, num_stages=1)),
]
BWD_DQ_CONFIGS_FP32 = [
    (lambda d, dv, arch: max(d, dv) <= 64, dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)),
    (lambda d, dv, arch: max(d, dv) <= 128, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_DC=32, num_warps=8, num_stages=1)),
    (lambda d, dv, arch: True, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_DC=32, num_warps=8, num_stages=1)),
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


def score_mods_config(cfg, width, kind, fp32=False):
    """The config of a call with per-element score modifiers (softcap, rel_bias, ALiBi; the
    window alone costs no registers) for kernel ``kind`` ("fwd", "dkdv", "dq") at padded head
    width ``width``: the same kind of tile with at most 16 score elements and 32 accumulator
    elements per thread (dK/dV: 8 and 32; dQ: 4 and 32, with the rel_bias gradient's sums; a
    quarter and half for float32, whose 3xTF32 products hold split copies of their operands),
    reached by doubling the warps up to 8, then halving the accumulator's rows (dK/dV: keys,
    else queries); Q / dO (K / V) chunked from memory above 64 columns (BLOCK_DC); the register
    cap lifted (maxnreg=255: without it ptxas capped an 8-warp decode config at 128). On the
    base configs the "+mods" variants spilled (sm_90 fp16 D = 64: 224-424 bytes)."""
    cfg = dict(cfg, maxnreg=255, num_stages=1)  # one stage: 2 stages spilled 8-16 bytes
    tile_max, acc_max = {"dq": (4, 32), "dkdv": (8, 32)}.get(kind, (16, 32))
    if fp32:
        tile_max, acc_max = tile_max // 4, acc_max // 2

    def over():
        threads = 32 * cfg["num_warps"]
        acc_rows = 2 * cfg["BLOCK_N"] if kind == "dkdv" else cfg["BLOCK_M"]
        return (cfg["BLOCK_M"] * cfg["BLOCK_N"] > tile_max * threads or acc_rows * width > acc_max * threads)

    while over():
        if cfg["num_warps"] < 8:
            cfg["num_warps"] *= 2
        elif kind == "dkdv" and cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        elif kind != "dkdv" and cfg["BLOCK_M"] > 16:
            cfg["BLOCK_M"] //= 2
        else:
            break
    if kind == "dq" and cfg["BLOCK_M"] == 16:
        # at most 32 keys on 16-row dQ tiles: sm_90 fp16 D = 128 "+hdmask+mods" spilled 8 bytes
        # with 64 (after the natural-unit modified scores of the tmod/tfix merge)
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], 32)
    cfg["BLOCK_DC"] = min(cfg["BLOCK_DC"], 64)
    return cfg


def prune_fwd_config(BLOCK_D, BLOCK_DV, fp32, decode, arch=90, score_mods=False):
    """The forward config for padded head widths, float32 inputs?, decode (Lq <= 16)?, the
    compute capability (80, 90, ...) and per-element score modifiers?"""
    table = FWD_CONFIGS_FP32 if fp32 else FWD_CONFIGS
    cfg = _with_dc(next(c for pred, c in table if pred(BLOCK_D, BLOCK_DV, decode, arch)), BLOCK_D, BLOCK_DV)
    return score_mods_config(cfg, max(BLOCK_D, BLOCK_DV), "fwd", fp32) if score_mods else cfg


def prune_bwd_configs(BLOCK_D, BLOCK_DV, fp32, arch=90, score_mods=False):
    """(dK/dV config, dQ config) for padded head widths, float32 inputs?, the compute
    capability and per-element score modifiers?"""
    kv_table = BWD_DKDV_CONFIGS_FP32 if fp32 else BWD_DKDV_CONFIGS
    q_table = BWD_DQ_CONFIGS_FP32 if fp32 else BWD_DQ_CONFIGS
    dkdv = _with_dc(next(c for pred, c in kv_table if pred(BLOCK_D, BLOCK_DV, arch)), BLOCK_D, BLOCK_DV)
    dq = _with_dc(next(c for pred, c in q_table if pred(BLOCK_D, BLOCK_DV, arch)), BLOCK_D, BLOCK_DV)
    if score_mods:
        width = max(BLOCK_D, BLOCK_DV)
        return score_mods_config(dkdv, width, "dkdv", fp32), score_mods_config(dq, width, "dq", fp32)
    return dkdv, dq
