"""The machine's limit, measured in the same run as the benchmarks.

Two figures:

* ``additive``: the best per-triple rate of the additive inner loop
  ``s_ij = sum_a w_a / (1 + E_qi,a * E_kj,a)`` over an L1-resident block (32 queries x
  32 keys x A=128), where ``E = exp(2x)`` are the per-row factors of
  ``tanh(x + y) = 1 - 2 / (1 + e^{2x} e^{2y})``. That loop (one FMA and one division or
  reciprocal per triple, or half a reciprocal in the paired forms) is the least work found for
  an fp32-exact fused additive kernel per (query, key, feature) triple, so its rate is the
  ceiling a fused forward's score loop can approach (the forward also does P.V and the softmax).
  It is a tiny C kernel compiled at run time with the system C compiler (``cc -O3``) and called
  through ``ctypes`` from one Python thread per core (``ctypes`` releases the GIL), in variants:
  per ISA (AVX2, and AVX-512F when the CPU has it): ``div`` (exact ``vdivps``), ``rcp_nr``
  (``vrcpps``/``vrcp14ps`` + one Newton step), ``splitNM`` (N of 4 accumulators divide, M use
  ``rcp_nr``: the divider and the FMA pipes work at once), ``fma_nr`` (no reciprocal unit: bit-trick
  seed + three Newton steps, as the Triton kernel does on the GPU), and the weight-scaled ``ws_*``
  forms ``w / (1 + e k) = 1 / (e/w k + 1/w)`` (``e/w`` and ``1/w`` precomputed: the reciprocal is the
  term, no product by w), and the paired ``ws_pair*`` forms, two dims per reciprocal,
  ``1/d1 + 1/d2 = (d1 + d2) / (d1 d2)`` (``pair_div``: all divide; ``pair31``: 3 of 4 keys divide,
  the 4th takes the reciprocal unit + Newton; the cpu backend's loops use the paired form where the
  factors allow it, else ``ws_split22``). A variant counts only if its
  scores agree with the exact division to a relative error <= 1e-5 (``vrcpps`` alone, ~2e-4, would
  not). ``per_isa`` holds the best variant of each
  ISA: the limit for a kernel running at that level. Without a C compiler the figure is None and
  the reason is recorded.
* ``fma``: fp32 FMA throughput, from a C loop of independent vector FMAs (the hardware peak the
  compiler can reach) and, for reference, a large fp32 ``torch.mm`` (what a BLAS reaches).

Each figure is the best of a few timed runs of ~``seconds`` each, on ``threads`` threads; the
bench measures before and after its cases and keeps the better of the two (``best_of``).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Optional

import torch

_C_SOURCE = r"""
#include <immintrin.h>
#include <stddef.h>

/* out[i*nk+j] = sum_a w[a] / (1 + eq[i*A+a]*ek[j*A+a]); A % 8 == 0 (16 for avx512), nk % 4 == 0.
   Weight-scaled variants (ws_*, ADD = wv) take eq/w and 1/w for eq and w: d = eq/w ek + 1/w, and
   the term is 1/d itself. */
#define KERNEL_BODY(VEC, SET1, LOAD, FMADD, R0, R1, R2, R3, REDUCE, W, ADD)                  \
  for (long r = 0; r < reps; r++)                                                              \
    for (int i = 0; i < nq; i++) {                                                             \
      const float* e = eq + (size_t)i * A;                                                     \
      for (int j = 0; j < nk; j += 4) {                                                        \
        const float* k0 = ek + (size_t)j * A;                                                  \
        VEC one = SET1(1.0f), two = SET1(2.0f);                                                \
        VEC c0 = SET1(0.0f), c1 = c0, c2 = c0, c3 = c0;                                        \
        for (int a = 0; a < A; a += W) {                                                       \
          VEC ev = LOAD(e + a), wv = LOAD(w + a);                                              \
          VEC d0 = FMADD(ev, LOAD(k0 + a), ADD);                                               \
          VEC d1 = FMADD(ev, LOAD(k0 + A + a), ADD);                                           \
          VEC d2 = FMADD(ev, LOAD(k0 + 2 * A + a), ADD);                                       \
          VEC d3 = FMADD(ev, LOAD(k0 + 3 * A + a), ADD);                                       \
          R0(c0, d0); R1(c1, d1); R2(c2, d2); R3(c3, d3);                                      \
        }                                                                                      \
        out[(size_t)i * nk + j] = REDUCE(c0); out[(size_t)i * nk + j + 1] = REDUCE(c1);        \
        out[(size_t)i * nk + j + 2] = REDUCE(c2); out[(size_t)i * nk + j + 3] = REDUCE(c3);    \
      }                                                                                        \
    }
