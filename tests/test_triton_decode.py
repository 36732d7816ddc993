"""The additive decode kernel (``kernels/additive_decode.py``) under TRITON_INTERPRET=1 on CPU:
forward against the float64 reference with the 2x rule, the route the launcher takes, and a
forward + backward call (the backward runs the main additive kernels)."""
from __future__ import annotations

import pytest
import torch

from fusedattn import testing
from fusedattn.backends import unavailable_reason
from fusedattn.testing import Case

_REASON = unavailable_reason("triton")
pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable: {_REASON}")]

F16, BF16 = torch.float16, torch.bfloat16

if _REASON is None:
    from fusedattn.backends import triton_backend as tb
    from fusedattn.kernels import additive as _add
    from fusedattn.kernels import additive_decode as _adec

DEC = "_attn_fwd_additive_decode"

CASES = [
    Case(B=1, H=1, Hk=1, Lq=1, Lk=1, D=16, Dv=16),                                   # one key
    Case(B=2, H=2, Hk=2, Lq=1, Lk=17, D=40, Dv=24, lengths=(17, 0)),                 # key length 0
    Case(B=1, H=2, Hk=1, Lq=1, Lk=257, D=24, Dv=40, lengths=(200,)),                 # split + merge
    Case(B=1, H=4, Hk=1, Lq=1, Lk=17, D=16, Dv=16, dtype=F16),                       # GQA 4
    Case(B=1, H=16, Hk=1, Lq=1, Lk=33, D=16, Dv=24, dtype=BF16),                     # GQA 16: 16 rows
    Case(B=2, H=1, Hk=1, Lq=3, Lk=17, D=40, Dv=16, causal=True, lengths=(17, 2)),    # causal per step
    Case(B=1, H=2, Hk=2, Lq=16, Lk=17, D=16, Dv=24, causal=True, dtype=F16),         # Lq = 16
    Case(B=1, H=2, Hk=1, Lq=3, Lk=40, D=24, Dv=16, dtype=BF16),                      # GQA x steps
    Case(B=1, H=1, Hk=1, Lq=1, Lk=17, D=16, Dv=16, magnitude=60.0),                  # direct tanh path
    Case(B=1, H=2, Hk=1, Lq=3, Lk=1, D=16, Dv=16, causal=True),                      # rows with no key
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_forward(case):
    """Forward against the float64 reference (2x rule), through the decode kernel."""
    tb.LAST_ADDITIVE_KERNEL.clear()
    testing.check_backend(case, "triton", backward=False)
    assert tb.LAST_ADDITIVE_KERNEL == [DEC]


def test_decode_route_is_taken(monkeypatch):
    """Plain decode calls with (H / Hk) * Lq <= 16 launch the decode kernel and not the main one;
    larger groups, Lq > 16 and windows / rel_bias / ALiBi launch the main kernel."""
    launched = []

    class Spy:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def run(*args, **kw):
                launched.append(self.name)
                return self.fn[grid](*args, **kw)
            return run

    monkeypatch.setattr(tb, "interpreting", lambda: True)  # it looks at the kernel objects' type
    monkeypatch.setattr(_adec, DEC, Spy(DEC, _adec._attn_fwd_additive_decode))
    monkeypatch.setattr(_add, "_attn_fwd_additive", Spy("main", _add._attn_fwd_additive))
    g = torch.Generator().manual_seed(0)

    def call(H, Hk, Lq, **mods):
        q = torch.randn(1, H, Lq, 16, generator=g)
        k, v = torch.randn(1, Hk, 20, 16, generator=g), torch.randn(1, Hk, 20, 16, generator=g)
        w = torch.randn(H, 16, generator=g)
        spec = tb.AttnSpec(score="additive", **mods)
        launched.clear()
        tb._forward(spec, q, k, v, w, None)
        return list(launched)

    assert call(2, 2, 1) == [DEC]
    assert call(16, 1, 1) == [DEC]
    assert call(4, 2, 8) == [DEC]
    assert call(2, 2, 16, window_right=0) == [DEC]  # causal
    assert call(32, 1, 1) == ["main"]  # 32 rows per kv group
    assert call(4, 1, 5) == ["main"]  # 20 rows
    assert call(2, 2, 17) == ["main"]  # not a decode step
    assert call(2, 2, 1, window_left=4, window_right=0) == ["main"]
    assert call(2, 2, 1, alibi_slopes=torch.ones(2)) == ["main"]
    assert call(2, 2, 1, rel_bias=torch.zeros(2, 7)) == ["main"]


def test_decode_matches_main_kernel():
    """The decode kernel and the main kernel (the route bypassed) agree closely, with splits."""
    case = Case(B=2, H=4, Hk=2, Lq=2, Lk=130, D=40, Dv=24, causal=True, lengths=(130, 61))
    q, k, v, w, lengths = testing.make_inputs(case)
    spec = tb._spec("additive", lengths, True)
    dec = tb._forward(spec, q, k, v, w, 3)
    assert tb.LAST_ADDITIVE_KERNEL == [DEC]
    old = tb.decode_route
    try:
        tb.decode_route = lambda *a: False
        main = tb._forward(spec, q, k, v, w, 1)
    finally:
        tb.decode_route = old
    torch.testing.assert_close(dec[0], main[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(dec[1], main[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_decode_forward_backward(dtype):
    """A forward + backward call whose forward is a decode step: gradients (main backward kernels,
    fed by the decode kernel's out and lse) within the 2x rule."""
    case = Case(B=1, H=4, Hk=2, Lq=2, Lk=17, D=24, Dv=16, causal=True, lengths=(13,), dtype=dtype)
    tb.LAST_ADDITIVE_KERNEL.clear()
    testing.check_backend(case, "triton", backward=True)
    assert DEC in tb.LAST_ADDITIVE_KERNEL
