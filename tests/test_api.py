"""The public API: validation errors, backend selection, op registration, torch.compile."""
import os
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import fusedattn
from fusedattn.spec import AttnSpec
from fusedattn.testing import Case, make_inputs


def _inputs(score="additive", **kw):
    return make_inputs(Case(score=score, B=2, H=4, Hk=2, Lq=5, Lk=7, D=6, Dv=3, **kw))


def _call(score, q, k, v, w=None, **kw):
    if score == "additive":
        return fusedattn.additive_attention(q, k, v, w, **kw)
    return fusedattn.dot_product_attention(q, k, v, **kw)


BAD = [
    # (description, mutate(q, k, v, w, lengths) -> (q, k, v, w, kwargs), exception, message fragment)
    ("q rank", lambda q, k, v, w: (q[0], k, v, w, {}), ValueError, "q must have shape (B, H, Lq, D)"),
    ("k not a tensor", lambda q, k, v, w: (q, k.tolist(), v, w, {}), TypeError, "k must be a torch.Tensor"),
    ("v rank", lambda q, k, v, w: (q, k, v[..., 0], w, {}), ValueError, "v must have shape"),
    ("batch mismatch", lambda q, k, v, w: (q, k[:1], v[:1], w, {}), ValueError, "batch size B"),
    ("Lk mismatch", lambda q, k, v, w: (q, k, v[:, :, :3], w, {}), ValueError, "share Hk and Lk"),
    ("D mismatch", lambda q, k, v, w: (q, k[..., :4], v, w[:, :4] if w is not None else w, {}),
     ValueError, "head dim D"),
    ("H % Hk", lambda q, k, v, w: (q[:, :3], k, v, w[:3] if w is not None else w, {}), ValueError,
     "multiple of the key/value heads"),
    ("integer dtype", lambda q, k, v, w: (q.long(), k, v, w, {}), TypeError, "floating"),
    ("mixed dtypes", lambda q, k, v, w: (q, k.double(), v, w, {}), TypeError, "share one dtype"),
    ("lengths dtype", lambda q, k, v, w: (q, k, v, w, {"key_lengths": torch.tensor([1.0, 2.0])}),
     TypeError, "key_lengths must have dtype"),
    ("lengths shape", lambda q, k, v, w: (q, k, v, w, {"key_lengths": torch.tensor([1, 2, 3])}),
     ValueError, "key_lengths must have shape (B,) = (2,)"),
    ("lengths list", lambda q, k, v, w: (q, k, v, w, {"key_lengths": [1, 2]}), TypeError, "key_lengths"),
    ("lengths > Lk", lambda q, k, v, w: (q, k, v, w, {"key_lengths": torch.tensor([1, 8])}),
     ValueError, "[0, Lk=7]"),
    ("lengths < 0", lambda q, k, v, w: (q, k, v, w, {"key_lengths": torch.tensor([-1, 2])}),
     ValueError, "[0, Lk=7]"),
    ("causal not bool", lambda q, k, v, w: (q, k, v, w, {"causal": "yes"}), TypeError, "causal"),
    ("unknown backend", lambda q, k, v, w: (q, k, v, w, {"backend": "cuda"}), ValueError, "backend='cuda'"),
    ("D = 0", lambda q, k, v, w: (q[..., :0], k[..., :0], v, w[:, :0] if w is not None else w, {}),
     ValueError, "head dims"),
    ("Hk = 0", lambda q, k, v, w: (q, k[:, :0], v[:, :0], w, {}), ValueError, "multiple"),
]


@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("desc,mutate,exc,fragment", BAD, ids=[b[0] for b in BAD])
def test_validation_errors(score, desc, mutate, exc, fragment):
    q, k, v, w, _ = _inputs(score)
    q, k, v, w, kw = mutate(q, k, v, w)
    with pytest.raises(exc) as info:
        _call(score, q, k, v, w, backend=kw.pop("backend", "reference"), **kw)
    assert fragment in str(info.value)


