"""The contract every backend serves.

A backend is a small object that declares what it supports and implements four
launchers. The op layer (``fusedattn.ops``) has already validated shapes, dtypes
and devices, and has already handled empty sizes (``Lq == 0`` or ``Lk == 0``)
before a launcher is called, so launchers may assume ``B, H, Lq, Lk >= 1``.

Conventions shared by every launcher (all tensors may have arbitrary strides):

- ``q (B, H, Lq, D)``, ``k (B, Hk, Lk, D)``, ``v (B, Hk, Lk, Dv)``, ``H % Hk == 0``;
  query head ``h`` reads key/value head ``h // (H // Hk)``.
- ``w (H, D)`` for additive scores ``s_ij = sum_a w[h, a] * tanh(q_ia + k_ja)``;
  dot scores are ``s_ij = scale * q_i . k_j``.
- ``key_lengths``: ``None`` or an int32 tensor of shape ``(B,)`` on the inputs'
  device with values in ``[0, Lk]`` (already checked). Key ``j`` is allowed when
  ``j < key_lengths[b]`` and, if ``causal``, ``j <= i + (Lk - Lq)``.
- ``out (B, H, Lq, Dv)`` in the input dtype, or in float32 for 16-bit inputs when the backend
  declares ``f32_out`` and the call asks for it (``forward(..., out32=True)``; the cpu backend
  returns float32 always): its unrounded result, which the op layer rounds and keeps for the
  backward, whose ``delta = rowsum(dO * O)`` is then not taken from a rounded output (the
  backward takes ``out`` in either dtype); ``lse (B, H, Lq)`` in float32
  (float64 for float64 inputs), natural log. A row with no allowed key has
  ``out = 0``, ``lse = -inf`` and contributes zero gradients.
- Backward returns ``dq`` like ``q``, ``dk``/``dv`` like ``k``/``v`` (grouped heads
  summed), and for additive ``dw (H, D)``; in the input dtype, or in float32 (the cpu backend:
  the op layer rounds them; ring attention sums blocks' gradients unrounded).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..spec import SCORES, AttnSpec


class Grads(NamedTuple):
    """What a backward returns; ``dw`` / ``drel_bias`` are None when the call has no such input."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dw: Optional[torch.Tensor] = None
    drel_bias: Optional[torch.Tensor] = None


