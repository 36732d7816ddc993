"""``python -m fusedattn.bench``: run the standard set, print the table, write JSON and a plot."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone

import torch

from . import harness, limits, report
from .model_counts import load_counts


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _loadavg():
    """1-minute load average: above ~0 before the run, something else competed for the cores."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fusedattn.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="lengths 256..4096, 3 repeats, 10 s cap (< 5 min)")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot here (needs matplotlib)")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown here")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(harness.DTYPES), default="float32")
    p.add_argument("--score", choices=("additive", "dot", "all"), default="all")
    p.add_argument("--lengths", type=_csv, help="comma-separated Lq = Lk values (default: standard set)")
    p.add_argument("--backends", type=_csv,
                   help="comma-separated subset of reference,chunked,sdpa,cpu,triton")
    p.add_argument("--passes", type=_csv, help="comma-separated subset of fwd,fwd+bwd")
    p.add_argument("--repeats", type=int, help="timed calls per case after warm-up (default 5; quick 3)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per case (default 3; quick 1.5)")
    p.add_argument("--time-cap", type=float, help="skip a case predicted to take longer per call "
                                                   "(s; default 300; quick 10)")
    p.add_argument("--slow-cap", type=float, help="the same cap for the reference and chunked baselines "
                                                   "(s; default 60; quick 10)")
    p.add_argument("--mem-budget-gib", type=float, default=8.0,
                   help="skip a baseline predicted to need more (default 8)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run each case in a fresh interpreter (default: yes; --quick: no, to save the "
                        "~2 s interpreter start per case)")
    p.add_argument("--limit-seconds", type=float, help="duration of each limit microbenchmark run")
    p.add_argument("--model", action=argparse.BooleanOptionalAction, default=True,
                   help="add the modeled H100 rows (compiles the Triton kernels for sm_90; default yes)")
    p.add_argument("--from-json", metavar="PATH",
                   help="run nothing: re-derive the model rows, ratios, table and plot from the measured "
                        "records of an earlier run's JSON")
    p.add_argument("--no-limit", action="store_true", help="skip the machine-limit microbenchmarks")
    return p.parse_args(argv)


def rerender(a) -> int:
    """--from-json: the earlier run's measurements, with the H100 model rows recomputed."""
    with open(a.from_json) as f:
        data = json.load(f)
    records = [r for r in data["records"] if not r.get("modeled")]
    settings = data["settings"]
    if a.model:
        counts, note = load_counts(settings["dtype"])
    else:
        counts, note = {}, "not modeled (--no-model)"
    records += report.model_records(records, counts)
    report.finalize(records, data["limit"])
    records.sort(key=lambda r: (harness.SCORES.index(r["score"]), harness.PASSES.index(r["pass"]), r["Lq"],
                                r.get("modeled", False)))
    settings["h100_model"] = note
    settings["h100_counts"] = {"|".join(k): v for k, v in counts.items()}
    _write(a, data["machine"], data["limit"], settings, records, note)
    return 0


