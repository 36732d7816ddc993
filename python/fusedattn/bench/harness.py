"""Cases, the implementations they time, the per-call measurement and the run loop.

Implementations ("backends" in the records):

* ``reference``: ``fusedattn`` with ``backend="reference"`` (materializes the scores and, for
  additive scores, the ``(B, H, Lq, Lk, A)`` tanh tensor; its backward recomputes them).
* ``chunked``: what a careful user writes by hand in plain PyTorch (``chunked_additive`` /
  ``chunked_dot`` below): query chunks sized so one chunk's tensor is ~32 MiB, the tanh taken in
  place and contracted with ``w`` by a matmul, softmax per chunk, and ``torch.utils.checkpoint``
  around each chunk so autograd keeps only the chunk outputs and recomputes the rest in backward.
  It never builds the full Lq x Lk x A (or Lq x Lk) tensor.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (dot-product only).
* ``cpu`` / ``triton``: the package's fused backends, through the public API.

``reference``, ``chunked`` and ``sdpa`` are the baselines; ``cpu`` and ``triton`` are fused.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

BASELINES = ("reference", "chunked", "sdpa")
FUSED = ("cpu", "triton")
PASSES = ("fwd", "fwd+bwd")
SCORES = ("additive", "dot")
# the standard shapes: additive as in the CPU issue's targets (A = D = Dv = 128, one head),
# dot-product as in its SDPA comparison (4 heads of 64)
SHAPES = {
    "additive": dict(B=1, H=1, Hk=1, D=128, Dv=128),
    "dot": dict(B=1, H=4, Hk=4, D=64, Dv=64),
}
FULL_LENGTHS = (256, 1024, 4096, 16384, 65536)
QUICK_LENGTHS = (256, 1024, 4096)
CHUNK_BYTES = 32 << 20          # chunked baseline: bytes of one chunk's largest tensor
MiB = float(1 << 20)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


@dataclass
class Case:
    score: str
    backend: str
    pass_: str
    Lq: int
    Lk: int
    B: int = 1
    H: int = 1
    Hk: int = 1
    D: int = 64
    Dv: int = 64
    device: str = "cpu"
    dtype: str = "float32"
    causal: bool = False

    @property
    def elements(self) -> int:
        """Score elements (query, key pairs) computed, halved (approximately) for causal."""
        n = self.B * self.H * self.Lq * self.Lk
        return n // 2 if self.causal else n

    @property
    def work(self) -> float:
        """Proportional to the run time of every implementation here: pairs x feature dim."""
        return float(self.elements) * self.D

    def spec(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


def case_from_spec(d: dict) -> Case:
    d = dict(d)
    d["pass_"] = d.pop("pass")
    return Case(**d)


# ---------------------------------------------------------------------------- predictions


def esize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


# Tensors of the largest size that the reference backend holds at once (read off its code:
# fusedattn/reference.py and backends/reference_backend.py), checked against measured peaks by
# tests/test_bench.py. Additive: N = B*H*Lq*Lk*A elements of the compute dtype; forward holds
# q+k and tanh(q+k) (2N); backward holds t, t*t / 1-t*t, g and dS*t (3N; the forward's are freed by
# then). Dot: S = B*H*Lq*Lk; forward 3-4S resident (matmul, *scale, s-m, exp, p/denom; whether
# glibc reuses a freed S-sized heap block varies: measured 3.1S and 4.1S at Lq=Lk=512, H=8),
# predicted as 4S; backward ~7S (measured 7.25S).
REFERENCE_COPIES = {("additive", "fwd"): 2, ("additive", "fwd+bwd"): 3,
                    ("dot", "fwd"): 4, ("dot", "fwd+bwd"): 7}


def predicted_bytes(case: Case) -> Optional[int]:
    """Predicted peak bytes of the reference backend (it materializes); None for the others,
    whose memory does not grow with Lq*Lk (the chunked baseline's chunks are ~CHUNK_BYTES)."""
    el = max(4, esize(case.dtype))     # the reference computes half precision in float32
    pairs = case.B * case.H * case.Lq * case.Lk
    if case.backend == "reference":
        per = pairs * (case.D if case.score == "additive" else 1)
        return REFERENCE_COPIES[(case.score, case.pass_)] * per * el
    return None


# ---------------------------------------------------------------------------- implementations


def _expand(x: torch.Tensor, H: int) -> torch.Tensor:
    return x if x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1)


