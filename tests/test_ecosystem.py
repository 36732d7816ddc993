"""The public functions in the wider PyTorch world: autocast, differentiable attention weights
(alignment losses), the reference-fallback warning, resolve_backend, the support matrix."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import fusedattn
from fusedattn import api, reference
from fusedattn.support import support_matrix

USABLE = [n for n, why in fusedattn.available_backends().items() if why is None]


def _qkvw(B=2, H=2, Lq=7, Lk=9, D=8, Dv=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(B, H, Lq, D), r(B, H, Lk, D), r(B, H, Lk, Dv), r(H, D)


# ------------------------------------------------------------------------------ autocast


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_functions_follow_cpu_autocast_bf16(score):
    q, k, v, w = _qkvw()
    kl = torch.tensor([9, 4])
    call = (lambda *a: fusedattn.additive_attention(*a, w, key_lengths=kl)) if score == "additive" else \
        (lambda *a: fusedattn.dot_product_attention(*a, key_lengths=kl))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(q, k, v)
    assert out.dtype == torch.bfloat16
    # equal to the call on inputs cast to bf16 by hand (the ops see exactly those tensors)
    ww = w.bfloat16()
    hand = fusedattn.additive_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), ww, key_lengths=kl) \
        if score == "additive" else fusedattn.dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                                                   key_lengths=kl)
    torch.testing.assert_close(out, hand, atol=0, rtol=0)
    # float64 inputs are not narrowed
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out64 = call(q.double(), k.double(), v.double()) if score == "dot" else \
            fusedattn.additive_attention(q.double(), k.double(), v.double(), w.double(), key_lengths=kl)
    assert out64.dtype == torch.float64


def test_autocast_gradients_reach_float32_leaves():
    q, k, v, w = (t.requires_grad_(True) for t in _qkvw())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fusedattn.additive_attention(q, k, v, w, causal=True)
    out.float().sum().backward()
    for t in (q, k, v, w):
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()


# ------------------------------------------------------------------------------ attention_weights


def _guided_loss(weights, Lq, Lk, g=0.2):
    """The guided attention loss of TTS models (Tachibana et al. 2017): penalize weight far from the
    diagonal, W[i, j] = 1 - exp(-(j/Lk - i/Lq)^2 / (2 g^2))."""
    i = torch.arange(Lq, dtype=weights.dtype).view(-1, 1) / Lq
    j = torch.arange(Lk, dtype=weights.dtype).view(1, -1) / Lk
    return (weights * (1 - torch.exp(-((j - i) ** 2) / (2 * g * g)))).mean()


@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_attention_weights_gradients_match_autograd_through_reference(score, chunk):
    q, k, v, w = _qkvw(dtype=torch.float64, seed=1)
    kl = torch.tensor([9, 5])
    rb = torch.randn(2, 7, dtype=torch.float64)
    kw = dict(key_lengths=kl, causal=True, rel_bias=rb)
    leaves = [q, k, rb] + ([w] if score == "additive" else [])
    for t in leaves:
        t.requires_grad_(True)
    wv = w if score == "additive" else None
    ours = fusedattn.attention_weights(q, k, w=wv, chunk=chunk, **kw)
    g_ours = torch.autograd.grad(_guided_loss(ours, 7, 9), leaves)
    # the oracle: softmax of the reference's scores, masked, differentiated by autograd
    s = reference.scores(q, k, wv, scale=8 ** -0.5, rel_bias=rb, Lq=7)
    mask = reference.allowed_mask(2, 7, 9, kl, False, q.device, (-1, 0))
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(ours, p)
    g_ref = torch.autograd.grad(_guided_loss(p, 7, 9), leaves)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_attention_weights_memory_is_chunked():
    """Backward through attention_weights recomputes each chunk: the saved tensors are the inputs
    (and the output), not the (B, H, Lq, Lk, D) tanh tensor of additive scores."""
    q, k, _, w = _qkvw(B=1, H=1, Lq=64, Lk=64, D=32)
    q.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fusedattn.attention_weights(q, k, w=w, chunk=8)
    assert max(saved) <= 64 * 64          # nothing of size Lq * Lk * D = 131,072 is kept


# ------------------------------------------------------------------------------ fallback warning


def test_reference_fallback_warns_once_above_32_mib(monkeypatch):
    monkeypatch.setattr(api, "_WARNED", set())
    # float64 is served by the reference only: 1 x 1 x 1024 x 1024 x 4 bytes x D=16 > 32 MiB of scores
    q = torch.randn(1, 1, 1024, 16, dtype=torch.float64)
    w = torch.randn(1, 16, dtype=torch.float64)
    with pytest.warns(fusedattn.ReferenceFallbackWarning, match="materializing reference path"):
        fusedattn.additive_attention(q, q, q[..., :2], w)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fusedattn.ReferenceFallbackWarning)
        fusedattn.additive_attention(q, q, q[..., :2], w)            # once per kind of call
        fusedattn.additive_attention(q, q, q[..., :2], w, backend="reference")  # explicit: never
        small = q[:, :, :64]
        fusedattn.additive_attention(small, small, small[..., :2], w)


# ------------------------------------------------------------------------------ resolve_backend


def test_resolve_backend_names_backend_and_reasons():
    q, k, v, w = _qkvw()
    r = fusedattn.resolve_backend(q, k, v, w)
    assert r.backend == ("cpu" if "cpu" in USABLE else "reference")
    assert r.spec.score == "additive"
    r64 = fusedattn.resolve_backend(q.double(), k.double(), v.double())
    assert r64.backend == "reference"
    if "cpu" in USABLE:
        assert any("float64" in reason for reason in r64.skipped["cpu"])
    if "cpu" in USABLE:
        with pytest.raises(ValueError, match=r"backend='cpu' cannot run .*float64"):
            fusedattn.resolve_backend(q.double(), k.double(), v.double(), backend="cpu")
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        fusedattn.resolve_backend(q, k, v, backend="nope")


def test_resolve_backend_agrees_with_the_call(monkeypatch):
    q, k, v, w = _qkvw()
    ran = []
    from fusedattn import backends

    real = backends.get

    def spy(name):
        ran.append(name)
        return real(name)

    monkeypatch.setattr(backends, "get", spy)
    for kw in ({}, {"causal": True}, {"window": (2, 1)}, {"softcap": 5.0}):
        ran.clear()
        fusedattn.dot_product_attention(q, k, v, **kw)
        assert ran[-1] == fusedattn.resolve_backend(q, k, v, **kw).backend, kw


# ------------------------------------------------------------------------------ support matrix


def test_support_matrix_is_read_from_the_declarations():
    rows = support_matrix()
    from fusedattn import backends

    for row in rows:
        b = backends.get(row["backend"])
        assert row["devices"] == sorted(b.devices) and row["scores"] == sorted(b.scores)
        assert set(row["modifiers"]) == set(b.serves())
    out = subprocess.run([sys.executable, "-m", "fusedattn.support"], capture_output=True, text=True,
                         check=True)
    assert "| backend |" in out.stdout and "reference" in out.stdout
