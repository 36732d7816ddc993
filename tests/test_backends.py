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

import fusedattn
from fusedattn import backends
from fusedattn.spec import MODIFIERS
from fusedattn.testing import Case, check_backend, make_inputs, make_modifiers

GRID = [
    Case(Lq=1, Lk=1),
    Case(Lq=17, Lk=97, D=40, Dv=24, causal=True),
    Case(Lq=97, Lk=17, D=64, Dv=64, causal=True),
    # GQA, D > 64 (the dot kernels' chunked-D path), 2 query tiles, key tiles cut by lengths incl. 0;
    # kept small: the additive Triton kernels run column by column under the interpreter (~30 s here)
    Case(B=2, H=2, Hk=1, Lq=33, Lk=257, D=100, Dv=40, lengths=(200, 0)),
    Case(B=2, Lq=33, Lk=65, D=16, Dv=32, lengths=(65, 7), causal=True, strided=True),
    Case(Lq=17, Lk=64, D=128, Dv=128, magnitude=30.0),
    Case(Lq=17, Lk=17, magnitude=1e4),
    Case(Lq=1, Lk=1025, D=24, Dv=64),
]
HALF_GRID = [GRID[1], GRID[4], GRID[5]]
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


# ----------------------------------------------------------------------------- modifiers

# cases per modifier (float32 and float64); each also combines it with others
MODIFIER_CASES = {
    "key_lengths": [Case(B=2, Lq=9, Lk=33, lengths=(33, 0))],
    "causal": [Case(Lq=33, Lk=17, causal=True)],
    "window": [Case(Lq=17, Lk=97, D=24, window=(8, 3)),
               Case(B=2, H=4, Hk=2, Lq=97, Lk=33, window=(5, -1), causal=True, lengths=(33, 20)),
               Case(Lq=33, Lk=33, window=(-1, 4), rel_bias=6),
               Case(Lq=17, Lk=17, window=(0, 0))],
    "softcap": [Case(score="dot", Lq=17, Lk=33, softcap=1.5, magnitude=9.0),
                Case(score="dot", B=2, H=4, Hk=1, Lq=33, Lk=65, softcap=0.7, causal=True, alibi="BH",
                     lengths=(40, 65))],
    "rel_bias": [Case(Lq=17, Lk=33, rel_bias=5),
                 Case(H=4, Hk=2, Lq=33, Lk=17, rel_bias=40, causal=True, lengths=None, D=20)],
    "alibi": [Case(Lq=17, Lk=33, alibi="H", causal=True), Case(B=2, Lq=9, Lk=17, alibi="BH", window=(4, 4))],
    "varlen": [Case(H=4, Hk=2, D=24, Dv=8, seqlens=((5, 7), (0, 3), (17, 1), (4, 0), (33, 33)), causal=True),
               Case(seqlens=((9, 30), (30, 9)), window=(6, 2), rel_bias=8, alibi="BH"),
               Case(score="dot", seqlens=((1, 1), (20, 40)), softcap=2.0, strided=True)],
}


def _modifier_params():
    for name in backends.names():
        backend = backends.get(name)
        reason = backends.unavailable_reason(name)
        for mod in MODIFIERS:
            for score in ("additive", "dot"):
                cases = [c.with_(score=score) for c in MODIFIER_CASES[mod]
                         if c.score == score or "softcap" not in c.modifiers()]
                if score == "additive" and mod == "softcap":
                    continue  # not an additive modifier: the additive functions take no softcap
                served = backend is None or mod in backend.serves()
                if backend is not None:  # run the combinations the backend serves in full
                    cases = [c for c in cases if c.modifiers() <= backend.serves() or not served]
                marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
                if name == "triton" and served:
                    marks.append(pytest.mark.triton)
                yield pytest.param(name, mod, score, served, cases, id=f"{name}-{mod}-{score}", marks=marks)


@pytest.mark.parametrize("name,mod,score,served,cases", list(_modifier_params()))
def test_declared_modifiers(name, mod, score, served, cases):
    """Each backend serves what it declares (forward and backward against the float64 reference,
    the 2x rule) and refuses the rest naming the modifier; auto then falls back to a backend that serves."""
    if served:
        assert cases, f"no case exercises {mod} for {name}"
        for case in cases:
            check_backend(case, name)
    else:
        case = next(c for c in cases if mod in c.modifiers())
        q, k, v, w, lengths = make_inputs(case)
        mods = make_modifiers(case)
        causal = mods.pop("causal", False)
        if case.seqlens is not None:
            pytest.skip("varlen is served by every backend")
        fn = fusedattn.additive_attention if score == "additive" else fusedattn.dot_product_attention
        args = (q, k, v, w) if score == "additive" else (q, k, v)
        with pytest.raises(ValueError, match=f"backend='{name}' cannot run .*{mod}"):
            fn(*args, key_lengths=lengths, causal=causal, backend=name, **mods)
        res = fusedattn.resolve_backend(q, k, v, w, key_lengths=lengths, causal=causal, **mods)
        assert res.backend != name and any(mod in r for r in res.skipped.get(name, [mod]))
