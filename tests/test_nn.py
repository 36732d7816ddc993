"""fusedattn.nn against hand-written plain-PyTorch Bahdanau and Luong layers, and fusedattn.viz."""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedattn
from fusedattn.nn import AdditiveAttention, AttentionCache, LuongAttention

USABLE = [name for name, why in fusedattn.available_backends().items() if why is None]
FUSED_CPU = [b for b in USABLE if b == "cpu"]


# ------------------------------------------------------------------------ hand-written layers


def masked_softmax(scores: torch.Tensor, lengths) -> torch.Tensor:
    """scores (..., Lk) with batch first; softmax over valid keys, rows with no key -> 0."""
    if lengths is not None:
        Lk = scores.shape[-1]
        valid = torch.arange(Lk).view(1, *([1] * (scores.dim() - 2)), Lk) < \
            lengths.view(-1, *([1] * (scores.dim() - 1)))
        scores = scores.masked_fill(~valid, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


class HandBahdanau(nn.Module):
    """e_ij = v^T tanh(W_a s_i + U_a h_j + b) per head, written out with (B, Lq, Lk, A) tensors."""

    def __init__(self, m: AdditiveAttention):
        super().__init__()
        self.heads, self.hd = m.heads, m.head_dim
        self.W = nn.Parameter(m.query_proj.weight.detach().clone())
        self.U = nn.Parameter(m.key_proj.weight.detach().clone())
        # same registration order as the module's parameters, so gradients pair up
        self.V = None if m.value_proj is None else nn.Parameter(m.value_proj.weight.detach().clone())
        self.v = nn.Parameter(m.score.detach().clone())
        self.b = None if m.bias is None else nn.Parameter(m.bias.detach().clone())
        self.g = None if m.gain is None else nn.Parameter(m.gain.detach().clone())

    def forward(self, s, h, lengths=None):
        B, Lq, _ = s.shape
        Lk = h.shape[1]
        pre = (s @ self.W.t()).unsqueeze(2) + (h @ self.U.t()).unsqueeze(1)      # (B, Lq, Lk, A)
        if self.b is not None:
            pre = pre + self.b
        t = torch.tanh(pre).view(B, Lq, Lk, self.heads, self.hd)
        v = self.v
        if self.g is not None:
            v = self.g[:, None] * v / torch.sqrt((v * v).sum(1, keepdim=True))
        e = (t * v).sum(-1).permute(0, 3, 1, 2)                                  # (B, heads, Lq, Lk)
        alpha = masked_softmax(e, lengths)
        if self.V is None:
            ctx = torch.einsum("bhqk,bkd->bqhd", alpha, h)
        else:
            vals = (h @ self.V.t()).view(B, Lk, self.heads, -1)
            ctx = torch.einsum("bhqk,bkhd->bqhd", alpha, vals)
        return ctx.reshape(B, Lq, -1), alpha


class HandLuong(nn.Module):
    def __init__(self, m: LuongAttention):
        super().__init__()
        self.score, self.qd = m.score, m.query_dim
        self.W = None if m.W_a is None else nn.Parameter(m.W_a.weight.detach().clone())
        self.v = None if m.v_a is None else nn.Parameter(m.v_a.detach().clone())

    def forward(self, s, h, lengths=None):
        if self.score == "dot":
            e = s @ h.transpose(1, 2)
        elif self.score == "general":
            e = s @ self.W @ h.transpose(1, 2)                     # h_t^T W_a h_s, W_a (query_dim, key_dim)
        else:
            Lq, Lk = s.shape[1], h.shape[1]
            cat = torch.cat([s.unsqueeze(2).expand(-1, -1, Lk, -1),
                             h.unsqueeze(1).expand(-1, Lq, -1, -1)], dim=-1)   # [h_t; h_s]
            e = torch.tanh(cat @ self.W.t()) @ self.v
        alpha = masked_softmax(e, lengths)
        return alpha @ h, alpha.unsqueeze(1)


HAND_NAMES = {"W": "query_proj.weight", "U": "key_proj.weight", "V": "value_proj.weight", "v": "score",
              "b": "bias", "g": "gain"}
LUONG_NAMES = {"W": "W_a.weight", "v": "v_a"}


def _paired_grads(m, ref, names, inputs, loss, loss_ref):
    """Gradients of the module's and the hand-written layer's parameters, paired by name."""
    mp = dict(m.named_parameters())
    hand = [(n, p) for n, p in ref.named_parameters()]
    assert sorted(names[n] for n, _ in hand) == sorted(mp), (sorted(mp), hand)
    got = torch.autograd.grad(loss, [mp[names[n]] for n, _ in hand] + inputs[0])
    want = torch.autograd.grad(loss_ref, [p for _, p in hand] + inputs[1])
    labels = [names[n] for n, _ in hand] + [f"input{i}" for i in range(len(inputs[0]))]
    return list(zip(labels, got, want))


def _randn(*shape, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 1000)
    return torch.randn(*shape, generator=g, dtype=dtype)


LENGTHS = torch.tensor([7, 3, 0, 5])


# ------------------------------------------------------------------------ additive


@pytest.mark.parametrize("heads,value_dim,normalize,bias", [
    (1, None, False, True), (1, None, False, False), (1, None, True, True), (2, None, False, True),
    (3, None, True, False), (2, 10, False, True), (1, 6, True, True),
])
def test_additive_matches_handwritten(heads, value_dim, normalize, bias):
    torch.manual_seed(0)
    m = AdditiveAttention(5, 4, 6, heads=heads, value_dim=value_dim, normalize=normalize, bias=bias).double()
    with torch.no_grad():  # non-trivial bias and gain
        if m.bias is not None:
            m.bias.normal_()
        if m.gain is not None:
            m.gain.uniform_(0.5, 2.0)
    ref = HandBahdanau(m)
    s = _randn(4, 3, 5, seed=1).requires_grad_()
    h = _randn(4, 7, 4, seed=2).requires_grad_()
    ctx, weights = m(s, h, LENGTHS, return_weights=True)
    ctx_ref, alpha = ref(s, h, LENGTHS)
    assert ctx.shape == (4, 3, m.output_dim) == ctx_ref.shape
    assert m.output_dim == (heads * 4 if value_dim is None else value_dim)
    torch.testing.assert_close(ctx, ctx_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(weights, alpha, rtol=0, atol=1e-12)
    up = _randn(*ctx.shape, seed=3)
    pairs = _paired_grads(m, ref, HAND_NAMES, ([s, h], [s, h]), (ctx * up).sum(), (ctx_ref * up).sum())
    assert len(pairs) == len(list(m.parameters())) + 2
    for name, a, b in pairs:
        assert a.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=lambda e, n=name: f"{n}: {e}")


@pytest.mark.parametrize("backend", FUSED_CPU or [pytest.param("cpu", marks=pytest.mark.skip("no cpu"))])
def test_additive_fused_float32_matches_handwritten(backend):
    torch.manual_seed(0)
    m = AdditiveAttention(16, 12, 32, heads=2, backend=backend)
    ref = HandBahdanau(m).double()
    s = _randn(4, 9, 16, dtype=torch.float32, seed=4).requires_grad_()
    h = _randn(4, 7, 12, dtype=torch.float32, seed=5).requires_grad_()
    s64, h64 = s.detach().double().requires_grad_(), h.detach().double().requires_grad_()
    ctx = m(s, h, LENGTHS)
    ctx_ref, _ = ref(s64, h64, LENGTHS)
    torch.testing.assert_close(ctx.double(), ctx_ref, rtol=0, atol=2e-6)
    pairs = _paired_grads(m, ref, HAND_NAMES, ([s, h], [s64, h64]), ctx.square().sum(),
                          ctx_ref.square().sum())
    for name, a, b in pairs:
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=lambda e, n=name: f"{n}: {e}")