def test_validation_errors_additive_only():
    q, k, v, w, _ = _inputs()
    with pytest.raises(ValueError, match=r"w must have shape \(H, D\) = \(4, 6\), got \(4, 5\)"):
        fusedattn.additive_attention(q, k, v, w[:, :5])
    with pytest.raises(ValueError, match="w must have shape"):
        fusedattn.additive_attention(q, k, v, w[0])
    with pytest.raises(TypeError, match="share one dtype"):
        fusedattn.additive_attention(q, k, v, w.double())


def test_validation_errors_dot_only():
    q, k, v, _, _ = _inputs("dot")
    with pytest.raises(ValueError, match="scale must be finite"):
        fusedattn.dot_product_attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="scale must be finite"):
        fusedattn.dot_product_attention(q, k, v, scale=float("inf"))
    with pytest.raises(TypeError, match="scale must be None or a real number"):
        fusedattn.dot_product_attention(q, k, v, scale="0.5")


def test_attention_weights_validation():
    q, k, v, w, _ = _inputs()
    out, lse = fusedattn.additive_attention(q, k, v, w, return_lse=True)
    with pytest.raises(ValueError, match=r"lse must have shape \(B, H, Lq\)"):
        fusedattn.attention_weights(q, k, w=w, lse=lse[:, :2])
    with pytest.raises(ValueError, match="not both"):
        fusedattn.attention_weights(q, k, w=w, scale=1.0, lse=lse)


def test_available_backends_and_unusable_backend():
    avail = fusedattn.available_backends()
    assert set(avail) == {"reference", "triton", "cpu"}
    assert avail["reference"] is None
    q, k, v, w, _ = _inputs()
    for name, reason in avail.items():
        if reason is not None:  # asking for it names the reason
            with pytest.raises(ValueError, match=f"backend='{name}' cannot run"):
                fusedattn.additive_attention(q, k, v, w, backend=name)
    # a dtype the reference supports but no fused backend does still runs under "auto"
    qd, kd, vd, wd = (t.double() for t in (q, k, v, w))
    assert fusedattn.additive_attention(qd, kd, vd, wd).dtype == torch.float64


