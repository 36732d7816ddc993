"""Equivalence tests generated from each backend's declarations.

Every backend declares the devices and dtypes it serves (``Backend.devices``,
``Backend.dtypes``). For each usable backend, each declared dtype and each
declared device present here, a covering grid of cases runs forward and backward
against the float64 reference under the tolerance rule (``fusedattn.testing``).
Undeclared dtypes must be refused with a ValueError naming the reason.
Backend-specific suites (``test_cpu.py``, ``test_triton.py``) go deeper.
"""
import pytest
import torch

from fusedattn import backends
from fusedattn.testing import Case, check_backend, make_inputs

GRID = [
    Case(Lq=1, Lk=1),
    Case(Lq=17, Lk=97, D=40, Dv=24, causal=True),
    Case(Lq=97, Lk=17, D=64, Dv=64, causal=True),
    Case(B=2, H=4, Hk=2, Lq=64, Lk=257, D=100, Dv=40, lengths=(200, 0)),
    Case(B=2, Lq=33, Lk=65, D=16, Dv=32, lengths=(65, 7), causal=True, strided=True),
    Case(Lq=17, Lk=64, D=128, Dv=128, magnitude=30.0),
    Case(Lq=17, Lk=17, magnitude=1e4),
    Case(Lq=1, Lk=1025, D=64, Dv=64),
]
HALF_GRID = [GRID[1], GRID[3], GRID[5]]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _params():
    for name in backends.names():
        if name == "reference":
            continue  # the oracle; tested in test_reference.py
        backend = backends.get(name)
        reason = backends.unavailable_reason(name)
        declared = sorted(backend.devices) if backend is not None else ["cpu"]
        for device in declared:
            for dtype in DTYPES:
                dt = str(dtype).replace("torch.", "")
                marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
                if backend is not None and dtype not in backend.dtypes:
                    yield pytest.param(name, device, dtype, False, id=f"{name}-{device}-{dt}-refused",
                                       marks=marks)
                else:
                    yield pytest.param(name, device, dtype, True, id=f"{name}-{device}-{dt}", marks=marks)


def _skip_absent(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here")


@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("name,device,dtype,supported", list(_params()))
def test_declared_support(score, name, device, dtype, supported):
    _skip_absent(device)
    if not supported:
        q, k, v, w, _ = make_inputs(Case(score=score, dtype=dtype), device)
        with pytest.raises(ValueError, match=f"backend='{name}' cannot run .*dtype"):
            backends.select(name, score, q, k, v)
        return
    grid = GRID if dtype in (torch.float32, torch.float64) else HALF_GRID
    for case in grid:
        check_backend(case.with_(score=score, dtype=dtype), name, device=device)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_auto_prefers_a_fused_backend_on_cpu(score):
    q, k, v, _, _ = make_inputs(Case(score=score))
    chosen = backends.select("auto", score, q, k, v)
    cpu = backends.get("cpu")
    if cpu is not None and not cpu.not_supported_reasons(score, q, k, v):
        assert chosen == "cpu"
    else:
        assert chosen == "reference"
