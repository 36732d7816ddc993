"""The CPU backend (fused C++ kernels, ``torch.ops.fusedattn_cpu``) against the reference.

Oracle: ``fusedattn.reference`` on float64 inputs (autograd for the gradients). Rule (as in
FlashAttention's tests): for out, lse, dq, dk, dv and dw,
``max|fused - oracle| <= 2 * max|reference_in_dtype - oracle| + atol`` with
``atol = 2e-6 * max(1, max|oracle|)`` (a few float32 ulps of the largest value).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fusedattn
from fusedattn import reference as R
from fusedattn.backends import unavailable_reason
from fusedattn.testing import Case, check_backend, saturated_additive

_REASON = unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend unavailable: {_REASON}")

if _REASON is None:
    from fusedattn.backends.cpu_backend import CpuBackend

    BACKEND = CpuBackend()
    OPS = torch.ops.fusedattn_cpu


# ------------------------------------------------------------------------------ helpers

@pytest.fixture
def isa_level():
    """``set(level)`` switches the instruction-set level for the test; the old one is restored."""
    old = OPS.isa()
    yield OPS.set_isa
    OPS.set_isa(old)


def _inputs(score, B, H, Hk, Lq, Lk, D, Dv, *, pre=1.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g) * pre
    k = torch.randn(B, Hk, Lk, D, generator=g) * pre
    v = torch.randn(B, Hk, Lk, Dv, generator=g)
    w = torch.randn(H, D, generator=g) * (0.3 if score == "additive" else 1.0)
    do = torch.randn(B, H, Lq, Dv, generator=g)
    return tuple(t.to(dtype) for t in (q, k, v, w, do))


def _fused(score, q, k, v, w, do, kl, causal, scale):
    if score == "additive":
        out, lse = BACKEND.additive_forward(q, k, v, w, kl, causal)
        grads = BACKEND.additive_backward(do, q, k, v, w, kl, causal, out, lse)
    else:
        out, lse = BACKEND.dot_forward(q, k, v, kl, scale, causal)
        grads = BACKEND.dot_backward(do, q, k, v, kl, scale, causal, out, lse)
    return (out, lse, *grads)


def _ref(score, q, k, v, w, do, kl, causal, scale, dtype):
    inputs = (q, k, v, w) if score == "additive" else (q, k, v)
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    if score == "additive":
        out, lse = R.additive_attention(*leaves, key_lengths=kl, causal=causal, return_lse=True)
    else:
        out, lse = R.dot_product_attention(*leaves, scale=scale, key_lengths=kl, causal=causal,
                                           return_lse=True)
    out.backward(do.to(dtype))
    return (out.detach(), lse.detach(), *[t.grad for t in leaves])


_NAMES = ("out", "lse", "dq", "dk", "dv", "dw")


def _max_err(a, b):
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin), "non-finite entries differ"
    return (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0


def _compare(score, q, k, v, w, do, kl, causal, scale=None, fused=None, score_floor=0.0):
    """Apply the tolerance rule to every output; returns the fused results.

    ``score_floor`` (relative to each output's magnitude) is added to the floor where the
    rounding of large scores dominates both float32 computations (see test_dot_large_scores).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    fused = fused if fused is not None else _fused(score, q, k, v, w, do, kl, causal, scale)
    oracle = _ref(score, q, k, v, w, do, kl, causal, scale, torch.float64)
    in_dtype = _ref(score, q, k, v, w, do, kl, causal, scale, q.dtype)
    for name, f, o, r in zip(_NAMES, fused, oracle, in_dtype):
        assert f.shape == o.shape, name
        assert f.dtype == (torch.float32 if name == "lse" else q.dtype), name
        fin = o[torch.isfinite(o)]
        mag = fin.abs().max().item() if fin.numel() else 0.0
        ef, er = _max_err(f, o), _max_err(r, o)
        bound = 2 * er + (2e-6 + score_floor) * max(1.0, mag)
        assert ef <= bound, f"{name}: fused err {ef:.3g}, reference err {er:.3g}"
    return fused


def _lengths(vals):
    return None if vals is None else torch.tensor(vals, dtype=torch.int32)


# ------------------------------------------------------------------------------ equivalence

# (B, H, Hk, Lq, Lk, D, Dv, causal, key_lengths)
GRID = [
    (1, 1, 1, 1, 1, 16, 16, False, None),
    (2, 2, 2, 17, 17, 16, 24, True, None),
    (2, 4, 2, 64, 97, 40, 40, True, [97, 0]),       # causal Lq < Lk, GQA, a length of 0
    (1, 2, 1, 97, 64, 100, 16, True, None),         # causal Lq > Lk: 33 fully masked rows
    (2, 2, 2, 257, 17, 128, 64, False, [5, 17]),
    (1, 1, 1, 17, 1025, 40, 100, False, [1000]),
    (1, 3, 1, 1025, 97, 64, 32, True, [90]),
]


@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("case", GRID, ids=lambda c: "B{}H{}Hk{}Lq{}Lk{}D{}Dv{}c{}kl{}".format(*c))
def test_matches_reference(score, case):
    B, H, Hk, Lq, Lk, D, Dv, causal, kl = case
    q, k, v, w, do = _inputs(score, B, H, Hk, Lq, Lk, D, Dv)
    _compare(score, q, k, v, w, do, _lengths(kl), causal)


# Windows narrower than a tile: the kernels run such tiles in row sub-tiles over their own key
# ranges (forward) and query blocks over the columns they see (backward); with every modifier.
WINDOW_CASES = [
    Case(B=2, H=4, Hk=2, Lq=300, Lk=333, D=40, Dv=24, window=(40, 0), lengths=(333, 290), rel_bias=50),
    Case(Lq=400, Lk=257, D=24, Dv=17, window=(70, 5), alibi="H"),
    Case(Lq=257, Lk=300, D=20, window=(0, 31), causal=False, rel_bias=9),
    Case(H=2, Hk=1, Lq=700, Lk=700, D=16, window=(300, 0), causal=True, lengths=(650,)),
]


@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_window_edges_match_reference(score, case):
    check_backend(case.with_(score=score), "cpu")


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_window_one_vs_two_threads_bitwise(score):
    q, k, v, w, _ = _inputs(score, 1, 2, 1, 333, 400, 24, 16)
    fn = fusedattn.additive_attention if score == "additive" else fusedattn.dot_product_attention
    inputs = (q, k, v, w) if score == "additive" else (q, k, v)
    old = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = [t.clone().requires_grad_() for t in inputs]
            out = fn(*leaves, window=(37, 3), key_lengths=torch.tensor([390]), backend="cpu")
            out.square().sum().backward()
            results.append([out, *[t.grad for t in leaves]])
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_nan_query_poisons_only_the_keys_it_sees(score):
    """A NaN in query row 150 of a window (20, 0): dk and dv of the keys it never sees stay finite
    (the dk product would multiply dS = 0 by the NaN row), and so do the other rows' dq."""
    q, k, v, w, _ = _inputs(score, 1, 1, 1, 300, 300, 24, 16)
    q[0, 0, 150, 3] = float("nan")
    leaves = [t.requires_grad_() for t in ((q, k, v, w) if score == "additive" else (q, k, v))]
    fn = fusedattn.additive_attention if score == "additive" else fusedattn.dot_product_attention
    out = fn(*leaves, window=(20, 0), backend="cpu")
    out.sum().backward()
    seen = torch.zeros(300, dtype=torch.bool)
    seen[130:151] = True
    assert out[0, 0, 150].isnan().all() and torch.isfinite(out[0, 0, torch.arange(300) != 150]).all()
    assert torch.isfinite(q.grad[0, 0, torch.arange(300) != 150]).all()
    assert torch.isfinite(k.grad[0, 0, ~seen]).all() and torch.isfinite(v.grad[0, 0, ~seen]).all()
    assert k.grad[0, 0, seen].isnan().any()


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_rel_bias_gradient_of_a_clamped_bucket(score):
    """rel_bias with M = 2: the bucket d <= -1 holds almost every pair of a long causal call. Each
    softmax row's dS sums to 0, so a head's gradient sums to 0 over the distances, and that bucket's
    gradient is minus the diagonal's. Summed directly, the rows' rounding residuals add up (the float32
    lse, the vector exp): 2.8x the float32 reference's error at L = 4096 before the kernel removed them."""
    L, D = 2048, 16
    q, k, v, w, do = _inputs(score, 1, 1, 1, L, L, D, D, seed=3)
    rel = torch.randn(1, 3, generator=torch.Generator().manual_seed(4))
    grads = {}
    for name, dt, backend in (("truth", torch.float64, "reference"), ("ref32", torch.float32, "reference"),
                              ("cpu", torch.float32, "cpu")):
        r = rel.to(dt).clone().requires_grad_()
        leaves = [t.to(dt) for t in ((q, k, v, w) if score == "additive" else (q, k, v))]
        fn = fusedattn.additive_attention if score == "additive" else fusedattn.dot_product_attention
        fn(*leaves, rel_bias=r, causal=True, backend=backend).backward(do.to(dt))
        grads[name] = r.grad.double()
    g, t = grads["cpu"], grads["truth"]
    assert g.sum().abs() <= 1e-6 * g.abs().max()
    assert (g - t).abs().max() <= 2 * (grads["ref32"] - t).abs().max()


@pytest.mark.parametrize("pre", [30.0, 1e4])
@pytest.mark.parametrize("causal", [False, True])
def test_additive_large_preactivations(pre, causal):
    """|q|, |k| beyond 40: those rows take the direct-tanh path; mixed rows too."""
    q, k, v, w, do = _inputs("additive", 1, 2, 1, 33, 70, 40, 16, pre=pre)
    q[:, :, ::3] /= pre  # some rows within the exp-factorized range, some beyond
    k[:, :, ::4] /= pre
    _compare("additive", q, k, v, w, do, None, causal)


_W_SMALL = [0.0, -0.0, 3e-39, 1e-30, -1e-5, 2.0**-12, -(2.0**-12) * 0.999, 2.0**-12 * 1.001]
_W_BIG = [2.0**12, -(2.0**12) * 1.001, 4100.0, -1e4]


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("pre", [1.0, 9.0])
def test_additive_extreme_weights(level, pre, isa_level):
    """Weights of every size, at each level: the vector loops divide by d' = e/w k + 1/w only for
    2^-12 <= |w| <= 2^12; zero, subnormal, tiny and huge weights (and the edges) take the exact
    w / (1 + e k). |q|, |k| up to ~19 (pre=9) put e k near its float32 ends.

    Small weights beside ordinary ones: the rule as everywhere, forward and backward. Big weights
    make scores of |s| ~ 1e4, whose float32 rounding dominates both computations (as in
    test_dot_large_scores): the floor adds 2 ulps of the largest possible score, forward only (a
    saturated softmax's gradients are rounding noise times |w| in any float32 backward); at
    |w| = 1e30 the result stays finite."""
    if level not in OPS.supported_isas():
        pytest.skip(f"this CPU does not support the {level} level")
    isa_level(level)
    q, k, v, w, do = _inputs("additive", 1, 2, 1, 19, 45, 40, 16, pre=pre)
    q, k = q.clamp(-19.5, 19.5), k.clamp(-19.5, 19.5)
    small = torch.tensor(_W_SMALL)
    w[0, : len(small)] = small  # head 0 outside the weight-scaled form, head 1 inside
    _compare("additive", q, k, v, w, do, None, False)
    w[1, -len(small):] = small.flip(0)
    w[0] = 1e-20
    _compare("additive", q, k, v, w, do, None, True)
    w[0, -len(_W_BIG):] = torch.tensor(_W_BIG)
    floor = 2 * torch.finfo(torch.float32).eps * w.abs().sum(1).max().item()
    fused = BACKEND.additive_forward(q, k, v, w, None, False)
    oracle, in_dtype = (_ref("additive", q, k, v, w, do, None, False, 1.0, dt)[:2]
                        for dt in (torch.float64, torch.float32))
    for name, f, o, r in zip(_NAMES, fused, oracle, in_dtype):
        bound = 2 * _max_err(r, o) + 2e-6 * max(1.0, o.abs().max().item()) + floor
        assert _max_err(f, o) <= bound, name
    w[0, :2] = torch.tensor([-1e30, 1e30])  # scores ~1e30 (float32 ties decide the argmax): finite
    out, lse = BACKEND.additive_forward(q, k, v, w, None, False)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("pre", [3.0, 30.0, 1e4])
@pytest.mark.parametrize("Dv", [16, 100])
def test_dot_large_scores(pre, Dv):
    """Large scores (|s| up to ~1e3 at pre=30, ~1e8 at pre=1e4).

    At 1e4 the softmax is one-hot: delta = dout . out must cancel dP exactly, as it does in
    the reference, or dq/dk pick up rounding noise times |k|. At 3 and 30 both float32
    computations are dominated by the rounding of the scores themselves (their error ratio
    varies from 0.1 to 5 between seeds and GEMM kernels: the reference's matmul and the cpu
    backend's brgemm sum in different orders), so the floor there adds that rounding: 2 float32
    ulps of the largest score, propagated with the output's magnitude.
    """
    q, k, v, w, do = _inputs("dot", 1, 2, 1, 33, 300, 40, Dv, pre=pre)
    floor = 0.0
    if pre < 1e4:
        smax = (q.double() @ k.double().transpose(-1, -2)).abs().max().item() / math.sqrt(40)
        floor = 2 * torch.finfo(torch.float32).eps * smax
    _compare("dot", q, k, v, w, do, None, True, score_floor=floor)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_softmax_exponential_tails(score):
    """Scores -inf (a rel_bias of -inf at every third distance) and 90-100 below the row's maximum
    (exponentials in float32's subnormal range): weights there are exactly 0 and tiny, outputs and
    gradients (rel_bias's too, 0 on the -inf buckets) follow the tolerance rule."""
    q, k, v, w, do = _inputs(score, 1, 2, 2, 17, 97, 16, 16, seed=3)
    rb = torch.randn(2, 2 * 97 - 1, generator=torch.Generator().manual_seed(4))
    rb[:, ::3] = -math.inf
    rb[:, 1::3] -= 95.0
    res = {}
    for name, backend, dt in [("cpu", "cpu", torch.float32), ("truth", "reference", torch.float64),
                              ("ref32", "reference", torch.float32)]:
        xs = (q, k, v, w) if score == "additive" else (q, k, v)
        leaves = [t.detach().to(dt).requires_grad_() for t in xs]
        r = rb.detach().to(dt).clone().requires_grad_()
        fn = fusedattn.additive_attention if score == "additive" else fusedattn.dot_product_attention
        out, lse = fn(*leaves, rel_bias=r, return_lse=True, backend=backend)
        out.backward(do.to(dt))
        res[name] = [out, lse, *[t.grad for t in leaves], r.grad]
    assert torch.equal(res["cpu"][-1][:, ::3], torch.zeros_like(res["cpu"][-1][:, ::3]))
    for f, o, r in zip(res["cpu"], res["truth"], res["ref32"]):
        mag = o.abs().max().item()
        assert _max_err(f, o) <= 2 * _max_err(r, o) + 2e-6 * max(1.0, mag)


def _saturated(kind, seed):
    """Issue 16 item 1: inputs whose softmax saturates (one-hot rows)."""
    if kind == "one key":  # a single allowed key: the softmax is constant, dk must be exactly 0
        q, k, v, w, do = _inputs("dot", 1, 2, 1, 20, 1, 64, 63, pre=60.0, seed=seed)
        return "dot", q, k, v, w, do
    if kind == "one key additive":
        q, k, v, w, do = _inputs("additive", 1, 2, 1, 20, 1, 64, 63, pre=3.0, seed=seed)
        return "additive", q, k, v, w * 200, do
    score = "additive" if kind.startswith("additive") else "dot"
    q, k, v, w, do = _inputs(score, 1, 2, 1, 33, 70, 40, 63, seed=seed)
    big = float(kind.split("=")[1])
    if score == "dot":
        q[0, :, 5, 3] = big
        q[0, 1, 9, 0] = -big
    else:
        w[0, 7] = big
    return score, q, k, v, w, do


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["dot q=1e4", "dot q=1e30", "additive w=1e4", "one key",
                                  "one key additive"])
