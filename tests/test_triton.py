"""The triton backend (``fusedattn.kernels`` under TRITON_INTERPRET=1 on CPU) against the reference.

Oracle and rule: ``fusedattn.testing`` (FlashAttention's rule: error against a float64
reference <= 2 x the error of the reference computed in the input dtype + a small floor),
applied to out, lse, dq, dk, dv and dw.

The cases are a covering set, not a cross product: every Lq/Lk in {1, 17, 64, 97, 257},
every D/A in {16, 40, 64, 100, 128} plus 256, Dv != D, causal with Lq < Lk and Lq > Lk,
key lengths including 0 (fully masked rows), grouped heads, pre-activations scaled by 30
and 1e4 (saturated tanh: the direct-tanh tiles), transposed (B, L, H, D) inputs,
fp32/fp16/bf16 and the flash-decoding split path. Interpreter block sizes are
``INTERPRET_CONFIG`` in the kernel modules (Lq, Lk = 97 and 257 span several tiles).
Score modifiers (window, softcap, rel_bias, ALiBi): ``MODS`` below, on sizes that span several
tiles (skipped, straddling and unmasked tiles); the one-tile combinations are generated in
``test_backends.py::MODIFIER_CASES``.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fusedattn import testing
from fusedattn.backends import unavailable_reason
from fusedattn.testing import Case

_REASON = unavailable_reason("triton")
pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable: {_REASON}")]

if _REASON is None:
    from fusedattn.backends import triton_backend as tb

    BACKEND = tb.TritonBackend()

    import triton
    import triton.language as tl

    from fusedattn.kernels.additive_bwd import _exp_fma

    @triton.jit
    def _exp_fma_kernel(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, _exp_fma(tl.load(X + offs)))

    from fusedattn.kernels.common import _softcap

    @triton.jit
    def _softcap_kernel(X, S, G, softcap_k, softcap, N: tl.constexpr, POLY: tl.constexpr):
        offs = tl.arange(0, N)
        s, g = _softcap(tl.load(X + offs), softcap_k, softcap, POLY)
        tl.store(S + offs, s)
        tl.store(G + offs, g)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# ------------------------------------------------------------------------------ cases
ADDITIVE = [
    Case(B=1, H=2, Hk=2, Lq=17, Lk=64, D=16, Dv=24),
    Case(B=2, H=2, Hk=1, Lq=97, Lk=64, D=40, Dv=24, causal=True, lengths=(64, 30)),
    Case(B=1, H=1, Hk=1, Lq=64, Lk=97, D=100, Dv=64, causal=True),                 # Lq < Lk
    Case(B=1, H=1, Hk=1, Lq=257, Lk=17, D=64, Dv=40, causal=True),                 # Lq > Lk
    Case(B=2, H=1, Hk=1, Lq=64, Lk=257, D=64, Dv=40, lengths=(0, 200), dtype=F16),
    Case(B=1, H=1, Hk=1, Lq=64, Lk=97, D=128, Dv=17, lengths=(90,)),
    Case(B=1, H=2, Hk=1, Lq=97, Lk=97, D=40, Dv=80, causal=True, dtype=BF16),
    Case(B=1, H=1, Hk=1, Lq=64, Lk=64, D=64, Dv=32, magnitude=30.0),
    Case(B=1, H=1, Hk=1, Lq=17, Lk=97, D=16, Dv=16, magnitude=1e4, causal=True),
    Case(B=1, H=2, Hk=2, Lq=64, Lk=17, D=40, Dv=16, magnitude=30.0, dtype=F16),
    Case(B=1, H=4, Hk=2, Lq=17, Lk=97, D=40, Dv=16, strided=True, lengths=(50,)),
    Case(B=1, H=1, Hk=1, Lq=1, Lk=257, D=64, Dv=32, lengths=(131,)),               # decode split
    Case(B=2, H=2, Hk=1, Lq=16, Lk=257, D=40, Dv=64, causal=True, lengths=(257, 3), dtype=F16),
    Case(B=1, H=1, Hk=1, Lq=64, Lk=1, D=16, Dv=16, causal=True),
    Case(B=1, H=1, Hk=1, Lq=1, Lk=1, D=100, Dv=40),
    Case(B=1, H=1, Hk=1, Lq=17, Lk=64, D=256, Dv=256),
]
DOT = [Case(score="dot", **{f: getattr(c, f) for f in ("B", "H", "Hk", "Lq", "Lk", "D", "Dv", "causal",
                                                       "lengths", "dtype", "strided")})
       for c in ADDITIVE if c.magnitude == 1.0]
DOT += [
    Case(score="dot", B=1, H=2, Hk=2, Lq=97, Lk=97, D=64, Dv=64, magnitude=30.0, scale=0.05),
    Case(score="dot", B=1, H=1, Hk=1, Lq=64, Lk=64, D=128, Dv=100, dtype=BF16, causal=True),
    # GQA decode: the kernel packs the 4 query heads of a kv head into one program's rows (12 of 16)
    Case(score="dot", B=2, H=8, Hk=2, Lq=3, Lk=97, D=64, Dv=64, causal=True, lengths=(97, 40)),
    Case(score="dot", B=1, H=6, Hk=2, Lq=40, Lk=70, D=32, Dv=32, causal=True, dtype=F16),  # rows span heads
]


def _launch(case: Case, q, k, v, w, lengths, dout, num_splits=None):
    """Forward and backward straight through the launchers (no op layer)."""
    if case.score == "additive":
        out, lse = BACKEND.additive_forward(q, k, v, w, lengths, case.causal, num_splits=num_splits)
        grads = BACKEND.additive_backward(dout, q, k, v, w, lengths, case.causal, out, lse)
        names = ("dq", "dk", "dv", "dw")
    else:
        scale = case.scale if case.scale is not None else q.shape[-1] ** -0.5
        out, lse = BACKEND.dot_forward(q, k, v, lengths, scale, case.causal, num_splits=num_splits)
        grads = BACKEND.dot_backward(dout, q, k, v, lengths, scale, case.causal, out, lse)
        names = ("dq", "dk", "dv")
    return {"out": out, "lse": lse, **dict(zip(names, grads))}


def _check_launchers(case: Case, num_splits=None):
    q, k, v, w, lengths = testing.make_inputs(case)
    g = torch.Generator().manual_seed(case.seed + 1)
    dout = torch.randn(case.B, case.H, case.Lq, case.Dv, generator=g, dtype=torch.float64).to(case.dtype)
    fused = _launch(case, q, k, v, w, lengths, dout, num_splits)
    ref64 = testing.run_reference(case, q, k, v, w, lengths, dout, upcast_to=torch.float64)
    ref_dt = testing.run_reference(case, q, k, v, w, lengths, dout)
    for name in ref64:
        assert fused[name].dtype == (torch.float32 if name == "lse" else case.dtype), name
        assert fused[name].shape == ref64[name].shape, name
        assert not torch.isnan(fused[name]).any(), f"{case} {name}: NaN"
        testing.assert_within_rule(f"{case} [triton] {name}", fused[name], ref64[name], ref_dt[name],
                                   case.dtype)
    return fused


@pytest.mark.parametrize("case", ADDITIVE + DOT, ids=str)
def test_forward_backward(case):
    _check_launchers(case)


# ------------------------------------------------------------------------------ decode splits
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_decode_split_matches_single_pass(score):
    """Flash-decoding: 1 program vs. 5 key splits merged by LSE (including all-masked splits)."""
    case = Case(score=score, B=2, H=2, Hk=1, Lq=3, Lk=257, D=16, Dv=24, causal=True, lengths=(257, 70))
    q, k, v, w, lengths = testing.make_inputs(case)
    assert tb.num_splits_for(2, 2, 3, 257, 16, 64, q.device) == 5  # what the launcher picks by itself
    fwd = BACKEND.additive_forward if score == "additive" else BACKEND.dot_forward
    args = (q, k, v, w, lengths, False) if score == "additive" else (q, k, v, lengths, 0.25, False)
    one, split = fwd(*args, num_splits=1), fwd(*args, num_splits=5)
    torch.testing.assert_close(split[0], one[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(split[1], one[1], rtol=0, atol=2e-6)
    assert torch.isneginf(split[1][1, :, :]).sum() == 0  # batch 1: 70 keys, every row sees some


# ------------------------------------------------------------------------------ masked rows
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_fully_masked_rows(score):
    """key_lengths = 0 and causal rows with no key: out = 0, lse = -inf, zero gradients."""
    case = Case(score=score, B=2, H=1, Hk=1, Lq=20, Lk=5, D=16, Dv=16, causal=True, lengths=(0, 5))
    fused = _check_launchers(case)
    assert torch.isneginf(fused["lse"][0]).all() and (fused["out"][0] == 0).all()
    assert (fused["dq"][0] == 0).all() and (fused["dk"][0] == 0).all() and (fused["dv"][0] == 0).all()
    # batch 1: rows i < Lq - Lk see no key under the bottom-right causal mask
    assert torch.isneginf(fused["lse"][1, :, :15]).all() and torch.isfinite(fused["lse"][1, :, 15:]).all()
    assert (fused["dq"][1, :, :15] == 0).all()


def test_direct_tanh_tiles_are_exact():
    """|q| > 40 on some rows only: those tiles take the direct path, others the factored one."""
    case = Case(B=1, H=1, Hk=1, Lq=97, Lk=64, D=40, Dv=16)
    q, k, v, w, lengths = testing.make_inputs(case)
    q[0, 0, 70:] *= 200.0  # the last query tile only
    k[0, 0, :5] += 45.0    # one key tile
    dout = torch.randn(1, 1, 97, 16, generator=torch.Generator().manual_seed(3))
    fused = _launch(case, q, k, v, w, lengths, dout)
    ref64 = testing.run_reference(case, q, k, v, w, lengths, dout, upcast_to=torch.float64)
    ref_dt = testing.run_reference(case, q, k, v, w, lengths, dout)
    for name in ref64:
        testing.assert_within_rule(f"direct {name}", fused[name], ref64[name], ref_dt[name], F32)


@pytest.mark.parametrize("D", [5, 10, 40])
def test_factored_scores_at_float32_accuracy(D):
    """The factored score loop (with every 5th column's reciprocal on the FMA pipes, as
    INTERPRET_CONFIG sets) keeps float32 accuracy: the lse error is at most 2x that of the
    float32 reference plus 2e-7, far tighter than the suite's 2e-5 floor (two Newton steps
    instead of three give 4-15x the reference error here)."""
    from fusedattn.kernels import additive
    assert additive.INTERPRET_CONFIG["SOFT_RCP"] == 5
    case = Case(B=1, H=1, Hk=1, Lq=64, Lk=64, D=D, Dv=16, magnitude=2.0)
    q, k, v, w, _ = testing.make_inputs(case)
    _, lse = BACKEND.additive_forward(q, k, v, w, None, False)
    ref64 = testing.run_reference(case, q, k, v, w, None, None, upcast_to=torch.float64)["lse"]
    ref32 = testing.run_reference(case, q, k, v, w, None, None)["lse"]
    err, err_ref = (lse.double() - ref64).abs().max().item(), (ref32.double() - ref64).abs().max().item()
    assert err <= 2 * err_ref + 2e-7, (err, err_ref)


def test_fma_pipe_exp_is_float32_accurate():
    """``additive_bwd._exp_fma`` (P in the additive backward, computed on the FMA pipes so the
    MUFU unit only takes the reciprocals): within a few float32 ulp of exp on [-100, 0.01] (the
    product x log2 e rounds like the GPU's own exp), exactly 0 far below the float32 range."""
    x = torch.cat([torch.linspace(-100.0, 0.01, 4090), torch.tensor([-1e4, -200.0, -104.0, -float("inf"),
                                                                      0.0, -0.5])])
    x = torch.cat([x, torch.zeros(4096 - x.numel())])
    y = torch.empty_like(x)
    _exp_fma_kernel[(1,)](x, y, N=4096)
    ref = torch.exp(x.double())
    rel = ((y.double() - ref).abs() / ref.clamp_min(1e-300))[x > -87]
    assert float((rel / (3e-7 + 1e-7 * x[x > -87].abs().double())).max()) <= 1.0
    assert (y[x < -104] == 0).all() and y[x == 0].eq(1.0).all()


@pytest.mark.parametrize("poly", [True, False], ids=["float32", "16bit"])
@pytest.mark.parametrize("cap", [50.0, 2.0])
def test_softcap_is_accurate_near_zero_and_saturated(cap, poly):
    """``common._softcap`` against float64 tanh: for float32 inputs (POLY) s = cap tanh(x) within a
    few float32 ulps of its own size for x from 1e-6 to 20 (1 - 2 e r alone errs by cap ulp(1)
    near 0: ~1e-4 relative at x = 1e-3), for 16-bit inputs within a few cap ulp(1); g = 1 - tanh^2
    within a few ulps of its own size on both paths (also at x << 0, where 1 - r would cancel);
    exactly +-cap and g = 0 when saturated."""
    mag = torch.logspace(-6, 1.3, 2000, dtype=torch.float64)
    x = torch.cat([mag, -mag, torch.tensor([0.0, 0.6, -0.6, 1e4, -1e4], dtype=torch.float64)])
    x = torch.cat([x, torch.zeros(4096 - x.numel(), dtype=torch.float64)])
    scale = 0.125
    softcap_k = 2.0 * scale * 1.4426950408889634 / cap
    qk = (x * cap / scale).float()  # raw products whose scaled value is x
    s, g = torch.empty_like(qk), torch.empty_like(qk)
    _softcap_kernel[(1,)](qk, s, g, softcap_k, cap, N=4096, POLY=poly)
    xx = qk.double() * scale / cap
    t = torch.tanh(xx)
    ok = xx.abs() < 5
    rel_s = ((s.double() - cap * t).abs() / (cap * t).abs().clamp_min(1e-300))[ok & (xx != 0)]
    rel_g = ((g.double() - (1 - t * t)).abs() / (1 - t * t))[ok]
    eps = 2.0 ** -24
    if poly:
        assert float(rel_s.max()) <= 8 * eps, float(rel_s.max())
    else:
        assert float((s.double() - cap * t).abs()[ok].max()) <= 4 * eps * cap
        assert float(rel_s.max()) > 1e-3  # what POLY is for
    assert float(rel_g.max()) <= 16 * eps, float(rel_g.max())
    assert s[xx == 0].eq(0).all()
    assert s[xx > 30].eq(cap).all() and s[xx < -30].eq(-cap).all() and g[xx.abs() > 30].eq(0).all()


def test_deterministic():
    case = Case(B=1, H=4, Hk=1, Lq=20, Lk=70, D=16, Dv=16, causal=True)
    q, k, v, w, lengths = testing.make_inputs(case)
    dout = torch.randn(1, 4, 20, 16, generator=torch.Generator().manual_seed(1))
    a = _launch(case, q, k, v, w, lengths, dout)
    b = _launch(case, q, k, v, w, lengths, dout)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------ launch contract
class _Spy:
    """Stands in for a @triton.jit kernel: records every launch's arguments, then runs it."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.fn, dict(zip(self.fn.arg_names, args))))
            return self.fn[grid](*args, **kwargs)
        return launch


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values at an address 1 element past a 16-byte boundary, row stride D + 1."""
    buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype)
    buf[..., 1:] = t
    return buf[..., 1:]


