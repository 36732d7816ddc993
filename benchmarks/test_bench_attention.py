"""pytest-benchmark cases: score type x backend x sequence length x pass, grouped per case.

Run ``pytest benchmarks/ --benchmark-only --benchmark-json=out/bench.json``: each group
(``additive fwd L=1024`` ...) holds one row per backend, so the table compares backends on the
same case. The default set is small (L = 256 and 1024, B=1; additive H=1, A=D=Dv=128; dot H=4,
D=Dv=64); set ``FUSEDATTN_BENCH_LENGTHS=256,1024,4096`` for more. Backends that are not usable
here (the cpu extension not built, triton without a GPU) and baselines predicted to need more than
8 GiB are skipped with the reason. The full harness with memory, limits and the H100 model is
``python -m fusedattn.bench``; the implementations timed here are the same (fusedattn.bench.harness).
"""
import os

import pytest
import torch

from fusedattn.bench import harness

LENGTHS = [int(x) for x in os.environ.get("FUSEDATTN_BENCH_LENGTHS", "256,1024").split(",")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("reference", "chunked", "sdpa", "triton" if DEVICE == "cuda" else "cpu")
MEM_BUDGET = 8 << 30

CASES = [(score, backend, L, pass_) for score in harness.SCORES for pass_ in harness.PASSES for L in LENGTHS
         for backend in BACKENDS if not (backend == "sdpa" and score != "dot")]


@pytest.mark.parametrize("score,backend,L,pass_", CASES,
                         ids=[f"{s}-{p}-L{L}-{b}" for s, b, L, p in CASES])
def test_attention(benchmark, score, backend, L, pass_):
    case = harness.Case(score=score, backend=backend, pass_=pass_, Lq=L, Lk=L, device=DEVICE,
                        **harness.SHAPES[score])
    reason = harness.unsupported_reason(case)
    if reason:
        pytest.skip(reason)
    need = harness.predicted_bytes(case)
    if need is not None and need > MEM_BUDGET:
        pytest.skip(f"predicted {need / (1 << 30):.1f} GiB > {MEM_BUDGET >> 30} GiB")
    x = harness.make_inputs(case)
    run = harness.call_fn(case, x)
    if DEVICE == "cuda":
        def timed():
            run()
            torch.cuda.synchronize()
    else:
        timed = run
    benchmark.group = f"{score} {pass_} L={L}"
    benchmark.extra_info.update(score_elements=case.elements, feature_dim=case.D, shape=harness.SHAPES[score])
    benchmark.pedantic(timed, rounds=5 if L <= 256 else 3, iterations=1, warmup_rounds=1)
