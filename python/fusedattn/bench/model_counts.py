"""Per-score-element SASS counts of the Triton kernels on sm_90, for the H100 model.

``load_counts(dtype, shapes)`` compiles (without a GPU, through
``fusedattn.tools.gpu_compile_check.compile_one``) the kernels each benchmarked pass launches,
for sm_90, in the benchmark's dtype and head widths, and returns
``({(score, pass): counts}, note)``. ``counts`` holds ``mufu_per_elem``, ``instr_per_elem``
and ``tensor_flops_per_elem`` (per lane per score element: per (i, j, a) triple for additive
kernels, per (i, j) pair for dot kernels; ``per`` says which) summed over the kernels of the
pass: forward = ``_attn_fwd_*``; forward + backward adds ``_attn_bwd_dkdv_*`` and
``_attn_bwd_dq_*`` (each visits every element once). O(L) prologue/epilogue kernels are left
out.

The per-kernel figures are the compile check's amortized ones (``instr_per_elem_amortized``,
``mufu_per_elem``): the main SASS loop plus the per-tile work around it spread over the tile
(for additive kernels at A = the benchmark's feature width), of the EVEN variant (head dims
equal to the padded block: no head-dim masks). The direct-tanh fallback loops are left out
(see ``gpu_compile_check.amortized``). ``loop_counts`` is the older innermost-loop-only rule,
kept for comparison.

Results are cached under ``~/.cache/fusedattn/`` keyed by the kernel sources, the compile
check and the triton version (the compiles take about a minute). On any failure the counts are
empty and the note says why: the bench then prints no H100 rows.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os

KERNELS = {
    ("additive", "fwd"): ("_attn_fwd_additive",),
    ("additive", "fwd+bwd"): ("_attn_fwd_additive", "_attn_bwd_dkdv_additive", "_attn_bwd_dq_additive"),
    ("dot", "fwd"): ("_attn_fwd_dot",),
    ("dot", "fwd+bwd"): ("_attn_fwd_dot", "_attn_bwd_dkdv_dot", "_attn_bwd_dq_dot"),
}
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ARCH = 90


def _cache_key(dtype: str, shapes: dict) -> str:
    import fusedattn
    from fusedattn.tools import gpu_compile_check
    root = os.path.dirname(os.path.dirname(os.path.abspath(fusedattn.__file__)))
    h = hashlib.sha256()
    kdir = os.path.dirname(os.path.abspath(__import__("fusedattn.kernels", fromlist=["x"]).__file__))
    for path in sorted(glob.glob(os.path.join(kdir, "*.py"))) + [gpu_compile_check.__file__, __file__]:
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(json.dumps([dtype, shapes, importlib.metadata.version("triton"), ARCH, root],
                        sort_keys=True).encode())
    return h.hexdigest()[:20]


def loop_counts(score: str, loops: list[dict]) -> tuple[float, float]:
    """(mufu_per_elem, instr_per_elem) of one kernel from its compile-check loops (rule above)."""
    used = [lp for lp in loops if "instr_per_elem" in lp]
    if score == "additive":
        kept, prev = [], None
        for lp in used:
            kind = lp.get("kind", "direct" if "EX2" in lp["mufu"] else "fast")
            if kind != "direct" and not (kind == "fast" and prev == "mixed"):
                kept.append(lp)
            prev = kind
        used = kept or used
    mufu = sum(sum(lp["mufu_per_elem"].values()) for lp in used)
    instr = sum(lp["instr_per_elem"] for lp in used)
    return mufu, instr


def _compile_counts(dtype: str, shapes: dict) -> dict:
    from fusedattn.tools import gpu_compile_check as gcc

    from .gpu_model import tensor_flops_per_elem
    tdt = TRITON_DTYPE[dtype]
    wanted = {k for ks in KERNELS.values() for k in ks}
    # per kernel: the variant with the head-width tile that serves these shapes: BLOCK_DV equal to
    # Dv rounded up to a power of two, else the widest BLOCK_DV below it (a launcher that loops
    # over Dv in chunks); for dot kernels BLOCK_D must match D too
    best: dict = {}
    for v in gcc.variants(quick=False, arch=ARCH):
        if v["kernel"] not in wanted or v["dtype"] != tdt or v["variant"] != "":
            continue
        score = "additive" if v["kernel"].endswith("additive") else "dot"
        s, cfg = shapes[score], v["config"]
        bdv = cfg.get("BLOCK_DV", 0)
        if v["score"] == "additive-bwd":  # one layout per padded A, Dv in fixed chunks
            if v["head_dim"] != _pow2(s["D"]):
                continue
        elif bdv > _pow2(s["Dv"]) or (score == "dot" and cfg.get("BLOCK_D") not in (None, _pow2(s["D"]))):
            continue
        if v["kernel"] not in best or bdv > best[v["kernel"]][0]:
            best[v["kernel"]] = (bdv, v, score)
    rows = {}
    for name, (_, v, score) in best.items():
        cfg = v["config"]
        s = shapes[score]
        if v["score"] == "additive":
            v = dict(v, head_dim=s["D"])  # amortize the per-tile work over the benchmark's A
        r = gcc.compile_one(v, ARCH)
        if r["error"] or r["instr_per_elem_amortized"] is None:
            why = (r["error"] or "no loop")[:200]
            raise RuntimeError(f"{v['kernel']} failed to compile for sm_{ARCH}: {why}")
        kpass = "fwd" if "_fwd_" in name else "dkdv" if "dkdv" in name else "dq"
        rows[name] = {"mufu_per_elem": r["mufu_per_elem"], "instr_per_elem": r["instr_per_elem_amortized"],
                      "tensor_flops_per_elem": tensor_flops_per_elem(score, kpass, s["D"], s["Dv"], s["D"]),
                      "regs": r["regs"], "ctas_per_sm": r["ctas_per_sm"],
                      "config": {k: cfg[k] for k in cfg if k.startswith(("BLOCK", "num_"))}}
    out = {}
    for (score, pass_), kernels in KERNELS.items():
        missing = [k for k in kernels if k not in rows]
        if missing:
            raise RuntimeError(f"no compile-check variant for {missing} ({tdt}, {shapes[score]})")
        out[f"{score}|{pass_}"] = {
            "mufu_per_elem": round(sum(rows[k]["mufu_per_elem"] for k in kernels), 3),
            "instr_per_elem": round(sum(rows[k]["instr_per_elem"] for k in kernels), 2),
            "tensor_flops_per_elem": round(sum(rows[k]["tensor_flops_per_elem"] for k in kernels), 3),
            "per": "triple" if score == "additive" else "pair",
            "kernels": {k: rows[k] for k in kernels},
            "source": f"gpu_compile_check sm_{ARCH} {tdt} (amortized)"}
    return out


def _pow2(n: int) -> int:
    p = 16
    while p < n:
        p *= 2
    return p


def load_counts(dtype: str = "float32", shapes: dict | None = None) -> tuple[dict, str]:
    from .harness import SHAPES
    shapes = shapes or SHAPES
    if dtype not in TRITON_DTYPE:
        return {}, f"not modeled (no Triton kernels for {dtype})"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return {}, "not modeled (TRITON_INTERPRET=1: the kernels cannot be compiled in this process)"
    try:
        key = _cache_key(dtype, shapes)
        cache = os.path.join(os.path.expanduser("~"), ".cache", "fusedattn", f"h100_counts-{key}.json")
        if os.path.exists(cache):
            with open(cache) as f:
                raw = json.load(f)
        else:
            raw = _compile_counts(dtype, shapes)
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(cache, "w") as f:
                json.dump(raw, f, indent=1)
    except Exception as e:  # noqa: BLE001 - a missing triton or compile check only drops the model rows
        return {}, f"not modeled ({type(e).__name__}: {str(e)[:200]})"
    counts = {tuple(k.split("|")): v for k, v in raw.items()}
    return counts, (f"MODEL: lower bound on an H100 SXM from sm_{ARCH} SASS counts "
                    f"({TRITON_DTYPE[dtype]} kernels), not measured")