/* Paired weight-scaled variants (ws_pair*): the dims a..a+W-1 and a+W..a+2W-1 of one key share one
   reciprocal, 1/d1 + 1/d2 = (d1 + d2) / (d1 d2) (the cpu backend's paired form, kernels_avx512.cpp). */
#define PAIR_BODY(VEC, SET1, LOAD, FMADD, ADDV, MUL, R0, R1, R2, R3, REDUCE, W)                  \
  for (long r = 0; r < reps; r++)                                                              \
    for (int i = 0; i < nq; i++) {                                                             \
      const float* e = eq + (size_t)i * A;                                                     \
      for (int j = 0; j < nk; j += 4) {                                                        \
        const float* k0 = ek + (size_t)j * A;                                                  \
        VEC one = SET1(1.0f);                                                                  \
        VEC c0 = SET1(0.0f), c1 = c0, c2 = c0, c3 = c0;                                        \
        for (int a = 0; a < A; a += 2 * W) {                                                   \
          VEC e1 = LOAD(e + a), e2 = LOAD(e + a + W), w1 = LOAD(w + a), w2 = LOAD(w + a + W);  \
          VEC d1, d2, s, p;                                                                    \
          d1 = FMADD(e1, LOAD(k0 + a), w1); d2 = FMADD(e2, LOAD(k0 + a + W), w2);              \
          s = ADDV(d1, d2); p = MUL(d1, d2); R0(c0, s, p);                                     \
          d1 = FMADD(e1, LOAD(k0 + A + a), w1); d2 = FMADD(e2, LOAD(k0 + A + a + W), w2);      \
          s = ADDV(d1, d2); p = MUL(d1, d2); R1(c1, s, p);                                     \
          d1 = FMADD(e1, LOAD(k0 + 2 * A + a), w1); d2 = FMADD(e2, LOAD(k0 + 2 * A + a + W), w2); \
          s = ADDV(d1, d2); p = MUL(d1, d2); R2(c2, s, p);                                     \
          d1 = FMADD(e1, LOAD(k0 + 3 * A + a), w1); d2 = FMADD(e2, LOAD(k0 + 3 * A + a + W), w2); \
          s = ADDV(d1, d2); p = MUL(d1, d2); R3(c3, s, p);                                     \
        }                                                                                      \
        out[(size_t)i * nk + j] = REDUCE(c0); out[(size_t)i * nk + j + 1] = REDUCE(c1);        \
        out[(size_t)i * nk + j + 2] = REDUCE(c2); out[(size_t)i * nk + j + 3] = REDUCE(c3);    \
      }                                                                                        \
    }
#define PAIR_VARIANT(name, VEC, SET1, LOAD, FMADD, ADDV, MUL, R0, R1, R2, R3, REDUCE, W)         \
  void name(const float* eq, const float* ek, const float* w, float* out, int nq, int nk, int A, \
            long reps) {                                                                       \
    PAIR_BODY(VEC, SET1, LOAD, FMADD, ADDV, MUL, R0, R1, R2, R3, REDUCE, W)                    \
  }
#define VARIANT(name, VEC, SET1, LOAD, FMADD, R0, R1, R2, R3, REDUCE, W, ADD)                   \
  void name(const float* eq, const float* ek, const float* w, float* out, int nq, int nk, int A, \
            long reps) {                                                                       \
    KERNEL_BODY(VEC, SET1, LOAD, FMADD, R0, R1, R2, R3, REDUCE, W, ADD)                        \
  }

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#define DIV8(c, d) c = _mm256_add_ps(c, _mm256_div_ps(wv, d))
#define RCP8(c, d) do { __m256 x = _mm256_rcp_ps(d);                                            \
    x = _mm256_fmadd_ps(x, _mm256_fnmadd_ps(d, x, one), x); c = _mm256_fmadd_ps(wv, x, c); } while (0)
/* FMA-only: bit-trick seed (integer subtract) and three Newton steps */
#define FNR8(c, d) do { __m256 x = _mm256_castsi256_ps(_mm256_sub_epi32(                         \
        _mm256_set1_epi32(0x7EF311C3), _mm256_castps_si256(d)));                               \
    x = _mm256_mul_ps(x, _mm256_fnmadd_ps(d, x, two)); x = _mm256_mul_ps(x, _mm256_fnmadd_ps(d, x, two)); \
    x = _mm256_mul_ps(x, _mm256_fnmadd_ps(d, x, two)); c = _mm256_fmadd_ps(wv, x, c); } while (0)
