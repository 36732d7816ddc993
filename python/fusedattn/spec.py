"""One description of an attention call: the score and its modifiers (``AttnSpec``).

The public functions build an ``AttnSpec`` once, after validating every argument;
the op layer carries it through ``torch.library`` as plain arguments (the op schema
is generated from the spec's fields, so adding a modifier adds a field here and
nothing in ``ops.py``); backends declare which score kinds and modifiers they serve
and read the call from the spec.

Semantics (all backends, forward and backward)::

    s_ij  = additive: sum_a w[h,a] tanh(q_ia + k_ja)      dot: scale * q_i . k_j
    s_ij  = softcap * tanh(s_ij / softcap)                  (dot, softcap > 0)
    s_ij += rel_bias[h, clamp(d, -(M-1), M-1) + M - 1]      (rel_bias (H, 2M-1))
    s_ij -= alibi_slopes[(b,) h] * |d|                      (alibi_slopes (H,) or (B, H))
    d     = j - i - (Lk - Lq)                               (bottom-right aligned distance)

Key ``j`` is allowed for query ``i`` of batch ``b`` when ``j < key_lengths[b]`` and
``-left <= d <= right`` for ``window = (left, right)`` (``-1``: unbounded on that side);
``causal=True`` is the window ``(left, 0)``. With ``cu_seqlens_q/k`` (varlen) the batch is
packed: sequence ``b`` is rows ``cu_seqlens[b]:cu_seqlens[b+1]`` and ``Lq``, ``Lk``, ``d``,
the window and the biases are per sequence.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

SCORES = ("additive", "dot")
# every modifier a backend may declare; ``AttnSpec.modifiers()`` names those a call uses
MODIFIERS = ("key_lengths", "causal", "window", "softcap", "rel_bias", "alibi", "varlen")


def _f(schema: str, default=None, **kw):
    return field(default=default, metadata={"schema": schema}, **kw)


@dataclass(frozen=True)
class AttnSpec:
    """The score kind and modifiers of one call (validated by ``fusedattn.api``).

    Tensor fields travel as op inputs, the others as op scalars; the field order is the
    order of the op arguments (``ops.py`` generates the schema from ``schema_args()``).
    """

    score: str = _f("str", "dot")
    scale: float = _f("float", 1.0)
    softcap: float = _f("float", 0.0)
    window_left: int = _f("int", -1)
    window_right: int = _f("int", -1)
    key_lengths: Optional[Tensor] = _f("Tensor?", None, compare=False)
    rel_bias: Optional[Tensor] = _f("Tensor?", None, compare=False)
    alibi_slopes: Optional[Tensor] = _f("Tensor?", None, compare=False)
    cu_seqlens_q: Optional[Tensor] = _f("Tensor?", None, compare=False)
    cu_seqlens_k: Optional[Tensor] = _f("Tensor?", None, compare=False)
    max_seqlen_q: int = _f("int", -1)
    max_seqlen_k: int = _f("int", -1)

    # -- derived --------------------------------------------------------------------
    @property
    def window(self) -> tuple[int, int]:
        return (self.window_left, self.window_right)

    @property
    def causal(self) -> bool:
        """The mask is exactly causal (``window == (-1, 0)``)."""
        return self.window == (-1, 0)

    @property
    def has_window(self) -> bool:
        """A window other than none or plain causal."""
        return self.window not in ((-1, -1), (-1, 0))

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def additive(self) -> bool:
        return self.score == "additive"

    def modifiers(self) -> frozenset:
        """The modifiers this call uses (names from ``MODIFIERS``)."""
        used = {
            "key_lengths": self.key_lengths is not None,
            "causal": self.causal,
            "window": self.has_window,
            "softcap": self.softcap > 0,
            "rel_bias": self.rel_bias is not None,
            "alibi": self.alibi_slopes is not None,
            "varlen": self.varlen,
        }
        return frozenset(name for name, on in used.items() if on)

    def replace(self, **kw) -> AttnSpec:
        return dataclasses.replace(self, **kw)

    # -- op arguments (names fixed at import: tracing never inspects the dataclass) -----
    @staticmethod
    def tensor_names() -> tuple[str, ...]:
        return _TENSOR_NAMES

    @staticmethod
    def scalar_names() -> tuple[str, ...]:
        return _SCALAR_NAMES

    @staticmethod
    def schema_args(part: str) -> str:
        """``"Tensor? key_lengths, ..."`` (part="tensors") or ``"str score, ..."`` (part="scalars")."""
        names = _TENSOR_NAMES if part == "tensors" else _SCALAR_NAMES
        return ", ".join(f"{_SCHEMA[n]} {n}" for n in names)

    def tensor_args(self) -> tuple:
        return tuple(getattr(self, n) for n in _TENSOR_NAMES)

    def scalar_args(self) -> tuple:
        return tuple(getattr(self, n) for n in _SCALAR_NAMES)

    @classmethod
    def from_args(cls, tensors, scalars) -> AttnSpec:
        return cls(**dict(zip(_TENSOR_NAMES, tensors)), **dict(zip(_SCALAR_NAMES, scalars)))

    def __str__(self) -> str:
        mods = ",".join(sorted(self.modifiers())) or "none"
        return f"{self.score} attention (modifiers: {mods})"


_SCHEMA = {f.name: f.metadata["schema"] for f in dataclasses.fields(AttnSpec)}
_TENSOR_NAMES = tuple(n for n, s in _SCHEMA.items() if s == "Tensor?")
_SCALAR_NAMES = tuple(n for n, s in _SCHEMA.items() if s != "Tensor?")


def distance(Lq: int, Lk: int, device, row0: int = 0, rows: Optional[int] = None) -> Tensor:
    """``d[i, j] = j - i - (Lk - Lq)``, int64 ``(Lq, Lk)``: the bottom-right aligned distance
    (only query rows ``row0 : row0 + rows`` when ``rows`` is given)."""
    i = torch.arange(row0, row0 + (Lq - row0 if rows is None else rows), device=device).view(-1, 1)
    j = torch.arange(Lk, device=device).view(1, -1)
    return j - i - (Lk - Lq)
