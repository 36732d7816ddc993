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


# ---------------------------------------------------------------- the third campaign (session 2026-12-01)


@pytest.mark.parametrize("w_given", [False, True])
def test_attention_weights_without_keys_is_an_empty_row(w_given):
    case = Case(score="additive" if w_given else "dot", B=2, H=2, Hk=1, Lq=5, Lk=0, D=6, Dv=3)
    q, k, _, w, _ = make_inputs(case)
    q.requires_grad_()
    p = fusedattn.attention_weights(q, k, w=w if w_given else None)
    assert p.shape == (2, 2, 5, 0)
    p.sum().backward()  # the graph holds: no keys, no gradient
    assert q.grad is None or (q.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_sides_beyond_any_distance_are_unbounded(backend):
    q, k, v, _, _ = _inputs()
    base = fusedattn.dot_product_attention(q, k, v, window=(-1, 1), backend=backend)
    for left in (12, 2 ** 40, 2 ** 70):  # Lq + Lk = 12: no aligned distance reaches the side
        out = fusedattn.dot_product_attention(q, k, v, window=(left, 1), backend=backend)
        torch.testing.assert_close(out, base, rtol=0, atol=0)
    assert fusedattn.resolve_backend(q, k, v, window=(2 ** 70, 2 ** 70)).spec.modifiers() == frozenset()
    # a side just inside the span still masks
    assert not torch.equal(fusedattn.dot_product_attention(q, k, v, window=(0, 1), backend=backend), base)


def test_a_device_no_backend_serves_is_refused_by_auto():
    m = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    q, k, v, w = m(2, 2, 5, 6), m(2, 1, 7, 6), m(2, 1, 7, 3), m(2, 6)
    with pytest.raises(ValueError, match="no backend can run .* on meta"):
        fusedattn.additive_attention(q, k, v, w)
    with pytest.raises(ValueError, match="no backend can run .* on meta"):
        fusedattn.dot_product_attention(q, k, v, key_lengths=torch.tensor([3, 7], device="meta"))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="no backend can run .* on meta"):
        fusedattn.dot_product_attention_varlen(m(9, 2, 6), m(9, 1, 6), m(9, 1, 3), cu, cu)
    with pytest.raises(ValueError, match="no backend can run .* on meta"):
        fusedattn.resolve_backend(q, k, v)
    with pytest.raises(ValueError, match="attention_weights runs on .* got q on meta"):
        fusedattn.attention_weights(q, k)


def test_dot_only_arguments_are_refused_with_additive_scores():
    q, k, v, w, _ = _inputs("additive")
    with pytest.raises(ValueError, match="softcap applies to dot-product scores only"):
        fusedattn.resolve_backend(q, k, v, w, softcap=1.0)
    with pytest.raises(ValueError, match="scale applies to dot-product scores only"):
        fusedattn.resolve_backend(q, k, v, w, scale=0.5)
    with pytest.raises(ValueError, match="softcap applies to dot-product scores only"):
        fusedattn.attention_weights(q, k, w=w, softcap=1.0)
    assert fusedattn.resolve_backend(q, k, v, w, softcap=0.0).spec.softcap == 0.0


def test_attention_weights_checks_the_device_of_lse():
    q, k, v, _, _ = _inputs()
    _, lse = fusedattn.dot_product_attention(q, k, v, return_lse=True)
    for grad in (False, True):
        with pytest.raises(ValueError, match="lse is on meta but q is on cpu"):
            fusedattn.attention_weights(q.clone().requires_grad_(grad), k, lse=lse.to("meta"))


