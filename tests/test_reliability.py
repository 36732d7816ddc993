"""Reliability of every usable backend: random shapes, extreme values, NaN containment, padding,
fully masked rows, determinism, threads and memory growth. Backends come from the registry;
triton runs under the interpreter on CPU tensors."""
import math
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedattn
from fusedattn import backends
from fusedattn.testing import Case, check_backend, make_inputs, run

USABLE = [n for n, reason in backends.available_backends().items() if reason is None]
FUSED = [n for n in USABLE if n != "reference"]
# the interpreter is slow: fewer random examples for triton
EXAMPLES = {"reference": 25, "cpu": 40, "triton": 12}


def _dtypes(name):
    return sorted((d for d in backends.get(name).dtypes if d != torch.float64), key=str)


@st.composite
def cases(draw, name):
    Hk = draw(st.integers(1, 2))
    H = Hk * draw(st.sampled_from([0, 1, 1, 1, 2, 2, 2]))  # H = 0: an empty result, zero key gradients
    B = draw(st.integers(1, 2))
    Lq, Lk = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    lengths = draw(st.one_of(st.none(), st.tuples(*[st.integers(0, Lk)] * B)))
    score = draw(st.sampled_from(["additive", "dot"]))
    # one huge element (the saturated softmax of the reliability issue): in q, k, v or w
    where = ["q", "k", "v"] + ["w"] * (score == "additive")
    spike = draw(st.one_of(st.none(), st.tuples(st.sampled_from(where), st.sampled_from([1e4, -1e4]))))
    return Case(score=score, B=B, H=H, Hk=Hk, Lq=Lq, Lk=Lk,
                D=draw(st.integers(1, 40)), Dv=draw(st.integers(1, 24)), causal=draw(st.booleans()),
                lengths=lengths, dtype=draw(st.sampled_from(_dtypes(name))), strided=draw(st.booleans()),
                magnitude=draw(st.sampled_from([0.1, 1.0, 5.0, 60.0])), seed=draw(st.integers(0, 2**16)),
                spike=spike)


