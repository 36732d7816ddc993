"""Helpers for numerical-equivalence tests of any backend against the reference.

The tolerance rule is FlashAttention's: against a float64 reference, a fused
result's error may be at most ``2x`` the error of the same reference computed in
the input dtype, plus a small absolute floor (scaled by the reference's
magnitude, so that sums over long rows are judged fairly)::

    |fused - ref64|.max() <= 2 * |ref_in_dtype - ref64|.max() + floor * max(1, |ref64|.max())

The same rule is applied to ``out``, ``lse`` and every gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from . import api, reference

# absolute floors per input dtype (relative to max(1, |ref|))
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Case:
    """One attention call: sizes, options and how the inputs are made."""

    score: str = "additive"          # "additive" | "dot"
    B: int = 1
    H: int = 2
    Hk: int = 2
    Lq: int = 17
    Lk: int = 17
    D: int = 16
    Dv: int = 16
    causal: bool = False
    lengths: Optional[tuple] = None  # key_lengths per batch entry
    dtype: torch.dtype = torch.float32
    magnitude: float = 1.0           # multiplies q and k: 30 or 1e4 saturate the tanh
    strided: bool = False            # q/k/v as transposed views of (B, L, H, D)
    scale: Optional[float] = None
    seed: int = 0
    # modifiers (fusedattn.spec)
    window: Optional[tuple] = None   # (left, right)
    softcap: float = 0.0             # dot only
    rel_bias: Optional[int] = None   # M: a random (H, 2M - 1) float32 bias, differentiated
    alibi: Optional[str] = None      # "H" (slopes (H,)) or "BH" (slopes (B, H))
    seqlens: Optional[tuple] = None  # varlen: ((lq, lk), ...) per packed sequence; B, Lq, Lk unused
    spike: Optional[tuple] = None    # (name, value): one element of "q", "k", "v" or "w" set to value

    def modifiers(self) -> frozenset:
        """The ``fusedattn.spec`` modifiers this case uses."""
        win = self.window
        used = {"key_lengths": self.lengths is not None,
                "causal": self.causal and (win is None or win[0] == -1),
                "window": win is not None and (win[0] != -1 or (win[1] != -1 and
                                                                not (self.causal and win[1] == 0))),
                "softcap": self.softcap > 0, "rel_bias": self.rel_bias is not None,
                "alibi": self.alibi is not None, "varlen": self.seqlens is not None}
        return frozenset(n for n, on in used.items() if on)

    def with_(self, **kw) -> Case:
        return replace(self, **kw)

    def __str__(self) -> str:
        parts = [self.score, f"B{self.B}H{self.H}/{self.Hk}", f"Lq{self.Lq}Lk{self.Lk}",
                 f"D{self.D}Dv{self.Dv}", str(self.dtype).replace("torch.", "")]
        if self.causal:
            parts.append("causal")
        if self.lengths is not None:
            parts.append("len" + "-".join(map(str, self.lengths)))
        if self.magnitude != 1.0:
            parts.append(f"x{self.magnitude:g}")
        if self.strided:
            parts.append("strided")
        for name in ("window", "rel_bias", "alibi", "seqlens", "spike"):
            val = getattr(self, name)
            if val is not None:
                parts.append(f"{name}{val}".replace(" ", ""))
        if self.softcap:
            parts.append(f"softcap{self.softcap:g}")
        return "_".join(parts)


def make_inputs(case: Case, device="cpu"):
    """``(q, k, v, w_or_None, key_lengths_or_None)`` in ``case.dtype``, deterministic in ``case.seed``."""
    g = torch.Generator().manual_seed(case.seed)

    def rand(B, H, L, D, mag):
        if case.strided:  # a (B, L, H, D) buffer viewed as (B, H, L, D)
            return (torch.randn(B, L, H, D, generator=g, dtype=torch.float64) * mag).transpose(1, 2)
        return torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * mag

    mag = case.magnitude
    qk_mag = mag if case.score == "additive" else math.sqrt(mag)
    if case.seqlens is not None:  # packed (total, H, D)
        tq, tk = sum(a for a, _ in case.seqlens), sum(b for _, b in case.seqlens)
        def packed(T, H, D, m):  # strided: a (H, T, D) buffer viewed as (T, H, D)
            if case.strided:
                return (torch.randn(H, T, D, generator=g, dtype=torch.float64) * m).transpose(0, 1)
            return torch.randn(T, H, D, generator=g, dtype=torch.float64) * m

        q = packed(tq, case.H, case.D, qk_mag)
        k = packed(tk, case.Hk, case.D, qk_mag)
        v = packed(tk, case.Hk, case.Dv, 1.0)
    else:
        q = rand(case.B, case.H, case.Lq, case.D, qk_mag)
        k = rand(case.B, case.Hk, case.Lk, case.D, qk_mag)
        v = rand(case.B, case.Hk, case.Lk, case.Dv, 1.0)
    w = torch.randn(case.H, case.D, generator=g, dtype=torch.float64) / math.sqrt(case.D) \
        if case.score == "additive" else None
    lengths = None if case.lengths is None else torch.tensor(case.lengths, dtype=torch.int32, device=device)
    if case.spike is not None:  # one element, at a position drawn from the seed, becomes the value
        name, value = case.spike
        t = {"q": q, "k": k, "v": v, "w": w}[name]
        if t is not None and t.numel():
            idx = torch.unravel_index(torch.randint(t.numel(), (1,), generator=g), t.shape)
            t[tuple(i[0] for i in idx)] = value  # in place: strided views write into their buffer

    def cast(t):
        return None if t is None else t.to(device=device, dtype=case.dtype)

    return cast(q), cast(k), cast(v), cast(w), lengths


def make_modifiers(case: Case, device="cpu") -> dict:
    """Keyword arguments of the case's modifiers (tensors deterministic in ``case.seed``)."""
    g = torch.Generator().manual_seed(case.seed + 7)
    kw = {}
    if case.causal:
        kw["causal"] = True
    if case.window is not None:
        kw["window"] = case.window
    if case.softcap:
        kw["softcap"] = case.softcap
    if case.rel_bias is not None:
        kw["rel_bias"] = torch.randn(case.H, 2 * case.rel_bias - 1, generator=g).to(device)
    if case.alibi is not None:
        nb = len(case.seqlens) if case.seqlens is not None else case.B
        shape = (case.H,) if case.alibi == "H" else (nb, case.H)
        kw["alibi_slopes"] = (torch.rand(*shape, generator=g) * 0.5).to(device)
    if case.seqlens is not None:
        cq, ck = [0], [0]
        for a, b in case.seqlens:
            cq.append(cq[-1] + a)
            ck.append(ck[-1] + b)
        kw["cu_seqlens_q"] = torch.tensor(cq, dtype=torch.int32, device=device)
        kw["cu_seqlens_k"] = torch.tensor(ck, dtype=torch.int32, device=device)
    return kw


