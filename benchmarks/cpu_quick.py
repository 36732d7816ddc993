"""Quick CPU timings of the fused kernels (torch.ops.fusedattn_cpu) against the reference and SDPA.

Usage: python benchmarks/cpu_quick.py [additive|dot|dots|decode|overhead|memory|all] [threads]
("overhead": the public functions against the raw C++ op and SDPA on small and decode calls)
("dots": the dot-product targets of issue 11, three shapes x causal x float32/bfloat16/float16)
Ratios are taken within one run; the machine is noisy, so each figure is the best of a few repeats.
"""
from __future__ import annotations

import math
import resource
import sys
import time

import torch
import torch.nn.functional as F

import fusedattn._C  # noqa: F401  (registers torch.ops.fusedattn_cpu)
from fusedattn import reference as R

ops = torch.ops.fusedattn_cpu


def best(fn, reps=5, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def race(fns, reps=5):
    """Best time of each function, calls interleaved so machine noise hits all of them alike."""
    for f in fns:
        f()
    out = [float("inf")] * len(fns)
    for _ in range(reps):
        for n, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            out[n] = min(out[n], time.perf_counter() - t0)
    return out


def additive(L=1024, A=128, Dv=128):
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, L, A), torch.randn(1, 1, L, A)
    v, w = torch.randn(1, 1, L, Dv), torch.randn(1, A) * 0.1
    do = torch.randn(1, 1, L, Dv)

    def f_fwd():
        return ops.additive_fwd(q, k, v, w, None, False)

    def f_fb():
        o, lse = ops.additive_fwd(q, k, v, w, None, False)
        return ops.additive_bwd(do, q, k, v, w, None, False, o, lse)

    def r_fwd():
        with torch.no_grad():
            return R.additive_attention(q, k, v, w)

    def r_fb():
        ts = [t.detach().requires_grad_() for t in (q, k, v, w)]
        R.additive_attention(*ts).backward(do)

    tf, rf = race([f_fwd, r_fwd], reps=3)
    tfb, rfb = race([f_fb, r_fb], reps=3)
    triples = L * L * A
    print(f"additive L={L} A={A} Dv={Dv}: fused fwd {tf*1e3:.1f} ms ({triples/tf/1e9:.2f} G triples/s), "
          f"reference fwd {rf*1e3:.0f} ms -> {rf/tf:.0f}x")
    print(f"additive L={L} A={A} Dv={Dv}: fused fwd+bwd {tfb*1e3:.1f} ms, reference fwd+bwd {rfb*1e3:.0f} ms "
          f"-> {rfb/tfb:.0f}x")


def dot(B=1, H=4, L=4096, D=64, causal=False, dtype=torch.float32):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype) for _ in range(3))
    do = torch.randn(B, H, L, D, dtype=dtype)
    scale = 1 / math.sqrt(D)

    def f_fwd():  # the op returns float32: round as the package does
        o, lse = ops.dot_fwd(q, k, v, None, scale, causal)
        return o.to(dtype), lse

    def f_fb():  # the backward takes the float32 output, as the package passes it
        o, lse = ops.dot_fwd(q, k, v, None, scale, causal)
        o.to(dtype)
        return [g.to(dtype) for g in ops.dot_bwd(do, q, k, v, None, scale, causal, o, lse)[:3]]

    def s_fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def s_fb():
        ts = [t.detach().requires_grad_() for t in (q, k, v)]
        F.scaled_dot_product_attention(*ts, is_causal=causal).backward(do)

    tf, sf = race([f_fwd, s_fwd], reps=6)
    tfb, sfb = race([f_fb, s_fb], reps=4)
    print(f"dot {str(dtype)[6:]} B={B} H={H} L={L} D={D} causal={causal}: "
          f"fwd fused {tf*1e3:.0f} ms, sdpa {sf*1e3:.0f} ms "
          f"-> {sf/tf:.2f}x sdpa speed; fwd+bwd fused {tfb*1e3:.0f} ms, sdpa {sfb*1e3:.0f} ms "
          f"-> {sfb/tfb:.2f}x")


def decode(Lk=4000, D=128):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 1, D), torch.randn(1, 1, Lk, D), torch.randn(1, 1, Lk, D)
    w = torch.randn(1, D) * 0.1
    t = best(lambda: ops.additive_fwd(q, k, v, w, None, False), reps=20)
    print(f"additive decode Lq=1 Lk={Lk} A={D}: {t*1e6:.0f} us ({Lk*D/t/1e9:.2f} G triples/s)")


def _overhead_case(Lq, Lk, D, n=200):
    import fusedattn
    q, k, v = torch.randn(1, 8, Lq, D), torch.randn(1, 8, Lk, D), torch.randn(1, 8, Lk, D)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        api, raw, sdpa = (t / n for t in race([
            lambda: [fusedattn.dot_product_attention(q, k, v) for _ in range(n)],
            lambda: [ops.dot_fwd(q, k, v, None, D ** -0.5, False) for _ in range(n)],
            lambda: [F.scaled_dot_product_attention(q, k, v) for _ in range(n)]], reps=7))
    g_api, g_sdpa = (t / n for t in race([
        lambda: [fusedattn.dot_product_attention(*leaves).sum().backward() for _ in range(n)],
        lambda: [F.scaled_dot_product_attention(*leaves).sum().backward() for _ in range(n)]], reps=7))
    print(f"dot B1 H8 Lq={Lq} Lk={Lk} D={D}: no-grad api {api*1e6:.0f} us, raw op {raw*1e6:.0f} us, "
          f"sdpa {sdpa*1e6:.0f} us; fwd+bwd api {g_api*1e6:.0f} us, sdpa {g_sdpa*1e6:.0f} us")


def overhead():
    """Per-call cost of the public API (validation, backend resolution, op layer) over the raw op."""
    torch.manual_seed(0)
    for Lq, Lk, D in ((1, 1, 64), (1, 2048, 64), (16, 512, 64)):
        _overhead_case(Lq, Lk, D)


def memory(L=16384, A=128, Lbig=65536):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, L, A) for _ in range(3))
    w = torch.randn(1, A) * 0.1
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ops.additive_fwd(q, k, v, w, None, False)
    t = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"additive fwd L={L} A={A}: {t:.2f} s, peak RSS grew {(after-before)/1024:.0f} MiB "
          f"(inputs {3*L*A*4/2**20:.0f} MiB)")
    if Lbig:
        q, k, v, do = (torch.randn(1, 1, Lbig, A) for _ in range(4))
        t0 = time.perf_counter()
        o, lse = ops.additive_fwd(q, k, v, w, None, False)
        t1 = time.perf_counter()
        ops.additive_bwd(do, q, k, v, w, None, False, o, lse)
        t2 = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"additive L={Lbig} A={A}: fwd {t1-t0:.1f} s, bwd {t2-t1:.1f} s, "
              f"process peak RSS {peak/1024:.0f} MiB")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    print(f"threads={torch.get_num_threads()} isa={ops.isa()} (FUSEDATTN_CPU_ISA may force scalar or avx2)")
    if what in ("additive", "all"):
        additive()
    if what in ("dot", "all"):
        dot()
    if what == "dots":
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for B, H, L, D in ((1, 4, 4096, 64), (4, 8, 1024, 64), (1, 8, 2048, 128)):
                for causal in (False, True):
                    dot(B, H, L, D, causal, dtype)
    if what in ("decode", "all"):
        decode()
    if what in ("overhead", "all"):
        overhead()
    if what == "memory":
        memory()