@pytest.mark.parametrize("name", USABLE)
def test_property_random_calls_match_reference(name):
    @settings(max_examples=EXAMPLES.get(name, 20), deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(cases(name))
    def prop(case):
        check_backend(case, name)

    prop()


@pytest.mark.parametrize("name", USABLE)
@pytest.mark.parametrize("bad", ["lengths", "shape", "dtype"])
def test_property_bad_input_raises(name, bad):
    q, k, v, w, _ = make_inputs(Case(B=2, Lq=5, Lk=6))
    kw = {"backend": name}
    if bad == "lengths":
        kw["key_lengths"] = torch.tensor([3, 7])
        exc = ValueError
    elif bad == "shape":
        v = v[:, :, :4]
        exc = ValueError
    else:
        w = w.to(torch.float64)
        exc = TypeError
    with pytest.raises(exc):
        fusedattn.additive_attention(q, k, v, w, **kw)


@pytest.mark.parametrize("name", USABLE)
def test_property_non_finite_w_is_refused(name):
    @settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(cases(name), st.sampled_from([math.inf, -math.inf, math.nan]))
    def prop(case, bad):
        case = case.with_(score="additive", spike=("w", bad), H=max(case.H, case.Hk))
        q, k, v, w, lengths = make_inputs(case)
        with pytest.raises(ValueError, match="w must be finite"):
            fusedattn.additive_attention(q, k, v, w, key_lengths=lengths, causal=case.causal, backend=name)

    prop()


def _non_dense(t, layout):
    if layout == "nested":
        return torch.nested.nested_tensor(list(t.unbind(0)))
    return t.to_sparse() if layout == "sparse_coo" else t.to_sparse_csr() if t.dim() == 2 else t.to_sparse()


@pytest.mark.parametrize("name", USABLE)
def test_property_non_dense_layouts_are_refused_by_name(name):
    @settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(cases(name), st.sampled_from(["q", "k", "v", "w"]),
           st.sampled_from(["sparse_coo", "sparse_csr", "nested"]))
    def prop(case, arg, layout):
        case = case.with_(score="additive" if arg == "w" else case.score, spike=None)
        q, k, v, w, lengths = make_inputs(case)
        args = dict(q=q, k=k, v=v) if case.score == "dot" else dict(q=q, k=k, v=v, w=w)
        args[arg] = _non_dense(args[arg], layout)
        fn = fusedattn.dot_product_attention if case.score == "dot" else fusedattn.additive_attention
        with pytest.raises(TypeError, match=f"{arg} must be a dense .* got a .*(sparse|nested).* tensor"):
            fn(*args.values(), key_lengths=lengths, backend=name)

    prop()


@pytest.mark.parametrize("name", USABLE)
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_extreme_values(name, score):
    for mag in (30.0, 1e4):
        check_backend(Case(score=score, Lq=17, Lk=33, D=40, Dv=8, magnitude=mag), name)


@pytest.mark.parametrize("name", USABLE)
def test_additive_large_operands_that_cancel(name):
    # q ~ +45 and k ~ -45: each factor e^{2x} alone over/underflows in fp32, yet tanh(q + k) is
    # far from saturated. An exp-factorized kernel must fall back to a direct tanh here.
    case = Case(Lq=9, Lk=13, D=24, Dv=8)
    q, k, v, w, _ = make_inputs(case)
    q, k = q + 45.0, k - 45.0
    out = fusedattn.additive_attention(q, k, v, w, backend=name)
    ref = fusedattn.reference.additive_attention(q.double(), k.double(), v.double(), w.double())
    ref32 = fusedattn.reference.additive_attention(q, k, v, w)
    err, err32 = (out.double() - ref).abs().max(), (ref32.double() - ref).abs().max()
    assert err <= 2 * err32 + 2e-5, (err, err32)


def _same(a, b):
    """Finite and equal up to float32 rounding: a kernel may take another (equally exact) path
    for a tile that holds a non-finite value, so untouched rows need not be bitwise equal."""
    return bool(torch.isfinite(a).all()) and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", USABLE)
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_nan_stays_in_its_rows(name, score):
    case = Case(score=score, B=2, H=4, Hk=2, Lq=6, Lk=7, D=8, Dv=4)
    q, k, v, w, _ = make_inputs(case)
    args = lambda q, k, v: (q, k, v, w) if score == "additive" else (q, k, v)  # noqa: E731
    fn = fusedattn.additive_attention if score == "additive" else fusedattn.dot_product_attention
    clean = fn(*args(q, k, v), backend=name)
    # a NaN in query row (b=1, h=0, i=2) touches that output row only
    qn = q.clone()
    qn[1, 0, 2, 3] = float("nan")
    out = fn(*args(qn, k, v), backend=name)
    bad = torch.zeros_like(out, dtype=torch.bool)
    bad[1, 0, 2] = True
    assert torch.isnan(out[bad]).all() and _same(out[~bad], clean[~bad])
    # an Inf in key (b=0, kv head 0, j=4) touches only batch 0's query heads 0 and 1 (its group)
    kn = k.clone()
    kn[0, 0, 4, 1] = float("inf")
    out = fn(*args(q, kn, v), backend=name)
    assert _same(out[1], clean[1]) and _same(out[0, 2:], clean[0, 2:])
    # a NaN in value (b=1, kv head 1, j=0) touches only batch 1's query heads 2 and 3
    vn = v.clone()
    vn[1, 1, 0, 2] = float("nan")
    out = fn(*args(q, k, vn), backend=name)
    assert _same(out[0], clean[0]) and _same(out[1, :2], clean[1, :2])
    assert torch.isnan(out[1, 2:]).any()


@pytest.mark.parametrize("name", USABLE)
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_padding_content_is_never_read(name, score):
    case = Case(score=score, B=2, Lq=5, Lk=9, D=8, Dv=4, lengths=(9, 4))
    q, k, v, w, lengths = make_inputs(case)
    kp, vp = k.clone(), v.clone()
    kp[1, :, 4:] = float("nan")
    vp[1, :, 4:] = float("inf")
    fn = fusedattn.additive_attention if score == "additive" else fusedattn.dot_product_attention
    leaves = [t.clone().requires_grad_() for t in ((q, kp, vp, w) if score == "additive" else (q, kp, vp))]
    out = fn(*leaves, key_lengths=lengths, backend=name)
    clean = fn(*((q, k, v, w) if score == "additive" else (q, k, v)), key_lengths=lengths, backend=name)
    assert torch.equal(out, clean)
    out.sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    assert torch.all(leaves[1].grad[1, :, 4:] == 0) and torch.all(leaves[2].grad[1, :, 4:] == 0)


@pytest.mark.parametrize("name", USABLE)
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_fully_masked_and_empty_memory(name, score):
    for case in (Case(score=score, B=2, Lq=4, Lk=6, lengths=(0, 6)),
                 Case(score=score, B=1, Lq=7, Lk=3, causal=True),
                 Case(score=score, B=1, Lq=3, Lk=0)):
        q, k, v, w, lengths = make_inputs(case)
        dout = torch.randn(case.B, case.H, case.Lq, case.Dv)
        res = run(case, name, q, k, v, w, lengths, dout)
        masked = torch.isneginf(res["lse"])
        assert masked.any()
        assert torch.all(res["out"][masked] == 0) and torch.all(res["dq"][masked] == 0)
        for g in ("dq", "dk", "dv") + (("dw",) if score == "additive" else ()):
            assert torch.isfinite(res[g]).all(), g


@pytest.mark.parametrize("name", USABLE)
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_deterministic_bits(name, score):
    case = Case(score=score, B=2, H=4, Hk=2, Lq=33, Lk=70, D=20, Dv=12, causal=True, lengths=(70, 50))
    q, k, v, w, lengths = make_inputs(case)
    dout = torch.randn(case.B, case.H, case.Lq, case.Dv)
    a = run(case, name, q, k, v, w, lengths, dout)
    b = run(case, name, q, k, v, w, lengths, dout)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", [n for n in USABLE if n != "triton"])
def test_concurrent_threads_equal_serial(name):
    cases_ = [Case(score=s, B=1, H=2, Lq=40 + i, Lk=64, D=16, Dv=8, seed=i)
              for i, s in enumerate(["additive", "dot"] * 3)]
    inputs = [make_inputs(c) for c in cases_]
    douts = [torch.randn(c.B, c.H, c.Lq, c.Dv) for c in cases_]
    serial = [run(c, name, *x, d) for c, x, d in zip(cases_, inputs, douts)]
    results, errors = [None] * len(cases_), []

    def work(i):
        try:
            for _ in range(3):
                results[i] = run(cases_[i], name, *inputs[i], douts[i])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases_))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for s, r in zip(serial, results):
        for key in s:
            assert torch.equal(s[key], r[key]), key


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found")