def _dout(case: Case, device):
    g = torch.Generator().manual_seed(case.seed + 1)
    if case.seqlens is not None:
        shape = (sum(a for a, _ in case.seqlens), case.H, case.Dv)
    else:
        shape = (case.B, case.H, case.Lq, case.Dv)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=case.dtype)


def saturated_additive(H: int, Lq: int, Lk: int, D: int, Dv: int, dtype=torch.float32, seed: int = 0):
    """``(q, k, v, w, dout)`` of one batch entry whose every tanh saturates (q = 30, k ~ N(0, 1)): each
    pair's tanh is 1, so ``dw = sum_ij dS_ij``, which is 0 as each row's dS sums to 0. ``w`` requires
    grad. A test of how far a backend's rows' dS sums stay from 0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.full((1, H, Lq, D), 30.0, dtype=dtype)
    k = torch.randn(1, H, Lk, D, generator=g).to(dtype)
    v = torch.randn(1, H, Lk, Dv, generator=g).to(dtype)
    w = torch.randn(H, D, generator=g).to(dtype).requires_grad_()
    dout = torch.randn(1, H, Lq, Dv, generator=g).to(dtype)
    return q, k, v, w, dout


def _names(case: Case, mods: dict):
    names = ["dq", "dk", "dv"] + (["dw"] if case.score == "additive" else [])
    return names + (["drel_bias"] if "rel_bias" in mods else [])


def run(case: Case, backend: str, q, k, v, w, key_lengths, dout=None, mods: Optional[dict] = None):
    """Forward (+ backward when ``dout`` is given) through the public API.

    Returns ``{"out", "lse", "dq", "dk", "dv", ["dw"], ["drel_bias"]}``.
    """
    mods = dict(make_modifiers(case, q.device) if mods is None else mods)
    inputs = (q, k, v) + ((w,) if w is not None else ())
    leaves = [t.detach().requires_grad_(dout is not None) for t in inputs]
    if "rel_bias" in mods:
        mods["rel_bias"] = mods["rel_bias"].detach().requires_grad_(dout is not None)
    causal = mods.pop("causal", False)
    if case.seqlens is not None:
        cu = (mods.pop("cu_seqlens_q"), mods.pop("cu_seqlens_k"))
        fn = api.additive_attention_varlen if case.score == "additive" else api.dot_product_attention_varlen
        extra = {} if case.score == "additive" else {"scale": case.scale}
        out, lse = fn(*leaves, *cu, causal=causal, return_lse=True, backend=backend, **extra, **mods)
    elif case.score == "additive":
        out, lse = api.additive_attention(*leaves, key_lengths=key_lengths, causal=causal,
                                          return_lse=True, backend=backend, **mods)
    else:
        out, lse = api.dot_product_attention(*leaves, scale=case.scale, key_lengths=key_lengths,
                                             causal=causal, return_lse=True, backend=backend, **mods)
    res = {"out": out.detach(), "lse": lse.detach()}
    if dout is not None:
        wrt = leaves + ([mods["rel_bias"]] if "rel_bias" in mods else [])
        grads = torch.autograd.grad(out, wrt, dout)
        res.update(zip(_names(case, mods), grads))
    return res


def run_reference(case: Case, q, k, v, w, key_lengths, dout=None, upcast_to=None,
                  mods: Optional[dict] = None):
    """The reference (autograd-differentiated ``fusedattn.reference``), optionally on upcast inputs."""
    def prep(t):
        return None if t is None else t.detach().to(upcast_to or t.dtype)

    mods = dict(make_modifiers(case, q.device) if mods is None else mods)
    q, k, v, w = (prep(t) for t in (q, k, v, w))
    leaves = [t.requires_grad_(dout is not None) for t in (q, k, v) + ((w,) if w is not None else ())]
    if "rel_bias" in mods:  # float32 bias: upcast with the inputs (float64), else as given
        rb = mods["rel_bias"].detach()
        rb = rb.to(upcast_to) if upcast_to is not None else rb
        mods["rel_bias"] = rb.requires_grad_(dout is not None)
    scale = None if case.score == "additive" else case.scale
    wv = leaves[3] if w is not None else None
    if case.seqlens is not None:
        out, lse = reference.attention_varlen(*leaves[:3], wv, scale=scale, return_lse=True, **mods)
    else:
        out, lse = reference.attention(*leaves[:3], wv, scale=scale, key_lengths=key_lengths,
                                       return_lse=True, **mods)
    res = {"out": out.detach(), "lse": lse.detach()}
    if dout is not None:
        wrt = leaves + ([mods["rel_bias"]] if "rel_bias" in mods else [])
        grads = torch.autograd.grad(out, wrt, prep(dout))
        res.update(zip(_names(case, mods), grads))
    return res


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference, treating equal infinities (lse = -inf rows) as exact."""
    a, b = a.double(), b.double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    diff = torch.where(same_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_within_rule(name: str, fused: torch.Tensor, ref64: torch.Tensor, ref_dtype: torch.Tensor,
                       dtype: torch.dtype, slack: float = 2.0, rounding_floor: float = 0.0) -> None:
    """Assert the tolerance rule; ``rounding_floor`` is added to the bound (see ``gradient_floors``)."""
    if fused.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(fused.shape)} != reference {tuple(ref64.shape)}")
    if torch.isnan(fused).any() and not torch.isnan(ref64).any():
        raise AssertionError(f"{name}: NaN in the fused result but not in the reference")
    finite = ref64[torch.isfinite(ref64)]
    mag = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    err, err_ref = _err(fused, ref64), _err(ref_dtype, ref64)
    floor = FLOOR[dtype] * mag + rounding_floor
    if not err <= slack * err_ref + floor:
        raise AssertionError(f"{name}: max error {err:.3e} > {slack:g} x reference-in-{dtype} error "
                             f"{err_ref:.3e} + floor {floor:.1e}")


