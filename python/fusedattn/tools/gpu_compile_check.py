"""Ahead-of-time compile check of every Triton kernel variant the triton backend can launch.

No GPU is needed: each (kernel, configuration, dtype, constexpr variant) that the launchers in
``fusedattn.backends.triton_backend`` can pick on an architecture is compiled with
``triton.compile`` for that CUDA architecture; resources and SASS are read from the cubin with
the ``cuobjdump`` shipped in the triton wheel.

Command line::

    python -m fusedattn.tools.gpu_compile_check --arch 80 90 [--quick] [--jobs N] [--only NAME ...]
        [--json PATH] [--sass-dir DIR]

prints one row per compile and exits non-zero on a compile error, any spill (STACK or LOCAL > 0), more than
255 registers, or shared memory above the arch limit (sm_80: 163 KB, sm_90: 227 KB per block). ``--quick``:
fp16 and fp32, head widths 64 and 256. ``--sass-dir`` writes one ``.sass`` file per compile; ``--json``
writes the rows with exactly the fields of ``JSON_FIELDS``:

- ``kernel``, ``arch``, ``dtype`` ("fp16" | "bf16" | "fp32"), ``variant`` ("", "decode",
  "decode-split"; "+hdmask" for the dot kernels' head-dim-masked form; "+mods", "+window",
  "+softcap", "+rel", "+alibi" for score modifiers, see ``variants``), ``config`` (the
  constexprs and ``num_warps``/``num_stages``/``maxnreg``), ``head_dim`` (BLOCK_D for dot
  kernels; for additive kernels the A over which the per-tile work is amortized: 128),
- ``regs``, ``spill_bytes`` (stack + local), ``shared`` (bytes of dynamic shared memory),
  ``ctas_per_sm`` (resident CTAs by registers, threads and shared memory),
- ``instr_per_elem_loop``, ``overhead_instr_per_tile``, ``instr_per_elem_amortized``, ``mufu_per_elem``:
  per score element (a pair for dot kernels, a triple for additive ones) per thread; see ``amortized``,
- ``global_loads``: global load instructions by width in the whole SASS (``2B``, ``4B``,
  ``8B``, ``16B``; ``cp.async`` = LDGSTS; ``tma`` = UTMALDG/UBLKCP),
- ``sass`` (the file name under ``--sass-dir``) and ``error`` (None or the compile error).

Each kernel is compiled with the one specialization the launchers produce (the launch contract in
``fusedattn.kernels.common``): pointers 16-byte aligned and strides divisible by 16 (the launcher copies
other inputs into padded buffers), unit last strides as constants, size arguments unspecialized
(``do_not_specialize``; a kernel that lacks it is reported as a problem, because Triton would then compile
variants this check never saw). The process must not have ``TRITON_INTERPRET=1`` when the kernels are
imported; ``compile_rows`` re-runs itself in a clean subprocess if it has.

Python API (for benchmarks / GPU models)::

    from fusedattn.tools.gpu_compile_check import compile_rows
    rows = compile_rows(archs=(80, 90), quick=False, jobs=2)

returns the full rows: the JSON fields plus ``stack``, ``local``, ``shared_static``, ``mufu`` ({kind: count}
over the whole SASS), ``loops`` (one dict per innermost SASS loop that issues MUFU instructions: ``instr``,
``mufu``, ``span`` and ``parent`` (addresses of the loop and of its enclosing loop), ``kind``, ``elems``,
``instr_per_elem``, ``mufu_per_elem``) and ``problems``.

Loop kinds: for additive kernels the score loop over ``a`` issues exactly one reciprocal per triple by
construction, so a loop's unroll is inferred as round(RCP in body / (tile elements per thread)), except in
the main loop of a config with ``SOFT_RCP = k``, where one column in k takes its reciprocal on the FMA
pipes: there a body with (k - 1) n MUFU reciprocals per thread element covers k n columns. "direct" (it
issues EX2: the direct-tanh path), "mixed" (fewer than one RCP per triple), "fast" (one RCP per triple); the
additive decode kernel's row loops: one row's (BLOCK_N, BLOCK_A) triples per trip, "fast" or "direct"; dot
kernels' loops are "softmax", one pass per key (or query) tile.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ARCH_SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MAX_REGS = 255
DTYPES = ("fp16", "bf16", "fp32")
WIDTHS = (16, 32, 64, 128, 256)
QUICK_DTYPES = ("fp16", "fp32")
QUICK_WIDTHS = (64, 256)
ADDITIVE_A = 128  # additive rows: the A (features) the per-tile overhead is amortized over
SM_LIMITS = {80: dict(smem=164 * 1024, regs=65536, threads=2048, ctas=32),
             90: dict(smem=228 * 1024, regs=65536, threads=2048, ctas=32)}
JSON_FIELDS = ("kernel", "arch", "dtype", "variant", "config", "head_dim", "regs", "spill_bytes", "shared",
               "ctas_per_sm", "instr_per_elem_loop", "overhead_instr_per_tile", "instr_per_elem_amortized",
               "mufu_per_elem", "global_loads", "sass", "error")

# pointer arguments that are always float32 / int32 (everything else is in the input dtype)
_FP32_PTRS = {"W", "EQ", "EK", "QMAX", "KMAX", "LSE", "Delta", "DKT", "DQT", "DWT", "ET", "XMAX",
              "OP", "LSEP", "DPS", "RN", "REL", "SLOPES", "DREL", "SKEW"}
_FP32_SCALARS = {"scale", "softcap_k", "softcap"}
_FP32_PTRS_BY_KERNEL = {"_attn_bwd_dkdv_additive": {"DV"}}
_I32_PTRS = {"KLEN", "XLEN"}
# unit strides: the launchers make the last dimension contiguous, and Triton specializes an
# integer argument equal to 1 as a constant, so this is the variant that runs
_UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dod", "stride_dvd",
                 "stride_dkd", "stride_dqd", "stride_xd", "stride_pd", "stride_wa", "stride_lm",
                 "stride_lsem"}


def _kernels():
    from fusedattn.kernels import additive, additive_bwd, additive_decode, common, dot
    return additive, dot, common, additive_bwd, additive_decode


def _FWD_VARIANTS(dt):
    """(variant, decode?, Out dtype): decode splits write float32 partials; a differentiable 16-bit
    call keeps the output in float32 ("o32"; decode steps then run the "decode-split" signature)."""
    o32 = (("o32", False, "fp32"),) if dt != "fp32" else ()
    return (("", False, dt), ("decode", True, dt), ("decode-split", True, "fp32")) + o32


# score-modifier flags (constexprs of the main kernels); "+mods" turns every one on
NO_MODS = dict(WINDOW=False, BIAS=0)
ALL_MODS = dict(WINDOW=True, BIAS=3)
SINGLE_MODS = {"window": dict(WINDOW=True), "rel": dict(BIAS=1), "alibi": dict(BIAS=2)}
SINGLE_MODS_DTYPES = ("fp16",)  # the single-flag variants: fp16, widths 64 and 128
SINGLE_MODS_WIDTHS = (64, 128)
ADDITIVE_BWD_NO_MODS = dict(WINDOW=False, ALIBI=False, REL_BIAS=False)  # flags of kernels/additive_bwd.py
ADDITIVE_BWD_SINGLES = {"window": "WINDOW", "alibi": "ALIBI", "rel": "REL_BIAS"}
DOT_KIND = {"_attn_fwd_dot": "fwd", "_attn_bwd_dkdv_dot": "dkdv", "_attn_bwd_dq_dot": "dq"}


def variants(quick: bool = False, arch: int = 90) -> list[dict]:
    """Every (kernel, dtype, constexpr/config) variant the launchers can pick on ``arch``.
    Dot kernels come in two head-dim variants: EVEN (D == BLOCK_D and Dv == BLOCK_DV: no
    head-dim masks) and masked (variant suffix "+hdmask"); additive kernels mask V and dO
    loads per tile (8-element masks) and have one.

    Score modifiers: each main kernel (forward, dK/dV, dQ of both scores) is compiled for every
    configuration without modifiers and with all of them on (suffix "+mods": WINDOW, BIAS = 3
    (rel_bias and ALiBi), and SOFTCAP for dot). A launch with only some flags on runs a subset of
    that code: each flag adds its own code under a constexpr ``if`` (loop bounds and masks for
    WINDOW; per-element score terms for SOFTCAP and BIAS; the rel_bias gradient's diagonal sums in
    the dot dQ kernel and the additive dK/dV kernel) and no flag changes another's code or the
    configuration, so "+mods" is the superset of every path and of the live values, which is what
    the register and spill limits bound. The single-flag variants ("+window", "+softcap", "+rel",
    "+alibi") are compiled for fp16 at head widths 64 and 128 (additive forward: Dv 64 and 128;
    additive backward, flags WINDOW / ALIBI / REL_BIAS: padded A 64 and 128), EVEN, not decode,
    where their per-element figures are reported against the base rows."""
    from fusedattn.backends.triton_backend import delta_shape, delta_warps

    additive, dot, _, additive_bwd, additive_decode = _kernels()
    dtypes = QUICK_DTYPES if quick else DTYPES
    widths = QUICK_WIDTHS if quick else WIDTHS
    out = []

    def add(kernel, dtype, variant, cfg, tile=None, score="", out_dtype=None, head_dim=None):
        cfg = dict(cfg)
        out.append(dict(kernel=kernel, dtype=dtype, variant=variant, config=cfg, tile=tile,
                        score=score, out_dtype=out_dtype or dtype, head_dim=head_dim))

    def add_mods(kernel, dtype, variant, cfg, tile, score, out_dtype, head_dim, width):
        """the kernel without modifiers, with all of them, and (fp16, widths 64/128) each alone;
        dot kernels with per-element score modifiers run ``dot.score_mods_config``"""
        dot_flags = dict(SOFTCAP=False) if score == "dot" else {}
        add(kernel, dtype, variant, dict(cfg, **NO_MODS, **dot_flags), tile, score, out_dtype, head_dim)

        def mod_cfg(flags):
            c = dict(cfg, **{**NO_MODS, **dot_flags, **flags})
            if score == "dot" and (c["BIAS"] or c["SOFTCAP"]):
                c = dot.score_mods_config(c, c["BLOCK_D"], DOT_KIND[kernel], dtype == "fp32")
            t = (c["BLOCK_N"], c["BLOCK_M"]) if "dkdv" in kernel else (c["BLOCK_M"], c["BLOCK_N"])
            return c, t

        every = dict(ALL_MODS, **({"SOFTCAP": True} if score == "dot" else {}))
        add(kernel, dtype, variant + "+mods", *mod_cfg(every), score, out_dtype, head_dim)
        if dtype in SINGLE_MODS_DTYPES and width in SINGLE_MODS_WIDTHS and variant == "":
            singles = dict(SINGLE_MODS, **({"softcap": dict(SOFTCAP=True)} if score == "dot" else {}))
            for name, flags in singles.items():
                add(kernel, dtype, f"{variant}+{name}", *mod_cfg(flags), score, out_dtype, head_dim)

    for dt in dtypes:
        prec = "tf32x3" if dt == "fp32" else "tf32"
        # -- prologue / epilogue kernels --
        for ba in (8, 16, 32, 64) if not quick else (64,):
            add("_attn_exp_table", dt, "", dict(BLOCK_L=64, BLOCK_A=ba, num_warps=4, num_stages=1))
        add("_bwd_exp_table", dt, "", dict(XB=additive_bwd.XB, BLOCK_A=64, num_warps=4, num_stages=1))
        for bdv in widths:
            # delta: the chunk of the dot dQ kernel at this width, and the additive Dv chunks
            _, dq_cfg = dot.prune_bwd_configs(bdv, bdv, dt == "fp32", arch)
            chunks = [dq_cfg["BLOCK_DC"]] + ([bdv] if bdv in ((32,) if dt == "fp32" else (32, 64)) else [])
            for chunk in chunks:
                # O32: O is the forward's float32 output (16-bit dO), see kernels.common
                for o32 in (False, True) if dt != "fp32" else (False,):
                    add("_attn_bwd_preprocess", dt, "+o32" if o32 else "",
                        dict(delta_shape(dq_cfg, bdv, chunk, dt == "fp32"), DOT_PRECISION=prec, O32=o32,
                             num_warps=delta_warps(o32), num_stages=1, maxnreg=255),
                        head_dim=bdv)
            add("_attn_fwd_merge", dt, "", dict(BLOCK_DV=bdv, num_warps=1, num_stages=1), head_dim=bdv)
        # -- additive (the backward walks Dv in chunks of at most 64 columns); head_dim is the A
        #    the per-tile overhead is amortized over --
        for bdv in widths:
            for variant, decode, odt in _FWD_VARIANTS(dt):
                if variant == "decode-split" and dt == "fp32":
                    continue  # same signature as "decode"
                cfg = additive.prune_fwd_config(bdv, dt == "fp32", decode)
                cfg.update(BLOCK_DV=bdv, FAST_RCP=True, DOT_PRECISION=prec)
                add_mods("_attn_fwd_additive", dt, variant, cfg, (cfg["BLOCK_M"], cfg["BLOCK_N"]), "additive",
                         odt, ADDITIVE_A, bdv)
        for bw in widths:  # additive decode: one width for A and Dv; elements: (row, key, feature)
            for var, _, odt in _FWD_VARIANTS(dt)[1:2 if dt == "fp32" else 3]:
                c = dict(additive_decode.dec_config(bw, dt == "fp32"), FAST_RCP=True, DOT_PRECISION=prec)
                add("_attn_fwd_additive_decode", dt, var, c, (c["BLOCK_N"], bw), "additive-decode", odt, bw)
        # additive backward: one layout per padded A (features per thread, threads per row); Dv is
        # walked in chunks of the config's BLOCK_DV columns. Without modifiers, "+mods" (a left
        # window edge, ALiBi and rel_bias: every flag of these kernels) and, for fp16 at A = 64
        # and 128, each flag alone
        for ba in widths:
            flag_sets = {"": {}, "+mods": dict(WINDOW=True, ALIBI=True, REL_BIAS=True)}
            if dt in SINGLE_MODS_DTYPES and ba in SINGLE_MODS_WIDTHS:
                flag_sets.update({f"+{n}": {f: True} for n, f in ADDITIVE_BWD_SINGLES.items()})
            for sfx, on in flag_sets.items():
                cfg = additive_bwd.bwd_config(ba, dt == "fp32", rel_bias=on.get("REL_BIAS", False))
                cfg.update(FAST_RCP=True, DOT_PRECISION=prec, **{**ADDITIVE_BWD_NO_MODS, **on})
                for kern in ("_attn_bwd_dkdv_additive", "_attn_bwd_dq_additive"):
                    add(kern, dt, sfx, cfg, (cfg["AS"], cfg["XB"]), "additive-bwd", None, ba)
        # -- dot (the launcher pads D and Dv to one width: BLOCK_D == BLOCK_DV) --
        for bd in widths:
            for even in (True, False):
                sfx = "" if even else "+hdmask"
                for variant, decode, odt in _FWD_VARIANTS(dt):
                    cfg = dot.prune_fwd_config(bd, bd, dt == "fp32", decode, arch)
                    cfg.update(BLOCK_D=bd, BLOCK_DV=bd, EVEN=even, DOT_PRECISION=prec)
                    add_mods("_attn_fwd_dot", dt, variant + sfx, cfg, (cfg["BLOCK_M"], cfg["BLOCK_N"]), "dot",
                             odt, bd, bd if even else 0)
                kv, q = dot.prune_bwd_configs(bd, bd, dt == "fp32", arch)
                kv.update(BLOCK_D=bd, BLOCK_DV=bd, EVEN=even, DOT_PRECISION=prec)
                q.update(BLOCK_D=bd, BLOCK_DV=bd, EVEN=even, DOT_PRECISION=prec)
                add_mods("_attn_bwd_dkdv_dot", dt, sfx, kv, (kv["BLOCK_N"], kv["BLOCK_M"]), "dot", None, bd,
                         bd if even else 0)
                add_mods("_attn_bwd_dq_dot", dt, sfx, q, (q["BLOCK_M"], q["BLOCK_N"]), "dot", None, bd,
                         bd if even else 0)
    # drop exact duplicates (e.g. a decode config equal to the regular one)
    seen, unique = set(), []
    for v in out:
        key = (v["kernel"], v["dtype"], v["out_dtype"], tuple(sorted(v["config"].items())))
        if key not in seen:
            seen.add(key)
            unique.append(v)
    return unique


def selected(kernel: str, only) -> bool:
    """``--only``: keep a kernel whose name or module (``additive``, ``additive_bwd``, ``common``,
    ``dot``) contains one of the substrings."""
    if not only:
        return True
    module = _find_fn(kernel).fn.__module__.rsplit(".", 1)[-1]  # where it is defined
    return any(o in kernel or o in module for o in only)


def _find_fn(name):
    for mod in _kernels():
        if hasattr(mod, name):
            return getattr(mod, name)
    raise KeyError(name)


def _signature(fn, v):
    """(signature, attrs) of the launch contract; raises ValueError for a size argument that
    Triton would specialize."""
    from fusedattn.kernels.common import SIZE_ARGS
    cfg = v["config"]
    sig, attrs = {}, {}
    for idx, name in enumerate(fn.arg_names):
        if name in SIZE_ARGS and not fn.params[idx].do_not_specialize:
            raise ValueError(f"size argument {name} is specialized (add it to do_not_specialize)")
        if name in cfg or name in _UNIT_STRIDES:
            sig[name] = "constexpr"
        elif name in _FP32_SCALARS:
            sig[name] = "fp32"
        elif name[0].isupper() and name not in SIZE_ARGS:
            if name in _FP32_PTRS or name in _FP32_PTRS_BY_KERNEL.get(v["kernel"], ()):
                sig[name] = "*fp32"
            elif name in _I32_PTRS:
                sig[name] = "*i32"
            elif name == "Out":
                sig[name] = "*" + v["out_dtype"]
            elif name == "O" and cfg.get("O32"):
                sig[name] = "*fp32"
            else:
                sig[name] = "*" + v["dtype"]
            attrs[(idx,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(idx,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _cuobjdump():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _parse_sass(sass: str):
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    return ins


def _spans(ins):
    """(start, end) address spans of all loops (backward branches)."""
    spans = set()
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr:
            spans.add((int(m.group(1), 16), addr))
    return sorted(spans)


def _loops(ins, trips: int = 1):
    """Innermost loops that contain MUFU instructions, each with the span of its enclosing loop
    (``parent``, None at top level). With ``trips`` > 1 (dot kernels whose products run over
    BLOCK_D / BLOCK_DC head-dim chunks in a runtime loop), a loop that issues MUFU outside its
    nested loops also counts when those nested loops issue none (the chunk loops): its ``instr``
    is its own instructions plus each nested loop's body times ``trips`` (an upper bound: a
    rotated loop runs its body trips - 1 times after a peeled first pass), ``nested`` their
    count."""
    spans = _spans(ins)

    def inside(s, o):
        return o != s and s[0] <= o[0] and o[1] <= s[1]

    res = []
    for lo, hi in spans:
        kids = [o for o in spans if inside((lo, hi), o)]
        top = [o for o in kids if not any(inside(k, o) for k in kids)]
        if kids and trips <= 1:
            continue
        body = [t for a, t in ins if lo <= a <= hi]
        own = [t for a, t in ins if lo <= a <= hi and not any(k[0] <= a <= k[1] for k in top)]
        mufu = collections.Counter(m for t in own for m in re.findall(r"MUFU\.(\w+)", t))
        if not mufu or any(re.search(r"MUFU\.", t) for a, t in ins if any(k[0] <= a <= k[1] for k in top)):
            continue
        instr = len(own) + trips * (len(body) - len(own))
        outer = [o for o in spans if inside(o, (lo, hi))]
        parent = min(outer, key=lambda o: o[1] - o[0]) if outer else None
        row = dict(instr=instr, mufu=dict(mufu), span=(lo, hi), parent=parent)
        if kids:
            row["nested"] = len(top)
        res.append(row)
    return res


def global_loads(ins) -> dict:
    """Global loads by width: 2B/4B/8B/16B (LDG), cp.async (LDGSTS) and TMA (UTMALDG, UBLKCP)."""
    counts = dict.fromkeys(("1B", "2B", "4B", "8B", "16B", "cp.async", "tma"), 0)
    for _, text in ins:
        mnem = text.split()[1] if text.startswith("@") and len(text.split()) > 1 else text.split()[0]
        parts = mnem.split(".")
        if parts[0] == "LDG":
            kinds = set(parts)
            width = ("16B" if "128" in kinds else "8B" if "64" in kinds else "2B" if {"U16", "S16"} & kinds
                     else "1B" if {"U8", "S8"} & kinds else "4B")
            counts[width] += 1
        elif parts[0] == "LDGSTS":
            counts["cp.async"] += 1
        elif parts[0] in ("UTMALDG", "UBLKCP"):
            counts["tma"] += 1
    if not counts["1B"]:
        del counts["1B"]
    return counts


def ctas_per_sm(arch: int, regs: int, threads: int, shared: int) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 256), threads and
    shared memory (1 KB reserved per CTA)."""
    lim = SM_LIMITS.get(arch, SM_LIMITS[90])
    warps = threads // 32
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (per_warp * warps)
    by_smem = lim["smem"] // (shared + 1024)
    return max(0, min(by_regs, lim["threads"] // threads, by_smem, lim["ctas"]))


def amortized(v: dict, loops: list, ins) -> dict:
    """Per score element (pair for dot, triple for additive) figures of a tiled kernel.

    Dot: the innermost MUFU loop is the key-tile (or query-tile) loop, one pass per tile (or per
    ``unroll`` tiles, from its EX2 count): the loop figure is the unmasked loop (the one with the
    fewest instructions per pair; the masked copy runs only on diagonal and tail tiles) and there
    is no further per-tile overhead.
    Additive: the innermost MUFU loops walk the A columns inside the tile loop; a "mixed" loop
    covers A - A % SOFT_RCP columns and the "fast" loop right after it the rest, any other
    non-direct loop all A columns. The per-tile overhead is every instruction of the enclosing
    tile loop outside its MUFU loops (softmax, P @ V, dP, masks, the other path's glue). The
    direct-tanh loops (fallback for |x| > 40) are left out."""
    if v["score"] in ("additive-bwd", "additive-decode"):
        return _amortized_steps(v, loops, ins, v["score"] == "additive-decode")
    per_thread = v["tile"][0] * v["tile"][1] / (32 * v["config"]["num_warps"])
    used = [lp for lp in loops if "instr_per_elem" in lp]
    if not used:
        return dict(instr_per_elem_loop=None, overhead_instr_per_tile=None, instr_per_elem_amortized=None,
                    mufu_per_elem=None)
    if v["score"] == "dot":
        pairs = [lp for lp in used if lp["kind"] == "softmax"]
        if not pairs:
            return dict(instr_per_elem_loop=None, overhead_instr_per_tile=None, instr_per_elem_amortized=None,
                        mufu_per_elem=None)
        lp = min(pairs, key=lambda x: x["instr"] / x["elems"])
        mufu = round(sum(lp["mufu"].values()) / lp["elems"], 3)
        ipe = round(lp["instr"] / lp["elems"], 2)
        return dict(instr_per_elem_loop=ipe, overhead_instr_per_tile=0, instr_per_elem_amortized=ipe,
                    mufu_per_elem=mufu)
    A = v["head_dim"]
    k = v["config"].get("SOFT_RCP", 0)
    first = next((lp for lp in used if lp["kind"] != "direct"), None)
    if first is None:
        return dict(instr_per_elem_loop=None, overhead_instr_per_tile=None, instr_per_elem_amortized=None,
                    mufu_per_elem=None)
    parent = first["parent"]
    instr = mufu = 0.0
    prev = None
    for lp in used:
        if lp["parent"] != parent or lp["kind"] == "direct":
            prev = lp["kind"]
            continue
        cols = (A - A % k if lp["kind"] == "mixed" else A % k if (lp["kind"] == "fast" and prev == "mixed")
                else A)
        unroll = lp["elems"] / per_thread
        instr += lp["instr"] / unroll * cols
        mufu += sum(lp["mufu"].values()) / unroll * cols
        prev = lp["kind"]
    overhead, over_mufu = 0, 0
    if parent is not None:
        inner = [lp["span"] for lp in loops if lp["parent"] == parent]
        for a, t in ins:
            if parent[0] <= a <= parent[1] and not any(lo <= a <= hi for lo, hi in inner):
                overhead += 1
                over_mufu += len(re.findall(r"MUFU\.", t))
    elems = A * per_thread
    return dict(instr_per_elem_loop=round(instr / elems, 2), overhead_instr_per_tile=overhead,
                instr_per_elem_amortized=round((instr + overhead) / elems, 2),
                mufu_per_elem=round((mufu + over_mufu) / elems, 3))


def _amortized_steps(v: dict, loops: list, ins, decode: bool = False) -> dict:
    """The additive backward (``kernels.additive_bwd``): each thread walks the other index one
    step at a time, AS triples per step (tile = (AS, XB)); the loop figure is the fast step
    loop per triple, the per-tile overhead every instruction of the enclosing block loop (XB
    steps: the dP product, scratch, barriers, dV) outside its step loops. ``decode``: a step is one row."""
    AS, XB = v["tile"]
    AS, XB = (AS * XB / (32 * v["config"]["num_warps"]), 1) if decode else (AS, XB)  # decode: per thread
    fast = [lp for lp in loops if lp.get("kind") == "fast"]
    if not fast:
        return dict(instr_per_elem_loop=None, overhead_instr_per_tile=None, instr_per_elem_amortized=None,
                    mufu_per_elem=None)
    lp = min(fast, key=lambda x: x["instr"] / x["elems"])
    steps = lp["elems"] / AS
    instr, mufu = lp["instr"] / steps * XB, sum(lp["mufu"].values()) / steps * XB
    overhead, over_mufu = 0, 0
    if lp["parent"] is not None:
        inner = [x["span"] for x in loops if x["parent"] == lp["parent"]]
        inner += [sp for sp in _spans(ins) if sp != lp["parent"] and lp["parent"][0] <= sp[0]
                  and sp[1] <= lp["parent"][1]]
        for a, t in ins:
            if lp["parent"][0] <= a <= lp["parent"][1] and not any(lo <= a <= hi for lo, hi in inner):
                overhead += 1
                over_mufu += len(re.findall(r"MUFU\.", t))
    elems = AS * XB
    return dict(instr_per_elem_loop=round(lp["instr"] / lp["elems"], 2), overhead_instr_per_tile=overhead,
                instr_per_elem_amortized=round((instr + overhead) / elems, 2),
                mufu_per_elem=round((mufu + over_mufu) / elems, 3))


def sass_name(v: dict, arch: int) -> str:
    cfg = _fmt_cfg(v["config"]).replace(",", "_")
    variant = (v["variant"] or "main").replace("+", "_")
    return f"{v['kernel']}-sm{arch}-{v['dtype']}-{variant}-{cfg}.sass"


def compile_one(v: dict, arch: int, sass_dir: str | None = None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _find_fn(v["kernel"])
    cfg = dict(v["config"])
    from fusedattn.backends.triton_backend import LAUNCH_OPTS
    opts = dict(LAUNCH_OPTS, num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    if "maxnreg" in cfg:
        opts["maxnreg"] = cfg.pop("maxnreg")
    row = dict(kernel=v["kernel"], arch=arch, dtype=v["dtype"], variant=v["variant"],
               config=dict(v["config"]), head_dim=v.get("head_dim"), error=None, regs=None, stack=None,
               local=None, spill_bytes=None, shared=None, shared_static=None, ctas_per_sm=None, mufu={},
               loops=[], instr_per_elem_loop=None, overhead_instr_per_tile=None,
               instr_per_elem_amortized=None, mufu_per_elem=None, global_loads={}, sass=None, problems=[])
    try:
        sig, attrs = _signature(fn, v)
        consts = dict(cfg, **{n: 1 for n in fn.arg_names if n in _UNIT_STRIDES})
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    except Exception as e:  # a compile error is a result, reported in the row
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        row["problems"].append("compile error")
        return row
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(c.asm["cubin"])
        res = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True).stdout
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
        row["sass"] = sass_name(v, arch)
        with open(os.path.join(sass_dir, row["sass"]), "w") as f:
            f.write(sass)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    row["regs"], row["stack"], row["shared_static"], row["local"] = (int(x) for x in m.groups())
    row["spill_bytes"] = row["stack"] + row["local"]
    row["shared"] = int(c.metadata.shared)
    threads = 32 * opts["num_warps"]
    row["ctas_per_sm"] = ctas_per_sm(arch, row["regs"], threads, row["shared"] + row["shared_static"])
    ins = _parse_sass(sass)
    row["global_loads"] = global_loads(ins)
    row["mufu"] = dict(collections.Counter(m for _, t in ins for m in re.findall(r"MUFU\.(\w+)", t)))
    if v["tile"]:
        per_thread = v["tile"][0] * v["tile"][1] / threads
        cfg = v["config"]
        trips = cfg["BLOCK_D"] // cfg["BLOCK_DC"] if v["score"] == "dot" and cfg.get("BLOCK_DC") else 1
        for lp in _loops(ins, trips):
            unroll, kind = 1, "softmax"
            if v["score"] == "additive-bwd" and lp["mufu"].get("RCP"):
                # one step (other index) per AS reciprocals per thread; the direct path also
                # issues AS EX2 per step
                unroll = max(1, round(lp["mufu"]["RCP"] / v["config"]["AS"])) * v["config"]["AS"] / per_thread
                kind = "direct" if lp["mufu"].get("EX2", 0) >= lp["mufu"]["RCP"] else "fast"
            elif v["score"] == "additive-decode" and lp["mufu"].get("RCP"):  # one row per trip
                unroll = max(1, round(lp["mufu"]["RCP"] / per_thread))  # fewer RCPs: not a row loop
                kind = "other" if lp["mufu"]["RCP"] < 0.9 * per_thread else "direct" if lp["mufu"].get(
                    "EX2", 0) >= unroll * per_thread else "fast"
            elif v["score"] == "additive" and lp["mufu"].get("RCP"):
                n = max(1, round(lp["mufu"]["RCP"] / per_thread))
                k = v["config"].get("SOFT_RCP", 0)
                kind = "direct" if lp["mufu"].get("EX2") else "fast"
                if kind == "fast" and k > 2 and n % (k - 1) == 0:
                    unroll, kind = n * k / (k - 1), "mixed"
                else:
                    unroll = n
            elif v["score"] == "dot":
                # a key-tile (query-tile) loop issues one EX2 per pair (with SOFTCAP exactly one
                # RCP per pair, the cap's) and ptxas may unroll it; a MUFU loop with fewer is not
                # a tile loop (e.g. a loop nested in the tile loop) and is reported as "other"
                soft = v["config"].get("SOFTCAP")
                n = lp["mufu"].get("RCP" if soft else "EX2", 0) / per_thread
                if n < 0.9:
                    kind = "other"
                else:
                    unroll = max(1, round(n))
            elems = per_thread * unroll
            lp["kind"] = kind
            lp.update(elems=elems, instr_per_elem=round(lp["instr"] / elems, 2),
                      mufu_per_elem={k: round(n / elems, 3) for k, n in lp["mufu"].items()})
            row["loops"].append(lp)
        row.update(amortized(v, row["loops"], ins))
    if row["spill_bytes"]:
        row["problems"].append(f"spill (STACK={row['stack']}, LOCAL={row['local']})")
    if row["regs"] > MAX_REGS:
        row["problems"].append(f"{row['regs']} registers > {MAX_REGS}")
    limit = ARCH_SHARED_LIMIT.get(arch, 227 * 1024)
    if row["shared"] + row["shared_static"] > limit:
        row["problems"].append(f"shared {row['shared'] + row['shared_static']} B > {limit} B")
    return row


def _task(args):
    return compile_one(*args)


def json_row(r: dict) -> dict:
    """A row reduced to the documented JSON fields (``JSON_FIELDS``)."""
    return {k: r.get(k) for k in JSON_FIELDS}


def compile_rows(archs=(80, 90), quick: bool = False, jobs: int = 2, only=None) -> list[dict]:
    """Compile every variant for every arch; returns the rows described in the module docstring.
    ``only``: optional list of substrings; keep the kernels whose name or module contains one of
    them (``selected``)."""
    from fusedattn.kernels import additive
    if type(additive._attn_fwd_additive).__name__ == "InterpretedFunction":
        # kernels were decorated for the interpreter: redo the work in a clean process
        env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "rows.json")
            cmd = [sys.executable, "-m", "fusedattn.tools.gpu_compile_check", "--arch",
                   *map(str, archs), "--jobs", str(jobs), "--json-full", path, "--no-print"]
            if quick:
                cmd.append("--quick")
            if only:
                cmd += ["--only", *only]
            subprocess.run(cmd, env=env, check=False)
            with open(path) as f:
                return json.load(f)
    return list(iter_rows(archs, quick, jobs, only))


def iter_rows(archs=(80, 90), quick: bool = False, jobs: int = 2, only=None, sass_dir=None):
    """Like ``compile_rows`` (in a process without TRITON_INTERPRET), yielding rows in order."""
    tasks = [(v, arch, sass_dir) for arch in archs for v in variants(quick, arch)
             if selected(v["kernel"], only)]
    if jobs <= 1:
        for t in tasks:
            yield compile_one(*t)
        return
    import multiprocessing as mp
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as ex:
        yield from ex.map(_task, tasks)


def _fmt_cfg(cfg):
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_D": "D", "BLOCK_DV": "DV", "BLOCK_DC": "DC",
             "BLOCK_L": "L", "BLOCK_A": "A", "ROWS": "R", "COLS": "C", "CHUNK": "K", "num_warps": "w",
             "num_stages": "s", "maxnreg": "r", "S": "S", "BLOCK": "B", "XB": "X"}
    return ",".join(f"{short[k]}{v}" for k, v in cfg.items() if k in short)


def format_row(r: dict) -> str:
    head = f"{r['kernel']:<24} sm_{r['arch']} {r['dtype']:<4} {r['variant']:<19} {_fmt_cfg(r['config']):<30}"
    if r["error"]:
        return f"{head} ERROR {r['error'].splitlines()[0][:80]}"
    loads = " ".join(f"{k}:{n}" for k, n in r["global_loads"].items() if n)
    per = ""
    if r.get("instr_per_elem_amortized") is not None:
        per = (f" loop {r['instr_per_elem_loop']} +tile {r['overhead_instr_per_tile']} = "
               f"{r['instr_per_elem_amortized']} instr, {r['mufu_per_elem']} MUFU /elem")
    flag = "" if not r["problems"] else "  <-- " + "; ".join(r["problems"])
    return (f"{head} REG {r['regs']:>3} SPILL {r['spill_bytes']} SHARED {r['shared']:>6} "
            f"CTA/SM {r['ctas_per_sm']}{per} LDG[{loads}]{flag}")


def summarize(rows: list[dict]) -> list[str]:
    """One line per kernel: compiles, max registers, spills, max shared memory, and the range of
    instructions and MUFU operations per score element over the MUFU loops of all compiles, per
    loop kind (see the module docstring)."""
    by_kernel = collections.defaultdict(list)
    for r in rows:
        by_kernel[r["kernel"]].append(r)
    lines = []
    for kernel, rs in by_kernel.items():
        ok = [r for r in rs if not r["error"]]
        if not ok:
            lines.append(f"{kernel:<26} {len(rs)} compiles, all failed")
            continue
        spills = sum(1 for r in ok if r["stack"] or r["local"])
        loops = collections.defaultdict(list)  # loop kind -> [(instr/elem, {MUFU op: per elem})]
        for r in ok:
            for lp in r["loops"]:
                if "instr_per_elem" in lp:
                    loops[lp["kind"]].append((lp["instr_per_elem"], lp["mufu_per_elem"]))
        parts = []
        for i in sorted(loops):
            ipe = [x for x, _ in loops[i]]
            kinds = sorted({k for _, m in loops[i] for k in m})
            per = {k: [m.get(k, 0) for _, m in loops[i]] for k in kinds}
            mufu = " ".join(f"{k} {min(x):g}-{max(x):g}" for k, x in per.items())
            parts.append(f"{i} loops: {min(ipe):g}-{max(ipe):g} instr, {mufu} per elem")
        lines.append(f"{kernel:<26} {len(rs):>3} compiles  max REG {max(r['regs'] for r in ok):>3}  "
                     f"spills {spills}  max SHARED {max(r['shared'] + r['shared_static'] for r in ok):>6}  "
                     + "; ".join(parts))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--quick", action="store_true", help="reduced set for CI")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", default=None, help="write the rows (the documented fields) to this file")
    ap.add_argument("--json-full", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sass-dir", default=None, help="write one .sass file per compiled variant here")
    ap.add_argument("--only", nargs="+", default=None,
                    help="keep the kernels whose name or module (additive, additive_bwd, common, dot) "
                         "contains one of these substrings; no match is an error")
    ap.add_argument("--no-print", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("gpu_compile_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)",
              file=sys.stderr)
        return 2
    if args.only and not any(selected(v["kernel"], args.only) for a in args.arch
                             for v in variants(args.quick, a)):
        print(f"gpu_compile_check: --only {' '.join(args.only)} selects no kernel", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = []
    for r in iter_rows(tuple(args.arch), quick=args.quick, jobs=args.jobs, only=args.only,
                       sass_dir=args.sass_dir):
        rows.append(r)
        if not args.no_print:
            print(format_row(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([json_row(r) for r in rows], f, indent=1)
    if args.json_full:
        with open(args.json_full, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["problems"]]
    if not args.no_print:
        print("\nsummary (per kernel, over every arch, dtype and config):")
        print("\n".join(summarize(rows)))
        print(f"{len(rows)} compiles, {len(bad)} with problems, {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
