"""Regression tests for what the second adversarial campaign found (issue 16), at the API level."""

import numpy as np
import pytest
import torch

import fusedattn
from fusedattn.testing import Case, make_inputs

BACKENDS = [b for b in ("reference", "cpu") if fusedattn.available_backends()[b] is None]


def _inputs(score="dot", dtype=torch.float32, **kw):
    return make_inputs(Case(score=score, B=2, H=2, Hk=1, Lq=5, Lk=7, D=6, Dv=3, dtype=dtype, **kw))


def _call(score, q, k, v, w=None, **kw):
    if score == "additive":
        return fusedattn.additive_attention(q, k, v, w, **kw)
    return fusedattn.dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_forward_mode_ad_and_functorch_are_refused(score):
    q, k, v, w, _ = _inputs(score)
    args = (q, k, v, w) if score == "additive" else (q, k, v)
    f = lambda *xs: _call(score, *xs)  # noqa: E731
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            _call(score, fwAD.make_dual(q, torch.ones_like(q)), *args[1:])
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.jvp(f, args, tuple(torch.ones_like(a) for a in args))
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda *xs: f(*xs).sum())(*args)
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.vmap(f)(*(a.unsqueeze(0) for a in args))


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_double_backward_is_refused(score):
    q, k, v, w, _ = _inputs(score)
    leaves = [t.requires_grad_() for t in ((q, k, v, w) if score == "additive" else (q, k, v))]
    out = _call(score, *leaves, backend="reference")
    (g,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()


def test_attention_weights_argument_checks():
    q, k, v, _, _ = _inputs()
    _, lse = fusedattn.dot_product_attention(q, k, v, return_lse=True)
    for chunk in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk must be an int >= 1"):
            fusedattn.attention_weights(q, k, lse=lse, chunk=chunk)
    with pytest.raises(TypeError, match="lse must be a floating tensor"):
        fusedattn.attention_weights(q, k, lse=lse.long())
    p = fusedattn.attention_weights(q, k, lse=lse, chunk=2)
    torch.testing.assert_close(p.sum(-1), torch.ones_like(lse))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_nan_key_poisons_only_the_rows_that_see_it(score, backend):
    """A NaN in valid key 2 of batch 0: causal rows before it, the padding keys, and the keys no NaN row
    sees keep finite gradients (padding exactly 0), in every backend."""
    q, k, v, w, _ = make_inputs(Case(score=score, B=1, H=2, Hk=2, Lq=7, Lk=7, D=4, Dv=3))
    k[0, 0, 2, 1] = float("nan")
    lengths = torch.tensor([6])
    leaves = [t.requires_grad_() for t in ((q, k, v, w) if score == "additive" else (q, k, v))]
    out = _call(score, *leaves, key_lengths=lengths, causal=True, backend=backend)
    out.sum().backward()
    assert torch.isnan(out[0, 0, 2:]).all() and torch.isfinite(out[0, 0, :2]).all()
    assert torch.isfinite(out[0, 1]).all()
    assert (k.grad[0, :, 6] == 0).all() and (v.grad[0, :, 6] == 0).all()  # padding: exactly 0
    assert torch.isfinite(q.grad[0, 0, :2]).all() and torch.isfinite(q.grad[0, 1]).all()
    assert torch.isfinite(k.grad[0, 1]).all() and torch.isfinite(v.grad[0, 1]).all()
    # the finite values are the reference's (the kernels take another path for blocks with a NaN key)
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    _call(score, *ref, key_lengths=lengths, causal=True, backend="reference").sum().backward()
    for name, a, b in zip("qkvw", leaves, ref):
        fin = torch.isfinite(a.grad) & torch.isfinite(b.grad)
        assert fin.any(), name
        torch.testing.assert_close(a.grad[fin], b.grad[fin], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_w_is_refused(backend, bad):
    q, k, v, w, _ = _inputs("additive")
    w[1, 2] = bad
    with pytest.raises(ValueError, match="w must be finite"):
        fusedattn.additive_attention(q, k, v, w, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_beyond_float32_is_refused(dtype):
    q, k, v, _, _ = _inputs(dtype=dtype)
    with pytest.raises(ValueError, match="scale must be finite in float32"):
        fusedattn.dot_product_attention(q, k, v, scale=1e39)
    q64, k64, v64, _, _ = _inputs(dtype=torch.float64)
    out = fusedattn.dot_product_attention(q64, k64, v64, scale=1e39, backend="reference")
    assert out.shape == (2, 2, 5, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("Lq, Lk", [(5, 7), (0, 0)])  # H = Lq = Lk = 0: the reference's reshape of w failed
def test_zero_query_heads_give_an_empty_result(score, backend, Lq, Lk):
    q, k, v, w, _ = make_inputs(Case(score=score, B=2, H=2, Hk=1, Lq=Lq, Lk=Lk, D=6, Dv=3))
    q, w = q[:, :0], (w[:0] if w is not None else None)
    leaves = [t.requires_grad_() for t in ((q, k, v, w) if score == "additive" else (q, k, v))]
    out, lse = _call(score, *leaves, return_lse=True, backend=backend)
    assert out.shape == (2, 0, Lq, 3) and lse.shape == (2, 0, Lq)
    out.sum().backward()
    assert (k.grad == 0).all() and (v.grad == 0).all()
    # the oracle module called directly (the tests' reference path) as well
    ref = fusedattn.reference.attention(q, k, v, w, return_lse=True)
    assert ref[0].shape == out.shape and ref[1].shape == lse.shape


def test_sparse_and_nested_inputs_are_refused_by_name():
    q, k, v, _, _ = _inputs()
    with pytest.raises(TypeError, match="q must be a dense .* got a torch.sparse_coo tensor"):
        fusedattn.dot_product_attention(q.to_sparse(), k, v)
    nested = torch.nested.nested_tensor([torch.randn(2, 5, 6), torch.randn(2, 3, 6)])
    with pytest.raises(TypeError, match="q must be a dense .* got a nested tensor"):
        fusedattn.dot_product_attention(nested, k, v)


def test_flags_accept_numpy_bools_and_refuse_strings():
    q, k, v, _, _ = _inputs()
    a = fusedattn.dot_product_attention(q, k, v, causal=np.bool_(True))
    torch.testing.assert_close(a, fusedattn.dot_product_attention(q, k, v, causal=True), rtol=0, atol=0)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        fusedattn.dot_product_attention(q, k, v, return_lse="no")
    with pytest.raises(TypeError, match="causal must be a bool, got str"):
        fusedattn.dot_product_attention(q, k, v, causal="yes")
