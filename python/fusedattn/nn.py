"""Attention layers for encoder-decoder models, on top of the fused kernels.

``AdditiveAttention`` (Bahdanau et al., 2015) and ``LuongAttention`` (Luong et al.,
2015) are drop-in replacements for the hand-written layers of a seq2seq model. They
compute the context ``c_i = sum_j alpha_ij h_j`` with ``fusedattn.additive_attention``
or ``fusedattn.dot_product_attention``, so the ``(B, Lq, Lk)`` weights (and, for
additive scores, the ``(B, Lq, Lk, attn_dim)`` tanh tensor) are never stored while
training, whatever backend ``"auto"`` picks. The weights are recomputed exactly
from the log-sum-exp only when asked for (``return_weights=True``, for plots).

Shapes::

    query          (B, Lq, query_dim)   all decoder steps at once (teacher forcing)
                   (B, query_dim)       one decoder step
    memory         (B, Lk, key_dim)     encoder states h_j, or the cache of precompute()
    memory_lengths (B,) int             number of valid source positions, in [0, Lk]
    context        (B, Lq, output_dim)  or (B, output_dim) for a one-step query
    weights        (B, heads, Lq, Lk)   or (B, heads, Lk) for a one-step query; in the context's
                                        dtype (autocast's under torch.autocast)

A decoder that queries step by step calls ``precompute(memory, lengths)`` once and
passes the returned cache as ``memory``: the source is projected once, not once per
step. Each query row is independent (no causal mask), so step-by-step decoding gives
the same contexts as one call over all steps.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import api, backends

__all__ = ["AdditiveAttention", "AttentionCache", "LuongAttention"]


class AttentionCache(NamedTuple):
    """The projected source, computed once per sequence by ``precompute``.

    keys ``(B, heads, Lk, head_dim)``, values ``(B, heads, Lk, value_head_dim)`` (views,
    possibly with stride 0 over heads), lengths ``(B,)`` int64 or None.
    """

    keys: Tensor
    values: Tensor
    lengths: Optional[Tensor]


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _autocast_on(t: Tensor) -> bool:
    """torch.autocast is active for t's device (the projections and the ops then pick the dtype)."""
    dev = t.device.type
    return dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)