@pytest.mark.parametrize("case", [
    Case(B=2, H=2, Hk=1, Lq=17, Lk=97, D=40, Dv=24, causal=True, lengths=(97, 30)),
    Case(B=1, H=3, Hk=3, Lq=3, Lk=130, D=20, Dv=17, lengths=(100,)),   # decode split, H = 3
    Case(score="dot", B=2, H=2, Hk=1, Lq=17, Lk=97, D=40, Dv=24, causal=True, lengths=(97, 30)),
    Case(score="dot", B=1, H=3, Hk=3, Lq=3, Lk=130, D=20, Dv=17, lengths=(100,)),
], ids=str)
def test_launch_contract(case, monkeypatch):
    """Every launch meets the contract the compile check compiles for (kernels.common): pointers
    16-byte aligned, unit last strides, every other stride a multiple of 16, even for a D = 40,
    Dv = 17 or Lq = 17 problem whose inputs sit at a misaligned address; results still match."""
    from fusedattn.kernels import additive, additive_bwd, additive_decode, common, dot
    from fusedattn.tools.gpu_compile_check import _UNIT_STRIDES

    calls = []
    monkeypatch.setattr(tb, "interpreting", lambda: True)  # it looks at the kernel objects' type
    for mod, names in ((additive, ("_attn_fwd_additive", "_attn_exp_table")),
                       (additive_bwd, ("_attn_bwd_dkdv_additive", "_attn_bwd_dq_additive")),
                       (additive_decode, ("_attn_fwd_additive_decode",)),
                       (dot, ("_attn_fwd_dot", "_attn_bwd_dkdv_dot", "_attn_bwd_dq_dot"))):
        for name in names:
            monkeypatch.setattr(mod, name, _Spy(getattr(mod, name), calls))
    for name in ("_attn_bwd_preprocess", "_attn_fwd_merge"):
        monkeypatch.setattr(tb, name, _Spy(getattr(common, name), calls))
    q, k, v, w, lengths = testing.make_inputs(case)
    q, k, v = _misaligned(q), _misaligned(k), _misaligned(v)
    if w is not None:
        w = _misaligned(w)
    lengths = torch.cat([torch.zeros(1, dtype=torch.int32), lengths])[1:]  # 4-byte offset
    g = torch.Generator().manual_seed(5)
    dout = _misaligned(torch.randn(case.B, case.H, case.Lq, case.Dv, generator=g))
    fused = _launch(case, q, k, v, w, lengths, dout)
    launched = {fn.__name__ for fn, _ in calls}
    expected = {"_attn_bwd_preprocess"} | ({"_attn_exp_table"} if case.score == "additive" else set())
    if case.score == "additive" and case.Lq <= tb.DECODE_MAX_LQ:
        expected.add("_attn_fwd_additive_decode")
    assert expected <= launched and (case.Lq > tb.DECODE_MAX_LQ or "_attn_fwd_merge" in launched)
    for fn, args in calls:
        for name, val in args.items():
            where = f"{fn.__name__}({name})"
            if isinstance(val, torch.Tensor):
                assert val.data_ptr() % 16 == 0, where
            elif name in _UNIT_STRIDES:
                assert val == 1, where
            elif name.startswith("stride_"):
                assert val % 16 == 0, f"{where} = {val}"
    ref64 = testing.run_reference(case, q, k, v, w, lengths, dout, upcast_to=torch.float64)
    ref_dt = testing.run_reference(case, q, k, v, w, lengths, dout)
    for name in ref64:
        assert fused[name].is_contiguous(), name
        testing.assert_within_rule(f"{case} [misaligned] {name}", fused[name], ref64[name], ref_dt[name],
                                   case.dtype)