def _write(a, machine, limit, settings, records, counts_note) -> None:
    print(report.limit_summary(limit))
    print(f"load average (1 min) before / after: {machine['loadavg_start']} / {machine['loadavg_end']}")
    print(f"torch threads {machine['torch_threads']}; time = median of up to {settings['repeats']} calls "
          f"after warm-up; x ref / x best = speed-up over the reference / the fastest baseline; H100 rows: "
          f"{counts_note}")
    print(report.table(records))
    print(f"({len(records)} records; cases ran in {settings['elapsed_s']:.0f} s)")
    for path in (a.json, a.plot, a.markdown):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "limit": limit, "settings": settings, "records": records}, f,
                      indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(f"{report.limit_summary(limit)}\n\n{report.markdown_table(records)}\n")
    if a.plot:
        report.plot(records, a.plot, title=f"fusedattn on {machine.get('cpu_model') or settings['device']}, "
                                             f"{machine['torch_threads']} threads, {settings['dtype']}")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.from_json:
        return rerender(a)
    t_start = time.time()
    quick = a.quick
    lengths = [int(x) for x in a.lengths] if a.lengths else \
        list(harness.QUICK_LENGTHS if quick else harness.FULL_LENGTHS)
    scores = harness.SCORES if a.score == "all" else (a.score,)
    default_backends = ("reference", "chunked", "sdpa", "triton" if a.device == "cuda" else "cpu")
    backends = a.backends or list(default_backends)
    unknown = set(backends) - {*harness.BASELINES, *harness.FUSED}
    if unknown:
        print(f"unknown backends: {sorted(unknown)}", file=sys.stderr)
        return 2
    passes = a.passes or list(harness.PASSES)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    cfg = harness.RunConfig(
        repeats=a.repeats or (3 if quick else 5),
        budget_s=a.budget or (1.5 if quick else 3.0),
        time_cap_s=a.time_cap or (10.0 if quick else 300.0),
        slow_cap_s=a.slow_cap or (10.0 if quick else 60.0),
        mem_budget_bytes=a.mem_budget_gib * (1 << 30),
        threads=a.threads, isolate=(not quick) if a.isolate is None else a.isolate,
        log=lambda s: print(s, file=sys.stderr, flush=True))

    machine = report.machine_info(a.threads, cfg.repeats)
    from fusedattn import available_backends
    machine["backends"] = available_backends()
    machine["loadavg_start"] = _loadavg()
    machine["cpu_extension_start"] = report.extension_fingerprint()
    limit = None
    if not a.no_limit and a.device == "cpu":
        print("measuring the machine limit ...", file=sys.stderr, flush=True)
        limit = limits.measure(a.threads, a.limit_seconds or (0.1 if quick else 0.3))
    if a.model:
        print("compiling the Triton kernels for sm_90 (H100 model; cached after the first run) ...",
              file=sys.stderr, flush=True)
        counts, counts_note = load_counts(a.dtype)
    else:
        counts, counts_note = {}, "not modeled (--no-model)"

    cases = harness.standard_cases(scores, lengths, backends, passes, a.device, a.dtype)
    print(f"running {len(cases)} cases ...", file=sys.stderr, flush=True)
    records = harness.run_cases(cases, cfg)
    if limit is not None:
        print("measuring the machine limit again ...", file=sys.stderr, flush=True)
        limit = limits.best_of(limit, limits.measure(a.threads, a.limit_seconds or (0.1 if quick else 0.3)))
    records += report.model_records(records, counts)
    report.finalize(records, limit)
    records.sort(key=lambda r: (harness.SCORES.index(r["score"]), harness.PASSES.index(r["pass"]), r["Lq"],
                                r.get("modeled", False)))
    elapsed = time.time() - t_start
    machine["loadavg_end"] = _loadavg()
    machine["cpu_extension_end"] = report.extension_fingerprint()
    if machine["cpu_extension_end"] != machine["cpu_extension_start"]:
        print("WARNING: the C++ extension was rebuilt during the run; cpu figures mix two builds",
              file=sys.stderr)
    settings = {"quick": quick, "lengths": lengths, "scores": list(scores), "backends": backends,
                "passes": passes, "device": a.device, "dtype": a.dtype, "repeats": cfg.repeats,
                "budget_s": cfg.budget_s, "time_cap_s": cfg.time_cap_s, "slow_cap_s": cfg.slow_cap_s,
                "mem_budget_gib": a.mem_budget_gib, "isolated": cfg.isolate, "h100_model": counts_note,
                "started_utc": datetime.fromtimestamp(t_start, timezone.utc).isoformat(timespec="seconds"),
                "elapsed_s": round(elapsed, 1), "shapes": harness.SHAPES,
                "h100_counts": {"|".join(k): v for k, v in counts.items()}}
    _write(a, machine, limit, settings, records, counts_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
