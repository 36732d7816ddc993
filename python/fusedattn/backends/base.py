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
- ``out (B, H, Lq, Dv)`` in the input dtype; ``lse (B, H, Lq)`` in float32
  (float64 for float64 inputs), natural log. A row with no allowed key has
  ``out = 0``, ``lse = -inf`` and contributes zero gradients.
- Backward returns ``dq`` like ``q``, ``dk``/``dv`` like ``k``/``v`` (grouped heads
  summed), and for additive ``dw (H, D)``; all in the input dtype.
"""
from __future__ import annotations

from typing import Optional

import torch


class Backend:
    """Base class: declarations plus the four launchers."""

    name: str = ""
    devices: frozenset = frozenset()
    dtypes: frozenset = frozenset()
    max_head_dim: int = 1 << 30
    description: str = ""

    # -- environment ----------------------------------------------------------
    def unavailable_reason(self) -> Optional[str]:
        """None when the backend can run in this process, else why it cannot."""
        return None

    # -- per call ---------------------------------------------------------------
    def not_supported_reasons(self, score: str, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor) -> list[str]:
        """Why this backend cannot serve a call on these tensors (empty: it can)."""
        reasons = []
        env = self.unavailable_reason()
        if env is not None:
            reasons.append(env)
        if q.device.type not in self.devices:
            reasons.append(f"device {q.device.type!r} not in {sorted(self.devices)}")
        if q.dtype not in self.dtypes:
            reasons.append(f"dtype {q.dtype} not in {sorted(str(d) for d in self.dtypes)}")
        d, dv = q.shape[-1], v.shape[-1]
        if max(d, dv) > self.max_head_dim:
            reasons.append(f"head dim {max(d, dv)} > max_head_dim={self.max_head_dim}")
        return reasons

    # -- launchers ----------------------------------------------------------------
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