/* weight-scaled: d = eq/w ek + 1/w; the divider's term is 1/d, the reciprocal unit's Newton step
   ends it (x + x (1 - d x)): no product by w */
#define WDIV8(c, d) c = _mm256_add_ps(c, _mm256_div_ps(one, d))
#define WRCP8(c, d) do { __m256 x = _mm256_rcp_ps(d);                                           \
    c = _mm256_add_ps(c, _mm256_fmadd_ps(x, _mm256_fnmadd_ps(d, x, one), x)); } while (0)
#define V8(name, R0, R1, R2, R3) VARIANT(name, __m256, _mm256_set1_ps, _mm256_loadu_ps, _mm256_fmadd_ps, \
                                         R0, R1, R2, R3, hsum8, 8, one)
#define W8(name, R0, R1, R2, R3) VARIANT(name, __m256, _mm256_set1_ps, _mm256_loadu_ps, _mm256_fmadd_ps, \
                                         R0, R1, R2, R3, hsum8, 8, wv)
V8(avx2_div, DIV8, DIV8, DIV8, DIV8)
V8(avx2_rcp_nr, RCP8, RCP8, RCP8, RCP8)
V8(avx2_split13, DIV8, RCP8, RCP8, RCP8)
V8(avx2_split22, DIV8, RCP8, DIV8, RCP8)
V8(avx2_split31, DIV8, DIV8, DIV8, RCP8)
V8(avx2_fma_nr, FNR8, FNR8, FNR8, FNR8)
W8(avx2_ws_rcp_nr, WRCP8, WRCP8, WRCP8, WRCP8)
W8(avx2_ws_split13, WDIV8, WRCP8, WRCP8, WRCP8)
W8(avx2_ws_split22, WDIV8, WRCP8, WDIV8, WRCP8)
/* paired: the divider's term is s / p; the reciprocal unit's, y + y (1 - p x) with y = s x */
#define PDIV8(c, s, p) c = _mm256_add_ps(c, _mm256_div_ps(s, p))
#define PRCP8(c, s, p) do { __m256 x = _mm256_rcp_ps(p), y = _mm256_mul_ps(s, x);                \
    c = _mm256_add_ps(c, _mm256_fmadd_ps(y, _mm256_fnmadd_ps(p, x, one), y)); } while (0)
#define P8(name, R0, R1, R2, R3)                                                              \
  PAIR_VARIANT(name, __m256, _mm256_set1_ps, _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_add_ps,   \
               _mm256_mul_ps, R0, R1, R2, R3, hsum8, 8)
P8(avx2_ws_pair_div, PDIV8, PDIV8, PDIV8, PDIV8)
P8(avx2_ws_pair31, PDIV8, PDIV8, PDIV8, PRCP8)
P8(avx2_ws_pair22, PDIV8, PRCP8, PDIV8, PRCP8)
/* fp32 FMA peak: 12 independent accumulators; returns a value so the loop is kept */
float avx2_fma(long iters, float x) {  /* distinct starts: no chain can be merged */
#define S(i) _mm256_set1_ps(x + i)
  __m256 a0 = S(0), a1 = S(1), a2 = S(2), a3 = S(3), a4 = S(4), a5 = S(5), a6 = S(6), a7 = S(7),
         a8 = S(8), a9 = S(9), a10 = S(10), a11 = S(11);
#undef S
  const __m256 m = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (long t = 0; t < iters; t++) {
    a0 = _mm256_fmadd_ps(a0, m, b); a1 = _mm256_fmadd_ps(a1, m, b); a2 = _mm256_fmadd_ps(a2, m, b);
    a3 = _mm256_fmadd_ps(a3, m, b); a4 = _mm256_fmadd_ps(a4, m, b); a5 = _mm256_fmadd_ps(a5, m, b);
    a6 = _mm256_fmadd_ps(a6, m, b); a7 = _mm256_fmadd_ps(a7, m, b); a8 = _mm256_fmadd_ps(a8, m, b);
    a9 = _mm256_fmadd_ps(a9, m, b); a10 = _mm256_fmadd_ps(a10, m, b); a11 = _mm256_fmadd_ps(a11, m, b);
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                           _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
  s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
  return hsum8(s);
}
int has_avx2 = 1;
#else
int has_avx2 = 0;
#endif

#if defined(__AVX512F__)
#define DIV16(c, d) c = _mm512_add_ps(c, _mm512_div_ps(wv, d))
#define RCP16(c, d) do { __m512 x = _mm512_rcp14_ps(d);                                         \
    x = _mm512_fmadd_ps(x, _mm512_fnmadd_ps(d, x, one), x); c = _mm512_fmadd_ps(wv, x, c); } while (0)
