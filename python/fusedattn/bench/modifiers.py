"""What the score modifiers cost on the cpu backend (issue targets of the score spec), in one run.

``python -m fusedattn.bench.modifiers [--length 4096] [--window-length 16384] [--threads 2] [--quick]``

* varlen: a batch of sequences with lengths uniform in ``[L/8, L]`` (fixed seed), packed, against
  the same sequences in separate calls and against one padded ``(B, H, L, D)`` call with
  ``key_lengths`` (padded query rows included, as a padded batch has them); causal and not; and 1,000
  short sequences (lengths in ``[8, 64]``, causal), where the calls per sequence cost most.
* window: ``window=(256, 0)`` at ``--window-length`` against the causal call, the causal time scaled
  by the allowed fraction of (query, key) pairs.
* softcap / rel_bias / alibi: forward time against the plain forward at ``--length``.

Each figure is the best of a few calls (the short window call: of a few dozen); calls of one comparison
are interleaved so machine noise hits them alike. Prints one line per comparison and, with ``--json``,
writes the records.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

import fusedattn


def _race(fns, reps, inner=None, samples=None):
    """Best time of each function over ``reps`` interleaved rounds; in each round function n runs
    ``inner[n]`` times (default 1), so a short call gets as many samples as it needs for its best.
    With ``samples`` (a list of lists, one per function) every time is appended there too."""
    inner = inner or [1] * len(fns)
    samples = samples if samples is not None else [[] for _ in fns]
    for f in fns:
        f()
    for _ in range(reps):
        for n, f in enumerate(fns):
            for _ in range(inner[n]):
                t0 = time.perf_counter()
                f()
                samples[n].append(time.perf_counter() - t0)
    return [min(t) for t in samples]


def _inputs(score, B, H, L, D, g):
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    w = torch.randn(H, D, generator=g) / math.sqrt(D) if score == "additive" else None
    return q, k, v, w


def _call(score, q, k, v, w, **kw):
    if score == "additive":
        return fusedattn.additive_attention(q, k, v, w, backend="cpu", **kw)
    return fusedattn.dot_product_attention(q, k, v, backend="cpu", **kw)


def varlen(score, L, H, D, nseq, causal, reps):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(L // 8, L + 1, (nseq,), generator=g).tolist()
    total = sum(lens)
    q, k, v = (torch.randn(total, H, D, generator=g) for _ in range(3))
    w = torch.randn(H, D, generator=g) / math.sqrt(D) if score == "additive" else None
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    def pad(x):
        out = torch.zeros(nseq, L, H, D)
        for b, (s, n) in enumerate(zip(cu[:-1].tolist(), lens)):
            out[b, :n] = x[s:s + n]
        return out.transpose(1, 2).contiguous()

    qp, kp, vp = pad(q), pad(k), pad(v)
    kl = torch.tensor(lens)
    fn = fusedattn.additive_attention_varlen if score == "additive" else \
        fusedattn.dot_product_attention_varlen
    packed = lambda: fn(*((q, k, v, w) if w is not None else (q, k, v)), cu, cu, causal=causal,  # noqa: E731
                        backend="cpu")

    def separate():
        for s, n in zip(cu[:-1].tolist(), lens):
            sl = [t[s:s + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
            _call(score, *sl, w, causal=causal)

    padded = lambda: _call(score, qp, kp, vp, w, key_lengths=kl, causal=causal)  # noqa: E731
    with torch.no_grad():
        tp, ts, tpad = _race([packed, separate, padded], reps)
    return {"case": f"varlen {score} L={L} nseq={nseq} causal={causal}", "packed_ms": tp * 1e3,
            "separate_ms": ts * 1e3, "padded_ms": tpad * 1e3, "packed_over_separate": tp / ts,
            "padded_over_packed": tpad / tp}


def window(score, L, H, D, left, reps):
    g = torch.Generator().manual_seed(1)
    q, k, v, w = _inputs(score, 1, H, L, D, g)
    # allowed pairs: causal L(L+1)/2; window (left, 0): each row i sees min(i, left) + 1 keys
    frac = sum(min(i, left) + 1 for i in range(L)) / (L * (L + 1) / 2)
    # the window call is ~1/30 of the causal one: it runs 1 / (2 * frac) times per round (16 at the
    # defaults), so its best is taken over about half the time the causal call's is, not over 2 samples
    inner = max(1, min(30, round(1 / (2 * frac))))
    samples = [[], []]
    with torch.no_grad():
        tw, tc = _race([lambda: _call(score, q, k, v, w, window=(left, 0)),
                        lambda: _call(score, q, k, v, w, causal=True)], reps, [inner, 1], samples)
    # the ratio of the medians as well: a best of many short calls may catch a fast moment of the machine
    med = [statistics.median(t) for t in samples]
    return {"case": f"window {score} L={L} window=({left}, 0)", "window_ms": tw * 1e3, "causal_ms": tc * 1e3,
            "allowed_fraction": frac, "window_over_scaled_causal": tw / (tc * frac),
            "median_ratio": med[0] / (med[1] * frac)}


def overhead(score, L, H, D, reps, inner=1):
    g = torch.Generator().manual_seed(2)
    q, k, v, w = _inputs(score, 1, H, L, D, g)
    rel = torch.randn(H, 2 * 128 - 1, generator=g)
    slopes = torch.rand(H, generator=g)
    variants = {"plain": {}, "rel_bias": {"rel_bias": rel}, "alibi": {"alibi_slopes": slopes}}
    if score == "dot":
        variants["softcap"] = {"softcap": 30.0}
    names = list(variants)
    samples = [[] for _ in names]
    with torch.no_grad():
        ts = _race([lambda kw=variants[n]: _call(score, q, k, v, w, **kw) for n in names], reps,
                   [inner] * len(names), samples)
    med = [statistics.median(t) for t in samples]
    rec = {"case": f"modifier overhead {score} L={L} H={H} D={D}"}
    for n, t, m in zip(names, ts, med):
        rec[f"{n}_ms"] = t * 1e3
        if n != "plain":
            rec[f"{n}_overhead"] = t / ts[0] - 1
            rec[f"{n}_median_overhead"] = m / med[0] - 1
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--window-length", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="shorter lengths (L=1024, window L=4096)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    L, WL = (1024, 4096) if args.quick else (args.length, args.window_length)
    recs = []
    load = os.getloadavg()[0]
    for score in ("dot", "additive"):
        D, H = (64, 4) if score == "dot" else (64, 1)
        for causal in (False, True):
            recs.append(varlen(score, L, H, D, 8, causal, 2))
        # many short sequences: what a packed call saves over a call per sequence
        recs.append(varlen(score, 64, H, D, 1000, True, 3))
        recs.append(window(score, WL, H if score == "dot" else 1, D, 256, 3))
        # a few per cent on calls of 10-100 ms: 5 calls of each variant per round, 3 rounds
        recs.append(overhead(score, L if score == "dot" else L // 2, H, D, 3, 5))
    for r in recs:
        print(r["case"] + ": " + ", ".join(f"{k}={v:.3g}" for k, v in r.items() if k != "case"))
    print(f"threads={args.threads}, load average before: {load:.2f}, after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": load, "threads": args.threads, "records": recs}, f, indent=1)


if __name__ == "__main__":
    main()