def test_import_is_lazy():
    code = ("import sys, fusedattn; "
            "bad = [m for m in ('triton', 'fusedattn._C', 'fusedattn.kernels') if m in sys.modules]; "
            "assert not bad, bad; "
            "import torch; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": ""})


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_opcheck(score):
    q, k, v, w, lengths = make_inputs(Case(score=score, B=2, H=2, Hk=1, Lq=5, Lk=6, D=4, Dv=3,
                                           lengths=(6, 0), dtype=torch.float64))
    for t in (q, k, v, w):
        if t is not None:
            t.requires_grad_()
    rel = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    specs = [AttnSpec(score=score, scale=0.7, window_right=0, key_lengths=lengths),
             AttnSpec(score=score, scale=0.5),
             AttnSpec(score=score, scale=0.5, window_left=2, window_right=1, rel_bias=rel,
                      alibi_slopes=torch.tensor([0.5, 0.25]), softcap=0.0 if score == "additive" else 2.0)]
    for spec in specs:
        opcheck(torch.ops.fusedattn.attn_fwd.default,
                (q, k, v, w, *spec.tensor_args(), *spec.scalar_args(), True, "reference"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_opcheck_cpu_unrounded_output(dtype):
    """On the cpu backend the op's third output is, when keep32 asks for it, the float32 output for
    16-bit inputs (kept for the backward's delta), and an empty tensor otherwise; the fake kernel says
    the same, and a compiled forward + backward gives the eager gradients bit for bit."""
    if fusedattn.available_backends()["cpu"] is not None:
        pytest.skip(fusedattn.available_backends()["cpu"])
    q, k, v, w, lengths = make_inputs(Case(score="additive", B=2, H=2, Hk=1, Lq=5, Lk=6, D=4, Dv=3,
                                           lengths=(6, 2), dtype=dtype))
    leaves = [t.requires_grad_() for t in (q, k, v, w)]
    spec = AttnSpec(score="additive", key_lengths=lengths)
    for keep32 in (True, False):
        args = (q, k, v, w, *spec.tensor_args(), *spec.scalar_args(), keep32, "cpu")
        out, lse, out32 = torch.ops.fusedattn.attn_fwd.default(*args)
        if dtype == torch.float32 or not keep32:
            assert out32.shape == (0,)
        else:
            assert out32.dtype == torch.float32 and out32.shape == out.shape
            assert torch.equal(out32.to(dtype), out) and not torch.equal(out32, out.float())
        opcheck(torch.ops.fusedattn.attn_fwd.default, args)

    def f(*xs):
        return (fusedattn.additive_attention(*xs, key_lengths=lengths, backend="cpu").float() ** 2).sum()

    g_eager = torch.autograd.grad(f(*leaves), leaves)
    g_comp = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    for a, b in zip(g_eager, g_comp):
        assert a.dtype == dtype and torch.equal(a, b)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_torch_compile_fullgraph(score):
    q, k, v, w, lengths = _inputs(score, lengths=(7, 3), causal=True)
    leaves = [t.requires_grad_() for t in ((q, k, v, w) if score == "additive" else (q, k, v))]

    def f(*xs):
        out = _call(score, *xs, key_lengths=lengths, causal=True)
        return (out * out).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    g_eager = torch.autograd.grad(f(*leaves), leaves)
    g_comp = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(g_eager, g_comp):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_eager_calls_skip_the_dispatcher_with_the_same_bits(score, backend, monkeypatch):
    """Plain eager calls run the op's implementations without the dispatcher (fusedattn.ops._eager);
    results and gradients are bitwise those of the op path; fake tensors still go through the op."""
    from fusedattn import ops
    if backend == "cpu" and fusedattn.available_backends()["cpu"] is not None:
        pytest.skip(fusedattn.available_backends()["cpu"])
    q, k, v, w, lengths = _inputs(score, lengths=(7, 3), causal=True)
    rel = torch.nn.Parameter(torch.randn(4, 9))  # as a module holds it: still the eager path
    leaves = [t.requires_grad_() for t in ((q, k, v, w) if score == "additive" else (q, k, v))] + [rel]
    dout = torch.randn(2, 4, 5, 3)

    def run():
        out, lse = _call(score, *leaves[:-1], key_lengths=lengths, window=(3, 0), rel_bias=rel,
                         return_lse=True, backend=backend)
        grads = torch.autograd.grad(out, leaves, dout)
        with torch.no_grad():  # the no-grad path too
            out2 = _call(score, *leaves[:-1], key_lengths=lengths, window=(3, 0), rel_bias=rel,
                         backend=backend)
        return out, lse, out2, grads

    calls = []
    real_fwd, real_bwd = ops.attn_fwd, ops.attn_bwd
    monkeypatch.setattr(ops, "attn_fwd", lambda *a: calls.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(ops, "attn_bwd", lambda *a: calls.append("bwd") or real_bwd(*a))
    fast = run()
    assert calls == []                      # eager: no op call
    monkeypatch.setattr(ops, "_eager", lambda tensors: False)
    slow = run()
    assert calls == ["fwd", "bwd", "fwd"]   # the op path, for comparison
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1]) and torch.equal(fast[2], slow[2])
    for a, b in zip(fast[3], slow[3]):
        assert torch.equal(a, b)
    assert not fast[2].requires_grad and fast[0].requires_grad

    monkeypatch.undo()
    from torch._subclasses.fake_tensor import FakeTensorMode
    plain = [None if t is None else t.detach() for t in (q, k, v, w)]
    with FakeTensorMode() as mode:
        fake = [None if t is None else mode.from_tensor(t) for t in plain]
        out = _call(score, *fake, backend=backend)
    assert out.shape == (2, 4, 5, 3)