# ------------------------------------------------------------------------------ public API
@pytest.mark.parametrize("case", [
    Case(B=2, H=2, Hk=1, Lq=33, Lk=70, D=40, Dv=24, causal=True, lengths=(70, 0)),
    Case(score="dot", B=1, H=2, Hk=2, Lq=70, Lk=33, D=40, Dv=24, causal=True, strided=True),
    Case(B=1, H=2, Hk=2, Lq=5, Lk=40, D=16, Dv=8, dtype=F16),
], ids=str)
def test_public_api(case):
    testing.check_backend(case, "triton")


def test_negative_scale():
    """The dot kernels track the row max of q . k, so the launcher runs a negative scale as
    |scale| * (-q) . k (and negates dq back)."""
    testing.check_backend(Case(score="dot", B=1, H=2, Hk=1, Lq=17, Lk=33, D=16, Dv=8, scale=-0.3, causal=True,
                               magnitude=30.0), "triton")


def test_backend_declarations():
    assert BACKEND.name == "triton"
    assert "cpu" in BACKEND.devices and "cuda" in BACKEND.devices
    assert BACKEND.unavailable_reason() is None
    assert torch.float64 not in BACKEND.dtypes
    q = torch.zeros(1, 1, 2, 300)
    assert BACKEND.not_supported_reasons("dot", q, q, q)  # head dim above max_head_dim


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_grid_axis_limit(score):
    """B*H programs go on CUDA grid axis 1 (<= 65535): larger batches are refused up front."""
    q = torch.zeros(65536, 1, 1, 16)
    with pytest.raises(ValueError, match="65536"):
        if score == "additive":
            BACKEND.additive_forward(q, q, q, torch.zeros(16), None, False)
        else:
            BACKEND.dot_forward(q, q, q, None, 0.25, False)


