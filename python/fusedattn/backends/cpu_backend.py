"""The CPU backend: fused C++ kernels from the extension ``fusedattn._C`` (``csrc/``).

Importing ``fusedattn._C`` registers the ops ``torch.ops.fusedattn_cpu.*``; it is
imported lazily, on first use, so the package imports without the extension and
``available_backends()["cpu"]`` carries the reason it could not be loaded.

The kernels compute in float32 (bfloat16 and float16 inputs are converted to float32 on
entry and the results back); they never store an ``Lq x Lk`` tensor. Inputs with any
strides are accepted: the C++ launchers copy them to contiguous float32 buffers,
an ``O(L*D)`` cost against the ``O(Lq*Lk*D)`` work.

Instruction sets: one binary holds a scalar, an AVX2+FMA and an AVX-512 (F/BW/VL/DQ)
version of every inner loop. The level is chosen once per process from CPUID and the
register state the OS enables; the environment variable ``FUSEDATTN_CPU_ISA`` (read once,
on first use) may force a lower one: ``scalar``, ``avx2`` or ``avx512``. An unknown value or
a level the CPU lacks makes every cpu-backend call raise ``ValueError`` naming the allowed
values, and ``available_backends()["cpu"]`` reports it. :func:`cpu_isa` tells the level in
use, :func:`cpu_isa_levels` the levels this machine can run.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Backend, Grads, _varlen_backward, _varlen_forward

_LOAD_ERROR: Optional[str] = None
_LOADED = False
ISA_LEVELS = ("scalar", "avx2", "avx512")


def _load() -> Optional[str]:
    """Import the extension once; None on success, else the reason it failed."""
    global _LOADED, _LOAD_ERROR
    if not _LOADED:
        _LOADED = True
        try:
            from .. import _C  # noqa: F401  (registers torch.ops.fusedattn_cpu)
        except (ImportError, OSError) as e:
            _LOAD_ERROR = f"the C++ extension fusedattn._C is not available ({e}); " \
                          "build it with `pip install --no-build-isolation -e .`"
    return _LOAD_ERROR


def _ops():
    err = _load()
    if err is not None:
        raise RuntimeError(err)
    return torch.ops.fusedattn_cpu


def cpu_isa() -> str:
    """The instruction-set level the cpu backend runs at: ``"scalar"``, ``"avx2"`` or ``"avx512"``.

    Raises ``ValueError`` when ``FUSEDATTN_CPU_ISA`` holds an unknown level or one this CPU
    lacks (the message names the allowed values), ``RuntimeError`` without the extension.
    """
    return _ops().isa()


def cpu_gemm_path(dtype: torch.dtype) -> str:
    """How dot-product attention in ``dtype`` multiplies at the level in use: ``"brgemm-bf16"``
    (oneDNN's brgemm micro-kernels on bfloat16 operands: AVX512-BF16 or AMX), ``"brgemm"`` (their
    float32 kernels; float16 and, without bfloat16 hardware, bfloat16 inputs converted),
    ``"gemm16"`` (MKL's 16-bit GEMM) or ``"sgemm"`` (MKL float32: the avx2 and scalar levels)."""
    return _ops().gemm_path(str(dtype).replace("torch.", ""))


def cpu_isa_levels() -> list[str]:
    """The levels this CPU and OS can run, lowest first (e.g. ``["scalar", "avx2"]``)."""
    return list(_ops().supported_isas())


_ISA_ERROR: Optional[str] = None
_ISA_CHECKED = False


def _isa_error() -> Optional[str]:
    """Why FUSEDATTN_CPU_ISA cannot be served (None: it can), read once per process (as the variable
    is) by the first eager call, so that later checks are plain Python that torch.compile traces
    without calling an op. A process whose first call is a compiled one checks nothing here: the
    ops then raise the same ValueError when they run."""
    global _ISA_ERROR, _ISA_CHECKED
    if not _ISA_CHECKED and not torch.compiler.is_compiling():
        _ISA_CHECKED = True
        try:
            torch.ops.fusedattn_cpu.isa()
        except ValueError as e:
            _ISA_ERROR = str(e).splitlines()[0]
    return _ISA_ERROR


def _all_finite(*ts: torch.Tensor) -> bool:
    """Whether every element is finite (one float32 sum each: a NaN or an infinity makes the sum
    non-finite; a sum that overflows says False too, and that call runs per sequence). A packed call
    multiplies the softmax's exact zeros by the values (and, backward, by dO) of rows next to a
    sequence's own in the same tile: 0 * x = 0 for every finite x, but a NaN or infinity there would
    reach another sequence. Such calls run per sequence, as separate calls would."""
    # float32 sums: a float16 sum overflows past 65504 for ordinary values
    return all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in ts if t.numel())


