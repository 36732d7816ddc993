"""The score spec and its modifiers through the public API: validation, varlen layout, gradients
of rel_bias, and agreement between the packed and the separate calls."""
import math

import pytest
import torch

import fusedattn
from fusedattn import ops
from fusedattn.spec import MODIFIERS, AttnSpec


def _qkv(B=2, H=2, Hk=2, Lq=9, Lk=11, D=8, Dv=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, H, Lq, D), mk(B, Hk, Lk, D), mk(B, Hk, Lk, Dv), mk(H, D) / math.sqrt(D)


def test_op_schema_is_generated_from_the_spec():
    for name in AttnSpec.tensor_names() + AttnSpec.scalar_names():
        assert f" {name}" in ops.FWD_SCHEMA and f" {name}" in ops.BWD_SCHEMA
    spec = AttnSpec(score="dot", scale=0.3, window_left=4, window_right=0, softcap=2.0)
    assert AttnSpec.from_args(spec.tensor_args(), spec.scalar_args()) == spec
    assert spec.modifiers() == {"window", "softcap"}
    assert AttnSpec(window_right=0).modifiers() == {"causal"} and set(MODIFIERS) >= spec.modifiers()


def _cu(*lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


I32 = torch.int32
VARLEN_BAD = [
    ("int64", dict(cu_seqlens_q=_cu(3, 4).long()), TypeError, "cu_seqlens_q must be int32"),
    ("start", dict(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=I32)), ValueError, "must start at 0"),
    ("decreasing", dict(cu_seqlens_k=torch.tensor([0, 6, 5, 9], dtype=I32), cu_seqlens_q=_cu(3, 2, 2)),
     ValueError, "non-decreasing"),
    ("end", dict(cu_seqlens_k=_cu(3, 3)), ValueError, "must end at the total length 9"),
    ("max_seqlen", dict(max_seqlen_q=2), ValueError, "max_seqlen_q=2 is below the longest sequence"),
    ("batch", dict(cu_seqlens_k=_cu(9)), ValueError, "must have one shape"),
    ("window", dict(window=(-2, 0)), ValueError, "window sides must be >= -1"),
    ("window type", dict(window=3), TypeError, "window must be None or a pair of ints"),
    ("causal window", dict(window=(2, 3), causal=True), ValueError, "causal=True means window right = 0"),
    ("rel_bias even", dict(rel_bias=torch.zeros(2, 4)), ValueError, r"rel_bias must have shape \(H, 2M"),
    ("rel_bias H", dict(rel_bias=torch.zeros(3, 5)), ValueError, r"rel_bias must have shape \(H, 2M"),
    ("rel_bias dtype", dict(rel_bias=torch.zeros(2, 5, dtype=torch.float64)), TypeError,
     "rel_bias must be float32"),
    ("alibi shape", dict(alibi_slopes=torch.zeros(3)), ValueError, r"alibi_slopes must have shape \(H,\)"),
    ("alibi dtype", dict(alibi_slopes=torch.zeros(2, dtype=torch.float64)), TypeError,
     "alibi_slopes must be float32"),
]


@pytest.mark.parametrize("what,kw,exc,msg", VARLEN_BAD, ids=[b[0] for b in VARLEN_BAD])
def test_varlen_and_modifier_validation(what, kw, exc, msg):
    q, k, v = torch.randn(7, 2, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 4)
    args = dict(cu_seqlens_q=_cu(3, 4), cu_seqlens_k=_cu(5, 4))
    args.update(kw)
    with pytest.raises(exc, match=msg):
        cu = args.pop("cu_seqlens_q"), args.pop("cu_seqlens_k")
        fusedattn.dot_product_attention_varlen(q, k, v, *cu, **args)


@pytest.mark.parametrize("softcap,exc", [(-1.0, ValueError), (float("inf"), ValueError),
                                         (float("nan"), ValueError), ("1", TypeError)])
def test_softcap_validation(softcap, exc):
    q, k, v, _ = _qkv()
    with pytest.raises(exc, match="softcap"):
        fusedattn.dot_product_attention(q, k, v, softcap=softcap)