@pytest.mark.parametrize("softcap, scale", [(1e-40, None), (1e-38, 1e4), (1e-30, 1e9)])
def test_softcap_too_small_for_float32_is_refused(softcap, scale):
    # the kernels take softcap and 2 log2(e) scale / softcap as float32 numbers (the triton backward's
    # gradients were NaN with softcap = 1e-40)
    q, k, v, _, _ = _inputs()
    with pytest.raises(ValueError, match="softcap=.* is too small for float32"):
        fusedattn.dot_product_attention(q, k, v, softcap=softcap, scale=scale)
    q64, k64, v64, _, _ = _inputs(dtype=torch.float64)  # the reference in float64 takes it
    assert torch.isfinite(fusedattn.dot_product_attention(q64, k64, v64, softcap=softcap, scale=scale,
                                                          backend="reference")).all()
    fusedattn.dot_product_attention(q, k, v, softcap=1e-30)  # small but within float32: served


def test_sparse_key_lengths_and_alibi_slopes_are_refused_by_name():
    q, k, v, _, _ = _inputs()
    with pytest.raises(TypeError, match="key_lengths must be a dense"):
        fusedattn.dot_product_attention(q, k, v, key_lengths=torch.tensor([3, 7]).to_sparse())
    with pytest.raises(TypeError, match="alibi_slopes must be a dense"):
        fusedattn.dot_product_attention(q, k, v, alibi_slopes=torch.rand(2).to_sparse())


def test_learnable_alibi_slopes_are_refused_not_silently_frozen():
    q, k, v, _, _ = _inputs()
    slopes = torch.tensor([0.5, 0.25], requires_grad=True)
    with pytest.raises(ValueError, match="alibi_slopes get no gradient"):
        fusedattn.dot_product_attention(q, k, v, alibi_slopes=slopes)
    with torch.no_grad():  # no gradient asked for: served
        fusedattn.dot_product_attention(q, k, v, alibi_slopes=slopes)
    fusedattn.dot_product_attention(q, k, v, alibi_slopes=slopes.detach())


def test_resolve_backend_names_an_unknown_keyword_and_max_seqlen_types():
    q, k, v, _, _ = _inputs()
    for bad in ("varlen", "dropout"):
        with pytest.raises(TypeError, match=f"got an unexpected keyword argument '{bad}'"):
            fusedattn.resolve_backend(q, k, v, **{bad: None})
    qp, kp, vp = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # (total, H, D)
    cu_q = torch.tensor([0, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 7], dtype=torch.int32)
    with pytest.raises(TypeError, match="max_seqlen_q must be None or an int >= 0, got str"):
        fusedattn.dot_product_attention_varlen(qp, kp, vp, cu_q, cu_k, max_seqlen_q="5")
    with pytest.raises(ValueError, match="max_seqlen_k must be None or an int >= 0, got -1"):
        fusedattn.dot_product_attention_varlen(qp, kp, vp, cu_q, cu_k, max_seqlen_k=-1)


def test_module_flags_must_be_bools():
    from fusedattn.nn import AdditiveAttention
    for name in ("normalize", "bias"):
        with pytest.raises(TypeError, match=f"{name} must be a bool, got str"):
            AdditiveAttention(8, 6, 8, **{name: "no"})
    attn = AdditiveAttention(8, 6, 8)
    with pytest.raises(TypeError, match="return_weights must be a bool, got str"):
        attn(torch.randn(2, 3, 8), torch.randn(2, 4, 6), return_weights="no")


@pytest.mark.triton
@pytest.mark.skipif(fusedattn.available_backends()["triton"] is not None,
                    reason="triton backend unavailable here")