def chunk_rows(row_bytes: int, Lq: int) -> int:
    return max(1, min(Lq, CHUNK_BYTES // max(1, row_bytes)))


def _additive_chunk(qc, k, v, w):
    H = qc.shape[1]
    t = torch.tanh_(qc.unsqueeze(3) + k.unsqueeze(2))                     # (B, H, c, Lk, A)
    s = torch.matmul(t, w.view(1, H, 1, -1, 1)).squeeze(-1)               # (B, H, c, Lk)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def chunked_additive(q, k, v, w):
    """Additive attention in query chunks, plain PyTorch, differentiable (see module docstring)."""
    B, H, Lq, A = q.shape
    k, v = _expand(k, H), _expand(v, H)
    c = chunk_rows(B * H * k.shape[2] * A * q.element_size(), Lq)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, w))
    outs = [checkpoint(_additive_chunk, q[:, :, s:s + c], k, v, w, use_reentrant=False) if grad
            else _additive_chunk(q[:, :, s:s + c], k, v, w) for s in range(0, Lq, c)]
    return torch.cat(outs, dim=2)


def _dot_chunk(qc, k, v, scale):
    return torch.matmul(torch.softmax(torch.matmul(qc, k.transpose(-1, -2)) * scale, dim=-1), v)


def chunked_dot(q, k, v, scale=None):
    """Dot-product attention in query chunks, plain PyTorch, differentiable."""
    B, H, Lq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = _expand(k, H), _expand(v, H)
    c = chunk_rows(B * H * k.shape[2] * q.element_size(), Lq)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = [checkpoint(_dot_chunk, q[:, :, s:s + c], k, v, scale, use_reentrant=False) if grad
            else _dot_chunk(q[:, :, s:s + c], k, v, scale) for s in range(0, Lq, c)]
    return torch.cat(outs, dim=2)


def make_inputs(case: Case, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    dt, dev = DTYPES[case.dtype], case.device
    grad = case.pass_ == "fwd+bwd"

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dt).requires_grad_(grad)

    x = {"q": t(case.B, case.H, case.Lq, case.D), "k": t(case.B, case.Hk, case.Lk, case.D),
         "v": t(case.B, case.Hk, case.Lk, case.Dv)}
    if case.score == "additive":
        x["w"] = t(case.H, case.D, scale=1.0 / math.sqrt(case.D))
    if grad:
        x["dout"] = torch.randn(case.B, case.H, case.Lq, case.Dv, generator=g).to(dev, dt)
    return x


def forward_fn(case: Case) -> Callable:
    """f(inputs) -> out for this case's score type and implementation."""
    import fusedattn

    name, causal = case.backend, case.causal
    if case.score == "additive":
        if causal and name == "chunked":
            raise ValueError("chunked baseline: causal not implemented")
        if name == "chunked":
            return lambda x: chunked_additive(x["q"], x["k"], x["v"], x["w"])
        if name in ("reference", *FUSED):
            return lambda x: fusedattn.additive_attention(x["q"], x["k"], x["v"], x["w"], causal=causal,
                                                          backend=name)
    else:
        if name == "chunked" and not causal:
            return lambda x: chunked_dot(x["q"], x["k"], x["v"])
        if name == "sdpa":
            gqa = case.H != case.Hk
            if causal and case.Lq != case.Lk:
                raise ValueError("sdpa: causal alignment differs when Lq != Lk")
            return lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=causal,
                                                            enable_gqa=gqa)
        if name in ("reference", *FUSED):
            return lambda x: fusedattn.dot_product_attention(x["q"], x["k"], x["v"], causal=causal,
                                                             backend=name)
    raise ValueError(f"no implementation {name!r} for {case.score} scores (causal={causal})")


def call_fn(case: Case, x: dict) -> Callable[[], object]:
    """One timed call: forward, or forward + backward (gradients reset before each call)."""
    fwd = forward_fn(case)
    if case.pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fwd(x)
        return run
    leaves = [x[n] for n in ("q", "k", "v", "w") if n in x]

    def run_bwd():
        for t in leaves:
            t.grad = None
        out = fwd(x)
        out.backward(x["dout"])
        return out
    return run_bwd