def test_step_decoding_equals_full_call():
    torch.manual_seed(0)
    m = AdditiveAttention(5, 4, 8, heads=2, normalize=True).double()
    s = _randn(4, 6, 5, seed=6)
    h = _randn(4, 7, 4, seed=7)
    full, wfull = m(s, h, LENGTHS, return_weights=True)
    cache = m.precompute(h, LENGTHS)
    assert isinstance(cache, AttentionCache)
    assert cache.keys.shape == (4, 2, 7, 4) and cache.values.shape == (4, 2, 7, 4)
    for i in range(6):
        step, wstep = m(s[:, i], cache, return_weights=True)
        assert step.shape == (4, 8) and wstep.shape == (4, 2, 7)
        torch.testing.assert_close(step, full[:, i], rtol=0, atol=1e-14)
        torch.testing.assert_close(wstep, wfull[:, :, i], rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", USABLE)
def test_step_decoding_equals_full_call_float32(backend):
    torch.manual_seed(0)
    m = AdditiveAttention(16, 12, 16, backend=backend)
    s, h = _randn(4, 5, 16, dtype=torch.float32, seed=8), _randn(4, 7, 12, dtype=torch.float32, seed=9)
    full = m(s, h, LENGTHS)
    cache = m.precompute(h, LENGTHS)
    steps = torch.stack([m(s[:, i], cache) for i in range(5)], dim=1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-6)


def test_weights_sum_to_one_and_zero_past_lengths():
    torch.manual_seed(0)
    m = AdditiveAttention(5, 4, 6, heads=2).double()
    s, h = _randn(4, 3, 5, seed=10), _randn(4, 7, 4, seed=11)
    ctx, w = m(s, h, LENGTHS, return_weights=True)
    assert w.shape == (4, 2, 3, 7)
    sums = w.sum(-1)
    for b, n in enumerate(LENGTHS.tolist()):
        assert torch.all(w[b, :, :, n:] == 0)
        if n > 0:
            torch.testing.assert_close(sums[b], torch.ones_like(sums[b]), rtol=0, atol=1e-14)
            assert torch.all(w[b, :, :, :n] > 0)
    assert torch.all(ctx[2] == 0)  # length 0: zero context, no NaN
    # padding content past the lengths does not matter
    h2 = h.clone()
    h2[1, 3:] = 1e3
    torch.testing.assert_close(m(s, h2, LENGTHS), ctx, rtol=0, atol=0)


def test_lengths_as_list_and_no_lengths():
    m = AdditiveAttention(5, 4, 6).double()
    s, h = _randn(4, 3, 5, seed=12), _randn(4, 7, 4, seed=13)
    torch.testing.assert_close(m(s, h, LENGTHS.tolist()), m(s, h, LENGTHS), rtol=0, atol=0)
    torch.testing.assert_close(m(s, h), m(s, h, [7, 7, 7, 7]), rtol=0, atol=0)


def test_normalize_is_scale_invariant():
    torch.manual_seed(0)
    m = AdditiveAttention(5, 4, 6, heads=2, normalize=True).double()
    s, h = _randn(2, 3, 5, seed=14), _randn(2, 7, 4, seed=15)
    w = m.score_vector()
    torch.testing.assert_close(w.norm(dim=1), m.gain.detach(), rtol=0, atol=1e-14)
    before = m(s, h)
    with torch.no_grad():
        m.score.mul_(7.0)
    torch.testing.assert_close(m(s, h), before, rtol=0, atol=1e-14)
    with torch.no_grad():
        m.gain.mul_(3.0)
    assert (m(s, h) - before).abs().max() > 1e-3
    assert m.bias is not None  # normalize=True always has the bias inside the tanh
    assert AdditiveAttention(5, 4, 6, normalize=True, bias=False).bias is not None
    assert AdditiveAttention(5, 4, 6, bias=False).bias is None


def test_precompute_cache_gradients_reach_memory():
    torch.manual_seed(0)
    m = AdditiveAttention(5, 4, 6, value_dim=4).double()
    s, h = _randn(4, 3, 5, seed=16), _randn(4, 7, 4, seed=17).requires_grad_()
    (g_direct,) = torch.autograd.grad(m(s, h, LENGTHS).sum(), h)
    cache = m.precompute(h, LENGTHS)
    total = sum(m(s[:, i], cache).sum() for i in range(3))
    (g_cache,) = torch.autograd.grad(total, h)
    torch.testing.assert_close(g_cache, g_direct, rtol=0, atol=1e-13)
    assert torch.all(g_direct[1, 3:] == 0) and g_direct[1, :3].abs().max() > 0


# ------------------------------------------------------------------------ Luong


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_luong_matches_handwritten(score):
    torch.manual_seed(0)
    qd = 4 if score == "dot" else 5
    m = LuongAttention(qd, 4, score, attn_dim=6 if score == "concat" else None).double()
    ref = HandLuong(m)
    s = _randn(4, 3, qd, seed=18).requires_grad_()
    h = _randn(4, 7, 4, seed=19).requires_grad_()
    ctx, w = m(s, h, LENGTHS, return_weights=True)
    ctx_ref, alpha = ref(s, h, LENGTHS)
    assert ctx.shape == (4, 3, 4) and w.shape == (4, 1, 3, 7)
    torch.testing.assert_close(ctx, ctx_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(w, alpha, rtol=0, atol=1e-12)
    pairs = _paired_grads(m, ref, LUONG_NAMES, ([s, h], [s, h]), ctx.square().sum(), ctx_ref.square().sum())
    assert len(pairs) == 2 + {"dot": 0, "general": 1, "concat": 2}[score]
    for name, a, b in pairs:
        assert a.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=lambda e, n=name: f"{n}: {e}")
    # one decoder step over the cache equals the full call
    cache = m.precompute(h, LENGTHS)
    for i in range(3):
        torch.testing.assert_close(m(s[:, i], cache), ctx[:, i], rtol=0, atol=1e-14)


def test_luong_dot_is_unscaled():
    m = LuongAttention(4, 4, "dot").double()
    s, h = _randn(1, 1, 4, seed=20) * 3, _randn(1, 5, 4, seed=21)
    _, w = m(s, h, return_weights=True)
    torch.testing.assert_close(w[0, 0, 0], torch.softmax(h[0] @ s[0, 0], 0), rtol=0, atol=1e-14)


# ------------------------------------------------------------------------ validation


def _bad(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


def test_constructor_validation():
    _bad(ValueError, "attn_dim=6 must be divisible by heads=4", lambda: AdditiveAttention(5, 4, 6, heads=4))
    _bad(ValueError, "value_dim=5 must be divisible by heads=2",
         lambda: AdditiveAttention(5, 4, 6, heads=2, value_dim=5))
    _bad(ValueError, "query_dim must be a positive int", lambda: AdditiveAttention(0, 4, 6))
    _bad(ValueError, "backend='gpu' is unknown", lambda: AdditiveAttention(5, 4, 6, backend="gpu"))
    _bad(ValueError, "score must be 'dot', 'general' or 'concat'", lambda: LuongAttention(4, 4, "location"))
    _bad(ValueError, "score='dot' needs query_dim == key_dim, got 5 and 4", lambda: LuongAttention(5, 4))
    _bad(ValueError, "attn_dim is only used by score='concat'", lambda: LuongAttention(4, 4, attn_dim=3))


def test_forward_validation():
    m = AdditiveAttention(5, 4, 6)
    s, h = torch.randn(2, 3, 5), torch.randn(2, 7, 4)
    _bad(ValueError, r"query must have shape \(B, Lq, query_dim=5\) or \(B, query_dim\), got \(2, 3, 6\)",
         lambda: m(torch.randn(2, 3, 6), h))
    _bad(ValueError, r"query must have shape .* got \(2, 1, 3, 5\)", lambda: m(torch.randn(2, 1, 3, 5), h))
    _bad(ValueError, r"memory must have shape \(B, Lk, key_dim=4\), got \(2, 7, 5\)",
         lambda: m(s, torch.randn(2, 7, 5)))
    _bad(ValueError, r"share the batch size: query \(3, 3, 5\), memory batch 2",
         lambda: m(torch.randn(3, 3, 5), h))
    _bad(TypeError, "memory must be a torch.Tensor", lambda: m(s, h.numpy()))
    _bad(TypeError, "query must be a torch.Tensor", lambda: m(s.tolist(), h))
    _bad(TypeError, "memory has dtype torch.float64 but the module's parameters are torch.float32",
         lambda: m(s.double(), h.double()))
    _bad(TypeError, "query has dtype torch.float64", lambda: m(s.double(), h))
    _bad(ValueError, r"memory_lengths must have shape \(B,\) = \(2,\) for memory with B=2, got \(3,\)",
         lambda: m(s, h, torch.tensor([1, 2, 3])))
    _bad(TypeError, "memory_lengths must have dtype int32 or int64, got torch.float32",
         lambda: m(s, h, torch.tensor([1.0, 2.0])))
    _bad(ValueError, r"memory_lengths must lie in \[0, Lk=7\], got values in \[1, 8\]",
         lambda: m(s, h, torch.tensor([1, 8])))
    _bad(TypeError, "memory_lengths given as a list/tuple must hold Python ints", lambda: m(s, h, [1.5, 2]))
    cache = m.precompute(h, [7, 2])
    _bad(ValueError, "give memory_lengths to precompute", lambda: m(s, cache, torch.tensor([7, 2])))


# ------------------------------------------------------------------------ viz


def test_plot_alignment_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from fusedattn.viz import plot_alignment

    w = torch.softmax(torch.randn(1, 1, 5, 6), -1)
    out = plot_alignment(w, "ab cd ", "ba dc", str(tmp_path / "a.png"), title="t")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    long = torch.softmax(torch.randn(300, 310), -1)
    p2 = plot_alignment(long, "x" * 310, ["y"] * 300, str(tmp_path / "long.png"))
    assert (tmp_path / "long.png").stat().st_size > 1000 and p2.endswith("long.png")
    with pytest.raises(ValueError, match=r"weights shape \(5, 6\) must be \(len\(target\), len\(source\)\)"):
        plot_alignment(w, "abc", "ba dc", str(tmp_path / "b.png"))
    with pytest.raises(ValueError, match="weights must be"):
        plot_alignment(torch.rand(2, 3, 4), "abcd", "abc", str(tmp_path / "c.png"))


def test_plot_alignment_without_matplotlib(monkeypatch, tmp_path):
    from fusedattn import viz

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"fusedattn\[viz\]"):
        viz.plot_alignment(torch.eye(2), "ab", "ab", str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_module_in_a_training_step():
    """The layer trains: one SGD step with the fused path lowers a toy loss."""
    torch.manual_seed(0)
    m = AdditiveAttention(5, 4, 8)
    s, h = torch.randn(4, 3, 5), torch.randn(4, 7, 4)
    target = torch.randn(4, 3, 4)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        loss = F.mse_loss(m(s, h, LENGTHS.clamp(min=1)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(math.isfinite(x) for x in losses)


# ------------------------------------------------------------------------ issue 15 / 16: ecosystem


def _small_additive(**kw):
    torch.manual_seed(0)
    m = AdditiveAttention(16, 24, 32, heads=2, **kw)
    s, h = torch.randn(3, 5, 16), torch.randn(3, 7, 24)
    return m, s, h, torch.tensor([7, 3, 0])


def test_foreign_cache_is_named():
    m, s, h, L = _small_additive()
    other = AdditiveAttention(16, 24, 32, heads=4)
    _bad(ValueError, r"memory is an AttentionCache that this module's precompute\(\) did not make: it has "
         r"keys \(3, 4, 7, 8\).*heads=2", lambda: m(s, other.precompute(h, L)))
    lu = LuongAttention(16, 24, "general")
    _bad(ValueError, "AttentionCache that this module's precompute", lambda: lu(s, m.precompute(h, L)))
    assert m(s, m.precompute(h, L)).shape == (3, 5, 48)


def test_normalize_zero_score_vector_is_uniform_not_nan():
    m, s, h, L = _small_additive(normalize=True)
    with torch.no_grad():
        m.score.zero_()
    ctx, weights = m(s, h, L, return_weights=True)
    assert torch.isfinite(ctx).all()
    # w = 0: every valid key gets the same weight, 1 / length; the length-0 row gets a zero context
    for b, n in enumerate(L.tolist()):
        if n:
            torch.testing.assert_close(weights[b, :, :, :n], torch.full_like(weights[b, :, :, :n], 1 / n))
            torch.testing.assert_close(ctx[b], h[b, :n].mean(0).repeat(2).expand(5, -1))
    assert ctx[2].abs().max() == 0
    ctx.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("module", ["additive", "luong_concat", "luong_general"])
def test_modules_under_cpu_autocast_bf16(module):
    if module == "additive":
        m, s, h, L = _small_additive(value_dim=8)
    else:
        torch.manual_seed(0)
        m = LuongAttention(16, 24, module.split("_")[1])
        s, h, L = torch.randn(3, 5, 16), torch.randn(3, 7, 24), torch.tensor([7, 3, 0])
    ref = m(s, h, L)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(s, h, L)
        step = m(s[:, 0], m.precompute(h, L))
    assert out.dtype == torch.bfloat16 and step.dtype == torch.bfloat16
    # bf16 has 8 bits of mantissa: compare against the float32 module with a bf16-sized tolerance
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(step.float(), ref[:, 0], atol=3e-2, rtol=3e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(s, h, L).float().square().sum()
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_module_compiles_fullgraph_with_lengths(monkeypatch):
    # inductor's on-disk caches do not key on a custom op's fake kernel: a graph compiled before a
    # change of the op's fake strides would be replayed, so this test compiles afresh
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    m, s, h, L = _small_additive()
    ref = m(s, h, L)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(s, h, L), ref)
    # the range check still fires, now from the op (key_lengths) since tracing never reads data
    with pytest.raises(ValueError, match=r"must lie in \[0, Lk=7\]"):
        compiled(s, h, torch.tensor([7, 8, 0]))
    s.requires_grad_(True)
    compiled(s, h, L).sum().backward()
    g = s.grad.clone()
    s.grad = None
    m(s, h, L).sum().backward()
    torch.testing.assert_close(g, s.grad)


def test_module_exports_with_lengths_and_dynamic_shapes():
    m, s, h, L = _small_additive()
    Bd, Lq, Lk = torch.export.Dim("B"), torch.export.Dim("Lq"), torch.export.Dim("Lk")
    ep = torch.export.export(m, (s, h, L), dynamic_shapes=({0: Bd, 1: Lq}, {0: Bd, 1: Lk}, {0: Bd}))
    torch.testing.assert_close(ep.module()(s, h, L), m(s, h, L))
    s2, h2, L2 = torch.randn(2, 9, 16), torch.randn(2, 11, 24), torch.tensor([11, 4])
    torch.testing.assert_close(ep.module()(s2, h2, L2), m(s2, h2, L2))


def test_submodules_are_lazy_attributes():
    import subprocess

    code = ("import sys, fusedattn; assert 'fusedattn.nn' not in sys.modules; "
            "assert 'fusedattn.integrations' not in sys.modules; "
            "assert fusedattn.nn.AdditiveAttention and fusedattn.viz.plot_alignment; "
            "assert 'nn' in dir(fusedattn)\n"
            "try:\n    fusedattn.no_such_module\nexcept AttributeError as e:\n    print('ok', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ok")