class _Attention(nn.Module):
    """Shared input handling: validation, precompute, step/sequence queries, weights."""

    query_dim: int
    key_dim: int
    heads: int
    output_dim: int
    backend: str

    # subclasses implement these three ------------------------------------------------
    def _keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory (B, Lk, key_dim) -> keys (B, heads, Lk, Dk), values (B, heads, Lk, Dv)."""
        raise NotImplementedError

    def _queries(self, query: Tensor) -> Tensor:
        """query (B, Lq, query_dim) -> (B, heads, Lq, Dk)."""
        raise NotImplementedError

    def _attend(self, q: Tensor, cache: AttentionCache, return_weights: bool):
        """-> (out (B, heads, Lq, Dv), weights (B, heads, Lq, Lk) or None)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------
    def _param_dtype(self) -> Optional[torch.dtype]:
        for p in self.parameters():
            return p.dtype
        return None

    def _param_device(self) -> Optional[torch.device]:
        for p in self.parameters():
            return p.device
        return None

    def _check_memory(self, memory, memory_lengths) -> Optional[Tensor]:
        if not isinstance(memory, Tensor):
            raise TypeError(f"memory must be a torch.Tensor of shape (B, Lk, key_dim={self.key_dim}) "
                            f"or the AttentionCache returned by precompute(), got {type(memory).__name__}")
        api._check_layout("memory", memory)
        pdev = self._param_device()
        if pdev is not None and memory.device != pdev:
            raise ValueError(f"memory is on {memory.device} but the module's parameters are on {pdev}")
        if memory.dim() != 3 or memory.shape[-1] != self.key_dim:
            raise ValueError(f"memory must have shape (B, Lk, key_dim={self.key_dim}), got {_shape(memory)}")
        if not memory.dtype.is_floating_point:
            raise TypeError(f"memory must be a floating tensor, got {memory.dtype}")
        pd = self._param_dtype()
        if pd is not None and memory.dtype != pd and not _autocast_on(memory):
            raise TypeError(f"memory has dtype {memory.dtype} but the module's parameters are {pd}; "
                            f"convert one of them (e.g. module.to({memory.dtype}))")
        return self._check_lengths(memory_lengths, memory.shape[0], memory.shape[1], memory.device)

    @staticmethod
    def _check_lengths(memory_lengths, B: int, Lk: int, device) -> Optional[Tensor]:
        if memory_lengths is None:
            return None
        if isinstance(memory_lengths, (list, tuple)):
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in memory_lengths):
                raise TypeError("memory_lengths given as a list/tuple must hold Python ints")
            memory_lengths = torch.tensor(memory_lengths, dtype=torch.int64, device=device)
        if not isinstance(memory_lengths, Tensor):
            raise TypeError(f"memory_lengths must be None, a list of ints or an integer tensor of shape "
                            f"(B,) = ({B},), got {type(memory_lengths).__name__}")
        api._check_layout("memory_lengths", memory_lengths)
        if memory_lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"memory_lengths must have dtype int32 or int64, got {memory_lengths.dtype}")
        if memory_lengths.device != device and memory_lengths.device.type != "cpu":  # CPU lengths are moved
            raise ValueError(f"memory_lengths is on {memory_lengths.device} but memory is on {device}")
        if _shape(memory_lengths) != (B,):
            raise ValueError(f"memory_lengths must have shape (B,) = ({B},) for memory with B={B}, "
                             f"got {_shape(memory_lengths)}")
        # the value check reads the data: eagerly here (to name memory_lengths); under torch.compile /
        # torch.export the op checks the range itself (key_lengths), so tracing never reads data
        if memory_lengths.numel() and not torch.compiler.is_compiling():
            lo, hi = int(memory_lengths.min()), int(memory_lengths.max())
            if lo < 0 or hi > Lk:
                raise ValueError(f"memory_lengths must lie in [0, Lk={Lk}], got values in [{lo}, {hi}]")
        return memory_lengths.to(device=device, dtype=torch.int64)

    def _cache_dims(self) -> tuple[int, int, int]:
        """(heads, key head dim, value head dim) of the caches this module's precompute() returns."""
        raise NotImplementedError

    def _check_cache(self, cache: AttentionCache) -> None:
        heads, dk, dv = self._cache_dims()
        keys, values = cache.keys, cache.values
        ok = (isinstance(keys, Tensor) and isinstance(values, Tensor) and keys.dim() == 4
              and values.dim() == 4 and keys.shape[1] == heads and keys.shape[3] == dk
              and _shape(values)[1:4:2] == (heads, dv))
        if not ok:
            got = (f"keys {_shape(keys) if isinstance(keys, Tensor) else type(keys).__name__}, values "
                   f"{_shape(values) if isinstance(values, Tensor) else type(values).__name__}")
            raise ValueError(
                f"memory is an AttentionCache that this module's precompute() did not make: it has {got}, "
                f"but this module's caches have keys (B, heads={heads}, Lk, {dk}) and values "
                f"(B, heads={heads}, Lk, {dv}); call precompute() on this module")

    def precompute(self, memory: Tensor, memory_lengths=None) -> AttentionCache:
        """Project the encoder states once; pass the result as ``memory`` to ``forward``.

        memory ``(B, Lk, key_dim)``; memory_lengths ``(B,)`` int tensor (or list of
        ints) of valid positions in ``[0, Lk]``, or None for all ``Lk``. Differentiable:
        gradients flow from every ``forward`` that uses the cache back to ``memory``.
        """
        lengths = self._check_memory(memory, memory_lengths)
        keys, values = self._keys_values(memory)
        return AttentionCache(keys, values, lengths)

    def forward(self, query: Tensor, memory, memory_lengths=None, *, return_weights: bool = False):
        """Attend from ``query`` over ``memory``.

        Args:
            query: ``(B, Lq, query_dim)`` (all decoder steps) or ``(B, query_dim)`` (one step).
            memory: encoder states ``(B, Lk, key_dim)``, or the ``AttentionCache`` from
                ``precompute`` (then give the lengths to ``precompute``, not here).
            memory_lengths: ``(B,)`` int tensor (or list of ints) of valid source positions;
                positions ``j >= memory_lengths[b]`` get weight 0. A row with length 0
                gets a zero context.
            return_weights: also return the exact attention weights, recomputed from the
                log-sum-exp (``(B, heads, Lq, Lk)``, or ``(B, heads, Lk)`` for a one-step
                query). Costs one extra pass over the scores, chunked over query rows.

        Returns:
            ``context`` of shape ``(B, Lq, output_dim)`` (or ``(B, output_dim)``), and
            ``(context, weights)`` with ``return_weights=True``.
        """
        return_weights = api._check_flag("return_weights", return_weights)
        if isinstance(memory, AttentionCache):
            if memory_lengths is not None:
                raise ValueError("memory is a precomputed AttentionCache: give memory_lengths to "
                                 "precompute(), not to forward()")
            self._check_cache(memory)
            cache = memory
        else:
            cache = self.precompute(memory, memory_lengths)
        B = cache.keys.shape[0]
        if not isinstance(query, Tensor):
            raise TypeError(f"query must be a torch.Tensor of shape (B, Lq, query_dim={self.query_dim}) "
                            f"or (B, query_dim), got {type(query).__name__}")
        api._check_layout("query", query)
        if query.dim() not in (2, 3) or query.shape[-1] != self.query_dim:
            raise ValueError(f"query must have shape (B, Lq, query_dim={self.query_dim}) or "
                             f"(B, query_dim), got {_shape(query)}")
        if query.shape[0] != B:
            raise ValueError(f"query and memory must share the batch size: query {_shape(query)}, "
                             f"memory batch {B}")
        if query.dtype != cache.keys.dtype and not _autocast_on(query):
            raise TypeError(f"query has dtype {query.dtype} but memory/parameters are {cache.keys.dtype}")
        if query.device != cache.keys.device:
            raise ValueError(f"query is on {query.device} but memory is on {cache.keys.device}")
        step = query.dim() == 2
        if step:
            query = query.unsqueeze(1)
        Lq = query.shape[1]
        q = self._queries(query)                                        # (B, heads, Lq, Dk)
        out, weights = self._attend(q, cache, return_weights)           # (B, heads, Lq, Dv)
        context = out.transpose(1, 2).reshape(B, Lq, self.output_dim)
        if step:
            context = context.squeeze(1)
            weights = None if weights is None else weights.squeeze(2)
        return (context, weights) if return_weights else context