def gradient_floors(case: Case, q, k, v, w, dout) -> dict:
    """Rounding floors for dq and dk: ``4 eps |dO| |v| x (scale |k| or |w|)`` (and ``|q|`` for dk).

    A FlashAttention-style backward computes ``delta = rowsum(dO * O)`` apart from
    ``dP = dO v^T``, so ``dS = P (dP - delta)`` carries an absolute rounding error of about
    ``eps |dO| |v|``. With a saturated softmax (dot scores near 1e4) the exact ``dS`` is ~0
    and the materializing reference, which forms ``delta`` from the same ``P * dP``, cancels
    exactly, so its own error is no yardstick. The floor is the size of that rounding error
    carried into ``dq = scale dS k`` and ``dk = scale dS^T q``; it is below the absolute
    floor for inputs of ordinary size.
    """
    eps = torch.finfo(case.dtype).eps
    amax = lambda t: float(t.detach().abs().max()) if t is not None and t.numel() else 0.0  # noqa: E731
    base = 4 * eps * amax(dout) * amax(v)
    if case.score == "additive":
        return {"dq": base * amax(w), "dk": base * amax(w)}
    scale = case.scale if case.scale is not None else 1 / math.sqrt(case.D)
    return {"dq": base * abs(scale) * amax(k), "dk": base * abs(scale) * amax(q)}


def check_backend(case: Case, backend: str, backward: bool = True, device="cpu") -> None:
    """Run ``case`` through ``backend`` and the reference; assert the tolerance rule everywhere."""
    q, k, v, w, lengths = make_inputs(case, device)
    dout = _dout(case, device) if backward else None
    mods = make_modifiers(case, device)
    fused = run(case, backend, q, k, v, w, lengths, dout, mods)
    ref64 = run_reference(case, q, k, v, w, lengths, dout, upcast_to=torch.float64, mods=mods)
    ref_dt = run_reference(case, q, k, v, w, lengths, dout, mods=mods)
    floors = gradient_floors(case, q, k, v, w, dout) if backward else {}
    for name in ref64:
        assert_within_rule(f"{case} [{backend}] {name}", fused[name], ref64[name], ref_dt[name], case.dtype,
                           rounding_floor=floors.get(name, 0.0))