def test_saturated_softmax_gradients(kind, seed):
    """Gradients stay within the rule when rows saturate; a constant softmax gives dS = 0 exactly."""
    score, q, k, v, w, do = _saturated(kind, seed)
    floor = 0.0
    if kind.startswith("additive"):
        # scores up to |w|_1 ~ 1e4: their float32 rounding (a few 1e-3) dominates out/dv in both
        # float32 computations, also with exact division (scalar level); as in test_dot_large_scores
        floor = 2 * torch.finfo(torch.float32).eps * w.abs().sum(-1).max().item()
    fused = _compare(score, q, k, v, w, do, None, False, score_floor=floor)
    if kind.startswith("one key"):
        dq, dk = fused[2], fused[3]
        assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dq, torch.zeros_like(dq))


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_strided_inputs(score):
    """Transposed views of a (B, L, H, D) layout and a non-contiguous w."""
    B, H, Hk, Lq, Lk, D, Dv = 2, 4, 2, 37, 70, 40, 24
    q, k, v, w, do = _inputs(score, B, H, Hk, Lq, Lk, D, Dv)
    qs, ks, vs = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    ws = w.t().contiguous().t()
    assert not qs.is_contiguous() and not ws.is_contiguous()
    fused = _compare(score, qs, ks, vs, ws, do, _lengths([70, 33]), True)
    contiguous = _fused(score, q, k, v, w, do, _lengths([70, 33]), True, 1 / math.sqrt(D))
    for a, b in zip(fused, contiguous):
        assert torch.equal(a, b)