#define FNR16(c, d) do { __m512 x = _mm512_castsi512_ps(_mm512_sub_epi32(                        \
        _mm512_set1_epi32(0x7EF311C3), _mm512_castps_si512(d)));                               \
    x = _mm512_mul_ps(x, _mm512_fnmadd_ps(d, x, two)); x = _mm512_mul_ps(x, _mm512_fnmadd_ps(d, x, two)); \
    x = _mm512_mul_ps(x, _mm512_fnmadd_ps(d, x, two)); c = _mm512_fmadd_ps(wv, x, c); } while (0)
#define WDIV16(c, d) c = _mm512_add_ps(c, _mm512_div_ps(one, d))
#define WRCP16(c, d) do { __m512 x = _mm512_rcp14_ps(d);                                        \
    c = _mm512_add_ps(c, _mm512_fmadd_ps(x, _mm512_fnmadd_ps(d, x, one), x)); } while (0)
#define V16(name, R0, R1, R2, R3) VARIANT(name, __m512, _mm512_set1_ps, _mm512_loadu_ps, _mm512_fmadd_ps, \
                                          R0, R1, R2, R3, _mm512_reduce_add_ps, 16, one)
#define W16(name, R0, R1, R2, R3) VARIANT(name, __m512, _mm512_set1_ps, _mm512_loadu_ps, _mm512_fmadd_ps, \
                                          R0, R1, R2, R3, _mm512_reduce_add_ps, 16, wv)
V16(avx512_div, DIV16, DIV16, DIV16, DIV16)
V16(avx512_rcp_nr, RCP16, RCP16, RCP16, RCP16)
V16(avx512_split13, DIV16, RCP16, RCP16, RCP16)
V16(avx512_split22, DIV16, RCP16, DIV16, RCP16)
V16(avx512_split31, DIV16, DIV16, DIV16, RCP16)
V16(avx512_fma_nr, FNR16, FNR16, FNR16, FNR16)
W16(avx512_ws_rcp_nr, WRCP16, WRCP16, WRCP16, WRCP16)
W16(avx512_ws_split13, WDIV16, WRCP16, WRCP16, WRCP16)
W16(avx512_ws_split22, WDIV16, WRCP16, WDIV16, WRCP16)
#define PDIV16(c, s, p) c = _mm512_add_ps(c, _mm512_div_ps(s, p))
#define PRCP16(c, s, p) do { __m512 x = _mm512_rcp14_ps(p), y = _mm512_mul_ps(s, x);             \
    c = _mm512_add_ps(c, _mm512_fmadd_ps(y, _mm512_fnmadd_ps(p, x, one), y)); } while (0)
#define P16(name, R0, R1, R2, R3)                                                             \
  PAIR_VARIANT(name, __m512, _mm512_set1_ps, _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_add_ps,   \
               _mm512_mul_ps, R0, R1, R2, R3, _mm512_reduce_add_ps, 16)
