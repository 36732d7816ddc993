"""The cpu backend's instruction-set levels (scalar, avx2, avx512; csrc/isa.cpp).

Every level this machine supports runs against the reference (the 2x rule of test_cpu.py), agrees
with the other levels within that tolerance, and is bitwise equal between 1 and 2 threads. A level
the CPU lacks is skipped with the reason. FUSEDATTN_CPU_ISA is checked in subprocesses, since the
variable is read once per process.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fusedattn
from fusedattn.backends import unavailable_reason

_REASON = unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend unavailable: {_REASON}")

if _REASON is None:
    from test_cpu import OPS, _compare, _fused, _inputs, _lengths, isa_level  # noqa: F401

    from fusedattn.backends.cpu_backend import ISA_LEVELS, cpu_isa, cpu_isa_levels

    SUPPORTED = cpu_isa_levels()
else:
    ISA_LEVELS, SUPPORTED = ("scalar", "avx2", "avx512"), []


def _need(level):
    if level not in SUPPORTED:
        pytest.skip(f"this CPU does not support the {level} level (supported: {SUPPORTED})")


def test_default_is_the_best_level():
    assert SUPPORTED[0] == "scalar" and list(ISA_LEVELS[:len(SUPPORTED)]) == SUPPORTED
    if "FUSEDATTN_CPU_ISA" not in os.environ:
        assert cpu_isa() == SUPPORTED[-1]
    assert OPS.uses_avx2() == (cpu_isa() != "scalar")


def test_set_isa_rejects_unknown_and_unsupported(isa_level):
    with pytest.raises(ValueError, match="allowed values: scalar, avx2, avx512"):
        isa_level("sse9")
    for level in ISA_LEVELS:
        if level not in SUPPORTED:
            with pytest.raises(ValueError, match="not supported by this CPU"):
                isa_level(level)


# (B, H, Hk, Lq, Lk, D, Dv, causal, key_lengths): odd sizes, GQA, masked rows, tails of 1..15 keys
_GRID = [
    (1, 2, 1, 45, 83, 40, 24, True, [80]),
    (2, 2, 2, 17, 97, 100, 17, False, [97, 1]),
    (1, 1, 1, 97, 33, 128, 64, True, None),
]


@pytest.mark.parametrize("level", ISA_LEVELS)
@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("case", _GRID, ids=lambda c: "B{}H{}Hk{}Lq{}Lk{}D{}Dv{}c{}kl{}".format(*c))
def test_level_matches_reference(level, score, case, isa_level):
    _need(level)
    isa_level(level)
    B, H, Hk, Lq, Lk, D, Dv, causal, kl = case
    q, k, v, w, do = _inputs(score, B, H, Hk, Lq, Lk, D, Dv, seed=3)
    _compare(score, q, k, v, w, do, _lengths(kl), causal)


@pytest.mark.parametrize("level", ISA_LEVELS)
@pytest.mark.parametrize("pre", [30.0, 1e4])
def test_level_additive_saturated(level, pre, isa_level):
    """Rows beyond the exp-factorized range take the direct tanh at every level."""
    _need(level)
    isa_level(level)
    q, k, v, w, do = _inputs("additive", 1, 2, 1, 33, 70, 40, 16, pre=pre)
    q[:, :, ::3] /= pre
    k[:, :, ::4] /= pre
    _compare("additive", q, k, v, w, do, None, True)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_levels_agree(score, isa_level):
    q, k, v, w, do = _inputs(score, 2, 2, 1, 70, 131, 72, 40)
    kl = _lengths([131, 60])
    res = {}
    for level in SUPPORTED:
        isa_level(level)
        res[level] = _fused(score, q, k, v, w, do, kl, True, 1 / math.sqrt(72))
    for level in SUPPORTED[1:]:
        for a, b in zip(res["scalar"], res[level]):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def _mkl_max_threads():
    """MKL's thread count for this thread (None without MKL's C service API)."""
    import ctypes
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return lib.MKL_Get_Max_Threads()
    except (OSError, AttributeError):
        return None


@pytest.mark.parametrize("level", ISA_LEVELS)
@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ["many-items", "one-item"])
def test_level_one_vs_two_threads_bitwise(level, score, dtype, shape, isa_level):
    # one-item: a backward with a single work item runs inline, outside an OpenMP region, where MKL's
    # products (the avx2 and scalar levels) ran on both threads with another summation order
    _need(level)
    isa_level(level)
    if shape == "many-items":
        q, k, v, w, do = _inputs(score, 2, 4, 2, 70, 300, 64, 48, dtype=dtype)
        kl, causal = _lengths([295, 300]), True
    else:
        q, k, v, w, do = _inputs(score, 1, 4, 1, 5, 130, 17, 80, dtype=dtype)
        kl, causal = None, False
    old = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_fused(score, q, k, v, w, do, kl, causal, 0.125))
            # MKL's own setting for this thread is left as torch set it
            assert _mkl_max_threads() in (None, n)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


_PROBE = r"""
import os, torch, fusedattn
from fusedattn.backends.cpu_backend import cpu_isa
try:
    print("isa", cpu_isa())
