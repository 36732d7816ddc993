"""A MODEL, not a measurement: lower-bound run time of a Triton kernel on an H100 (or A100) from its SASS.

Nothing here runs on a GPU. ``python -m fusedattn.tools.gpu_compile_check --arch 90`` compiles
each Triton kernel for sm_90 without a GPU and counts, per score element, the MUFU (special
function unit) operations and the instructions of the compiled kernel, amortized: the
innermost loop plus the per-tile work around it (softmax, P @ V, masks) spread over the
tile's elements (``instr_per_elem_amortized`` of the compile check). From those counts
``lower_bound`` gives the time below which the kernel cannot run, as the largest of five
throughput bounds, and names the bound that limits it (``bound``, with the readable name in
``bound_name``):

* ``sfu`` (MUFU):     MUFU lane-ops / (SMs x 16 per clock)
* ``issue``:          instructions / 32 lanes per warp / (SMs x 4 warp-instructions per clock)
* ``fp32`` (FMA):     FP32 FMA/FMUL/FADD lane-ops / (SMs x FP32 lanes per clock) (when counted)
* ``tensor``:         tensor-core FLOPs / dense peak (when counted)
* ``hbm`` (memory):   compulsory bytes (inputs read once, outputs written once) / HBM bandwidth

Counts are per thread (lane) per score element, i.e. what one element costs the lane that
computes it; a warp instruction serves 32 lanes. Latency, occupancy, shared-memory and L2
traffic are ignored, so real kernels are slower: the figure is a floor.
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
    tensor_flops_16bit: float = 989e12  # dense fp16/bf16 tensor-core FLOP/s
    tensor_flops_tf32: float = 494e12   # dense TF32 (3xTF32 float32 inputs: a third of it)


H100 = Gpu()
A100 = Gpu(name="A100 SXM (model)", sms=108, clock_hz=1.41e9, fp32_per_clk_sm=64, hbm_bytes_per_s=2.04e12,
           tensor_flops_16bit=312e12, tensor_flops_tf32=156e12)
BOUND_NAMES = {"sfu": "MUFU", "issue": "issue", "fp32": "FMA", "tensor": "tensor", "hbm": "memory"}


def tensor_flops_per_elem(score: str, kernel_pass: str, D: int, Dv: int, A: int = 0) -> float:
    """Tensor-core FLOPs per score element (pair for dot, triple for additive) of one kernel pass:
    "fwd" (Q K^T and P V), "dkdv" (Q K^T, dV, dP, dK), "dq" (Q K^T, dP, dQ); the additive kernels
    only multiply P V / dP on tensor cores, spread over the A features of a triple."""
    if score == "dot":
        return {"fwd": 2 * (D + Dv), "dkdv": 4 * (D + Dv), "dq": 4 * D + 2 * Dv}[kernel_pass]
    return {"fwd": 2 * Dv, "dkdv": 4 * Dv, "dq": 2 * Dv}[kernel_pass] / max(A, 1)


def lower_bound(elements: float, mufu_per_elem: float, instr_per_elem: float, bytes_: float,
                fp32_per_elem: Optional[float] = None, gpu: Gpu = H100,
                tensor_flops_per_elem: Optional[float] = None, tf32: bool = False) -> dict:
    """Lower-bound seconds for ``elements`` score elements on ``gpu``, and the limiting bound.

    Args:
        elements: score elements processed (the unit the counts are per).
        mufu_per_elem: MUFU lane-ops per element.
        instr_per_elem: SASS instructions per element per lane (thread-instructions).
        bytes_: compulsory HBM traffic of the call.
        fp32_per_elem: FP32 pipe lane-ops per element, if counted.
        tensor_flops_per_elem: tensor-core FLOPs per element, if counted (``tf32``: float32
            inputs, 3xTF32 = three TF32 MMAs).

    Returns ``{"time_s", "bound", "bound_name", "bounds": {name: seconds}, "gpu": {...}}``.
    """
    sm_clk = gpu.sms * gpu.clock_hz
    bounds = {
        "sfu": elements * mufu_per_elem / (gpu.sfu_per_clk_sm * sm_clk),
        "issue": elements * instr_per_elem / gpu.warp / (gpu.issue_per_clk_sm * sm_clk),
        "hbm": bytes_ / gpu.hbm_bytes_per_s,
    }
    if fp32_per_elem is not None:
        bounds["fp32"] = elements * fp32_per_elem / (gpu.fp32_per_clk_sm * sm_clk)
    if tensor_flops_per_elem is not None:
        peak = gpu.tensor_flops_tf32 / 3 if tf32 else gpu.tensor_flops_16bit
        bounds["tensor"] = elements * tensor_flops_per_elem / peak
    bound = max(bounds, key=bounds.get)
    return {"time_s": bounds[bound], "bound": bound, "bound_name": BOUND_NAMES[bound], "bounds": bounds,
            "gpu": asdict(gpu)}


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