P16(avx512_ws_pair_div, PDIV16, PDIV16, PDIV16, PDIV16)
P16(avx512_ws_pair31, PDIV16, PDIV16, PDIV16, PRCP16)
P16(avx512_ws_pair22, PDIV16, PRCP16, PDIV16, PRCP16)
float avx512_fma(long iters, float x) {  /* distinct starts: no chain can be merged */
#define S(i) _mm512_set1_ps(x + i)
  __m512 a0 = S(0), a1 = S(1), a2 = S(2), a3 = S(3), a4 = S(4), a5 = S(5), a6 = S(6), a7 = S(7),
         a8 = S(8), a9 = S(9), a10 = S(10), a11 = S(11);
#undef S
  const __m512 m = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (long t = 0; t < iters; t++) {
    a0 = _mm512_fmadd_ps(a0, m, b); a1 = _mm512_fmadd_ps(a1, m, b); a2 = _mm512_fmadd_ps(a2, m, b);
    a3 = _mm512_fmadd_ps(a3, m, b); a4 = _mm512_fmadd_ps(a4, m, b); a5 = _mm512_fmadd_ps(a5, m, b);
    a6 = _mm512_fmadd_ps(a6, m, b); a7 = _mm512_fmadd_ps(a7, m, b); a8 = _mm512_fmadd_ps(a8, m, b);
    a9 = _mm512_fmadd_ps(a9, m, b); a10 = _mm512_fmadd_ps(a10, m, b); a11 = _mm512_fmadd_ps(a11, m, b);
  }
  __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                           _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
  s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
  return _mm512_reduce_add_ps(s);
}
int has_avx512 = 1;
#else
int has_avx512 = 0;
#endif
"""

NQ, NK, A = 32, 32, 128   # block: 32 query rows x 32 key rows x A=128 (eq 16 KiB + ek 16 KiB: L1)
FMA_PER_ITER = 12          # independent vector FMAs per loop iteration in *_fma
KINDS = ("div", "rcp_nr", "split13", "split22", "split31", "fma_nr", "ws_rcp_nr", "ws_split13", "ws_split22",
         "ws_pair_div", "ws_pair31", "ws_pair22")
REL_TOL = 1e-5             # a variant must match exact division to this relative error


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compile(workdir: str) -> tuple[Optional[ctypes.CDLL], str]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, "no C compiler (cc/gcc/clang) on PATH"
    flags = cpu_flags()
    arch = []
    if {"avx2", "fma"} <= flags:
        arch += ["-mavx2", "-mfma"]
    if "avx512f" in flags:
        arch += ["-mavx512f"]
    src = os.path.join(workdir, "fusedattn_limit.c")
    lib = os.path.join(workdir, "fusedattn_limit.so")
    with open(src, "w") as f:
        f.write(_C_SOURCE)
    cmd = [cc, "-O3", "-shared", "-fPIC", *arch, src, "-o", lib]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        err = getattr(e, "stderr", "") or str(e)
        return None, f"compiling the limit kernel failed ({' '.join(cmd)}): {err.strip()[:300]}"
    return ctypes.CDLL(lib), " ".join([os.path.basename(cc), "-O3", *arch])


def _parallel(fn, threads: int) -> float:
    """Run fn() on `threads` Python threads at once (ctypes drops the GIL); wall seconds."""
    barrier = threading.Barrier(threads + 1)

    def body():
        barrier.wait()
        fn()

    ts = [threading.Thread(target=body) for _ in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def _best_rate(run, units_per_rep: float, threads: int, seconds: float, tries: int = 3) -> float:
    """Calibrate reps so one run takes ~seconds, then best-of-tries rate in units/s."""
    reps = 1
    while True:
        dt = _parallel(lambda n=reps: run(n), 1)
        if dt > 0.02 or reps > 1 << 40:
            break
        reps *= 4
    reps = max(1, int(reps * seconds / max(dt, 1e-9)))
    best = 0.0
    for _ in range(tries):
        dt = _parallel(lambda n=reps: run(n), threads)
        best = max(best, threads * reps * units_per_rep / dt)
    return best


def _additive_variant(lib, name: str, threads: int, seconds: float) -> tuple[Optional[float], float]:
    fn = getattr(lib, name)
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_long]
    g = torch.Generator().manual_seed(0)
    # exp(2x) of pre-activations in [-3, 3]: factors spanning e^-6 .. e^6
    eq = torch.exp(2 * (torch.rand(NQ, A, generator=g) * 6 - 3))
    ek = torch.exp(2 * (torch.rand(NK, A, generator=g) * 6 - 3))
    w = torch.randn(A, generator=g)
    exact = (w / (1 + eq[:, None, :].double() * ek[None, :, :].double())).sum(-1)
    scale = (w.abs() / (1 + eq[:, None, :].double() * ek[None, :, :].double())).sum(-1)
    if "_ws_" in name:  # the weight-scaled operands (each a correctly rounded float32 division)
        eq, w = eq / w, 1 / w
    bufs = [(eq.clone(), ek.clone(), w.clone(), torch.empty(NQ, NK)) for _ in range(threads)]
    fn(eq.data_ptr(), ek.data_ptr(), w.data_ptr(), bufs[0][3].data_ptr(), NQ, NK, A, 1)
    err = float(((bufs[0][3].double() - exact).abs() / scale).max())
    counter = iter(range(1 << 30))

    def run(reps):
        e_q, e_k, ww, out = bufs[next(counter) % threads]
        fn(e_q.data_ptr(), e_k.data_ptr(), ww.data_ptr(), out.data_ptr(), NQ, NK, A, reps)

    rate = _best_rate(run, NQ * NK * A, threads, seconds)
    return rate, err


def _fma_rate(lib, name: str, lanes: int, threads: int, seconds: float) -> float:
    fn = getattr(lib, name)
    fn.restype = ctypes.c_float
    fn.argtypes = [ctypes.c_long, ctypes.c_float]
    return _best_rate(lambda reps: fn(reps * 1000, 0.5), 1000 * FMA_PER_ITER * lanes * 2, threads, seconds)


def matmul_gflops(threads: int, n: int = 2048, seconds: float = 0.5) -> float:
    """fp32 torch.mm GFLOP/s (2*n^3 flops per product), best of a few, on `threads` torch threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = 0.0
        t_end = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            torch.mm(a, b)
            dt = time.perf_counter() - t0
            best = max(best, 2 * n ** 3 / dt / 1e9)
            if time.perf_counter() > t_end:
                break
        return best
    finally:
        torch.set_num_threads(old)