@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("kl,causal", [(None, False), ([3000], True)])
def test_decode_split_keys(score, kl, causal):
    """Lq = 1 against Lk = 4000: the keys are split across work items and merged by LSE."""
    q, k, v, w, do = _inputs(score, 1, 2, 1, 1, 4000, 64, 32)
    _compare(score, q, k, v, w, do, _lengths(kl), causal)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_fully_masked_rows_are_zero(score):
    q, k, v, w, do = _inputs(score, 2, 2, 2, 20, 8, 16, 16)
    kl = _lengths([0, 8])
    out, lse, dq, dk, dv, *rest = _fused(score, q, k, v, w, do, kl, True, 0.25)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.equal(out[1, :, :12], torch.zeros_like(out[1, :, :12]))  # causal, Lq > Lk
    assert torch.isneginf(lse[1, :, :12]).all() and torch.isfinite(lse[1, :, 12:]).all()
    for g in (dq[0], dk[0], dv[0], dq[1, :, :12]):
        assert torch.equal(g, torch.zeros_like(g))
    for t in (out, dq, dk, dv, *rest):
        assert not t.isnan().any()


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_padding_is_never_read_and_nan_stays_in_its_row(score):
    """Keys at or beyond key_lengths may hold NaN/inf: results equal those of clean padding.
    A NaN in one query row makes that output row NaN and leaves the other rows unchanged."""
    q, k, v, w, do = _inputs(score, 2, 2, 1, 40, 300, 24, 16)
    kl = _lengths([300, 70])
    kp, vp = k.clone(), v.clone()
    kp[1, :, 70:] = float("nan")
    vp[1, :, 70:] = float("inf")
    clean = _fused(score, q, k, v, w, do, kl, False, 0.2)
    dirty = _fused(score, q, kp, vp, w, do, kl, False, 0.2)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)
    qn = q.clone()
    qn[1, 0, 5, 3] = float("nan")
    out, lse = _fused(score, qn, k, v, w, do, kl, False, 0.2)[:2]
    bad = torch.zeros_like(out, dtype=torch.bool)
    bad[1, 0, 5] = True
    assert out[bad].isnan().all() and lse[1, 0, 5].isnan()
    assert torch.equal(out[~bad], clean[0][~bad])


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_bfloat16(score):
    """bfloat16 inputs, float32 compute: within the rule against the reference in bfloat16."""
    q, k, v, w, do = _inputs(score, 1, 2, 2, 33, 50, 40, 24, dtype=torch.bfloat16)
    _compare(score, q, k, v, w, do, _lengths([45]), True)


