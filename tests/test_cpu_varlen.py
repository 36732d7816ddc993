"""Packed variable-length batches on the cpu backend: one op call over the whole batch.

Every row's keys, masks and aligned distances are its own sequence's (csrc/checks.h: Problem with
cu_seqlens); query tiles and key tiles run across sequence boundaries and the rows of a tile run in
groups that stop at each boundary. Checked at every instruction-set level against the float64
reference (the 2x rule), 1 vs 2 threads bitwise, that no per-sequence path runs for finite inputs,
and that a NaN or an infinity stays in its sequence.
"""
from __future__ import annotations

import pytest
import torch

import fusedattn
from fusedattn.backends import unavailable_reason
from fusedattn.testing import Case, check_backend

_REASON = unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend unavailable: {_REASON}")

if _REASON is None:
    from test_cpu import isa_level  # noqa: F401
    from test_cpu_isa import _need

    from fusedattn.backends import cpu_backend
    from fusedattn.backends.cpu_backend import ISA_LEVELS
else:
    ISA_LEVELS = ("scalar", "avx2", "avx512")


def _lens(seed, n, lo, hi, cross=False):
    g = torch.Generator().manual_seed(seed)
    lq = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    lk = torch.randint(lo, hi + 1, (n,), generator=g).tolist() if cross else lq
    return tuple(zip(lq, lk))


# many sequences per 128-row tile, sequences longer than a tile, empty ones, other key counts
_SHORT = _lens(1, 40, 0, 23)
_MIXED = ((1, 1), (200, 200), (0, 5), (7, 0), (130, 129), (17, 97), (3, 3), (64, 64))
_CROSS = _lens(2, 12, 1, 90, cross=True)
_CASES = [
    Case(H=4, Hk=2, D=24, Dv=8, seqlens=_SHORT, causal=True),
    Case(H=2, Hk=1, D=20, Dv=12, seqlens=_MIXED, window=(9, 2), rel_bias=12, alibi="BH"),
    Case(H=2, Hk=2, D=17, Dv=17, seqlens=_CROSS),
    Case(H=4, Hk=1, D=33, Dv=16, seqlens=_MIXED, causal=True, alibi="H", window=(40, -1)),
    # decoding: one query per sequence against its keys (the forward splits the keys: few query tiles)
    Case(H=2, Hk=1, D=16, Dv=16, seqlens=((1, 300), (1, 0), (1, 1), (2, 517), (1, 64)) * 3, causal=True),
]


@pytest.mark.parametrize("level", ISA_LEVELS)
@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", range(len(_CASES)))
def test_level_varlen_matches_reference(level, score, dtype, n, isa_level):
    _need(level)
    isa_level(level)
    case = _CASES[n].with_(score=score, dtype=dtype)
    if score == "dot" and n == 2:
        case = case.with_(softcap=3.0)
    check_backend(case, "cpu")