def test_softcap_is_not_an_additive_argument():
    q, k, v, w = _qkv()
    with pytest.raises(TypeError, match="softcap"):
        fusedattn.additive_attention(q, k, v, w, softcap=1.0)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_rel_bias_gradcheck(score):
    q, k, v, w = _qkv(B=1, Lq=5, Lk=7, D=3, Dv=2, dtype=torch.float64)
    rel = torch.randn(2, 7, dtype=torch.float64)
    slopes = torch.tensor([0.3, 0.1])
    leaves = [t.requires_grad_() for t in (q, k, v, rel) + ((w,) if score == "additive" else ())]

    def f(q, k, v, rel, *w):
        kw = dict(window=(3, 1), rel_bias=rel, alibi_slopes=slopes, backend="reference")
        if score == "additive":
            return fusedattn.additive_attention(q, k, v, w[0], **kw)
        return fusedattn.dot_product_attention(q, k, v, softcap=1.3, **kw)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_varlen_equals_separate_calls(score):
    """Each packed sequence gives what a dense call on that sequence alone gives (every backend here):
    bit for bit where the backend runs a packed batch per sequence (reference), within float32
    rounding where one call runs the whole batch (cpu: its tiles start elsewhere, so its sums round
    in another order)."""
    lens = [(5, 9), (0, 4), (12, 12), (3, 0), (1, 7)]
    H, Hk, D, Dv = 4, 2, 12, 6
    g = torch.Generator().manual_seed(3)
    tq, tk = sum(a for a, _ in lens), sum(b for _, b in lens)
    q, k = torch.randn(tq, H, D, generator=g), torch.randn(tk, Hk, D, generator=g)
    v = torch.randn(tk, Hk, Dv, generator=g)
    w = torch.randn(H, D, generator=g) / math.sqrt(D)
    cq, ck = _cu(*[a for a, _ in lens]), _cu(*[b for _, b in lens])
    for backend in ("reference", "cpu"):
        if fusedattn.available_backends()[backend]:
            continue
        kw = dict(causal=True, return_lse=True, backend=backend)
        if score == "additive":
            out, lse = fusedattn.additive_attention_varlen(q, k, v, w, cq, ck, **kw)
        else:
            out, lse = fusedattn.dot_product_attention_varlen(q, k, v, cq, ck, **kw)
        assert out.shape == (tq, H, Dv) and lse.shape == (H, tq)
        for b, (a, n) in enumerate(lens):
            q0, k0 = int(cq[b]), int(ck[b])
            qb = q[q0:q0 + a].transpose(0, 1)[None]
            kb, vb = (t[k0:k0 + n].transpose(0, 1)[None] for t in (k, v))
            args = (qb, kb, vb, w) if score == "additive" else (qb, kb, vb)
            fn = fusedattn.additive_attention if score == "additive" else fusedattn.dot_product_attention
            ob, lb = fn(*args, causal=True, return_lse=True, backend=backend)
            tol = dict(rtol=0, atol=0) if backend == "reference" else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out[q0:q0 + a], ob[0].transpose(0, 1), **tol)
            torch.testing.assert_close(lse[:, q0:q0 + a], lb[0], **tol)


def test_window_matches_an_explicit_mask():
    """window=(left, right) against an explicit loop over FlashAttention's inequality."""
    q, k, v, _ = _qkv(B=1, H=1, Hk=1, Lq=6, Lk=9, dtype=torch.float64)
    left, right = 2, 1
    out = fusedattn.dot_product_attention(q, k, v, window=(left, right), backend="reference")
    s = (q @ k.transpose(-1, -2))[0, 0] / math.sqrt(8)
    Lq, Lk = 6, 9
    for i in range(Lq):
        allowed = [j for j in range(Lk) if i + Lk - Lq - left <= j <= i + Lk - Lq + right]
        p = torch.softmax(s[i, allowed], -1)
        torch.testing.assert_close(out[0, 0, i], p @ v[0, 0, allowed])
