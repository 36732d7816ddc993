"""fusedattn.distributed: ring attention on torch.distributed (gloo, CPU, 127.0.0.1).

The multi-process tests start this file as a script, one process per rank, on a free
localhost port with a group timeout; every launch has an overall timeout, so a hang fails the
test instead of stalling CI. Each launch runs many cases in one process group.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch

from fusedattn import reference, testing
from fusedattn.distributed import ring as ring_mod
from fusedattn.distributed import (
    ring_additive_attention,
    ring_dot_product_attention,
    shard_sequence,
    sharding,
    unshard_sequence,
)

GROUP_TIMEOUT_S = 15      # init_process_group(timeout=...) of the launched groups
HANG_GROUP_TIMEOUT_S = 5  # ... of the group in which one rank stops answering
LAUNCH_TIMEOUT_S = 240    # a whole launch (process start-up included), then every process is killed


# ------------------------------------------------------------------------------------------ launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, nproc: int, timeout: float = LAUNCH_TIMEOUT_S, kill: tuple = ()) -> list:
    """Run ``mode`` on ``nproc`` ranks; ``[(returncode, stdout + stderr)]`` per rank. The ranks in
    ``kill`` are killed once the others have finished."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(r), str(nproc), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(nproc)]
    deadline = time.monotonic() + timeout
    results: list = [None] * nproc
    try:
        for r in sorted(range(nproc), key=lambda r: r in kill):
            if r in kill:
                procs[r].kill()
            out, _ = procs[r].communicate(timeout=max(1.0, deadline - time.monotonic()))
            results[r] = (procs[r].returncode, out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail(f"{mode} on {nproc} ranks did not finish within {timeout} s (hang):\n" + "\n".join(logs))
    return results


def _check_ok(results, mode):
    for r, (rc, out) in enumerate(results):
        assert rc == 0, f"{mode}: rank {r} exited with {rc}:\n{out}"
        assert "FAIL" not in out, f"{mode}: rank {r}:\n{out}"


# ------------------------------------------------------------------------------------------ worker side


def _rank_cases(L: int):
    """(score, layout, causal, B, H, Hk, lengths) cases; lengths end inside other ranks' shards, and 0."""
    for score in ("additive", "dot"):
        for layout in ("zigzag", "contiguous"):
            for causal in (False, True):
                yield score, layout, causal, 1, 2, 2, None
                yield score, layout, causal, 3, 4, 2, (L, 7, 0)
                yield score, layout, causal, 2, 3, 1, (L - 3, L // 2 + 1)


def _ring_call(score, q, k, v, w, **kw):
    if score == "additive":
        return ring_additive_attention(q, k, v, w, return_lse=True, **kw)
    return ring_dot_product_attention(q, k, v, return_lse=True, **kw)


def _check_case(case: testing.Case, layout: str, group=None) -> list[str]:
    """Ring forward + backward on this rank's shards against the single-process reference
    (float64 and in-dtype) on the full tensors, with the 2x rule; returns failure messages."""
    q, k, v, w, lengths = testing.make_inputs(case)
    g = torch.Generator().manual_seed(case.seed + 1)
    dout = torch.randn(case.B, case.H, case.Lq, case.Dv, generator=g, dtype=torch.float64).to(case.dtype)
    shard = lambda t: shard_sequence(t, group=group, layout=layout)  # noqa: E731
    unshard = lambda t: unshard_sequence(t, group=group, layout=layout)  # noqa: E731
    leaves = [shard(t).requires_grad_() for t in (q, k, v)]
    leaves += [w.clone().requires_grad_()] if w is not None else []
    out, lse = _ring_call(case.score, *leaves[:3], leaves[3] if w is not None else None, group=group,
                          causal=case.causal, key_lengths=lengths, layout=layout)
    grads = torch.autograd.grad(out, leaves, shard(dout))
    got = {"out": unshard(out.detach()), "lse": unshard(lse)}
    got.update({n: unshard(t) for n, t in zip(("dq", "dk", "dv"), grads)})
    if w is not None:
        got["dw"] = grads[3]
    ref64 = testing.run_reference(case, q, k, v, w, lengths, dout, upcast_to=torch.float64)
    ref_dt = testing.run_reference(case, q, k, v, w, lengths, dout)
    floors = testing.gradient_floors(case, q, k, v, w, dout)
    failures = []
    for name in ref64:
        try:
            testing.assert_within_rule(f"{case} {layout} {name}", got[name], ref64[name], ref_dt[name],
                                       case.dtype, rounding_floor=floors.get(name, 0.0))
        except AssertionError as e:
            failures.append(str(e))
    return failures


def _mode_equivalence(rank: int, P: int) -> None:
    import torch.distributed as dist
    L = 24 if P == 2 else 40
    n = 0
    for score, layout, causal, B, H, Hk, lengths in _rank_cases(L):
        case = testing.Case(score=score, B=B, H=H, Hk=Hk, Lq=L, Lk=L, D=12, Dv=7, causal=causal,
                            lengths=lengths, seed=n)
        for msg in _check_case(case, layout):
            print("FAIL", msg)
        n += 1
    print(f"equivalence: {n} cases checked on rank {rank}")
    for dtype in (torch.bfloat16, torch.float16):  # 16-bit shards (fp32 merge and accumulators), same rule
        for score in ("additive", "dot"):
            case = testing.Case(score=score, B=2, H=4, Hk=2, Lq=L, Lk=L, D=12, Dv=7, causal=True,
                                lengths=(L - 1, 9), dtype=dtype, seed=100)
            for msg in _check_case(case, "zigzag"):
                print("FAIL", msg)
        # every tanh saturated: dw = sum of all dS = 0 when delta comes from the unrounded merged output
        # (from the output rounded to 16 bits the rows' residuals add up: ~1e-3)
        q, k, v, w, do = testing.saturated_additive(2, 4 * L, 4 * L, 1, 8, dtype, seed=7)
        shards = [shard_sequence(t, layout="zigzag") for t in (q, k, v, do)]
        out = ring_additive_attention(*shards[:3], w, causal=True)
        (dw,) = torch.autograd.grad(out, w, shards[3])
        if float(dw.float().abs().max()) >= 1e-5:
            print("FAIL", f"{dtype}: saturated ring dw {dw.tolist()} (should be ~0)")
    print("bfloat16, float16: checked")
    # every rank alone in a group of one: plain attention (and a group that is not the default one)
    singles = [dist.new_group([r]) for r in range(P)]
    case = testing.Case(score="additive", B=2, H=2, Hk=1, Lq=10, Lk=10, D=12, Dv=7, causal=True,
                        lengths=(10, 3))
    for msg in _check_case(case, "zigzag", group=singles[rank]):
        print("FAIL", msg)
    print("group of one: checked")
    _mode_roundtrip(rank, P)


def _expect_value_error(label: str, fn, *must_contain: str, types: tuple = (ValueError,)) -> None:
    """One of ``types`` (ValueError; with TypeError too where the rank whose own argument is bad raises
    its own), its message naming ``must_contain``."""
    try:
        fn()
    except types as e:
        missing = [s for s in must_contain if s not in str(e)]
        print(f"FAIL {label}: message lacks {missing}: {e}" if missing else f"ok {label}: {e}")
        return
    except Exception as e:  # noqa: BLE001
        print(f"FAIL {label}: {type(e).__name__} instead of {'/'.join(t.__name__ for t in types)}: {e}")
        return
    print(f"FAIL {label}: no error")


def _mode_bad_input(rank: int, P: int) -> None:
    import torch.distributed as dist
    g = torch.Generator().manual_seed(0)
    mk = lambda L, H=2: torch.randn(1, H, L, 8, generator=g)  # noqa: E731
    w = torch.randn(2, 8, generator=g)
    q = mk(6)
    # shards of different lengths across ranks
    qr = mk(6 if rank == 0 else 8)
    _expect_value_error("different shard lengths", lambda: ring_additive_attention(qr, qr, qr, w), "disagree",
                        "q.shape[2]")
    # unknown layout on every rank, then on one rank only
    _expect_value_error("unknown layout", lambda: ring_additive_attention(q, q, q, w, layout="striped"),
                        "layout", "striped")
    lay = "striped" if rank == P - 1 else "zigzag"
    _expect_value_error("unknown layout on one rank", lambda: ring_dot_product_attention(q, q, q, layout=lay),
                        "striped")
    # options that differ across ranks
    _expect_value_error("causal differs", lambda: ring_dot_product_attention(q, q, q, causal=(rank == 0)),
                        "causal")
    # global length not divisible by 2P (zigzag) -> names the length and P
    q5 = mk(5)
    _expect_value_error("length not divisible", lambda: ring_dot_product_attention(q5, q5, q5),
                        f"length {5 * P}", f"P = {P}")
    # key_lengths beyond the global length on one rank only
    kl = torch.tensor([6 * P + (1 if rank == 0 else 0)])
    _expect_value_error("key_lengths out of range",
                        lambda: ring_dot_product_attention(q, q, q, key_lengths=kl), "key_lengths")
    # key_lengths with the same sum and weighted sum on every rank, different values (the agreement
    # compared only those sums: a silently wrong result)
    q3 = torch.randn(3, 2, 6, 8, generator=g)
    kl3 = torch.tensor([1, 2, 3] if rank == 0 else [2, 0, 4])
    _expect_value_error("key_lengths values differ",
                        lambda: ring_dot_product_attention(q3, q3, q3, key_lengths=kl3), "disagree",
                        "key_lengths.hash")
    # w differs on one rank (it is replicated: the ranks' scores would come from two models)
    w1 = w.clone()
    if rank == P - 1:
        w1[1, 3] += 1e-3
    _expect_value_error("w values differ", lambda: ring_additive_attention(q, q, q, w1), "disagree", "w.hash")
    # a bad argument on one rank only: that rank's own error, a ValueError elsewhere, no rank waiting
    # (a nested q raised before the agreement and left the others in all_gather)
    nested = torch.nested.nested_tensor([torch.randn(2, 6, 8), torch.randn(2, 6, 8)])
    either = (ValueError, TypeError)
    _expect_value_error("nested q on one rank",
                        lambda: ring_dot_product_attention(nested if rank == 0 else q, q, q),
                        "q must be a dense", types=either)
    _expect_value_error("return_lse not a bool on one rank",
                        lambda: ring_dot_product_attention(q, q, q, return_lse="no" if rank == 0 else False),
                        "return_lse", types=either)
    # wrong group: not a group; a group this rank is not a member of
    _expect_value_error("group not a ProcessGroup",
                        lambda: ring_dot_product_attention(q, q, q, group="world"), "ProcessGroup")
    only0 = dist.new_group([0])
    if rank != 0:
        _expect_value_error("not a member", lambda: ring_dot_product_attention(q, q, q, group=only0),
                            "member")
    # mismatched shards for unshard_sequence
    _expect_value_error("unshard mismatch", lambda: unshard_sequence(mk(4 if rank == 0 else 6)), "disagree")
    # the group is still usable afterwards
    out = ring_dot_product_attention(q, q, q, causal=True)
    full = unshard_sequence(q)
    ref = reference.dot_product_attention(full, full, full, causal=True)
    err = float((unshard_sequence(out) - ref).abs().max())
    print(f"ok group usable after errors ({err:.1e})" if err < 1e-5 else "FAIL group unusable after errors")


def _mode_roundtrip(rank: int, P: int) -> None:
    x = torch.arange(2 * 3 * 8 * P * 2, dtype=torch.float32).view(2, 3, 8 * P, 2)
    for layout in ("zigzag", "contiguous"):
        for t, dim in ((x, 2), (x, -2), (x.transpose(1, 2).contiguous(), 1)):
            back = unshard_sequence(shard_sequence(t, dim=dim, layout=layout), dim=dim, layout=layout)
            if not torch.equal(back, t):
                print(f"FAIL roundtrip {layout} dim {dim}")
    ids = sharding.chunk_ids(rank, P, "zigzag")
    c = x.shape[2] // (2 * P)
    want = torch.cat([x[:, :, i * c:(i + 1) * c] for i in ids], dim=2)
    if not torch.equal(shard_sequence(x, layout="zigzag"), want):
        print("FAIL zigzag shard content")
    print("roundtrip: checked")


def _mode_dead_peer(rank: int, P: int, hang: bool = False) -> None:
    """Rank 1 exits (or, with ``hang``, stops answering) in the middle of the second call; the
    others must raise within the group timeout, not hang."""
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    w = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()  # one w on every rank
    calls = [0]
    real_block = ring_mod._block_forward

    def failing_block(*a, **kw):
        calls[0] += 1
        if rank == 1 and calls[0] == 5:  # inside the second call's ring
            if hang:
                time.sleep(LAUNCH_TIMEOUT_S)  # killed by the test once the others are done
            os._exit(17)
        return real_block(*a, **kw)

    ring_mod._block_forward = failing_block
    t0 = time.monotonic()
    try:
        for _ in range(4):
            t0 = time.monotonic()
            out = ring_additive_attention(q, q, q, w, causal=False)
            out.sum().backward()
    except Exception as e:  # noqa: BLE001
        print(f"raised after {time.monotonic() - t0:.1f} s: {type(e).__name__}: {str(e)[:300]}")
        return
    print("FAIL no error although a peer died")


def _worker(mode: str, rank: int, P: int, port: int) -> int:
    import torch.distributed as dist
    torch.set_num_threads(1)
    timeout = HANG_GROUP_TIMEOUT_S if mode == "hung_peer" else GROUP_TIMEOUT_S
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P,
                            timeout=timedelta(seconds=timeout))
    try:
        modes = {"equivalence": _mode_equivalence, "bad_input": _mode_bad_input, "roundtrip": _mode_roundtrip,
                 "dead_peer": _mode_dead_peer, "hung_peer": lambda r, p: _mode_dead_peer(r, p, hang=True)}
        modes[mode](rank, P)
        code = 0
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    os._exit(_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("P", [2, 4])
def test_ring_matches_single_process(P):
    """Both scores, both layouts, causal or not, GQA, key_lengths (0, ending in another rank's
    shard): out, lse, dq, dk, dv, dw of the ring equal the full-tensor reference (2x rule); a group
    of one; shard_sequence / unshard_sequence round trips."""
    results = _launch("equivalence", P)
    _check_ok(results, "equivalence")
    for _rc, out in results:
        for line in ("equivalence: 24 cases checked", "bfloat16, float16: checked", "group of one: checked",
                     "roundtrip: checked"):
            assert line in out, out


def test_bad_input_is_an_error_on_every_rank():
    results = _launch("bad_input", 2)
    _check_ok(results, "bad_input")
    for r, (_rc, out) in enumerate(results):
        n_ok = out.count("\nok ") + out.startswith("ok ")
        assert n_ok == (13 if r == 0 else 14), out


@pytest.mark.parametrize("mode", ["dead_peer", "hung_peer"])
def test_failed_peer_is_an_error_not_a_hang(mode):
    """A peer that exits mid-call (connection reset) or stops answering (the group timeout):
    the other ranks raise instead of waiting forever."""
    limit = GROUP_TIMEOUT_S if mode == "dead_peer" else HANG_GROUP_TIMEOUT_S
    results = _launch(mode, 3, kill=(1,) if mode == "hung_peer" else ())
    assert results[1][0] == (17 if mode == "dead_peer" else -9), results[1][1]
    for r in (0, 2):
        rc, out = results[r]
        assert rc == 0 and "raised after" in out and "FAIL" not in out, out
        waited = float(out.split("raised after ")[1].split(" s")[0])
        assert waited <= limit + 5, out


# ------------------------------------------------------------------------------------------ in-process


@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("causal", [False, True])
def test_world_size_one_is_plain_attention(score, causal):
    """Without torch.distributed initialized, group=None is a single process: bit-identical to the
    single-process fused call."""
    case = testing.Case(score=score, B=2, H=4, Hk=2, Lq=17, Lk=17, D=12, Dv=7, causal=causal, lengths=(17, 5))
    q, k, v, w, lengths = testing.make_inputs(case)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(case.B, case.H, case.Lq, case.Dv, generator=g)
    want = testing.run(case, "cpu", q, k, v, w, lengths, dout)
    leaves = [t.clone().requires_grad_() for t in (q, k, v) + ((w,) if w is not None else ())]
    out, lse = _ring_call(score, *leaves[:3], leaves[3] if w is not None else None, causal=causal,
                          key_lengths=lengths, layout="contiguous")
    grads = torch.autograd.grad(out, leaves, dout)
    assert torch.equal(out, want["out"]) and torch.equal(lse, want["lse"])
    for name, got in zip(("dq", "dk", "dv", "dw"), grads):
        assert torch.equal(got, want[name]), name


def _global_mask(L, lengths, causal):
    return reference.allowed_mask(len(lengths), L, L, torch.tensor(lengths), causal, "cpu")[:, 0]


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pieces", [None, 1, 2, 4])
def test_plan_covers_exactly_the_allowed_pairs(P, layout, causal, pieces):
    """The kernel calls planned for (rank, src), whole (forward) or in pieces of at most ``pieces``
    query rows (backward), allow exactly the globally allowed (query, key) pairs, each once."""
    c = 3
    L = c * sharding.n_chunks(P, layout)
    lengths = [L, 0, 4, L - 2, c + 1]
    want = _global_mask(L, lengths, causal)
    got = torch.zeros_like(want)
    kl = torch.tensor(lengths)
    for rank in range(P):
        q_pos = torch.cat([torch.arange(i * c, (i + 1) * c) for i in sharding.chunk_ids(rank, P, layout)])
        for src in range(P):
            k_pos = torch.cat([torch.arange(i * c, (i + 1) * c) for i in sharding.chunk_ids(src, P, layout)])
            for it in ring_mod._plan(rank, src, P, layout, c, causal, kl):
                whole = [(it.q0, it.q1, it.k_end, it.lengths)]
                calls = whole if pieces is None else ring_mod._pieces(it, pieces)
                for q0, q1, k_end, blk_len in calls:
                    if blk_len is None:
                        blk_len = torch.full((len(lengths),), k_end)
                    m = reference.allowed_mask(len(lengths), q1 - q0, k_end, blk_len, it.causal, "cpu")[:, 0]
                    rows, cols = q_pos[q0:q1], k_pos[:k_end]
                    sub = got[:, rows][:, :, cols]
                    assert not (sub & m).any(), "a pair is computed twice"
                    got[:, rows.view(-1, 1), cols.view(1, -1)] = sub | m
    assert torch.equal(got, want)


def _pairs(it) -> int:
    """(query, key) pairs one planned call computes (bottom-right causal when it.causal)."""
    n_q, n_k = it.q1 - it.q0, it.k_end
    return sum(min(n_k, i + n_k - n_q + 1) for i in range(n_q)) if it.causal else n_q * n_k


def test_plan_skips_wholly_masked_blocks():
    """Causal zigzag: every rank computes 2c^2 pairs per step (plus the c diagonal pairs on its
    own shard); causal contiguous: rank r computes r + 1 blocks."""
    P, c = 4, 8
    for rank in range(P):
        work = [sum(_pairs(it) for it in ring_mod._plan(rank, src, P, "zigzag", c, True, None))
                for src in range(P)]
        assert work == [2 * c * c + (c if src == rank else 0) for src in range(P)], work
        calls = [ring_mod._plan(rank, src, P, "contiguous", c, True, None) for src in range(P)]
        assert sum(len(x) for x in calls) == rank + 1


def test_merge_handles_empty_rows():
    out = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 4.0]])
    lse = torch.tensor([float("-inf"), 0.5, float("-inf"), 1.0])
    o_b = torch.tensor([[5.0, 6.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    l_b = torch.tensor([2.0, float("-inf"), float("-inf"), 1.0])
    ring_mod._merge(out, lse, o_b, l_b)
    assert torch.equal(out[:3], torch.tensor([[5.0, 6.0], [1.0, 2.0], [0.0, 0.0]]))
    assert torch.allclose(out[3], torch.tensor([2.0, 2.0]))
    assert lse[0] == 2.0 and lse[1] == 0.5 and torch.isneginf(lse[2])
    assert torch.allclose(lse[3], torch.tensor(1.0 + torch.log(torch.tensor(2.0)).item()))
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_single_process_errors():
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="layout"):
        ring_dot_product_attention(q, q, q, layout="ring")
    with pytest.raises(ValueError, match="not initialized"):
        ring_dot_product_attention(q, q, q, group=object())
    with pytest.raises(ValueError, match="length 7"):
        shard_sequence(torch.randn(1, 1, 7, 2), layout="zigzag")
    with pytest.raises(ValueError, match="reference"):
        ring_dot_product_attention(q.double(), q.double(), q.double())