@pytest.mark.parametrize("L, D", [(2048, 1), (1024, 4)])
def test_additive_dw_state_sums_blocks_in_double(L, D):
    """dw sums every (query block, key tile) of a work item: the blocks' sums are float32, the item's
    state double. With every tanh saturated (q = 30) dw = sum of all dS = 0; a float32 state left
    2.3e-5 / 4.6e-5 here (every ISA level; 4-7e-6 now), and a random float32 case (L = 700 x 512,
    D = 3, operands x30) missed the 2x rule for dw by 1.02x."""
    q, k, v, w, do = saturated_additive(2, L, L, D, 8)
    (dw,) = torch.autograd.grad(fusedattn.additive_attention(q, k, v, w, backend="cpu"), w, do)
    assert float(dw.abs().max()) < 1.2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_backward_takes_delta_from_the_unrounded_output(dtype):
    """delta = rowsum(dO * O) comes from the float32 output (the op keeps it for the backward), not from
    the output rounded to 16 bits. With every tanh saturated (q = 30) each pair's tanh is 1, so
    dw = sum_ij dS_ij, which is 0 since each row's dS sums to 0. From the rounded output every row kept
    a residual and dw added them up: 4.5e-3 (bfloat16) and 8.7e-4 (float16) here, against ~1e-6 now.
    (Ring attention: test_distributed.py's saturated case.)"""
    q, k, v, w, do = saturated_additive(2, 257, 97, 1, 8, dtype)
    out = fusedattn.additive_attention(q, k, v, w, backend="cpu")
    (dw,) = torch.autograd.grad(out, w, do)
    assert float(dw.float().abs().max()) < 1e-5
    for causal in (False, True):  # and within the rule, rows of any length
        check_backend(Case(score="additive", B=1, H=2, Hk=1, Lq=65, Lk=63, D=1, Dv=8, causal=causal,
                           dtype=dtype, magnitude=30.0, seed=3), "cpu")


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_scalar_fallback(score, isa_level):
    """The scalar level (used on CPUs without AVX2) against the reference and the default level."""
    q, k, v, w, do = _inputs(score, 1, 2, 1, 45, 83, 40, 24)
    kl = _lengths([80])
    best = OPS.isa()
    isa_level("scalar")
    assert not OPS.uses_avx2() and OPS.isa() == "scalar"
    scalar = _compare(score, q, k, v, w, do, kl, True)
    isa_level(best)
    vector = _fused(score, q, k, v, w, do, kl, True, 1 / math.sqrt(40))
    for a, b in zip(scalar, vector):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ determinism