class Backend:
    """Base class: declarations, ``forward``/``backward`` on an ``AttnSpec``, and the four
    legacy launchers (score x direction) that kernels without modifiers implement."""

    name: str = ""
    devices: frozenset = frozenset()
    dtypes: frozenset = frozenset()
    scores: frozenset = frozenset(SCORES)
    # modifiers served natively by the launchers (``fusedattn.spec.MODIFIERS``); "varlen" is served
    # by every backend: ``forward``/``backward`` below split packed batches into per-sequence calls
    # when the backend does not declare it
    modifiers: frozenset = frozenset({"key_lengths", "causal"})
    max_head_dim: int = 1 << 30
    description: str = ""
    # forward(out32=True) returns the float32 output for 16-bit inputs (see the module docstring)
    f32_out: bool = False

    # -- environment ----------------------------------------------------------
    def unavailable_reason(self) -> Optional[str]:
        """None when the backend can run in this process, else why it cannot."""
        return None

    def serves(self) -> frozenset:
        """Every modifier a call to this backend may use."""
        return self.modifiers | {"varlen"}

    def fwd_out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the unrounded ``out`` that ``forward(..., out32=True)`` returns for inputs of
        ``dtype``."""
        return torch.float32 if self.f32_out and dtype in (torch.float16, torch.bfloat16) else dtype

    # -- per call ---------------------------------------------------------------
    def not_supported_reasons(self, spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
        """Why this backend cannot serve ``spec`` on these tensors (empty: it can).

        ``spec`` is an ``AttnSpec`` (or, for convenience, a score name: no modifiers).
        """
        if isinstance(spec, str):
            spec = AttnSpec(score=spec)
        reasons = []
        env = self.unavailable_reason()
        if env is not None:
            reasons.append(env)
        if q.device.type not in self.devices:
            reasons.append(f"device {q.device.type!r} not in {sorted(self.devices)}")
        if q.dtype not in self.dtypes:
            reasons.append(f"dtype {q.dtype} not in {sorted(str(d) for d in self.dtypes)}")
        if spec.score not in self.scores:
            reasons.append(f"score {spec.score!r} not in {sorted(self.scores)}")
        missing = spec.modifiers() - self.serves()
        if missing:
            reasons.append(f"modifier(s) {sorted(missing)} not supported "
                           f"(supported: {sorted(self.serves())})")
        d, dv = q.shape[-1], v.shape[-1]
        if max(d, dv) > self.max_head_dim:
            reasons.append(f"head dim {max(d, dv)} > max_head_dim={self.max_head_dim}")
        return reasons

    # -- the two entry points of the op layer ---------------------------------------
    def forward(self, spec: AttnSpec, q, k, v, w, out32: bool = False):
        """-> (out, lse). Dense: q ``(B, H, Lq, D)``; varlen: ``(1, H, total_q, D)`` views.
        ``out32``: the caller keeps the output for a backward; a backend with ``f32_out`` then
        returns it unrounded (float32 for 16-bit inputs; it may do so always)."""
        if spec.varlen and "varlen" not in self.modifiers:
            return _varlen_forward(self, spec, q, k, v, w, out32)
        if spec.additive:
            return self.additive_forward(q, k, v, w, spec.key_lengths, spec.causal)
        return self.dot_forward(q, k, v, spec.key_lengths, spec.scale, spec.causal)

    def backward(self, spec: AttnSpec, dout, q, k, v, w, out, lse) -> Grads:
        if spec.varlen and "varlen" not in self.modifiers:
            return _varlen_backward(self, spec, dout, q, k, v, w, out, lse)
        if spec.additive:
            return Grads(*self.additive_backward(dout, q, k, v, w, spec.key_lengths, spec.causal, out, lse))
        return Grads(*self.dot_backward(dout, q, k, v, spec.key_lengths, spec.scale, spec.causal, out, lse))

    # -- launchers (key_lengths and causal only) ------------------------------------------
    def additive_forward(self, q, k, v, w, key_lengths, causal):
        """-> (out, lse)"""
        raise NotImplementedError

    def additive_backward(self, dout, q, k, v, w, key_lengths, causal, out, lse):
        """-> (dq, dk, dv, dw)"""
        raise NotImplementedError

    def dot_forward(self, q, k, v, key_lengths, scale, causal):
        """-> (out, lse)"""
        raise NotImplementedError

    def dot_backward(self, dout, q, k, v, key_lengths, scale, causal, out, lse):
        """-> (dq, dk, dv)"""
        raise NotImplementedError


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------- varlen by sequence


def sequences(spec: AttnSpec):
    """``(b, (q0, q1), (k0, k1), spec_b)`` for each packed sequence with queries and keys;
    ``spec_b`` is the dense spec of that sequence (its alibi row; no cu_seqlens)."""
    cq, ck = spec.cu_seqlens_q.tolist(), spec.cu_seqlens_k.tolist()
    dense = spec.replace(cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=-1, max_seqlen_k=-1)
    for b in range(len(cq) - 1):
        if cq[b + 1] == cq[b] or ck[b + 1] == ck[b]:
            continue  # no queries, or no keys: zeros / -inf, already in place
        al = spec.alibi_slopes
        sb = dense if al is None or al.dim() == 1 else dense.replace(alibi_slopes=al[b])
        yield b, (cq[b], cq[b + 1]), (ck[b], ck[b + 1]), sb


def _varlen_forward(backend: Backend, spec: AttnSpec, q, k, v, w, out32: bool = False):
    B, H, T, _ = q.shape  # B == 1
    out = q.new_zeros(B, H, T, v.shape[-1], dtype=backend.fwd_out_dtype(q.dtype) if out32 else q.dtype)
    lse = torch.full((B, H, T), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    for _, (q0, q1), (k0, k1), sb in sequences(spec):
        o, l = backend.forward(sb, q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], w, out32)
        out[:, :, q0:q1] = o
        lse[:, :, q0:q1] = l
    return out, lse


def _varlen_backward(backend: Backend, spec: AttnSpec, dout, q, k, v, w, out, lse) -> Grads:
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dw = None if w is None else torch.zeros_like(w, dtype=lse_dtype(w.dtype))
    rb = spec.rel_bias
    drb = None if rb is None else torch.zeros_like(rb, dtype=lse_dtype(rb.dtype))
    for _, (q0, q1), (k0, k1), sb in sequences(spec):
        g = backend.backward(sb, dout[:, :, q0:q1], q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], w,
                             out[:, :, q0:q1], lse[:, :, q0:q1])
        dq[:, :, q0:q1] = g.dq
        dk[:, :, k0:k1] = g.dk
        dv[:, :, k0:k1] = g.dv
        if dw is not None:
            dw += g.dw
        if drb is not None:
            drb += g.drel_bias
    return Grads(dq, dk, dv, None if dw is None else dw.to(w.dtype),
                 None if drb is None else drb.to(rb.dtype))