def unsupported_reason(case: Case) -> Optional[str]:
    """Why this case cannot run here (checked on tiny tensors), or None."""
    if case.backend == "sdpa" and case.score != "dot":
        return "sdpa computes dot-product scores only"
    if case.backend == "triton" and not case.device.startswith("cuda"):
        return "triton is measured on a GPU only (the CPU interpreter is not a benchmark)"
    if case.device.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device"
    if case.backend in ("reference", *FUSED):
        from fusedattn import backends
        small = Case(**{**asdict(case), "Lq": 2, "Lk": 2, "pass_": "fwd"})
        x = make_inputs(small)
        try:
            backends.select(case.backend, case.score, x["q"], x["k"], x["v"])
        except ValueError as e:
            return str(e)
    return None


# ---------------------------------------------------------------------------- memory (CPU)

_LIBC = None
_GC_FROZEN = False


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_hwm_supported() -> bool:
    try:
        _status_kib("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (OSError, KeyError):
        return False


def measure_cpu_peak(fn: Callable[[], object]) -> tuple[Optional[float], float, object]:
    """Run fn once; return (peak bytes it added to the resident set, seconds, its result).

    Method: collect garbage (the first call also ``gc.freeze()``s the objects that survive, so that
    later collections are quick) and ``malloc_trim(0)`` so freed heap pages go back to the OS, read
    ``VmRSS`` as the baseline (inputs and everything already live are in it), reset the kernel's
    high-water mark by writing 5 to ``/proc/self/clear_refs``, run ``fn``, read ``VmHWM``.
    Peak = VmHWM - baseline: every page the call touched beyond what was resident, whoever
    allocated it (torch's allocator, an extension's scratch buffers, OpenMP). Pages count once
    written, so a tensor allocated but never written would not. None where /proc is unusable.
    """
    global _GC_FROZEN
    gc.collect()
    if not _GC_FROZEN:     # later collections then scan only new objects (0.3 s -> ms per call)
        gc.freeze()
        _GC_FROZEN = True
    _malloc_trim()
    try:
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, KeyError):
        t0 = time.perf_counter()
        res = fn()
        return None, time.perf_counter() - t0, res
    t0 = time.perf_counter()
    res = fn()
    dt = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return max(0, peak - base) * 1024.0, dt, res


# ---------------------------------------------------------------------------- one case


def _timer(device: str):
    if device.startswith("cuda"):
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            res = fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3, res
    else:
        def timed(fn):
            t0 = time.perf_counter()
            res = fn()
            return time.perf_counter() - t0, res
    return timed


def run_case(spec: dict, repeats: int = 5, budget_s: float = 3.0, threads: int = 2) -> dict:
    """Measure one case in this process; returns the measured fields of its record.

    Order: a warm-up call on a tiny shape (loads extensions, starts thread pools), then the
    first full-size call, whose peak memory is measured (CPU: ``measure_cpu_peak``; CUDA:
    ``torch.cuda.max_memory_allocated`` above the memory allocated before the call) and which
    also warms the full shape. Then up to ``repeats`` timed calls, fewer if they would exceed
    ``budget_s``; ``time_ms`` is their median. If the first call alone took more than
    ``budget_s``, no repeat is run and ``time_ms`` is that call (``repeats`` = 0 in the record).
    """
    torch.set_num_threads(threads)
    case = case_from_spec(spec)
    cuda = case.device.startswith("cuda")
    timed = _timer(case.device)
    tiny = Case(**{**asdict(case), "Lq": min(case.Lq, 64), "Lk": min(case.Lk, 64)})
    xt = make_inputs(tiny, seed=1)
    call_fn(tiny, xt)()
    del xt
    x = make_inputs(case)
    run = call_fn(case, x)
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        first, res = timed(run)
        peak = float(torch.cuda.max_memory_allocated() - before)
        method = "torch.cuda.max_memory_allocated"
    else:
        peak, first, res = measure_cpu_peak(run)
        method = "rss-hwm" if peak is not None else None
    del res
    times = []
    if first <= budget_s:
        n = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
        for _ in range(n):
            dt, res = timed(run)
            del res
            times.append(dt)
    t = statistics.median(times) if times else first
    return {"time_ms": t * 1e3, "first_call_ms": first * 1e3, "repeats": len(times),
            "peak_mem_mib": None if peak is None else peak / MiB, "mem_method": method,
            **cpu_isa_fields(case)}


def cpu_isa_fields(case: Case) -> dict:
    """For the cpu backend: the instruction-set level the call ran at (``isa``) and, for dot
    attention, how its products multiply (``gemm``: ``cpu_backend.cpu_gemm_path``)."""
    if case.backend != "cpu":
        return {}
    from ..backends import cpu_backend

    out = {"isa": cpu_backend.cpu_isa()}
    if case.score == "dot":
        out["gemm"] = cpu_backend.cpu_gemm_path(getattr(torch, case.dtype))
    return out