@pytest.mark.parametrize("fp32", [False, True])
def test_dot_configs_chunk_the_head_width(fp32):
    """Every picked dot config has a BLOCK_DC that divides the padded width (the compile check
    compiles exactly these)."""
    from fusedattn.kernels import dot
    for width in (16, 32, 64, 128, 256):
        cfgs = [dot.prune_fwd_config(width, width, fp32, d) for d in (False, True)]
        cfgs += list(dot.prune_bwd_configs(width, width, fp32))
        cfgs += [dot.interpret_config(width, width, d) for d in (False, True)]
        for cfg in cfgs:
            assert 16 <= cfg["BLOCK_DC"] <= width and width % cfg["BLOCK_DC"] == 0, (width, cfg)


# ------------------------------------------------------------------------------ compile check
@pytest.mark.slow
def test_gpu_compile_check_quick():
    """The AOT compile check (sm_80, sm_90, reduced set) passes: no errors, spills or overflows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "fusedattn.tools.gpu_compile_check", "--arch", "80", "90",
                          "--quick"], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


# ------------------------------------------------------------------------------ 64-bit offsets
def test_int32_tile_offset_decision_on_huge_views():
    """The kernels use 64-bit (batch, head, tile) base pointers and int32 offsets inside a tile.
    A (B, L, H, D) key buffer with Lk = 512K keys x 32 heads x 128 spans 2^31 elements (the old
    int32 ``row * stride`` overflowed there) yet runs as is; a view whose row stride times the
    largest tile reaches 2^31 does not (the launcher copies it). Meta tensors: no allocation."""
    Lk, Hk, D = 512 * 1024, 32, 128
    k = torch.empty_strided((1, Hk, Lk, D), (Lk * Hk * D, D, Hk * D, 1), device="meta")
    extent = sum((n - 1) * st for n, st in zip(k.shape, k.stride())) + 1
    assert extent >= 2 ** 31 and (Lk - 1) * k.stride(2) >= 2 ** 31 - Hk * D
    assert tb.fits_int32_tile_offsets(k)
    wide = torch.empty_strided((1, 1, 4, D), (2 ** 26, 2 ** 26, 2 ** 23, 1), device="meta")
    assert not tb.fits_int32_tile_offsets(wide)
    # the boundary: row stride * MAX_TILE_ROWS + D < 2^31
    ok_stride = (2 ** 31 - D - 1) // tb.MAX_TILE_ROWS
    edge = torch.empty_strided((1, 1, 4, D), (4 * ok_stride, 4 * ok_stride, ok_stride, 1), device="meta")
    assert tb.fits_int32_tile_offsets(edge)
    edge = torch.empty_strided((1, 1, 4, D), (4 * ok_stride, 4 * ok_stride, ok_stride + 16, 1), device="meta")
    assert not tb.fits_int32_tile_offsets(edge)


def test_aligned_views_are_not_copied_and_odd_widths_are_zero_padded():
    """A (B, L, H, D) view with D = 64 goes to the kernels as is; D = 20 is copied into a buffer
    whose width is rounded up to 24 (a multiple of 8) with zeros, so head-dim masks stay 128-bit."""
    base = torch.randn(2, 33, 4, 64)
    v = base.transpose(1, 2)
    (out,) = tb._aligned(v)
    assert out.data_ptr() == v.data_ptr() and out.stride() == v.stride()
    odd = torch.randn(1, 2, 5, 20)
    (out,) = tb._aligned(odd)
    assert out.shape[-1] == 24 and torch.equal(out[..., :20], odd) and (out[..., 20:] == 0).all()


# ------------------------------------------------------------------------------ key lengths
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_padding_keys_are_masked_in_the_kernels(score):
    """Keys and values past key_lengths may hold NaN or inf: the kernels mask them (no copy of K
    and V); outputs and gradients equal those of zeroed padding, and padding rows get dk = dv = 0."""
    case = Case(score=score, B=2, H=2, Hk=1, Lq=17, Lk=97, D=40, Dv=24, lengths=(97, 30))
    q, k, v, w, lengths = testing.make_inputs(case)
    dout = torch.randn(case.B, case.H, case.Lq, case.Dv, generator=torch.Generator().manual_seed(2))
    clean = _launch(case, q, k, v, w, lengths, dout)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 30:] = float("nan")
    v2[1, :, 30:] = float("inf")
    dirty = _launch(case, q, k2, v2, w, lengths, dout)
    for name in clean:
        assert torch.equal(clean[name], dirty[name]), name
    assert (dirty["dk"][1, :, 30:] == 0).all() and (dirty["dv"][1, :, 30:] == 0).all()


def test_key_table_is_reused_until_the_keys_change(monkeypatch):
    """Additive decoding against a fixed memory builds the e^{2k} table once: the second call with
    the same k (and key_lengths) reuses it; an in-place update of k rebuilds it."""
    from fusedattn.kernels import additive
    calls = []
    monkeypatch.setattr(tb, "interpreting", lambda: True)
    monkeypatch.setattr(additive, "_attn_exp_table", _Spy(additive._attn_exp_table, calls))
    monkeypatch.setattr(tb, "_TABLE_CACHE", [])
    case = Case(B=1, H=2, Hk=2, Lq=1, Lk=40, D=16, Dv=16)
    q, k, v, w, _ = testing.make_inputs(case)
    out1, _ = BACKEND.additive_forward(q, k, v, w, None, False)
    n1 = len(calls)
    out2, _ = BACKEND.additive_forward(q, k, v, w, None, False)
    assert len(calls) == n1 + 1  # the query table only
    assert torch.equal(out1, out2)
    k.mul_(2.0)
    out3, _ = BACKEND.additive_forward(q, k, v, w, None, False)
    assert len(calls) == n1 + 3
    ref = testing.run_reference(case, q, k, v, w, None, None, upcast_to=torch.float64)["out"]
    torch.testing.assert_close(out3.double(), ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ compile check report
def test_compile_check_sass_analysis():
    """The SASS parsers of the compile check on a hand-written listing: load widths, loops with
    their parent, per-element figures and CTAs per SM."""
    from fusedattn.tools import gpu_compile_check as g
    sass = "\n".join(f"        /*{a:04x}*/                   {t} ;" for a, t in [
        (0x00, "LDG.E.U16 R2, desc[UR4][R2.64]"), (0x10, "LDG.E.128 R4, desc[UR4][R6.64]"),
        (0x20, "@P0 LDG.E.64 R8, desc[UR4][R6.64]"), (0x30, "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]"),
        (0x40, "LDG.E R9, desc[UR4][R6.64]"), (0x50, "FFMA R1, R2, R3, R4"),      # outer loop 0x50-0xb0
        (0x60, "MUFU.RCP R1, R2"), (0x70, "FFMA R1, R2, R3, R4"), (0x80, "BRA 0x60"),  # inner 0x60-0x80
        (0x90, "MUFU.EX2 R3, R3"), (0xa0, "FADD R1, R1, R3"), (0xb0, "@P1 BRA 0x50"), (0xc0, "EXIT")])
    ins = g._parse_sass(sass)
    loads = g.global_loads(ins)
    assert loads == {"2B": 1, "4B": 1, "8B": 1, "16B": 1, "cp.async": 1, "tma": 0}
    (lp,) = g._loops(ins)
    assert lp["span"] == (0x60, 0x80) and lp["parent"] == (0x50, 0xb0) and lp["instr"] == 3
    # an additive variant, 16 x 64 tile over 128 threads (8 elements per thread), A = 4 columns
    lp.update(kind="fast", elems=8.0, instr_per_elem=3 / 8, mufu_per_elem={"RCP": 1 / 8})
    v = dict(score="additive", tile=(16, 64), config=dict(num_warps=4), head_dim=4)
    am = g.amortized(v, [lp], ins)
    # loop: 3 instructions per column pass, 4 columns = 12; the tile loop outside it: 4 (0x50,
    # 0x90, 0xa0, 0xb0) with one MUFU; per triple: / (4 columns x 8 elements)
    assert am == dict(instr_per_elem_loop=round(12 / 32, 2), overhead_instr_per_tile=4,
                      instr_per_elem_amortized=round(16 / 32, 2), mufu_per_elem=round(5 / 32, 3))
    # the additive backward (kernels.additive_bwd): the inner loop is one step of AS = 2 triples
    # per thread (2 RCP); the block loop around it (XB = 4 steps) adds 4 instructions and 1 MUFU
    lp.update(kind="fast", elems=2.0, instr_per_elem=1.5, mufu_per_elem={"RCP": 0.5})
    am = g.amortized(dict(score="additive-bwd", tile=(2, 4), config=dict(num_warps=4, AS=2)), [lp], ins)
    assert am == dict(instr_per_elem_loop=1.5, overhead_instr_per_tile=4,
                      instr_per_elem_amortized=round((3 * 4 + 4) / 8, 2),
                      mufu_per_elem=round((1 * 4 + 1) / 8, 3))
    # 168 registers x 256 threads: 168 * 32 = 5376 -> 5376 registers a warp, 8 warps = 43008 -> 1 CTA
    assert g.ctas_per_sm(90, 168, 256, 1000) == 1
    assert g.ctas_per_sm(90, 64, 128, 200 * 1024) == 1  # shared memory binds
    assert g.ctas_per_sm(80, 32, 128, 0) == 16           # 2048 threads / 128


def test_compile_check_covers_every_modifier_variant():
    """Every main-kernel configuration the launchers can pick is compiled without modifiers and
    with all of them on (the superset of each flag's code, see ``variants``; dot kernels with
    score modifiers on ``dot.score_mods_config``, as the launcher picks)."""
    from fusedattn.kernels import dot
    from fusedattn.tools import gpu_compile_check as g
    main = ("_attn_fwd_dot", "_attn_bwd_dkdv_dot", "_attn_bwd_dq_dot", "_attn_fwd_additive")
    flags = ("WINDOW", "BIAS", "SOFTCAP")
    for arch in (80, 90):
        rows = [v for v in g.variants(arch=arch) if v["kernel"] in main]
        every = {(v["kernel"], v["dtype"], v["out_dtype"], v["variant"][:-len("+mods")],
                  tuple(sorted(v["config"].items()))) for v in rows if v["variant"].endswith("+mods")}
        n = 0
        for v in rows:
            cfg = v["config"]
            if any(cfg.get(f) for f in flags):
                continue
            want = dict(cfg, WINDOW=True, BIAS=3)
            if "dot" in v["kernel"]:
                kind = g.DOT_KIND[v["kernel"]]
                want = dict(want, SOFTCAP=True)
                want = dot.score_mods_config(want, cfg["BLOCK_D"], kind, v["dtype"] == "fp32")
            key = (v["kernel"], v["dtype"], v["out_dtype"], v["variant"], tuple(sorted(want.items())))
            assert key in every, key
            n += 1
        assert n == len(every) > 0, arch
        # the additive backward of kernels/additive_bwd.py: each config also with all of its flags
        # (WINDOW, ALIBI, REL_BIAS; the launcher's config with rel_bias), and (fp16, A 64 and 128)
        # with each flag alone
        from fusedattn.kernels import additive_bwd
        names = ("_attn_bwd_dkdv_additive", "_attn_bwd_dq_additive")
        bwd = [v for v in g.variants(arch=arch) if v["kernel"] in names]
        plain = {(v["kernel"], v["dtype"], v["head_dim"]) for v in bwd if v["variant"] == ""}
        mods = {(v["kernel"], v["dtype"], v["head_dim"]) for v in bwd if v["variant"] == "+mods"}
        assert plain == mods and len(mods) > 0, arch
        for v in bwd:
            rel = v["variant"] in ("+mods", "+rel")
            cfg = additive_bwd.bwd_config(v["head_dim"], v["dtype"] == "fp32", rel_bias=rel)
            on = dict(WINDOW=False, ALIBI=False, REL_BIAS=rel)
            if v["variant"] == "+mods":
                on = dict(WINDOW=True, ALIBI=True, REL_BIAS=True)
            elif v["variant"] in ("+window", "+alibi"):
                on[v["variant"][1:].upper()] = True
            prec = "tf32x3" if v["dtype"] == "fp32" else "tf32"
            assert v["config"] == dict(cfg, FAST_RCP=True, DOT_PRECISION=prec, **on), v
        singles = {(v["kernel"], v["variant"]) for v in bwd if v["dtype"] == "fp16" and v["head_dim"] == 128}
        assert {(n, f"+{m}") for n in names for m in ("window", "alibi", "rel")} <= singles, arch


def test_compile_check_json_fields():
    from fusedattn.tools import gpu_compile_check as g
    row = {k: 0 for k in g.JSON_FIELDS}
    row["problems"] = []
    assert list(g.json_row(row)) == list(g.JSON_FIELDS)
    assert g.JSON_FIELDS == ("kernel", "arch", "dtype", "variant", "config", "head_dim", "regs",
                             "spill_bytes", "shared", "ctas_per_sm", "instr_per_elem_loop",
                             "overhead_instr_per_tile",
                             "instr_per_elem_amortized", "mufu_per_elem", "global_loads", "sass", "error")


# ------------------------------------------------------------------------------ saturated softmax (issue 16)
def _grads_vs_rule(case, mod, names):
    q, k, v, w, lengths = testing.make_inputs(case)
    q, k, v, w = mod(q, k, v, w)
    dout = torch.randn(case.B, case.H, case.Lq, case.Dv, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(case.dtype)
    fused = _launch(case, q, k, v, w, lengths, dout)
    ref64 = testing.run_reference(case, q, k, v, w, lengths, dout, upcast_to=torch.float64)
    ref_dt = testing.run_reference(case, q, k, v, w, lengths, dout)
    for name in names:
        testing.assert_within_rule(f"{case} {name}", fused[name], ref64[name], ref_dt[name], case.dtype)
    return fused


def _big_w(q, k, v, w):
    w = w.clone()
    w[0, 3] = 1e4
    return q, k, v, w


def _big_q(q, k, v, w):
    q = q.clone()
    q[0, 0, :, 5] = 1e4
    return q, k, v, w


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


# These tests need the interpreter's tl.dot (numpy's matmul, i.e. its bundled OpenBLAS) to give dP and
# delta = rowsum(dO * O) the same bits, as the kernels arrange for the GPU. On an AVX2-only CPU
# (AMD Zen 3, 2026-12-01) OpenBLAS's kernels for that CPU sum them in different orders and these
# fail; they pass where the CPU has AVX-512 (Zen 4, Intel Xeon). The GPU property is unchanged.
_SAME_BLAS_ORDER = pytest.mark.skipif(
    "avx512f" not in _cpu_flags(),
    reason="the interpreter's matmul (numpy's OpenBLAS) orders dP and delta differently on AVX2-only CPUs")


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_16bit_backward_takes_delta_from_the_float32_output(dtype):
    """A differentiable 16-bit call keeps the kernels' float32 output for the backward
    (``forward(out32=True)``), and the delta kernel adds its rounding remainder to the MMA of the
    rounded output: with every tanh saturated, dw = sum_ij dS_ij = 0; from the rounded output
    (the launchers' path) each row's residual adds up: 3.7e-3 (bfloat16), 4.0e-4 (float16) here."""
    import fusedattn
    q, k, v, w, do = testing.saturated_additive(2, 65, 33, 1, 8, dtype)
    (dw,) = torch.autograd.grad(fusedattn.additive_attention(q, k, v, w, backend="triton"), w, do)
    assert float(dw.float().abs().max()) < 1e-5
    out, lse = BACKEND.additive_forward(q, k, v, w.detach(), None, False)  # rounded: the residual
    assert out.dtype == dtype
    dw_rounded = BACKEND.additive_backward(do, q, k, v, w.detach(), None, False, out, lse)[3]
    assert float(dw_rounded.float().abs().max()) > 1e-4


@_SAME_BLAS_ORDER
def test_saturated_softmax_gradients():
    """One w element at 1e4 (additive) or one q element at 1e4 (dot): delta = rowsum(dO * O) is
    formed with the arithmetic of the kernels' dP (``_attn_bwd_preprocess``), so dP - delta
    cancels where the softmax saturates and the large operand no longer multiplies a rounding
    difference into dq (the interpreter gave a dq error of 2e-3 before; the float32 reference's
    own error is ~2e-6). dv of the additive case is not asserted: see the next test."""
    _grads_vs_rule(Case(B=1, H=1, Hk=1, Lq=17, Lk=64, D=16, Dv=16), _big_w, ("out", "dq", "dk", "dw"))
    _grads_vs_rule(Case(score="dot", B=1, H=1, Hk=1, Lq=17, Lk=64, D=16, Dv=16), _big_q,
                   ("out", "dq", "dk", "dv"))


def test_saturated_softmax_dv_additive():
    """dv with one w element at 1e4: the float32 lse cannot hold log(l) ~ 1e-4 next to a row max
    ~ 1e4, and the backward's scores differ from the forward's in the last bits; the dQ kernel
    renormalizes P by its own row sums (``additive_bwd``), which the dK/dV kernel reuses (the
    error was 1e-4 to 1e-3 before, against 6e-8 for the float32 reference)."""
    _grads_vs_rule(Case(B=1, H=1, Hk=1, Lq=17, Lk=64, D=16, Dv=16), _big_w, ("dv",))


@_SAME_BLAS_ORDER
@pytest.mark.parametrize("score", ["additive", "dot"])
def test_constant_softmax_has_exactly_zero_gradients(score):
    """One key only: the softmax is 1 whatever q and k are, so dq and dk are exactly 0 (the issue
    saw errors up to 7e-4 on the cpu backend with q, k ~ 60 and Dv = 63)."""
    mag = 60.0 if score == "additive" else 3600.0  # dot: q and k scaled by sqrt(magnitude)
    case = Case(score=score, B=1, H=2, Hk=2, Lq=17, Lk=1, D=16, Dv=63, magnitude=mag)
    fused = _grads_vs_rule(case, lambda *t: t, ("out", "dv"))
    assert (fused["dq"] == 0).all() and (fused["dk"] == 0).all()


# ------------------------------------------------------------------------------ score modifiers
MODS = [
    # dot: window wider than a tile (interior tiles unmasked, left tiles skipped), rel_bias, GQA
    Case(score="dot", B=1, H=2, Hk=1, Lq=97, Lk=257, D=40, Dv=24, window=(100, 20), rel_bias=50,
         lengths=(200,)),
    Case(score="dot", B=2, H=2, Hk=2, Lq=97, Lk=97, D=64, Dv=64, window=(70, -1), causal=True, softcap=5.0,
         alibi="BH", dtype=F16),
    Case(score="dot", B=1, H=4, Hk=2, Lq=17, Lk=97, D=16, Dv=16, softcap=2.0, rel_bias=300, alibi="H",
         dtype=BF16),
    Case(score="dot", B=2, H=2, Hk=1, Lq=1, Lk=257, D=16, Dv=16, window=(40, 0), rel_bias=3,
         lengths=(257, 100)),                                                        # decode split
    Case(score="dot", B=1, H=1, Hk=1, Lq=97, Lk=17, D=16, Dv=16, window=(0, 0), softcap=1.0),
    # additive: the same modifiers (no softcap)
    Case(B=1, H=2, Hk=1, Lq=97, Lk=64, D=40, Dv=24, window=(20, 20), rel_bias=9, alibi="H"),
    Case(B=2, H=1, Hk=1, Lq=17, Lk=257, D=16, Dv=16, window=(-1, 3), alibi="BH", lengths=(257, 100),
         dtype=F16),
    Case(B=1, H=2, Hk=2, Lq=64, Lk=97, D=16, Dv=16, window=(40, 0), rel_bias=70, dtype=BF16),
    # additive rel_bias (kernels/additive_bwd.py): GQA with key lengths incl. 0 and causal (Lq < Lk),
    # A = 100 (16-row blocks), clamped buckets (M = 8), fp16; Lq > Lk with a left edge only, bf16, no
    # bucket clamped (M = 120); M = 1 (every distance in one bucket)
    Case(B=2, H=2, Hk=1, Lq=17, Lk=97, D=100, Dv=24, causal=True, rel_bias=8, lengths=(97, 0), dtype=F16),
    Case(B=1, H=2, Hk=1, Lq=97, Lk=17, D=24, Dv=8, window=(5, -1), rel_bias=120, dtype=BF16),
    Case(B=1, H=1, Hk=1, Lq=17, Lk=33, D=16, Dv=16, rel_bias=1, lengths=(20,)),
    # additive without rel_bias: window and ALiBi in kernels/additive_bwd.py (left edges, GQA, lengths)
    Case(B=1, H=2, Hk=1, Lq=97, Lk=64, D=40, Dv=24, window=(20, 20), alibi="H"),
    Case(B=2, H=1, Hk=1, Lq=257, Lk=97, D=16, Dv=16, window=(30, 0), lengths=(97, 50)),
    Case(B=1, H=2, Hk=2, Lq=17, Lk=257, D=64, Dv=16, window=(100, -1), alibi="BH", dtype=F16),
]


@pytest.mark.parametrize("case", MODS, ids=str)
def test_modifiers(case):
    testing.check_backend(case, "triton")


@pytest.mark.parametrize("mods", [dict(rel_bias=5), dict(alibi="H", window=(8, 2)),
                                  dict(softcap=50.0, rel_bias=3)],
                         ids=["rel_bias", "alibi+window", "softcap+rel_bias"])
def test_extreme_values_with_modifiers(mods):
    """Saturated rows with per-element score modifiers: the dot kernels track the max of the
    modified score in natural units and the backward takes exp(s - lse) there too (the row max
    gets P = 1 exactly), as without modifiers (test_reliability.py::test_extreme_values)."""
    for mag in (30.0, 1e4):
        testing.check_backend(Case(score="dot", Lq=17, Lk=33, D=40, Dv=8, magnitude=mag, **mods), "triton")


def _run_mods(case, k=None, v=None):
    q, k0, v0, w, lengths = testing.make_inputs(case)
    k, v = (k0 if k is None else k), (v0 if v is None else v)
    mods = testing.make_modifiers(case)
    dout = testing._dout(case, "cpu")
    return testing.run(case, "triton", q, k, v, w, lengths, dout, mods), (k0, v0)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_tiles_outside_the_window_are_skipped(score):
    """Keys whose whole key tile lies outside every row's window (left of it, or right of it with
    causal) are never loaded: NaN there changes nothing, forward or backward (a masked tile would
    turn it into NaN through P @ V)."""
    case = Case(score=score, B=1, H=1, Hk=1, Lq=64, Lk=257, D=16, Dv=16, window=(20, 0), rel_bias=4)
    clean, (k, v) = _run_mods(case)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :128] = float("nan")  # queries 0..63 see keys 173..256 (window 20, shift 193)
    v2[:, :, :128] = float("nan")
    dirty, _ = _run_mods(case, k2, v2)
    for name in clean:
        if name in ("dk", "dv"):
            assert torch.equal(clean[name][:, :, 128:], dirty[name][:, :, 128:]), name
            assert (dirty[name][:, :, :128] == 0).all(), name
        else:
            assert torch.equal(clean[name], dirty[name]), name


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_rel_bias_gradient_is_deterministic(score):
    """d rel_bias is summed without atomics (per-query-tile partials of diagonal sums, reduced in a
    fixed order): two runs agree bit for bit."""
    case = Case(score=score, B=2, H=2, Hk=1, Lq=49, Lk=49, D=16, Dv=16, rel_bias=40, causal=True)
    a, _ = _run_mods(case)
    b, _ = _run_mods(case)
    assert torch.equal(a["drel_bias"], b["drel_bias"])
