"""Correctness of the benchmark harness (fusedattn.bench): fields, memory measurement, skips, model.

These check what the harness reports, never how fast anything is.
"""
import json
import math

import pytest
import torch

import fusedattn
from fusedattn.bench import gpu_model, harness, limits, report
from fusedattn.bench.__main__ import main as bench_main
from fusedattn.bench.model_counts import loop_counts

MiB = 1 << 20
RECORD_FIELDS = {"score", "backend", "device", "dtype", "B", "H", "Lq", "Lk", "D", "Dv", "pass", "time_ms",
                 "peak_mem_mib", "elements_per_s", "ratio_vs_reference", "ratio_vs_best_baseline",
                 "pct_of_limit", "skipped", "predicted_bytes"}


def test_tiny_run_writes_complete_json_and_plot(tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = bench_main(["--lengths", "16,32", "--repeats", "1", "--budget", "0.1", "--limit-seconds", "0.005",
                     "--no-model", "--no-isolate", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) >= {"machine", "limit", "records", "settings"}
    assert data["machine"]["torch_threads"] == 2 and data["machine"]["repeats"] == 1
    recs = data["records"]
    # 2 scores x 2 passes x 2 lengths x (reference, chunked, cpu) + sdpa for dot
    assert len(recs) == 2 * 2 * 3 + 2 * 2 * 4
    for r in recs:
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
    ran = [r for r in recs if not r["skipped"]]
    assert {r["backend"] for r in ran} >= {"reference", "chunked", "sdpa"}
    for r in ran:
        assert r["time_ms"] > 0 and r["peak_mem_mib"] is not None and r["elements_per_s"] > 0
        assert r["elements"] == r["B"] * r["H"] * r["Lq"] * r["Lk"]
        assert r["ratio_vs_best_baseline"] is not None
    refs = [r for r in ran if r["backend"] == "reference"]
    assert refs and all(math.isclose(r["ratio_vs_reference"], 1.0) for r in refs)
    for r in recs:  # the cpu backend either ran or says why not
        if r["backend"] == "cpu":
            assert bool(r["skipped"]) == (fusedattn.available_backends()["cpu"] is not None)
    if data["limit"]["additive_triples_per_s"]:
        assert all(r["pct_of_limit"] is not None for r in ran if r["score"] == "additive")
    assert png.stat().st_size > 10_000


def test_memory_sees_a_known_allocation():
    peak, _, res = harness.measure_cpu_peak(lambda: torch.ones(32 * MiB // 4))
    del res
    assert peak is not None
    assert 31.5 * MiB <= peak <= 34 * MiB
    peak0, _, _ = harness.measure_cpu_peak(lambda: 1 + 1)
    assert peak0 < 2 * MiB


def test_inputs_are_not_counted():
    x = torch.ones(64 * MiB // 4)            # allocated before the call: not the call's memory
    peak, _, _ = harness.measure_cpu_peak(lambda: x.sum())
    assert peak < 4 * MiB


@pytest.mark.parametrize("score,pass_", [("additive", "fwd"), ("additive", "fwd+bwd"), ("dot", "fwd")])
def test_memory_matches_the_references_materialized_tensors(score, pass_):
    # additive: N = 512*512*64 floats = 64 MiB; forward holds 2N, backward 3N. dot, 8 heads: S = 8 MiB, 4S.
    shape = dict(H=1, Hk=1, D=64, Dv=64) if score == "additive" else dict(H=8, Hk=8, D=64, Dv=64)
    case = harness.Case(score=score, backend="reference", pass_=pass_, Lq=512, Lk=512, **shape)
    res = harness.run_isolated(case.spec(), repeats=0, budget_s=0.0, threads=2, timeout=120)  # as the bench
    predicted = harness.predicted_bytes(case)
    # 64 MiB tensors are always mmapped: exact. 8 MiB ones come from the heap, where glibc reuses a
    # freed block or not depending on its layout: 3 to 4 S resident (measured 25 and 33 MiB).
    low = 0.9 if score == "additive" else 0.7
    assert low * predicted <= res["peak_mem_mib"] * MiB <= 1.3 * predicted, (res, predicted / MiB)


def test_isolated_worker_returns_measurements():
    case = harness.Case(score="dot", backend="sdpa", pass_="fwd", Lq=64, Lk=64)
    res = harness.run_isolated(case.spec(), repeats=1, budget_s=0.1, threads=2, timeout=120)
    assert "error" not in res, res
    assert res["time_ms"] > 0 and res["peak_mem_mib"] is not None and res["mem_method"] == "rss-hwm"


def test_skipped_records_carry_predicted_bytes():
    cases = harness.standard_cases(scores=("additive",), lengths=(64, 128), backends=("reference", "chunked"),
                                   passes=("fwd",))
    cfg = harness.RunConfig(mem_budget_bytes=1 << 20, isolate=False, repeats=1, budget_s=0.05)
    recs = harness.run_cases(cases, cfg)
    ref = [r for r in recs if r["backend"] == "reference"]
    assert len(ref) == 2 and all(r["skipped"] and "GiB" in r["skipped"] for r in ref)
    # B*H*Lq*Lk*A floats, forward holds two such tensors
    assert ref[1]["predicted_bytes"] == 2 * 128 * 128 * 128 * 4
    assert all(r["time_ms"] is None for r in ref)
    chunked = [r for r in recs if r["backend"] == "chunked"]
    assert all(not r["skipped"] for r in chunked)
    assert chunked[1]["predicted_s"] is not None          # extrapolated from the length before
    report.finalize(recs, None)
    assert all(r["ratio_vs_reference"] is None for r in recs)


def test_time_cap_skips_with_predicted_seconds():
    cases = harness.standard_cases(scores=("dot",), lengths=(32, 4096), backends=("chunked",),
                                   passes=("fwd",))
    cfg = harness.RunConfig(time_cap_s=1e-6, slow_cap_s=1e-6, isolate=False, repeats=1, budget_s=0.05)
    recs = harness.run_cases(cases, cfg)
    assert not recs[0]["skipped"]
    assert recs[1]["skipped"].startswith("predicted") and recs[1]["predicted_s"] > 0


def test_ratios_and_pct_of_limit():
    base = dict(score="additive", device="cpu", dtype="float32", B=1, H=1, Hk=1, Lq=100, Lk=100, D=10, Dv=10,
                causal=False, elements=10_000, skipped=None)
    recs = [dict(base, backend="reference", pass_=None, time_ms=100.0),
            dict(base, backend="chunked", time_ms=50.0),
            dict(base, backend="cpu", time_ms=1.0)]
    for r in recs:
        r.pop("pass_", None)
        r["pass"] = "fwd"
    report.finalize(recs, {"additive_triples_per_s": 1e9, "fma_gflops": 100.0})
    cpu = recs[2]
    assert math.isclose(cpu["ratio_vs_reference"], 100.0)
    assert math.isclose(cpu["ratio_vs_best_baseline"], 50.0)
    assert math.isclose(cpu["triples_per_s"], 10_000 * 10 / 1e-3)            # 1e8 triples/s
    assert math.isclose(cpu["pct_of_limit"], 10.0)                           # of 1e9


def test_h100_model_hand_computed():
    # 1e12 elements at 1 MUFU op each: 1e12 / (132 SMs * 16/clk * 1.83e9 clk/s) = 0.25873 s;
    # 7.38 instructions per lane-element: 1e12 * 7.38 / 32 / (132 * 4 * 1.83e9) = 0.23868 s
    m = gpu_model.lower_bound(1e12, 1.0, 7.38, 0.0)
    assert m["bound"] == "sfu"
    assert math.isclose(m["time_s"], 0.25873, rel_tol=1e-4)
    assert math.isclose(m["bounds"]["issue"], 0.23868, rel_tol=1e-4)
    assert gpu_model.lower_bound(1e12, 1.0, 20.0, 0.0)["bound"] == "issue"        # 0.6468 s
    m = gpu_model.lower_bound(1e9, 1.0, 1.0, 3.35e12)                            # 1 s of HBM traffic
    assert m["bound"] == "hbm" and math.isclose(m["time_s"], 1.0)
    m = gpu_model.lower_bound(1e12, 0.0, 0.0, 0.0, fp32_per_elem=2.0)          # 2e12/(132*128*1.83e9)
    assert m["bound"] == "fp32" and math.isclose(m["time_s"], 0.064681, rel_tol=1e-4)


def test_model_loop_rule_skips_the_direct_tanh_fallback():
    loops = [{"instr_per_elem": 7.0, "mufu_per_elem": {"RCP": 1.0}, "mufu": {"RCP": 16}},
             {"instr_per_elem": 21.0, "mufu_per_elem": {"EX2": 1.0, "RCP": 1.0},
              "mufu": {"EX2": 16, "RCP": 16}},
             {"instr_per_elem": 13.0, "mufu_per_elem": {"RCP": 1.0}, "mufu": {"RCP": 16}}]
    assert loop_counts("additive", loops) == (2.0, 20.0)
    assert loop_counts("dot", loops[1:2]) == (2.0, 21.0)


def test_chunked_baselines_match_the_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for n in (37, 29, 29))
    w = torch.randn(2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    old = harness.CHUNK_BYTES
    harness.CHUNK_BYTES = 2 * 2 * 29 * 8 * 8 * 5          # 5 query rows per chunk: several chunks
    try:
        out = harness.chunked_additive(q, k, v, w)
        ref = fusedattn.reference.additive_attention(q, k, v, w)
        torch.testing.assert_close(out, ref)
        gr = torch.autograd.grad(out.sum(), (q, k, v, w))
        gr_ref = torch.autograd.grad(ref.sum(), (q, k, v, w))
        for a, b in zip(gr, gr_ref):
            torch.testing.assert_close(a, b)
        out = harness.chunked_dot(q, k, v)
        torch.testing.assert_close(out, fusedattn.reference.dot_product_attention(q, k, v))
    finally:
        harness.CHUNK_BYTES = old


def test_limit_microbenchmark_is_accurate_or_says_why(monkeypatch):
    lim = limits.measure(threads=1, seconds=0.005)
    assert lim["matmul_gflops"] > 0
    if lim["reason"] is None:
        assert lim["additive_triples_per_s"] > 0 and lim["fma_gflops"] > 0
        assert all(v["max_rel_err"] <= limits.REL_TOL for v in lim["variants"].values()
                   if isinstance(v, dict) and v["accurate"])
    monkeypatch.setenv("CC", "/nonexistent/cc")
    lim = limits.measure(threads=1, seconds=0.005)
    assert lim["additive_triples_per_s"] is None and "compil" in lim["reason"]


def test_model_records_count_the_tensor_cores():
    """The H100 model takes the tensor-core FLOPs of the counts: a pass whose MMA work outlasts its
    issue, MUFU and memory bounds is reported tensor-bound, with the time of that bound."""
    r = {"score": "dot", "pass": "fwd", "device": "cpu", "dtype": "float16", "B": 1, "H": 1, "Hk": 1,
         "Lq": 4096, "Lk": 4096, "D": 128, "Dv": 128, "A": None, "causal": False, "elements": 4096 * 4096}
    tf = gpu_model.tensor_flops_per_elem("dot", "fwd", 128, 128)
    counts = {("dot", "fwd"): {"mufu_per_elem": 0.0, "instr_per_elem": 0.01, "per": "pair",
                               "tensor_flops_per_elem": tf, "source": "test"}}
    (m,) = report.model_records([r], counts)
    assert m["model_bound"] == "tensor"
    assert m["time_ms"] == pytest.approx(r["elements"] * tf / gpu_model.H100.tensor_flops_16bit * 1e3)
    (m32,) = report.model_records([dict(r, dtype="float32")], counts)  # 3xTF32: three TF32 MMAs
    assert m32["time_ms"] == pytest.approx(m["time_ms"] * 3 * gpu_model.H100.tensor_flops_16bit
                                           / gpu_model.H100.tensor_flops_tf32)


def test_modifier_window_comparison_counts_pairs_and_repeats_the_short_call(monkeypatch):
    from fusedattn.bench import modifiers

    calls = []
    real = modifiers._call

    def counting(score, q, k, v, w, **kw):
        calls.append("window" if "window" in kw else "causal")
        return real(score, q, k, v, w, **kw)

    monkeypatch.setattr(modifiers, "_call", counting)
    L, left = 64, 4
    r = modifiers.window("additive", L, 1, 8, left, 2)
    # rows 0..4 see i + 1 keys, the other 59 see left + 1 = 5
    assert r["allowed_fraction"] == pytest.approx((1 + 2 + 3 + 4 + 5 * 60) / (L * (L + 1) / 2))
    inner = round(1 / (2 * r["allowed_fraction"]))  # 3 at these sizes
    assert inner == 3
    assert calls.count("causal") == 1 + 2 and calls.count("window") == 1 + 2 * inner
    assert r["window_over_scaled_causal"] == pytest.approx(
        r["window_ms"] / (r["causal_ms"] * r["allowed_fraction"]))
    assert 0 < r["median_ratio"] < math.inf