@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 300, 700), (1, 2, 1, 1, 4000), (2, 4, 2, 70, 300)])
def test_one_vs_two_threads_bitwise(score, shape):
    B, H, Hk, Lq, Lk = shape
    q, k, v, w, do = _inputs(score, B, H, Hk, Lq, Lk, 64, 48)
    kl = _lengths([Lk - 5] + [Lk] * (B - 1))
    old = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            results.append(_fused(score, q, k, v, w, do, kl, True, 0.125))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------ validation

def _good():
    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 2, 6, 8)
    v = torch.randn(2, 2, 6, 3)
    w = torch.randn(4, 8)
    return q, k, v, w


_BAD_FWD = {
    "q rank 3": lambda q, k, v, w, kl: (q[0], k, v, w, kl),
    "float64": lambda q, k, v, w, kl: (q.double(), k.double(), v.double(), w.double(), kl),
    "int dtype": lambda q, k, v, w, kl: (q.int(), k.int(), v.int(), w.int(), kl),
    "mixed dtypes": lambda q, k, v, w, kl: (q, k.bfloat16(), v, w, kl),
    "head dim mismatch": lambda q, k, v, w, kl: (q, k[..., :7], v, w[:, :7], kl),
    "batch mismatch": lambda q, k, v, w, kl: (q, k[:1], v[:1], w, kl),
    "v length mismatch": lambda q, k, v, w, kl: (q, k, v[:, :, :5], w, kl),
    "H % Hk": lambda q, k, v, w, kl: (q[:, :3], k, v, w[:3], kl),
    "lengths dtype": lambda q, k, v, w, kl: (q, k, v, w, kl.long()),
    "lengths size": lambda q, k, v, w, kl: (q, k, v, w, kl[:1]),
    "lengths range": lambda q, k, v, w, kl: (q, k, v, w, kl + 5),
    "negative length": lambda q, k, v, w, kl: (q, k, v, w, kl - 7),
}