def _packed(score, seqlens, H=4, Hk=2, D=16, Dv=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(a for a, _ in seqlens), sum(b for _, b in seqlens)
    q = torch.randn(tq, H, D, generator=g).to(dtype)
    k = torch.randn(tk, Hk, D, generator=g).to(dtype)
    v = torch.randn(tk, Hk, Dv, generator=g).to(dtype)
    w = (torch.randn(H, D, generator=g) / D ** 0.5).to(dtype)
    cq = torch.tensor([0] + torch.tensor([a for a, _ in seqlens]).cumsum(0).tolist(), dtype=torch.int32)
    ck = torch.tensor([0] + torch.tensor([b for _, b in seqlens]).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, w, cq, ck


def _run(score, q, k, v, w, cq, ck, dout=None, **kw):
    leaves = [t.detach().requires_grad_() for t in ((q, k, v, w) if score == "additive" else (q, k, v))]
    if score == "additive":
        out = fusedattn.additive_attention_varlen(*leaves, cq, ck, backend="cpu", **kw)
    else:
        out = fusedattn.dot_product_attention_varlen(*leaves, cq, ck, backend="cpu", **kw)
    out.backward(torch.ones_like(out) if dout is None else dout)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("level", ISA_LEVELS)
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_level_varlen_one_vs_two_threads_bitwise(level, score, isa_level):
    _need(level)
    isa_level(level)
    args = _packed(score, _MIXED + _SHORT, dtype=torch.float32)
    old = torch.get_num_threads()
    try:
        res = []
        for n in (1, 2):
            torch.set_num_threads(n)
            res.append(_run(score, *args, causal=True, window=(30, 0)))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*res):
        assert torch.equal(a, b)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_varlen_is_one_native_call(score, monkeypatch):
    """Finite inputs never take the per-sequence path (a Python loop of one call per sequence)."""
    def refuse(*a, **k):
        raise AssertionError("the per-sequence path ran")

    monkeypatch.setattr(cpu_backend, "_varlen_forward", refuse)
    monkeypatch.setattr(cpu_backend, "_varlen_backward", refuse)
    calls = []
    monkeypatch.setattr(cpu_backend, "_all_finite", lambda *ts: calls.append(len(ts)) or True)
    res = _run(score, *_packed(score, _SHORT), causal=True)
    assert calls == [1, 2] and all(torch.isfinite(t).all() for t in res)


def test_float16_values_with_a_large_sum_stay_one_call(monkeypatch):
    """The finiteness check sums in float32: a float16 sum of ordinary values passes 65504."""
    def refuse(*a, **k):
        raise AssertionError("the per-sequence path ran")

    monkeypatch.setattr(cpu_backend, "_varlen_forward", refuse)
    monkeypatch.setattr(cpu_backend, "_varlen_backward", refuse)
    q, k, v, w, cq, ck = _packed("dot", _MIXED, Dv=64, dtype=torch.float16)
    v = torch.full_like(v, 4.0)  # sum 4 * 499 keys * 2 heads * 64 = 255,488
    assert not torch.isfinite(v.sum())
    res = _run("dot", q, k, v, w, cq, ck, causal=True)
    assert all(torch.isfinite(t).all() for t in res)


@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("where", ["v", "dout", "q", "k"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_stays_in_its_sequence(score, where, bad):
    """A NaN or an infinity in one sequence's values, keys, queries or output gradient leaves every
    other sequence's output and gradients as a call on that sequence alone gives them."""
    seqlens = ((5, 5), (40, 40), (3, 3), (150, 150), (9, 9))
    q, k, v, w, cq, ck = _packed(score, seqlens)
    dout = torch.randn(q.shape[0], q.shape[1], v.shape[-1], generator=torch.Generator().manual_seed(9))
    poisoned = 1  # the second sequence: rows and keys 5..44
    r = int(cq[poisoned + 1]) - 1  # its last: the next sequence's tiles start at key 32 (16-aligned)
    {"v": v, "k": k, "q": q, "dout": dout}[where][r, 1, 2] = bad
    got = _run(score, q, k, v, w, cq, ck, dout, causal=True)
    fn = fusedattn.additive_attention if score == "additive" else fusedattn.dot_product_attention
    for b, (a, n) in enumerate(seqlens):
        if b == poisoned:
            continue
        q0, k0 = int(cq[b]), int(ck[b])
        sl = [t[q0:q0 + a] for t in (q,)] + [t[k0:k0 + n] for t in (k, v)]
        leaves = [t.transpose(0, 1)[None].detach().requires_grad_() for t in sl]
        args = leaves + ([w.detach().requires_grad_()] if score == "additive" else [])
        ob = fn(*args, causal=True, backend="cpu")
        ob.backward(dout[q0:q0 + a].transpose(0, 1)[None])
        want = [ob[0].transpose(0, 1), leaves[0].grad[0].transpose(0, 1), leaves[1].grad[0].transpose(0, 1),
                leaves[2].grad[0].transpose(0, 1)]
        have = [got[0][q0:q0 + a], got[1][q0:q0 + a], got[2][k0:k0 + n], got[3][k0:k0 + n]]
        for x, y in zip(have, want):
            assert torch.isfinite(x).all()
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