class CpuBackend(Backend):
    name = "cpu"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32, torch.bfloat16, torch.float16})
    description = ("fused C++ kernels (AVX-512 / AVX2+FMA / scalar, chosen at run time), float32 "
                   "compute, online softmax; never stores an Lq x Lk tensor")
    # varlen natively: one op call over the packed batch (each row's keys, masks and distances are its
    # sequence's), not a call per sequence
    modifiers = frozenset({"key_lengths", "causal", "window", "softcap", "rel_bias", "alibi", "varlen"})
    f32_out = True  # the C++ ops return out and dq, dk, dv, dw in float32

    def unavailable_reason(self) -> Optional[str]:
        return _load() or _isa_error()

    def not_supported_reasons(self, spec, q, k, v):
        # a bad FUSEDATTN_CPU_ISA is a configuration error: raise it rather than let "auto"
        # quietly take another backend
        if _load() is None:
            err = _isa_error()
            if err is not None:
                raise ValueError(err)
        return super().not_supported_reasons(spec, q, k, v)

    def forward(self, spec, q, k, v, w, out32: bool = False):
        if spec.varlen and not _all_finite(v):
            return _varlen_forward(self, spec, q, k, v, w, out32)
        mods = (spec.window_left, spec.window_right)
        tail = (spec.rel_bias, spec.alibi_slopes, spec.cu_seqlens_q, spec.cu_seqlens_k)
        if spec.additive:
            return torch.ops.fusedattn_cpu.additive_fwd(q, k, v, w, spec.key_lengths, False, *mods, *tail)
        return torch.ops.fusedattn_cpu.dot_fwd(q, k, v, spec.key_lengths, float(spec.scale), False, *mods,
                                               float(spec.softcap), *tail)

    def backward(self, spec, dout, q, k, v, w, out, lse):
        if spec.varlen and not _all_finite(v, dout):
            return _varlen_backward(self, spec, dout, q, k, v, w, out, lse)
        mods = (spec.window_left, spec.window_right)
        tail = (spec.rel_bias, spec.alibi_slopes, spec.cu_seqlens_q, spec.cu_seqlens_k)
        if spec.additive:
            dq, dk, dv, dw, drb = torch.ops.fusedattn_cpu.additive_bwd(
                dout, q, k, v, w, spec.key_lengths, False, out, lse, *mods, *tail)
        else:
            dw = None
            dq, dk, dv, drb = torch.ops.fusedattn_cpu.dot_bwd(
                dout, q, k, v, spec.key_lengths, float(spec.scale), False, out, lse, *mods,
                float(spec.softcap), *tail)
        return Grads(dq, dk, dv, dw, drb if spec.rel_bias is not None else None)

    # the four launchers (key_lengths and causal only); their results are in the input dtype
    def additive_forward(self, q, k, v, w, key_lengths, causal):
        out, lse = torch.ops.fusedattn_cpu.additive_fwd(q, k, v, w, key_lengths, bool(causal))
        return out.to(q.dtype), lse

    def additive_backward(self, dout, q, k, v, w, key_lengths, causal, out, lse):
        g = torch.ops.fusedattn_cpu.additive_bwd(dout, q, k, v, w, key_lengths, bool(causal), out, lse)[:4]
        return tuple(t.to(q.dtype) for t in g)

    def dot_forward(self, q, k, v, key_lengths, scale, causal):
        out, lse = torch.ops.fusedattn_cpu.dot_fwd(q, k, v, key_lengths, float(scale), bool(causal))
        return out.to(q.dtype), lse

    def dot_backward(self, dout, q, k, v, key_lengths, scale, causal, out, lse):
        g = torch.ops.fusedattn_cpu.dot_bwd(dout, q, k, v, key_lengths, float(scale), bool(causal),
                                            out, lse)[:3]
        return tuple(t.to(q.dtype) for t in g)