@pytest.mark.parametrize("bad", list(_BAD_FWD))
def test_malformed_forward_inputs_raise(bad):
    q, k, v, w = _good()
    kl = torch.tensor([6, 3], dtype=torch.int32)
    q, k, v, w, kl = _BAD_FWD[bad](q, k, v, w, kl)
    with pytest.raises(RuntimeError):
        OPS.additive_fwd(q, k, v, w, kl, False)
    with pytest.raises(RuntimeError):
        OPS.dot_fwd(q, k, v, kl, 0.5, False)


def test_malformed_w_scale_and_backward_inputs_raise():
    q, k, v, w = _good()
    with pytest.raises(RuntimeError):
        OPS.additive_fwd(q, k, v, w[:, :4], None, False)
    with pytest.raises(RuntimeError):
        OPS.additive_fwd(q, k, v, w.bfloat16(), None, False)
    with pytest.raises(RuntimeError):
        OPS.dot_fwd(q, k, v, None, math.inf, False)
    out, lse = OPS.dot_fwd(q, k, v, None, 0.5, False)
    aout, alse = OPS.additive_fwd(q, k, v, w, None, False)
    do = torch.randn_like(out)
    bad = {
        "dout shape": (do[:, :, :4], out, lse),
        "out dtype": (do, out.bfloat16(), lse),
        "lse dtype": (do, out, lse.double()),
        "lse shape": (do, out, lse[:, :, :4]),
    }
    for d, o, l in bad.values():
        with pytest.raises(RuntimeError):
            OPS.dot_bwd(d, q, k, v, None, 0.5, False, o, l)
        with pytest.raises(RuntimeError):
            OPS.additive_bwd(d, q, k, v, w, None, False, o, l)
    # the well-formed calls work
    assert len(OPS.dot_bwd(do, q, k, v, None, 0.5, False, out, lse)) == 4  # dq, dk, dv, drel_bias (empty)
    assert len(OPS.additive_bwd(do, q, k, v, w, None, False, aout, alse)) == 5  # + drel_bias (empty)


