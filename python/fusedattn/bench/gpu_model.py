"""A MODEL, not a measurement: lower-bound run time of a Triton kernel on an H100 from its SASS.

Nothing here runs on a GPU. ``python -m fusedattn.tools.gpu_compile_check --arch 90`` compiles
each Triton kernel for sm_90 without a GPU and counts, per score element, the MUFU (special
function unit) operations and the instructions of the compiled kernel. From those counts
``lower_bound`` gives the time below which the kernel cannot run on an H100 SXM, as the largest
of four throughput bounds, and names the bound that limits it:

* ``sfu``:   MUFU lane-ops / (SMs x 16 per clock)
* ``issue``: instructions / 32 lanes per warp / (SMs x 4 warp-instructions per clock)
* ``fp32``:  FP32 FMA/FMUL/FADD lane-ops / (SMs x 128 per clock) (when counted)
* ``hbm``:   compulsory bytes (inputs read once, outputs written once) / 3.35 TB/s

Counts are per thread (lane) per score element, i.e. what one element costs the lane that
computes it; a warp instruction serves 32 lanes. Latency, occupancy, shared-memory and L2 traffic,
and tensor-core work are ignored, so real kernels are slower: the figure is a floor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class Gpu:
    name: str = "H100 SXM (model)"
    sms: int = 132
    clock_hz: float = 1.83e9
    sfu_per_clk_sm: int = 16          # MUFU lane-ops per clock per SM
    fp32_per_clk_sm: int = 128        # FP32 lanes per clock per SM
    issue_per_clk_sm: int = 4         # warp-instructions issued per clock per SM
    warp: int = 32
    hbm_bytes_per_s: float = 3.35e12


H100 = Gpu()


def lower_bound(elements: float, mufu_per_elem: float, instr_per_elem: float, bytes_: float,
                fp32_per_elem: Optional[float] = None, gpu: Gpu = H100) -> dict:
    """Lower-bound seconds for ``elements`` score elements on ``gpu``, and the limiting bound.

    Args:
        elements: score elements processed (the unit the counts are per).
        mufu_per_elem: MUFU lane-ops per element.
        instr_per_elem: SASS instructions per element per lane (thread-instructions).
        bytes_: compulsory HBM traffic of the call.
        fp32_per_elem: FP32 pipe lane-ops per element, if counted.

    Returns ``{"time_s", "bound", "bounds": {name: seconds}, "gpu": {...}}``.
    """
    sm_clk = gpu.sms * gpu.clock_hz
    bounds = {
        "sfu": elements * mufu_per_elem / (gpu.sfu_per_clk_sm * sm_clk),
        "issue": elements * instr_per_elem / gpu.warp / (gpu.issue_per_clk_sm * sm_clk),
        "hbm": bytes_ / gpu.hbm_bytes_per_s,
    }
    if fp32_per_elem is not None:
        bounds["fp32"] = elements * fp32_per_elem / (gpu.fp32_per_clk_sm * sm_clk)
    bound = max(bounds, key=bounds.get)
    return {"time_s": bounds[bound], "bound": bound, "bounds": bounds, "gpu": asdict(gpu)}


def compulsory_bytes(score: str, pass_: str, B: int, H: int, Hk: int, Lq: int, Lk: int, D: int,
                     Dv: int, esize: int) -> float:
    """Bytes a fused kernel must move at least: each input read once, each output written once.

    Forward reads q, k, v (and w) and writes out and the float32 lse; forward + backward adds
    reading q, k, v, out, dout, lse (and w) again and writing dq, dk, dv (and dw).
    """
    q, k, v, o = B * H * Lq * D, B * Hk * Lk * D, B * Hk * Lk * Dv, B * H * Lq * Dv
    w = H * D if score == "additive" else 0
    fwd = (q + k + v + w + o) * esize + B * H * Lq * 4
    if pass_ == "fwd":
        return float(fwd)
    bwd = (q + k + v + w + 2 * o) * esize + B * H * Lq * 4 + (q + k + v + w) * esize
    return float(fwd + bwd)