@pytest.mark.parametrize("name", FUSED)
def test_no_memory_growth_over_1000_calls(name):
    if name == "triton":
        pytest.skip("the interpreter is too slow for 1,000 calls; its kernels hold no host state")
    case = Case(score="additive", B=2, H=2, Lq=32, Lk=48, D=16, Dv=8, lengths=(48, 20))
    q, k, v, w, lengths = make_inputs(case)
    dout = torch.randn(case.B, case.H, case.Lq, case.Dv)
    for _ in range(100):  # warm-up: allocator caches, lazy init
        run(case, name, q, k, v, w, lengths, dout)
    before = _rss_kib()
    for i in range(1000):
        run(case.with_(score="dot" if i % 2 else "additive"), name, q, k, v, w if i % 2 == 0 else None,
            lengths, dout)
    growth_mib = (_rss_kib() - before) / 1024
    assert growth_mib < 8, f"RSS grew by {growth_mib:.1f} MiB over 1,000 forward+backward calls"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in FUSED if n != "triton"])  # interpreter: too slow at 8 GiB
def test_64bit_offsets(name):
    # more than 2^31 elements in one tensor: v of (1, 1, Lk, Dv) with Lk * Dv > 2^31
    Lk, Dv = 2**25 + 3, 64
    q = torch.randn(1, 1, 2, 8)
    k = torch.zeros(1, 1, Lk, 8)
    v = torch.zeros(1, 1, Lk, Dv)
    v[0, 0, -1] = 1.0
    out = fusedattn.dot_product_attention(q, k, v, backend=name)
    # uniform weights: the last row contributes 1 / Lk to every output
    torch.testing.assert_close(out, torch.full_like(out, 1.0 / Lk), rtol=1e-3, atol=0)
    assert v.numel() > 2**31 and math.isfinite(out.sum().item())