def measure(threads: int = 2, seconds: float = 0.3) -> dict:
    """Measure the limit figures; see the module docstring. Never raises for a missing compiler."""
    out: dict = {"threads": threads, "block": {"nq": NQ, "nk": NK, "A": A}, "per_isa": {},
                 "variants": {}, "additive_triples_per_s": None, "additive_variant": None,
                 "fma_gflops": None, "matmul_gflops": None, "compiler": None, "reason": None}
    out["matmul_gflops"] = round(matmul_gflops(threads, seconds=max(0.2, seconds)), 2)
    with tempfile.TemporaryDirectory(prefix="fusedattn-limit-") as d:
        lib, info = _compile(d)
        if lib is None:
            out["reason"] = info
            return out
        out["compiler"] = info
        isas = [(isa, lanes) for isa, lanes in (("avx2", 8), ("avx512", 16))
                if ctypes.c_int.in_dll(lib, f"has_{isa}").value]
        if not isas:
            out["reason"] = "CPU has neither AVX2+FMA nor AVX-512F: no vector limit kernel"
            return out
        for isa, lanes in isas:
            for kind in KINDS:
                rate, err = _additive_variant(lib, f"{isa}_{kind}", threads, seconds)
                out["variants"][f"{isa}_{kind}"] = {"triples_per_s": round(rate), "max_rel_err": err,
                                                    "accurate": err <= REL_TOL}
            out["variants"][f"{isa}_fma_gflops"] = round(_fma_rate(lib, f"{isa}_fma", lanes, threads,
                                                                   seconds) / 1e9, 2)
        ok = {k: v for k, v in out["variants"].items() if isinstance(v, dict) and v["accurate"]}
        if ok:
            best = max(ok, key=lambda k: ok[k]["triples_per_s"])
            out["additive_variant"], out["additive_triples_per_s"] = best, ok[best]["triples_per_s"]
        out["per_isa"] = per_isa(out["variants"])
        out["fma_gflops"] = max(out["variants"][f"{isa}_fma_gflops"] for isa, _ in isas)
    return out


def per_isa(variants: dict) -> dict:
    """``{isa: {"variant": name, "triples_per_s": rate}}``: the best accurate variant of each ISA
    (the limit a kernel running at that instruction-set level is measured against)."""
    out: dict = {}
    for name, v in variants.items():
        if not isinstance(v, dict) or not v.get("accurate"):
            continue
        isa = name.split("_", 1)[0]
        if v["triples_per_s"] > out.get(isa, {}).get("triples_per_s", 0):
            out[isa] = {"variant": name, "triples_per_s": v["triples_per_s"]}
    return out


def best_of(a: dict, b: dict) -> dict:
    """Merge two ``measure`` results of one run (before and after the cases): each figure is the
    larger of the two, since other load on the cores can only lower a measured rate."""
    out = dict(a)
    for key in ("additive_triples_per_s", "fma_gflops", "matmul_gflops"):
        if (b.get(key) or 0) > (a.get(key) or 0):
            out[key] = b[key]
            if key == "additive_triples_per_s":
                out["additive_variant"] = b["additive_variant"]
    out["per_isa"] = dict(a.get("per_isa") or {})
    for isa, v in (b.get("per_isa") or {}).items():
        if v["triples_per_s"] > out["per_isa"].get(isa, {}).get("triples_per_s", 0):
            out["per_isa"][isa] = v
    out["measurements"] = [{k: m.get(k) for k in ("additive_triples_per_s", "additive_variant", "fma_gflops",
                                                  "matmul_gflops", "variants")} for m in (a, b)]
    return out