class AdditiveAttention(_Attention):
    r"""Bahdanau (additive) attention, fused.

    ``score(s_i, h_j) = w^T tanh(W_a s_i + U_a h_j + b)`` per head, ``alpha = softmax_j``,
    ``context_i = sum_j alpha_ij v_j``.

    Args:
        query_dim: size of the decoder state ``s_i``.
        key_dim: size of the encoder state ``h_j``.
        attn_dim: total size of the tanh layer, **split across heads**
            (``attn_dim % heads == 0``; each head has ``attn_dim // heads`` units),
            as ``nn.MultiheadAttention`` splits ``embed_dim``.
        heads: number of attention heads, each with its own slice of ``W_a``/``U_a``
            and its own score vector ``w``.
        value_dim: None (default) attends over the raw encoder states, as Bahdanau's
            ``c_i = sum_j alpha_ij h_j``: every head reads the same ``h_j`` and the
            context is the concatenation of the heads' contexts, ``output_dim =
            heads * key_dim`` (``= key_dim`` for one head). An int adds a value
            projection ``V_a: key_dim -> value_dim`` split across heads
            (``value_dim % heads == 0``), ``output_dim = value_dim``.
        normalize: weight-normalized score vector, ``w = g * v / ||v||`` per head (``w = 0``, uniform
            weights, when ``v = 0``) with
            a learned scalar ``g`` (initialised to ``sqrt(1 / head_dim)``), as
            TensorFlow's ``BahdanauAttention(normalize=True)``; it always has the bias
            ``b`` inside the tanh.
        bias: learned bias ``b`` inside the tanh (``W_a`` and ``U_a`` themselves have
            none; one bias inside the tanh is all a sum of projections can have).
            Ignored (always on) with ``normalize=True``.
        backend: passed to ``fusedattn.additive_attention``: ``"auto"`` (the fastest
            usable one), ``"reference"``, ``"cpu"``, ``"triton"``.

    Parameters: ``query_proj.weight`` (``W_a``, ``(attn_dim, query_dim)``),
    ``key_proj.weight`` (``U_a``, ``(attn_dim, key_dim)``), ``score`` (``w`` or ``v``,
    ``(heads, head_dim)``), ``bias`` (``(attn_dim,)``, or None), ``gain`` (``g``,
    ``(heads,)``, only with ``normalize``), ``value_proj`` (only with ``value_dim``).
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int, *, heads: int = 1,
                 value_dim: Optional[int] = None, normalize: bool = False, bias: bool = True,
                 backend: str = "auto"):
        super().__init__()
        for name, val in (("query_dim", query_dim), ("key_dim", key_dim), ("attn_dim", attn_dim),
                          ("heads", heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if attn_dim % heads:
            raise ValueError(f"attn_dim={attn_dim} must be divisible by heads={heads} "
                             f"(attn_dim is split across heads)")
        if value_dim is not None:
            if isinstance(value_dim, bool) or not isinstance(value_dim, int) or value_dim < 1:
                raise ValueError(f"value_dim must be None or a positive int, got {value_dim!r}")
            if value_dim % heads:
                raise ValueError(f"value_dim={value_dim} must be divisible by heads={heads}")
        if not isinstance(backend, str) or backend not in ("auto", *backends.names()):
            raise ValueError(f"backend={backend!r} is unknown; choose one of "
                             f"{['auto', *backends.names()]}")
        self.query_dim, self.key_dim, self.attn_dim, self.heads = query_dim, key_dim, attn_dim, heads
        self.head_dim = attn_dim // heads
        self.value_dim = value_dim
        for name, val in (("normalize", normalize), ("bias", bias)):
            if not api._is_bool(val):
                raise TypeError(f"{name} must be a bool, got {type(val).__name__} {val!r}")
        self.normalize = bool(normalize)
        self.backend = backend
        self.output_dim = heads * key_dim if value_dim is None else value_dim
        self.query_proj = nn.Linear(query_dim, attn_dim, bias=False)
        self.key_proj = nn.Linear(key_dim, attn_dim, bias=False)
        self.value_proj = None if value_dim is None else nn.Linear(key_dim, value_dim, bias=False)
        self.score = nn.Parameter(torch.empty(heads, self.head_dim))
        self.bias = nn.Parameter(torch.zeros(attn_dim)) if (bias or normalize) else None
        self.gain = nn.Parameter(torch.full((heads,), math.sqrt(1.0 / self.head_dim))) if normalize else None
        bound = 1.0 / math.sqrt(self.head_dim)
        nn.init.uniform_(self.score, -bound, bound)

    def extra_repr(self) -> str:
        return (f"query_dim={self.query_dim}, key_dim={self.key_dim}, attn_dim={self.attn_dim}, "
                f"heads={self.heads}, value_dim={self.value_dim}, normalize={self.normalize}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")

    def score_vector(self) -> Tensor:
        """The effective ``w (heads, head_dim)`` (``g * v / ||v||`` with ``normalize``)."""
        if not self.normalize:
            return self.score
        # a zero v gives w = 0 (uniform weights), not NaN: the norm is clamped at the dtype's tiny
        eps = torch.finfo(self.score.dtype).tiny
        return self.gain.unsqueeze(1) * F.normalize(self.score, dim=1, eps=eps)

    def _cache_dims(self):
        dv = self.key_dim if self.value_dim is None else self.value_dim // self.heads
        return self.heads, self.head_dim, dv

    def _keys_values(self, memory):
        B, Lk, _ = memory.shape
        keys = self.key_proj(memory)
        if self.bias is not None:
            keys = keys + self.bias.to(keys.dtype)      # under autocast keys are already low precision
        keys = keys.view(B, Lk, self.heads, self.head_dim).transpose(1, 2)
        if self.value_proj is None:
            values = memory.unsqueeze(1).expand(B, self.heads, Lk, self.key_dim)
        else:
            values = self.value_proj(memory).view(B, Lk, self.heads, -1).transpose(1, 2)
        return keys, values

    def _queries(self, query):
        B, Lq, _ = query.shape
        return self.query_proj(query).view(B, Lq, self.heads, self.head_dim).transpose(1, 2)

    def _attend(self, q, cache, return_weights):
        w = self.score_vector()
        out, lse = api.additive_attention(q, cache.keys, cache.values, w, key_lengths=cache.lengths,
                                          return_lse=True, backend=self.backend)
        weights = None
        if return_weights:
            weights = api.attention_weights(q, cache.keys, w=w, lse=lse, key_lengths=cache.lengths)
            weights = weights.to(out.dtype)  # the context's dtype (autocast's, under autocast)
        return out, weights


class LuongAttention(_Attention):
    r"""Luong (global) attention, fused. The context ``c_t = sum_s a_t(s) h_s`` (``key_dim``).

    ``score``:
        ``"dot"``: ``h_t^T h_s`` (needs ``query_dim == key_dim``; unscaled, as Luong).
        ``"general"``: ``h_t^T W_a h_s``, ``W_a (query_dim, key_dim)``; the keys ``W_a h_s``
        are what ``precompute`` caches.
        ``"concat"``: ``v_a^T tanh(W_a [h_t; h_s])`` with ``W_a (attn_dim, query_dim +
        key_dim)`` and ``v_a (attn_dim,)``; the additive kernel runs it with ``W_a`` split
        into its query and key columns (no bias, as in the paper).

    ``attn_dim`` (concat only) defaults to ``key_dim``. Luong's attentional state
    ``tanh(W_c [c_t; h_t])`` is the caller's layer: this module returns ``c_t``
    (``output_dim = key_dim``), with ``heads = 1`` in the weights' shape.
    Parameters: ``W_a`` (``nn.Linear``, general and concat), ``v_a`` (concat).
    """

    def __init__(self, query_dim: int, key_dim: int, score: str = "dot", *, attn_dim: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__()
        for name, val in (("query_dim", query_dim), ("key_dim", key_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if score not in ("dot", "general", "concat"):
            raise ValueError(f"score must be 'dot', 'general' or 'concat', got {score!r}")
        if score == "dot" and query_dim != key_dim:
            raise ValueError(f"score='dot' needs query_dim == key_dim, got {query_dim} and {key_dim} "
                             f"(use score='general' to learn a map between them)")
        if score != "concat" and attn_dim is not None:
            raise ValueError(f"attn_dim is only used by score='concat', got attn_dim={attn_dim!r} "
                             f"with score={score!r}")
        attn_dim = key_dim if attn_dim is None else attn_dim
        if isinstance(attn_dim, bool) or not isinstance(attn_dim, int) or attn_dim < 1:
            raise ValueError(f"attn_dim must be None or a positive int, got {attn_dim!r}")
        if not isinstance(backend, str) or backend not in ("auto", *backends.names()):
            raise ValueError(f"backend={backend!r} is unknown; choose one of "
                             f"{['auto', *backends.names()]}")
        self.query_dim, self.key_dim, self.score, self.heads = query_dim, key_dim, score, 1
        self.attn_dim = attn_dim if score == "concat" else None
        self.output_dim = key_dim
        self.backend = backend
        self.W_a = None
        self.v_a = None
        if score == "general":
            self.W_a = nn.Linear(key_dim, query_dim, bias=False)         # keys W_a h_s live in query space
        elif score == "concat":
            self.W_a = nn.Linear(query_dim + key_dim, attn_dim, bias=False)
            self.v_a = nn.Parameter(torch.empty(attn_dim))
            nn.init.uniform_(self.v_a, -1.0 / math.sqrt(attn_dim), 1.0 / math.sqrt(attn_dim))

    def extra_repr(self) -> str:
        extra = f", attn_dim={self.attn_dim}" if self.score == "concat" else ""
        return (f"query_dim={self.query_dim}, key_dim={self.key_dim}, score={self.score!r}{extra}, "
                f"backend={self.backend!r}")

    def _cache_dims(self):
        dk = {"dot": self.key_dim, "general": self.query_dim, "concat": self.attn_dim}[self.score]
        return 1, dk, self.key_dim

    def _keys_values(self, memory):
        values = memory.unsqueeze(1)                                    # (B, 1, Lk, key_dim)
        if self.score == "dot":
            keys = values
        elif self.score == "general":
            keys = self.W_a(memory).unsqueeze(1)
        else:
            keys = (memory @ self.W_a.weight[:, self.query_dim:].t()).unsqueeze(1)
        return keys, values

    def _queries(self, query):
        if self.score == "concat":
            query = query @ self.W_a.weight[:, :self.query_dim].t()
        return query.unsqueeze(1)

    def _attend(self, q, cache, return_weights):
        weights = None
        if self.score == "concat":
            w = self.v_a.unsqueeze(0)
            out, lse = api.additive_attention(q, cache.keys, cache.values, w, key_lengths=cache.lengths,
                                              return_lse=True, backend=self.backend)
            if return_weights:
                weights = api.attention_weights(q, cache.keys, w=w, lse=lse, key_lengths=cache.lengths)
        else:
            out, lse = api.dot_product_attention(q, cache.keys, cache.values, scale=1.0,
                                                 key_lengths=cache.lengths, return_lse=True,
                                                 backend=self.backend)
            if return_weights:
                weights = api.attention_weights(q, cache.keys, scale=1.0, lse=lse,
                                                key_lengths=cache.lengths)
        # the context's dtype (autocast's, under autocast: "dot" and "general" queries stay float32)
        return out, (None if weights is None else weights.to(out.dtype))
