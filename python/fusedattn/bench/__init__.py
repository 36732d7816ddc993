"""The benchmark harness: time, peak memory and distance to the machine's limit, per backend.

Run ``python -m fusedattn.bench [--quick] [--json PATH] [--plot PATH] [--device cpu|cuda]
[--dtype float32] [--score additive|dot|all]``: it prints a table and writes
``{"machine": ..., "limit": ..., "settings": ..., "records": [...]}``.

What is measured, and how:

* Cases: additive scores at B=1, H=1, A=D=Dv=128 and dot-product scores at B=1, H=4, D=Dv=64,
  Lq = Lk from 256 to 65,536 (``--quick``: 256 to 4,096), each forward (``fwd``, no autograd
  graph) and forward + backward (``fwd+bwd``, one ``backward`` through the output with
  gradients for q, k, v (and w)). Implementations: see ``harness`` (reference, chunked plain
  PyTorch, SDPA, and the fused ``cpu`` backend; ``triton`` with ``--device cuda`` only).
* Isolation: every case runs in a fresh interpreter (``fusedattn.bench.worker``; ``--quick``
  runs them in one process to save the interpreter starts) with
  ``torch.set_num_threads(threads)`` (2 by default; recorded in ``machine``, with the load
  average before and after the run: other work on the cores slows every figure).
* Time: a warm-up call on a tiny shape, one full-size call (which also measures memory), then
  up to N timed calls (``repeats`` in each record, N=5 or 3 with ``--quick``, fewer when the
  calls would exceed the per-case budget); ``time_ms`` is their median. A call longer than the
  budget is timed once (``repeats`` = 0: the single measured call). On CUDA, CUDA events.
* Peak memory (CPU): what the call adds to the process's resident set, not the inputs: after
  ``gc`` and ``malloc_trim(0)``, ``VmRSS`` is the baseline, the kernel's high-water mark is
  reset through ``/proc/self/clear_refs`` and ``VmHWM`` is read after the call (see
  ``harness.measure_cpu_peak``). This counts every page the call touches, including memory an
  extension allocates outside torch's allocator. Outputs and gradients count (the call makes
  them). tests/test_bench.py checks it against a known allocation and against the reference's
  materialized tensors. In one long-lived process (``--quick``, ``--no-isolate``) it can
  undercount when the allocator hands the call pages that stayed resident from an earlier case
  (seen: one 8 MiB block of 32 MiB); the fresh interpreter of the default run avoids that.
  On CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before.
* Skips: the reference's peak is predicted from its materialized tensors
  (``harness.predicted_bytes``) and the case is recorded as skipped with ``predicted_bytes`` if
  that exceeds the budget (8 GiB); any case whose single call is predicted, from the previous
  length of its series scaled by the work, to take longer than the time cap (60 s for the
  reference and chunked baselines, 300 s for the others; 10 s with ``--quick``) is skipped with
  ``predicted_s``.
* ``--from-json PATH`` re-derives ratios, the H100 rows, the table and the plot from an earlier
  run's records without running anything.
* Machine limit (``limits``), measured in the same run: the additive inner loop
  ``sum_a w_a / (1 + E_q E_k)`` in a C kernel compiled at run time, and the fp32 FMA peak;
  ``pct_of_limit`` relates every additive figure to the first and every dot figure to the second.
* The H100 column is a model (``gpu_model``) from sm_90 SASS counts, never a measurement.
"""
from .gpu_model import H100, lower_bound
from .harness import Case, chunked_additive, chunked_dot, measure_cpu_peak, predicted_bytes, run_case

__all__ = ["H100", "Case", "chunked_additive", "chunked_dot", "lower_bound", "measure_cpu_peak",
           "predicted_bytes", "run_case"]