def run_isolated(spec: dict, repeats: int, budget_s: float, threads: int, timeout: float) -> dict:
    """run_case in a fresh interpreter (``python -m fusedattn.bench.worker``)."""
    payload = json.dumps({"spec": spec, "repeats": repeats, "budget_s": budget_s, "threads": threads})
    try:
        p = subprocess.run([sys.executable, "-m", "fusedattn.bench.worker"], input=payload,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"worker exited {p.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------- the standard set


def standard_cases(scores=SCORES, lengths=FULL_LENGTHS, backends=(*BASELINES, *FUSED),
                   passes=PASSES, device="cpu", dtype="float32") -> list[Case]:
    cases = []
    for score in scores:
        for pass_ in passes:
            for L in lengths:
                for name in backends:
                    if name == "sdpa" and score != "dot":
                        continue
                    cases.append(Case(score=score, backend=name, pass_=pass_, Lq=L, Lk=L, device=device,
                                      dtype=dtype, **SHAPES[score]))
    return cases


@dataclass
class RunConfig:
    repeats: int = 5
    budget_s: float = 3.0          # per case: timed repeats stop here
    time_cap_s: float = 300.0      # skip a case whose predicted single-call time is above this
    slow_cap_s: float = 60.0       # the same for the plain-PyTorch baselines (reference, chunked)
    mem_budget_bytes: float = 8 * (1 << 30)
    threads: int = 2
    isolate: bool = True
    log: Callable[[str], None] = field(default=lambda s: None)


def run_cases(cases: list[Case], cfg: RunConfig) -> list[dict]:
    """Run (or skip, with the reason and predictions) every case; records without ratios yet.

    Cases of one series (score, backend, pass, shape, device, dtype) should come in increasing
    length: a case whose single call is predicted (from the previous measured length, scaled by
    the work Lq*Lk*D) to exceed ``time_cap_s`` (``slow_cap_s`` for the reference and chunked
    baselines), or whose predicted bytes exceed
    ``mem_budget_bytes``, is recorded as skipped instead of run.
    """
    last: dict = {}
    records = []
    for case in cases:
        rec = {**case.spec(), "A": case.D if case.score == "additive" else None,
               "elements": case.elements, "skipped": None, "predicted_bytes": predicted_bytes(case),
               "predicted_s": None}
        series = (case.score, case.backend, case.pass_, case.B, case.H, case.D, case.device, case.dtype)
        if series in last:
            work0, t0 = last[series]
            rec["predicted_s"] = t0 * case.work / work0
        reason = unsupported_reason(case)
        if reason is None and rec["predicted_bytes"] is not None \
                and rec["predicted_bytes"] > cfg.mem_budget_bytes:
            reason = (f"predicted {rec['predicted_bytes'] / (1 << 30):.1f} GiB > budget "
                      f"{cfg.mem_budget_bytes / (1 << 30):.1f} GiB")
        cap = cfg.slow_cap_s if case.backend in ("reference", "chunked") else cfg.time_cap_s
        if reason is None and rec["predicted_s"] is not None and rec["predicted_s"] > cap:
            reason = f"predicted {rec['predicted_s']:.0f} s per call > cap {cap:.0f} s"
        if reason is None:
            cfg.log(f"  {case.score:8s} {case.pass_:7s} L={case.Lq:<6d} {case.backend:9s} ...")
            if cfg.isolate:
                timeout = max(120.0, 4 * cap)
                res = run_isolated(case.spec(), cfg.repeats, cfg.budget_s, cfg.threads, timeout)
            else:
                try:
                    res = run_case(case.spec(), cfg.repeats, cfg.budget_s, cfg.threads)
                except Exception as e:                               # noqa: BLE001 - recorded
                    res = {"error": f"{type(e).__name__}: {e}"}
            if "error" in res:
                reason = res.pop("error")
            elif "skipped" in res:
                reason = res.pop("skipped")
            rec.update(res)
            if reason is None:
                last[series] = (case.work, rec["first_call_ms"] / 1e3)
        if reason is not None:
            rec["skipped"] = reason
            for k in ("time_ms", "peak_mem_mib"):
                rec.setdefault(k, None)
        records.append(rec)
    return records