@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("where", ["query", "key"])
def test_triton_nan_reaches_every_gradient_it_reaches_on_the_reference(score, where):
    """A NaN in one query row (or one key) gives NaN in every gradient entry the reference gives NaN
    (the additive backward's exponential clamped NaN away: a NaN query row left every dV finite),
    in exactly those of out and dv, and the finite entries match. dK (a NaN query) and dQ (a NaN
    key) may have more: the tile products multiply the NaN row by the dS = 0 of pairs it does not
    see (0 * NaN = NaN), as a NaN value does in P @ V on every backend (README, Guarantees)."""
    q, k, v, w, _ = make_inputs(Case(score=score, B=1, H=2, Hk=1, Lq=9, Lk=11, D=8, Dv=4))
    if where == "query":
        q[0, 0, 3, 2] = float("nan")
    else:
        k[0, 0, 5, 1] = float("nan")
    do = torch.randn(1, 2, 9, 4, generator=torch.Generator().manual_seed(3))
    grads = {}
    for backend in ("reference", "triton"):
        leaves = [t.clone().requires_grad_() for t in ((q, k, v, w) if score == "additive" else (q, k, v))]
        fn = fusedattn.additive_attention if score == "additive" else fusedattn.dot_product_attention
        out = fn(*leaves, causal=True, backend=backend)
        out.backward(do)
        grads[backend] = [out.detach()] + [t.grad for t in leaves]
    for name, a, b in zip(["out", "dq", "dk", "dv", "dw"], grads["triton"], grads["reference"]):
        assert (a.isnan() >= b.isnan()).all(), (name, int(a.isnan().sum()), int(b.isnan().sum()))
        if name in ("out", "dv"):
            assert torch.equal(a.isnan(), b.isnan()), name
        fin = ~a.isnan()
        torch.testing.assert_close(a[fin], b[fin], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- the fourth campaign (nn, compile, ring)


def _modules():
    from fusedattn.nn import AdditiveAttention, LuongAttention
    torch.manual_seed(0)
    return [AdditiveAttention(4, 3, 8, backend="cpu"), LuongAttention(4, 3, "general", backend="cpu"),
            LuongAttention(4, 3, "concat", backend="cpu")]


def _luong_dot():
    from fusedattn.nn import LuongAttention
    return LuongAttention(3, 3, "dot", backend="cpu")


def test_module_weights_under_cpu_autocast():
    # attention_weights follows autocast as the attention functions do (it got bfloat16 k and float32 w);
    # the weights come in the context's dtype (Luong "dot" and "general" gave float32 weights)
    mem = torch.randn(2, 5, 3)
    for m in _modules() + [_luong_dot()]:
        q = torch.randn(2, 3, m.query_dim)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ctx, w = m(q, mem, [5, 2], return_weights=True)
        assert ctx.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and w.shape == (2, 1, 3, 5)
        ref = m(q, mem, [5, 2], return_weights=True)[1]  # float32 run
        torch.testing.assert_close(w.float(), ref.float(), rtol=0.05, atol=0.02)
        assert (w[1, :, :, 2:] == 0).all()


def test_module_inputs_refused_by_name():
    m = _modules()[0]
    mem, q = torch.randn(2, 5, 3), torch.randn(2, 6, 4)
    nested = torch.nested.nested_tensor([torch.randn(5, 3), torch.randn(4, 3)])
    with pytest.raises(TypeError, match="memory must be a dense"):
        m(q, nested)
    with pytest.raises(TypeError, match="query must be a dense"):
        m(torch.nested.nested_tensor([torch.randn(6, 4), torch.randn(3, 4)]), mem)
    with pytest.raises(ValueError, match="memory is on meta but the module's parameters are on cpu"):
        m(q, torch.randn(2, 5, 3, device="meta"))
    with pytest.raises(ValueError, match="memory_lengths is on meta but memory is on cpu"):
        m(q, mem, torch.tensor([1, 2], device="meta"))


def test_compiled_weights_with_lengths_and_export():
    # the range check of key_lengths is an op (fusedattn::checked_lengths): tracing reads no data
    m = _modules()[1]
    q, mem, lengths = torch.randn(2, 3, 4), torch.randn(2, 5, 3), torch.tensor([5, 2])
    eager = m(q, mem, lengths, return_weights=True)[1]
    compiled = torch.compile(lambda q, mem, lengths: m(q, mem, lengths, return_weights=True)[1],
                             fullgraph=True)
    torch.testing.assert_close(compiled(q, mem, lengths), eager)  # inductor: last-bit differences
    qq, kk = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    f = torch.compile(lambda q, k, kl: fusedattn.attention_weights(q, k, key_lengths=kl), fullgraph=True)
    torch.testing.assert_close(f(qq, kk, torch.tensor([5])),
                               fusedattn.attention_weights(qq, kk, key_lengths=torch.tensor([5])))
    with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, Lk=8\]"):
        f(qq, kk, torch.tensor([9]))
    for dtype in (torch.int64, torch.int32):  # int32: the checked lengths are the input's values
        torch.library.opcheck(fusedattn.ops.checked_lengths, (torch.tensor([3, 5], dtype=dtype), 8))

    class WithWeights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, q, mem, lengths):
            return self.m(q, mem, lengths, return_weights=True)[1]

    ep = torch.export.export(WithWeights(), (q, mem, lengths))
    torch.testing.assert_close(ep.module()(q, mem, lengths), eager, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_the_first_call_of_a_process_may_be_a_compiled_one(backend):
    # the backends were imported with importlib.import_module and the cpu backend asked its op for the
    # instruction-set level while torch.compile traced: the first call had to be an eager one
    import subprocess
    import sys
    code = ("import torch, fusedattn\n"
            "q = torch.randn(1, 2, 8, 16)\n"
            f"f = torch.compile(lambda q: fusedattn.dot_product_attention(q, q, q, backend={backend!r}), "
            "fullgraph=True)\n"
            "c = f(q)\n"  # before any eager call
            f"e = fusedattn.dot_product_attention(q, q, q, backend={backend!r})\n"
            "print(bool((c - e).abs().max() < 1e-6))\n")
    if backend == "cpu" and fusedattn.available_backends()["cpu"] is not None:
        pytest.skip("cpu backend unavailable")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("True"), r.stderr[-2000:]


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_compile_with_dynamic_shapes(score):
    # dynamic=True traces floats and sizes as symbols: the default scale took math.sqrt of the head dim,
    # and the scalar checks math.isfinite of a symbolic float
    backend = BACKENDS[-1]
    w = torch.randn(2, 16) * 0.3

    def call(q, k, v):
        if score == "additive":
            return fusedattn.additive_attention(q, k, v, w, causal=True, backend=backend)
        return fusedattn.dot_product_attention(q, k, v, causal=True, backend=backend)

    f = torch.compile(call, fullgraph=True, dynamic=True)
    for L in (8, 13):
        q, k, v = (torch.randn(1, 2, L, 16) for _ in range(3))
        torch.testing.assert_close(f(q, k, v), call(q, k, v), rtol=0, atol=0)


def test_varlen_shape_errors_name_the_callers_shapes():
    """A packed call's q, k, v are (total, H, D); the shape errors named the internal (1, H, total, D)
    views the backends receive."""
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    t = torch.randn
    bad = {
        "q and k must share the head dim D: q (10, 4, 8), k (10, 2, 6), v (10, 2, 8)":
            (t(10, 4, 8), t(10, 2, 6), t(10, 2, 8)),
        "multiple of the key/value heads Hk (grouped heads): q (10, 4, 8), k (10, 3, 8), v (10, 3, 8)":
            (t(10, 4, 8), t(10, 3, 8), t(10, 3, 8)),
        "k and v must share Hk and Lk: q (10, 4, 8), k (10, 2, 8), v (10, 4, 8)":
            (t(10, 4, 8), t(10, 2, 8), t(10, 4, 8)),
        "head dims D and Dv must be >= 1: q (10, 4, 0), k (10, 2, 0), v (10, 2, 8)":
            (t(10, 4, 0), t(10, 2, 0), t(10, 2, 8)),
    }
    for msg, (q, k, v) in bad.items():
        with pytest.raises(ValueError) as e:
            fusedattn.dot_product_attention_varlen(q, k, v, cu, cu)
        assert msg in str(e.value), str(e.value)
    with pytest.raises(ValueError, match=r"got \(4, 6\) \(with q \(10, 4, 8\)\)"):
        fusedattn.additive_attention_varlen(t(10, 4, 8), t(10, 2, 8), t(10, 2, 8), t(4, 6), cu, cu)
