"""The reference path (the oracle) against hand computations and explicit loops."""
import math

import pytest
import torch

import fusedattn
from fusedattn import reference
from fusedattn.testing import Case, check_backend, make_inputs


def test_additive_hand_computed():
    # s = w * tanh(q + k) = 2 * tanh(0 + [0, atanh(0.5)]) = [0, 1]
    q = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    k = torch.tensor([0.0, math.atanh(0.5)], dtype=torch.float64).view(1, 1, 2, 1)
    v = torch.tensor([1.0, 3.0], dtype=torch.float64).view(1, 1, 2, 1)
    w = torch.tensor([[2.0]], dtype=torch.float64)
    out, lse = reference.additive_attention(q, k, v, w, return_lse=True)
    e = math.e
    assert out.item() == pytest.approx((1 + 3 * e) / (1 + e), rel=1e-14)
    assert lse.item() == pytest.approx(math.log(1 + e), rel=1e-14)


def test_dot_hand_computed():
    q = torch.tensor([2.0, 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).view(1, 1, 2, 2)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).view(1, 1, 2, 2)
    out, lse = reference.dot_product_attention(q, k, v, scale=0.5, return_lse=True)  # s = [1, 0]
    p1 = math.e / (1 + math.e)
    torch.testing.assert_close(out.view(2), torch.tensor([p1, 1 - p1], dtype=torch.float64))
    assert lse.item() == pytest.approx(math.log(1 + math.e))
    # default scale is 1/sqrt(D)
    out_default = reference.dot_product_attention(q, k, v)
    out_explicit = reference.dot_product_attention(q, k, v, scale=1 / math.sqrt(2))
    torch.testing.assert_close(out_default, out_explicit)


def _loop_reference(score, q, k, v, w, lengths, causal, scale=None):
    """One (b, h, i) at a time, straight from the definitions in the API docstring."""
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=q.dtype)
    lse = torch.full((B, H, Lq), float("-inf"), dtype=q.dtype)
    scale = 1 / math.sqrt(D) if scale is None else scale
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hk)
            for i in range(Lq):
                js = [j for j in range(Lk) if (lengths is None or j < lengths[b])
                      and (not causal or j <= i + (Lk - Lq))]
                if not js:
                    continue
                if score == "additive":
                    s = torch.stack([(w[h] * torch.tanh(q[b, h, i] + k[b, hk, j])).sum() for j in js])
                else:
                    s = torch.stack([scale * (q[b, h, i] * k[b, hk, j]).sum() for j in js])
                p = torch.softmax(s, 0)
                out[b, h, i] = (p[:, None] * v[b, hk, js]).sum(0)
                lse[b, h, i] = torch.logsumexp(s, 0)
    return out, lse