_FUZZ = r'''
import random, sys, torch
import fusedattn._C  # noqa: F401  (registers torch.ops.fusedattn_cpu)
OPS = torch.ops.fusedattn_cpu
rng = random.Random(int(sys.argv[1]))
DTYPES = [torch.float32] * 3 + [torch.bfloat16, torch.float64, torch.int32, torch.float16]

def tensor(shape):
    shape = list(shape)
    if rng.random() < 0.15:  # wrong rank
        shape = shape[:-1] if rng.random() < 0.5 else shape + [2]
    shape = [s if rng.random() > 0.1 else rng.choice([0, 1, 3]) for s in shape]
    dtype = rng.choice(DTYPES)
    device = "meta" if rng.random() < 0.05 else "cpu"
    t = torch.randn(shape, device=device).to(dtype) if dtype.is_floating_point else \
        torch.randint(0, 4, shape, device=device, dtype=dtype)
    r = rng.random()
    if r < 0.1 and t.dim() > 0 and t.shape[-1] > 0:  # overlapping memory: a stride-0 expanded view
        t = t[..., :1].expand(*t.shape)
    elif r < 0.2 and t.dim() >= 2:
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif r < 0.25 and t.dim() >= 1:
        t = t.flip(-1)  # torch has no negative strides; flip copies
    return t

ok = err = 0
for it in range(int(sys.argv[2])):
    B, H, g, Lq, Lk, D, Dv = (rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2), rng.randint(0, 9),
                              rng.randint(0, 9), rng.randint(1, 9), rng.randint(1, 5))
    Hq = H * g
    q, k, v, w = tensor((B, Hq, Lq, D)), tensor((B, H, Lk, D)), tensor((B, H, Lk, Dv)), tensor((Hq, D))
    kl = None if rng.random() < 0.5 else \
        tensor((B,)).to(rng.choice([torch.int32, torch.int64])) - rng.randint(0, 2)
    causal = rng.random() < 0.5
    try:
        if rng.random() < 0.5:
            out, lse = OPS.additive_fwd(q, k, v, w, kl, causal)
            do = tensor(tuple(out.shape))
            OPS.additive_bwd(do, q, k, v, w, kl, causal, out, tensor(tuple(lse.shape)).float())
        else:
            out, lse = OPS.dot_fwd(q, k, v, kl, rng.choice([0.5, -1.0, float("nan")]), causal)
            do = tensor(tuple(out.shape))
            OPS.dot_bwd(do, q, k, v, kl, 0.5, causal, out, tensor(tuple(lse.shape)).float())
        ok += 1
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        err += 1
print(ok, err)
'''


@pytest.mark.skipif(backends.unavailable_reason("cpu") is not None, reason="cpu backend not built")
def test_fuzz_cpu_entry_points_never_crash(tmp_path):
    # Malformed tensors straight into the C++ ops (wrong ranks, sizes incl. 0, dtypes, meta device,
    # overlapping stride-0 views, transposed layouts), in a subprocess so that a crash is a failure.
    import subprocess
    import sys

    script = tmp_path / "fuzz.py"
    script.write_text(_FUZZ)
    for seed in (0, 1):
        res = subprocess.run([sys.executable, str(script), str(seed), "300"], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, f"seed {seed}: exit {res.returncode}\n{res.stderr[-2000:]}"
        ok, err = map(int, res.stdout.split())
        assert ok > 0 and err > 0  # both well-formed and malformed calls were exercised