def test_empty_sizes():
    q, k, v, w = _good()
    out, lse = OPS.additive_fwd(q, k[:, :, :0], v[:, :, :0], w, None, False)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out, lse = OPS.dot_fwd(q[:, :, :0], k, v, None, 0.5, False)
    assert out.shape == (2, 4, 0, 3) and lse.shape == (2, 4, 0)


# ------------------------------------------------------------------------------ public API

def test_public_api_autograd():
    import fusedattn

    assert fusedattn.available_backends()["cpu"] is None
    q, k, v, w, do = _inputs("additive", 2, 2, 1, 19, 33, 24, 16)
    kl = torch.tensor([33, 20], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    out = fusedattn.additive_attention(*leaves, key_lengths=kl, causal=True, backend="cpu")
    out.backward(do)
    fused = _fused("additive", q, k, v, w, do, kl, True, None)
    assert torch.equal(out.detach(), fused[0])
    for leaf, g in zip(leaves, fused[2:]):
        assert torch.equal(leaf.grad, g)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = fusedattn.dot_product_attention(*leaves, key_lengths=kl, causal=True, return_lse=True,
                                               backend="cpu")
    out.backward(do)
    fused = _fused("dot", q, k, v, None, do, kl, True, 1 / math.sqrt(24))
    assert torch.equal(out.detach(), fused[0]) and torch.equal(lse, fused[1])
    for leaf, g in zip(leaves, fused[2:]):
        assert torch.equal(leaf.grad, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_reused_scratch_gives_the_same_bits(score, dtype):
    """The cpu ops keep freed scratch (csrc/scratch.h) and hand it to later calls: a call after one of
    other sizes and data (its blocks reused, holding that call's values) gives the bits it gave first."""
    def run(L, Lk, seed, window, fill=1.0):
        g = torch.Generator().manual_seed(seed)
        q = (torch.randn(1, 2, L, 40, generator=g) * fill).to(dtype).requires_grad_()
        k, v = ((torch.randn(1, 2, Lk, 40, generator=g) * fill).to(dtype).requires_grad_() for _ in range(2))
        if score == "additive":
            w = (torch.randn(2, 40, generator=g) / 6).to(dtype).requires_grad_()
            out = fusedattn.additive_attention(q, k, v, w, window=window, backend="cpu")
            leaves = (q, k, v, w)
        else:
            out = fusedattn.dot_product_attention(q, k, v, window=window, backend="cpu")
            leaves = (q, k, v)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [t.grad for t in leaves]

    first = run(290, 283, 1, (60, 0))
    # larger blocks of other values (NaN: a padding entry read with weight 0 that the call did not
    # clear would poison the result), freed into the cache
    run(300, 300, 2, None, fill=math.nan)
    run(300, 300, 3, (60, 0), fill=math.nan)
    again = run(290, 283, 1, (60, 0))
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_scratch_budget_variable_is_checked():
    code = ("import torch, fusedattn\nq = torch.randn(1, 1, 8, 4)\n"
            "try:\n    fusedattn.dot_product_attention(q, q, q, backend='cpu')\n    print('ok')\n"
            "except ValueError as e:\n    print('ValueError', e)\n")
    for value, want in (("lots", "ValueError"), ("-1", "ValueError"), ("0", "ok"), ("64", "ok")):
        env = dict(os.environ, FUSEDATTN_CPU_SCRATCH_MIB=value)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(want), (value, r.stdout)
        if want == "ValueError":
            assert "FUSEDATTN_CPU_SCRATCH_MIB" in r.stdout and value in r.stdout