@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("Lq,Lk", [(3, 7), (7, 3), (5, 5), (1, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_masks_causal_gqa_against_loops(score, Lq, Lk, causal):
    case = Case(score=score, B=2, H=4, Hk=2, Lq=Lq, Lk=Lk, D=3, Dv=2, causal=causal,
                lengths=(Lk, max(0, Lk - 2)), dtype=torch.float64)
    q, k, v, w, lengths = make_inputs(case)
    fn = reference.additive_attention if score == "additive" else reference.dot_product_attention
    args = (q, k, v, w) if score == "additive" else (q, k, v)
    out, lse = fn(*args, key_lengths=lengths, causal=causal, return_lse=True)
    out_loop, lse_loop = _loop_reference(score, q, k, v, w, case.lengths, causal)
    torch.testing.assert_close(out, out_loop)
    torch.testing.assert_close(lse, lse_loop)


def test_causal_alignment_is_bottom_right():
    mask = reference.allowed_mask(1, 2, 4, None, True, "cpu")[0, 0]
    assert mask.tolist() == [[True, True, True, False], [True, True, True, True]]
    mask = reference.allowed_mask(1, 4, 2, None, True, "cpu")[0, 0]
    assert mask.tolist() == [[False, False], [False, False], [True, False], [True, True]]
    # Lq == Lk: same as SDPA's is_causal (top-left == bottom-right)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(reference.dot_product_attention(q, k, v, causal=True),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_gradcheck_float64(score):
    case = Case(score=score, B=2, H=2, Hk=1, Lq=4, Lk=5, D=3, Dv=2, causal=True, lengths=(5, 2),
                dtype=torch.float64)
    q, k, v, w, lengths = make_inputs(case)
    inputs = tuple(t.requires_grad_() for t in ((q, k, v, w) if score == "additive" else (q, k, v)))
    if score == "additive":
        def f(*xs):
            return fusedattn.additive_attention(*xs, key_lengths=lengths, causal=True, backend="reference")
    else:
        def f(*xs):
            return fusedattn.dot_product_attention(*xs, key_lengths=lengths, causal=True, backend="reference")
    assert torch.autograd.gradcheck(f, inputs)
    # and the plain reference functions (the oracle other backends are compared with)
    fn = reference.additive_attention if score == "additive" else reference.dot_product_attention
    assert torch.autograd.gradcheck(lambda *xs: fn(*xs, key_lengths=lengths, causal=True), inputs)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_fully_masked_rows_zero_output_zero_grad(score):
    case = Case(score=score, B=2, Lq=5, Lk=3, causal=True, lengths=(0, 3), dtype=torch.float64)
    q, k, v, w, lengths = make_inputs(case)
    leaves = [t.requires_grad_() for t in ((q, k, v, w) if score == "additive" else (q, k, v))]
    fn = fusedattn.additive_attention if score == "additive" else fusedattn.dot_product_attention
    out, lse = fn(*leaves, key_lengths=lengths, causal=True, return_lse=True, backend="reference")
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    # batch 1: Lq - Lk = 2 leading rows see no key under bottom-right causal
    assert torch.all(out[1, :, :2] == 0) and torch.all(torch.isneginf(lse[1, :, :2]))
    assert torch.isfinite(lse[1, :, 2:]).all()
    (out * torch.randn_like(out)).sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[0] == 0) and torch.all(q.grad[1, :, :2] == 0)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_empty_sizes(score):
    for Lq, Lk in [(0, 5), (5, 0), (0, 0)]:
        case = Case(score=score, Lq=Lq, Lk=Lk, dtype=torch.float64)
        q, k, v, w, _ = make_inputs(case)
        fn = fusedattn.additive_attention if score == "additive" else fusedattn.dot_product_attention
        args = (q, k, v, w) if score == "additive" else (q, k, v)
        out, lse = fn(*args, return_lse=True, backend="reference")
        assert out.shape == (1, 2, Lq, 16) and lse.shape == (1, 2, Lq)
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    check_backend(Case(score=score, Lk=0), "reference")


def test_strided_inputs_equal_contiguous():
    case = Case(B=2, H=3, Hk=3, Lq=6, Lk=9, D=5, Dv=4, strided=True, dtype=torch.float64)
    q, k, v, w, _ = make_inputs(case)
    assert not q.is_contiguous()
    out = fusedattn.additive_attention(q, k, v, w, backend="reference")
    out_c = fusedattn.additive_attention(q.contiguous(), k.contiguous(), v.contiguous(), w,
                                         backend="reference")
    torch.testing.assert_close(out, out_c, rtol=0, atol=1e-15)


def test_upcast_is_more_accurate_in_half():
    case = Case(Lq=33, Lk=65, D=32, Dv=32, dtype=torch.float16)
    q, k, v, w, _ = make_inputs(case)
    exact = reference.additive_attention(q.double(), k.double(), v.double(), w.double())
    err_half = (reference.additive_attention(q, k, v, w).double() - exact).abs().max()
    err_up = (reference.additive_attention(q, k, v, w, upcast=True).double() - exact).abs().max()
    assert err_up < err_half


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_attention_weights_match_softmax(score):
    case = Case(score=score, B=2, H=2, Hk=1, Lq=6, Lk=8, D=4, Dv=3, causal=True, lengths=(8, 5),
                dtype=torch.float64)
    q, k, v, w, lengths = make_inputs(case)
    fn = fusedattn.additive_attention if score == "additive" else fusedattn.dot_product_attention
    args = (q, k, v, w) if score == "additive" else (q, k, v)
    out, lse = fn(*args, key_lengths=lengths, causal=True, return_lse=True, backend="reference")
    p = fusedattn.attention_weights(q, k, w=w, lse=lse, key_lengths=lengths, causal=True, chunk=4)
    assert p.shape == (2, 2, 6, 8)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 6, dtype=torch.float64))
    assert torch.all(p[1, :, :, 5:] == 0)
    # weights reproduce the output: out = P @ v
    torch.testing.assert_close(torch.matmul(p, v.repeat_interleave(2, dim=1)), out)


def test_tolerance_rule_catches_a_wrong_result():
    from fusedattn.testing import assert_within_rule
    ref64 = torch.randn(4, 8, dtype=torch.float64)
    ref32 = ref64.float()
    assert_within_rule("exact", ref32, ref64, ref32, torch.float32)
    with pytest.raises(AssertionError, match="max error"):
        assert_within_rule("off", ref32 + 1e-3, ref64, ref32, torch.float32)
    with pytest.raises(AssertionError, match="NaN"):
        assert_within_rule("nan", torch.full_like(ref32, float("nan")), ref64, ref32, torch.float32)
    # equal infinities (lse of fully masked rows) are exact; a finite value against -inf is not
    inf = torch.full((3,), float("-inf"), dtype=torch.float64)
    assert_within_rule("inf", inf.float(), inf, inf.float(), torch.float32)
    with pytest.raises(AssertionError):
        assert_within_rule("inf", torch.zeros(3), inf, inf.float(), torch.float32)
