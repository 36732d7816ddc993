"""Derived figures (rates, ratios, % of the machine limit, the H100 model), the table and the plot."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from typing import Optional

import torch

from . import gpu_model
from .harness import BASELINES, esize

# passes over the (query, key, feature) triples that the cheapest fp32-exact fused kernel makes:
# forward computes each once; forward + backward computes once and recomputes once.
TRIPLE_PASSES = {"fwd": 1, "fwd+bwd": 2}
# dot-product FLOPs: 4*Lq*Lk*D forward (2 matmuls), backward 2.5x forward (FlashAttention's count)
FLOP_FACTOR = {"fwd": 1.0, "fwd+bwd": 3.5}


def machine_info(threads: int, repeats: int) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": threads, "logical_cpus": os.cpu_count(),
            "repeats": repeats, "cpu_model": None, "cpu_family_model": None, "cpu_flags": [],
            "mem_total_gib": None, "git_commit": None, "triton": None, "cuda_device": None,
            "cpu_isa": None, "cpu_isa_levels": None}
    try:
        info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        fam = mod = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key, val = key.strip(), val.strip()
                if key == "model name" and info["cpu_model"] is None:
                    info["cpu_model"] = val
                elif key == "cpu family" and fam is None:
                    fam = val
                elif key == "model" and mod is None:
                    mod = val
                elif key == "flags" and not info["cpu_flags"]:
                    info["cpu_flags"] = sorted(set(val.split()) & {"avx", "avx2", "fma", "avx512f",
                                                                   "avx512bw", "avx512vl", "avx512dq",
                                                                   "avx512_bf16", "avx512_fp16",
                                                                   "amx_bf16", "amx_fp16", "f16c"})
        info["cpu_family_model"] = f"{fam}/{mod}"
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        info["git_commit"] = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    try:  # the cpu backend's instruction-set level (FUSEDATTN_CPU_ISA may lower it)
        from ..backends import cpu_backend
        info["cpu_isa"], info["cpu_isa_levels"] = cpu_backend.cpu_isa(), cpu_backend.cpu_isa_levels()
    except (RuntimeError, ValueError) as e:
        info["cpu_isa"] = f"unavailable: {e}"
    return info


def extension_fingerprint() -> dict | None:
    """sha256 (first 12 hex) and mtime of the built C++ extension, to tell if it changed mid-run."""
    import glob
    import hashlib
    from datetime import datetime, timezone
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    libs = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not libs:
        return None
    with open(libs[0], "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    mtime = datetime.fromtimestamp(os.path.getmtime(libs[0]), timezone.utc).isoformat(timespec="seconds")
    return {"file": os.path.basename(libs[0]), "sha256": digest, "mtime_utc": mtime}


def _group_key(r: dict) -> tuple:
    return (r["score"], r["pass"], r["device"], r["dtype"], r["B"], r["H"], r["Hk"], r["Lq"], r["Lk"],
            r["D"], r["Dv"], r["causal"])


def finalize(records: list[dict], limit: Optional[dict]) -> list[dict]:
    """Add elements_per_s, gflops_per_s / triples_per_s, ratios and pct_of_limit in place.

    ``ratio_vs_reference`` = reference time / this time (> 1: faster than the reference);
    ``ratio_vs_best_baseline`` = fastest baseline (reference, chunked, sdpa) that ran in the
    same case / this time. ``pct_of_limit``: additive, triple-passes per second as % of the
    measured additive inner-loop rate (``TRIPLE_PASSES``); dot, GFLOP/s as % of the measured FMA
    peak. None where the input is missing (skipped, no baseline ran, no limit).
    """
    add_lim = (limit or {}).get("additive_triples_per_s")
    fma_lim = (limit or {}).get("fma_gflops")
    groups: dict = {}
    for r in records:
        groups.setdefault(_group_key(r), []).append(r)
    for r in records:
        for k in ("elements_per_s", "triples_per_s", "gflops_per_s", "ratio_vs_reference",
                  "ratio_vs_best_baseline", "pct_of_limit"):
            r.setdefault(k, None)
        t = r.get("time_ms")
        if r.get("skipped") or not t:
            continue
        s = t / 1e3
        r["elements_per_s"] = r["elements"] / s
        modeled = bool(r.get("modeled"))          # an H100 model: no CPU limit, no measured peers
        if r["score"] == "additive":
            r["triples_per_s"] = r["elements"] * r["D"] / s      # (i, j, a) score terms per second
            lim = add_lim
            if r.get("isa"):  # the cpu backend: against the limit of the level it ran at
                lim = ((limit or {}).get("per_isa") or {}).get(r["isa"], {}).get("triples_per_s")
                r["limit_isa"] = r["isa"] if lim else None
            if lim and not modeled:
                r["pct_of_limit"] = 100.0 * r["triples_per_s"] * TRIPLE_PASSES[r["pass"]] / lim
        else:
            flops = 2.0 * r["elements"] * (r["D"] + r["Dv"]) * FLOP_FACTOR[r["pass"]]
            r["gflops_per_s"] = flops / s / 1e9
            if r["device"].startswith("cuda"):
                r["tflops_per_s"] = r["gflops_per_s"] / 1e3
            if fma_lim and not modeled:
                r["pct_of_limit"] = 100.0 * r["gflops_per_s"] / fma_lim
        if modeled:
            continue
        peers = [p for p in groups[_group_key(r)] if not p.get("skipped") and p.get("time_ms")
                 and not p.get("modeled")]
        ref = [p["time_ms"] for p in peers if p["backend"] == "reference"]
        base = [p["time_ms"] for p in peers if p["backend"] in BASELINES]
        if ref:
            r["ratio_vs_reference"] = ref[0] / t
        if base:
            r["ratio_vs_best_baseline"] = min(base) / t
    return records


def model_records(records: list[dict], counts: dict) -> list[dict]:
    """One modeled 'triton (H100 model)' record per distinct (score, pass, shape) with counts.

    ``counts[(score, pass)] = {"mufu_per_elem", "instr_per_elem", "fp32_per_elem" (optional),
    "per": "pair" | "triple", "source"}`` from the sm_90 compile check.
    """
    seen, out = set(), []
    for r in records:
        key = _group_key(r)
        c = counts.get((r["score"], r["pass"]))
        if c is None or key in seen or r.get("modeled"):
            continue
        seen.add(key)
        elems = r["elements"] * (r["D"] if c.get("per") == "triple" else 1)
        nbytes = gpu_model.compulsory_bytes(r["score"], r["pass"], r["B"], r["H"], r["Hk"], r["Lq"],
                                            r["Lk"], r["D"], r["Dv"], esize(r["dtype"]))
        m = gpu_model.lower_bound(elems, c["mufu_per_elem"], c["instr_per_elem"], nbytes,
                                  c.get("fp32_per_elem"), tf32=r["dtype"] == "float32",
                                  tensor_flops_per_elem=c.get("tensor_flops_per_elem"))
        rec = {k: r[k] for k in ("score", "pass", "dtype", "B", "H", "Hk", "Lq", "Lk", "D", "Dv", "A",
                                 "causal", "elements")}
        rec.update({"backend": "triton (H100 model)", "device": "h100-model", "modeled": True,
                    "skipped": None, "time_ms": m["time_s"] * 1e3, "peak_mem_mib": None,
                    "model_bound": m["bound"], "model_bounds_s": m["bounds"], "model_counts": c,
                    "predicted_bytes": None})
        out.append(rec)
    return out


# ---------------------------------------------------------------------------- table


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _isa_note(r: dict) -> str:
    """"; isa avx512" (and "; brgemm-bf16" etc.: how dot products multiply) for cpu-backend records."""
    if not r.get("isa"):
        return ""
    return f"; isa {r['isa']}" + (f"; {r['gemm']}" if r.get("gemm") else "")


def table(records: list[dict]) -> str:
    head = (f"{'score':8s} {'pass':7s} {'L':>6s} {'backend':20s} {'time ms':>10s} {'peak MiB':>9s} "
            f"{'rate':>13s} {'x ref':>7s} {'x best':>7s} {'% limit':>7s}  note")
    lines = [head, "-" * len(head)]
    prev = None
    for r in records:
        key = (r["score"], r["pass"])
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        if r["score"] == "additive":
            rate = _fmt(r.get("triples_per_s") and r["triples_per_s"] / 1e9, ".3g") + " Gtrip/s"
        else:
            rate = _fmt(r.get("gflops_per_s"), ".4g") + " GFLOP/s"
        if r.get("skipped"):
            note = "skipped: " + r["skipped"]
            if r.get("predicted_bytes"):
                note += f" (needs {r['predicted_bytes'] / (1 << 30):.1f} GiB)"
            rate = ""
        elif r.get("modeled"):
            note = f"MODEL, lower bound; {r['model_bound']}-bound"
        else:
            note = f"median of {r['repeats']}" if r.get("repeats") else "single call"
            note += _isa_note(r)
        lines.append(
            f"{r['score']:8s} {r['pass']:7s} {r['Lq']:>6d} {r['backend']:20s} "
            f"{_fmt(r.get('time_ms'), '10.4g'):>10s} {_fmt(r.get('peak_mem_mib'), '9.1f'):>9s} "
            f"{rate:>13s} {_fmt(r.get('ratio_vs_reference'), '7.3g'):>7s} "
            f"{_fmt(r.get('ratio_vs_best_baseline'), '7.3g'):>7s} {_fmt(r.get('pct_of_limit'), '7.2g'):>7s}"
            f"  {note}")
    return "\n".join(lines)


def markdown_table(records: list[dict]) -> str:
    """The same rows as ``table`` as a GitHub markdown table (for docs/PERFORMANCE.md)."""
    out = ["| score | pass | L | backend | time (ms) | peak MiB | rate | x ref | x best baseline "
           "| % of limit | note |", "|---|---|--:|---|--:|--:|--:|--:|--:|--:|---|"]
    for r in records:
        if r["score"] == "additive":
            rate = _fmt(r.get("triples_per_s") and r["triples_per_s"] / 1e9, ".3g") + " G terms/s"
        else:
            rate = _fmt(r.get("gflops_per_s"), ".3g") + " GFLOP/s"
        if r.get("skipped"):
            rate = ""
            note = "skipped: " + r["skipped"]
            if r.get("predicted_bytes"):
                note += f" (needs {r['predicted_bytes'] / (1 << 30):.1f} GiB)"
        elif r.get("modeled"):
            note = f"**model**, lower bound, {r['model_bound']}-bound"
        else:
            note = f"median of {r['repeats']}" if r.get("repeats") else "single call"
            note += _isa_note(r)
        cells = [r["score"], r["pass"], r["Lq"], r["backend"], _fmt(r.get("time_ms"), ".4g"),
                 _fmt(r.get("peak_mem_mib"), ".1f"), rate, _fmt(r.get("ratio_vs_reference"), ".3g"),
                 _fmt(r.get("ratio_vs_best_baseline"), ".3g"), _fmt(r.get("pct_of_limit"), ".2g"), note]
        out.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(out)


def limit_summary(limit: Optional[dict]) -> str:
    if not limit:
        return "machine limit: not measured"
    if limit.get("additive_triples_per_s"):
        add = (f"{limit['additive_triples_per_s'] / 1e9:.2f} G triples/s ({limit['additive_variant']}, "
               f"{limit['threads']} threads, {limit['compiler']})")
    else:
        add = f"not measured ({limit.get('reason')})"
    per = limit.get("per_isa") or {}
    if per:
        add += "; per ISA: " + ", ".join(f"{isa} {v['triples_per_s'] / 1e9:.2f} ({v['variant']})"
                                         for isa, v in sorted(per.items()))
    return (f"machine limit: additive inner loop {add}; FMA peak {_fmt(limit.get('fma_gflops'), '.1f')} "
            f"GFLOP/s; fp32 torch.mm {_fmt(limit.get('matmul_gflops'), '.1f')} GFLOP/s")


# ---------------------------------------------------------------------------- plot


def plot(records: list[dict], path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, p) for s in ("additive", "dot") for p in ("fwd", "fwd+bwd")
              if any(r["score"] == s and r["pass"] == p for r in records)]
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.5), squeeze=False)
    backends = list(dict.fromkeys(r["backend"] for r in records))
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    for col, (score, pass_) in enumerate(panels):
        for row, (key, label) in enumerate((("time_ms", "time per call (ms)"),
                                            ("peak_mem_mib", "peak memory added (MiB)"))):
            ax = axes[row][col]
            for b in backends:
                pts = sorted((r["Lq"], r[key]) for r in records
                             if r["score"] == score and r["pass"] == pass_ and r["backend"] == b
                             and not r.get("skipped") and r.get(key))
                if pts:
                    modeled = b.endswith("model)")
                    ax.plot(*zip(*pts), marker="o" if not modeled else "x", color=colors[b], label=b,
                            linestyle="--" if modeled else "-")
                if key == "peak_mem_mib":   # what a skipped materializing baseline would have needed
                    pred = sorted((r["Lq"], r["predicted_bytes"] / (1 << 20)) for r in records
                                  if r["score"] == score and r["pass"] == pass_ and r["backend"] == b
                                  and r.get("skipped") and r.get("predicted_bytes"))
                    if pred:
                        ax.plot(*zip(*pred), marker="o", markerfacecolor="none", color=colors[b],
                                linestyle=":", label=f"{b} (predicted, not run)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length Lq = Lk")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            if row == 0:
                ax.set_title(f"{score} {pass_}")
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