except ValueError as e:
    print("ValueError", e)
os.environ["FUSEDATTN_CPU_ISA"] = "scalar"   # read once: a later change has no effect
try:
    print("again", cpu_isa())
except ValueError as e:
    print("again ValueError")
print("available", fusedattn.available_backends()["cpu"])
q = torch.randn(1, 1, 4, 8)
try:
    fusedattn.dot_product_attention(q, q, q)
    print("call ok")
except ValueError as e:
    print("call ValueError", e)
"""


def _probe(value):
    env = dict(os.environ)
    env.pop("FUSEDATTN_CPU_ISA", None)
    if value is not None:
        env["FUSEDATTN_CPU_ISA"] = value
    r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("value", ["AVX2", "sse4", "avx512", "avx2", None])
def test_environment_variable(value):
    out = _probe(value)
    if value is None:
        assert f"isa {SUPPORTED[-1]}" in out and f"again {SUPPORTED[-1]}" in out
        assert "available None" in out and "call ok" in out
    elif value in SUPPORTED:
        assert f"isa {value}" in out and f"again {value}" in out and "call ok" in out
    else:
        allowed = "allowed values: scalar, avx2, avx512" if value not in ISA_LEVELS else "allowed values here"
        assert "ValueError FUSEDATTN_CPU_ISA" in out and allowed in out, out
        assert "again ValueError" in out
        assert "available FUSEDATTN_CPU_ISA" in out
        assert "call ValueError FUSEDATTN_CPU_ISA" in out


@pytest.mark.parametrize("level", ISA_LEVELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_level_additive_large_factor_products(level, dtype, isa_level):
    """q and k near +-35 (found by the property test: D=1, magnitude 60): e^{2q} e^{2k} overflowed
    to inf and the Newton step of the vector reciprocal turned it into NaN."""
    _need(level)
    isa_level(level)
    g = torch.Generator().manual_seed(0)

    def near35(*shape):
        sign = torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)
        return (torch.rand(*shape, generator=g) * 10 + 30) * sign

    q, k = near35(1, 1, 40, 17), near35(1, 1, 33, 17)
    v, do = torch.randn(1, 1, 33, 5, generator=g), torch.randn(1, 1, 40, 5, generator=g)
    w = torch.randn(1, 17, generator=g)
    q, k, v, w, do = (t.to(dtype) for t in (q, k, v, w, do))
    fused = _compare("additive", q, k, v, w, do, None, False)
    assert not any(t.isnan().any() for t in fused)


@pytest.mark.parametrize("level", ISA_LEVELS)
@pytest.mark.parametrize("tiny", [False, True], ids=["ordinary_w", "tiny_w"])
def test_level_additive_paired_and_unpaired_tiles(level, tiny, isa_level):
    """The vector levels pair two dims per reciprocal, (d1 + d2) / (d1 d2), on the tiles whose
    factors keep |d| < 2^62; a tile holding a row and a key at +19 in both dims of a pair (d1 d2 would
    overflow to inf, and the score to NaN) takes the unpaired loop. One call with both kinds of tiles,
    an odd A (a dim left over after the pairs), weights of both signs, key_lengths and causal.
    tiny_w: head 1 also has weights below the weight-scaled range (2^-12) but normal, which only the
    paired loop takes (its other tiles: w / (1 + e k))."""
    _need(level)
    isa_level(level)
    q, k, v, w, do = _inputs("additive", 2, 2, 1, 40, 300, 33, 12, seed=5)
    if tiny:
        w[1, [3, 8, 20]] = torch.tensor([-1e-5, 2.0**-13, 1e-7])
    q[0, 1, 37, :2] = 19.0  # query tile 1 of batch 0, head 1
    k[0, 0, 150, :2] = 19.0  # key tile 1 (keys 128-255)
    fused = _compare("additive", q, k, v, w, do, _lengths([300, 170]), True)
    assert all(torch.isfinite(t).all() for t in fused)


@pytest.mark.parametrize("level", ISA_LEVELS)
@pytest.mark.parametrize("cap", [50.0, 2.0])
def test_level_softcap_is_accurate_near_zero_and_saturated(level, cap, isa_level):
    """With one key the lse is the capped score itself: cap tanh(x) within a few float32 ulps of its
    own size for |x| from 1e-6 to 20 (1 - 2 / (1 + e^{2x}) alone errs by about cap * 3e-7 near 0:
    1e-4 relative at x = 1e-3), and exactly +-cap when saturated; the gradient through the cap stays
    within the rule."""
    _need(level)
    isa_level(level)
    import fusedattn
    mag = torch.logspace(-6, 1.3, 400, dtype=torch.float64)
    x = torch.cat([mag, -mag, torch.tensor([0.0, 0.6, -0.6, 0.59999, 1e4, -1e4], dtype=torch.float64)])
    n = x.numel()
    # query i . key = x_i * cap (scale 1): q = (x_i cap, 0...), k = (1, 0...)
    q = torch.zeros(1, 1, n, 16)
    q[0, 0, :, 0] = (x * cap).float()
    k = torch.zeros(1, 1, 1, 16)
    k[0, 0, 0, 0] = 1.0
    v = torch.ones(1, 1, 1, 16)
    _, lse = fusedattn.dot_product_attention(q, k, v, scale=1.0, softcap=cap, return_lse=True, backend="cpu")
    xx = q[0, 0, :, 0].double() / cap
    want = cap * torch.tanh(xx)
    got = lse[0, 0].double()
    ok = (xx.abs() < 5) & (xx != 0)
    rel = ((got - want).abs() / want.abs())[ok]
    assert float(rel.max()) <= 8 * 2.0 ** -24, float(rel.max())
    assert got[xx == 0].eq(0).all()
    assert got[xx > 30].eq(cap).all() and got[xx < -30].eq(-cap).all()


@pytest.mark.parametrize("level", ISA_LEVELS)
def test_level_softcap_keeps_nan_in_its_row(level, isa_level):
    """A NaN score stays NaN through the cap (the exponential path clamps its argument, which would
    turn NaN into a finite -softcap): the query row holding a NaN gives NaN, the others match the
    reference."""
    _need(level)
    isa_level(level)
    import fusedattn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    q[0, 1, 3, 2] = float("nan")
    out = fusedattn.dot_product_attention(q, k, v, softcap=5.0, backend="cpu")
    ref = fusedattn.dot_product_attention(q, k, v, softcap=5.0, backend="reference")
    bad = torch.isnan(out).any(dim=-1)
    assert bad[0, 1, 3] and int(bad.sum()) == 1
    ok = ~torch.isnan(ref)
    torch.testing.assert_close(out[ok], ref[ok], rtol=1e-5, atol=1e-5)


# (B, H, Hk, Lq, Lk, D, Dv, modifiers): the brgemm operand layouts at their edges: odd D and Dv (a zero
# VNNI column), odd key counts (the partner row of a VNNI pair), key lengths, GQA, causal, and left
# window edges (the forward's per-item K^T panels)
_BRGEMM = [
    (2, 4, 2, 33, 97, 17, 5, {"lengths": (50, 97)}),
    (1, 2, 1, 97, 257, 64, 23, {"causal": True}),
    (2, 2, 2, 131, 131, 40, 64, {"window": (37, 0)}),
    (1, 2, 2, 300, 301, 33, 16, {"window": (100, 5), "lengths": (250,)}),
    # 8 x 9 query tiles of 128: banded items take 2 tiles under one panel, the last group a single tile
    (1, 8, 4, 1025, 1025, 24, 24, {"window": (200, 0)}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", _BRGEMM, ids=lambda c: "B{}H{}Hk{}Lq{}Lk{}D{}Dv{}".format(*c[:7]))
def test_brgemm_products_match_reference(case, dtype, isa_level):
    from fusedattn.backends.cpu_backend import cpu_gemm_path
    from fusedattn.testing import Case, check_backend

    _need("avx512")
    isa_level("avx512")
    path = cpu_gemm_path(dtype)
    if not path.startswith("brgemm"):
        pytest.skip(f"dot products in {dtype} run through {path} on this CPU")
    B, H, Hk, Lq, Lk, D, Dv, mods = case
    check_backend(Case(score="dot", B=B, H=H, Hk=Hk, Lq=Lq, Lk=Lk, D=D, Dv=Dv, dtype=dtype, seed=Lk, **mods),
                  "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_banded_tile_groups_one_vs_two_threads_bitwise(dtype, isa_level):
    """Banded forward items group query tiles (more than 64 tiles here): the grouping depends on the
    sizes only, so 1 and 2 threads give the same bits."""
    _need("avx512")
    isa_level("avx512")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 8, 1100, 40, generator=g).to(dtype) for _ in range(3))
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(fusedattn.dot_product_attention(q, k, v, window=(300, 0), return_lse=True,
                                                        backend="cpu"))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_gemm_path_per_level(isa_level):
    from fusedattn.backends.cpu_backend import cpu_gemm_path

    for level in SUPPORTED:
        isa_level(level)
        paths = {d: cpu_gemm_path(d) for d in (torch.float32, torch.bfloat16, torch.float16)}
        if level != "avx512":  # brgemm only at the avx512 level
            assert paths[torch.float32] == paths[torch.bfloat16] == "sgemm", paths
        assert set(paths.values()) <= {"brgemm-bf16", "brgemm", "gemm16", "sgemm"}, paths
