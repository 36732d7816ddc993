"""Ring attention benchmark: one sequence across ``--nproc`` processes on this machine vs one process.

``python -m fusedattn.bench.ring --length 262144 --dim 16 --nproc 2 --causal [--score additive]``

Runs forward + backward (gradients for q, k, v and w) once in a fresh single process (``torch`` threads =
``--threads``, default all cores) and once across ``--nproc`` fresh processes on 127.0.0.1 (gloo; each
with ``threads / nproc`` torch threads, so both runs use the same cores), B=1, H=1, A=D=Dv=``--dim``,
float32, and prints:

* time: wall seconds of the forward + backward call (ring: the slowest rank, after a barrier);
* peak memory per process: what the call adds to the resident set (``VmHWM`` after the call minus
  ``VmRSS`` before it, ``fusedattn.bench.harness.measure_cpu_peak``: inputs excluded, outputs and
  gradients included), plus the size of the inputs it was given;
* communication share (ring): seconds a rank spent blocked waiting on communication
  (``fusedattn.distributed.comm_wait_seconds``) / its call time; the largest over ranks.

With ``--json PATH`` the figures are also written as JSON. The 1-minute load average before and
after is printed: the processes share the cores with anything else running.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import torch


def _inputs(args, L_local: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (1, args.heads, L_local, args.dim)
    q, k, v, dout = (torch.randn(shape, generator=g) for _ in range(4))
    w = torch.randn(args.heads, args.dim, generator=g) / args.dim ** 0.5
    for t in (q, k, v, w):
        t.requires_grad_()
    return q, k, v, w, dout


def _run_worker(args) -> None:
    from fusedattn.bench import harness
    torch.set_num_threads(args.worker_threads)
    ring = args.worker == "ring"
    if ring:
        import torch.distributed as dist

        from fusedattn import distributed as fd
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.nproc, timeout=timedelta(seconds=args.group_timeout))
        P, rank = args.nproc, args.rank
    else:
        import fusedattn
        P, rank = 1, 0
    score_kw = {"causal": args.causal, "layout": args.layout} if ring else {"causal": args.causal}

    def call(q, k, v, w):
        if args.score == "additive":
            f = fd.ring_additive_attention if ring else fusedattn.additive_attention
            return f(q, k, v, w, **score_kw)
        f = fd.ring_dot_product_attention if ring else fusedattn.dot_product_attention
        return f(q, k, v, **score_kw)

    # warm-up on a small shape: loads the extension, opens the connections
    wq, wk, wv, ww, wd = _inputs(args, 8 * P if ring else 16, 1)
    call(wq, wk, wv, ww).backward(wd)
    del wq, wk, wv, ww, wd
    q, k, v, w, dout = _inputs(args, args.length // P, 100 + rank)
    input_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, w, dout))
    if ring:
        dist.barrier()
        fd.comm_wait_seconds(reset=True)

    def fwd_bwd():
        t0 = time.perf_counter()
        out = call(q, k, v, w)
        t1 = time.perf_counter()
        out.backward(dout)
        return t1 - t0, time.perf_counter() - t1

    peak, seconds, (fwd_s, bwd_s) = harness.measure_cpu_peak(fwd_bwd)
    rec = {"rank": rank, "nproc": P, "threads": args.worker_threads, "seconds": seconds, "fwd_s": fwd_s,
           "bwd_s": bwd_s, "peak_mib": None if peak is None else peak / 2 ** 20,
           "input_mib": input_bytes / 2 ** 20,
           "comm_wait_s": fd.comm_wait_seconds() if ring else 0.0}
    print("RESULT " + json.dumps(rec), flush=True)
    if ring:
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args, worker: str, nproc: int, threads: int) -> list[dict]:
    port = _free_port()
    base = [sys.executable, "-m", "fusedattn.bench.ring", "--worker", worker, "--port", str(port),
            "--worker-threads", str(threads), "--length", str(args.length), "--dim", str(args.dim),
            "--heads", str(args.heads), "--nproc", str(nproc), "--score", args.score, "--layout", args.layout,
            "--group-timeout", str(args.group_timeout)] + (["--causal"] if args.causal else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo")
    procs = [subprocess.Popen(base + ["--rank", str(r)], env=env, stdout=subprocess.PIPE, text=True)
             for r in range(nproc)]
    recs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            for q in procs:
                q.kill()
            raise SystemExit(f"{worker} worker failed (exit {p.returncode}):\n{out}")
        recs += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return recs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedattn.bench.ring", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=262144, help="global sequence length L (default 262144)")
    p.add_argument("--dim", type=int, default=16, help="A = D = Dv (default 16)")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--nproc", type=int, default=2, help="ring processes (default 2)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--score", choices=("additive", "dot"), default="additive")
    p.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cores for each run (default: all)")
    p.add_argument("--no-single", action="store_true", help="skip the single-process run")
    p.add_argument("--group-timeout", type=float, default=3600.0, help="process-group timeout, seconds")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", choices=("single", "ring"), help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker-threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # os._exit: skip interpreter teardown (extensions' exit-time chatter on stderr)
        _run_worker(args)
        sys.stdout.flush()
        os._exit(0)
    per = 2 * args.nproc if args.layout == "zigzag" else args.nproc
    if args.length % per:
        p.error(f"--length {args.length} must be divisible by {per} ({args.layout} layout, "
                f"{args.nproc} processes)")
    load0 = os.getloadavg()[0]
    res = {"settings": {k: getattr(args, k) for k in ("length", "dim", "heads", "nproc", "causal", "score",
                                                       "layout", "threads")}, "load_before": load0}
    print(f"{args.score} attention fwd+bwd, B=1 H={args.heads} L={args.length} A=D=Dv={args.dim} float32 "
          f"causal={args.causal}; load average {load0:.2f}", flush=True)
    if not args.no_single:
        single = _spawn(args, "single", 1, args.threads)[0]
        res["single"] = single
        print(f"single process ({args.threads} threads): {single['seconds']:.1f} s "
              f"(fwd {single['fwd_s']:.1f}, bwd {single['bwd_s']:.1f}), peak +{single['peak_mib']:.1f} MiB "
              f"(inputs {single['input_mib']:.1f} MiB)", flush=True)
    ring = _spawn(args, "ring", args.nproc, max(1, args.threads // args.nproc))
    res["ring"] = ring
    t = max(r["seconds"] for r in ring)
    peak = max(r["peak_mib"] for r in ring)
    share = max(r["comm_wait_s"] / r["seconds"] for r in ring)
    print(f"ring, {args.nproc} processes x {max(1, args.threads // args.nproc)} threads, {args.layout}: "
          f"{t:.1f} s (slowest rank), per-rank peak +{peak:.1f} MiB (inputs {ring[0]['input_mib']:.1f} MiB), "
          f"communication wait {100 * share:.1f} % of the call", flush=True)
    for r in ring:
        print(f"  rank {r['rank']}: {r['seconds']:.1f} s (fwd {r['fwd_s']:.1f}, bwd {r['bwd_s']:.1f}), "
              f"peak +{r['peak_mib']:.1f} MiB, waiting {r['comm_wait_s']:.2f} s")
    if not args.no_single:
        res["time_ratio"] = t / single["seconds"]
        res["peak_ratio"] = peak / single["peak_mib"]
        print(f"ratios ring / single: time {res['time_ratio']:.2f} (target <= 1.2), per-rank peak "
              f"{res['peak_ratio']:.2f} (target <= 0.6)")
    res["load_after"] = os.getloadavg()[0]
    print(f"load average after: {res['load_after']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
