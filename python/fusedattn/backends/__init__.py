"""Backend registry: which backends exist, which are usable here, and which serves a call.

Backends are imported lazily: importing ``fusedattn`` never imports triton, never
loads the C++ extension and never queries a GPU.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .base import Backend

# name -> "module:attribute" of a zero-argument factory returning a Backend
_REGISTRY = {
    "reference": "fusedattn.backends.reference_backend:ReferenceBackend",
    "triton": "fusedattn.backends.triton_backend:TritonBackend",
    "cpu": "fusedattn.backends.cpu_backend:CpuBackend",
}
# "auto" tries these in order for each device type; reference is the last resort (other device types
# try it alone, and a call it cannot serve either raises, see ``resolve``).
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}

_INSTANCES: dict[str, Backend] = {}
_IMPORT_ERRORS: dict[str, str] = {}


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _import(name: str):
    """The backend's module, through import statements: torch.compile traces those (it runs them),
    not importlib.import_module, so the first call of a process may be a compiled one."""
    if name == "reference":
        from . import reference_backend as module
    elif name == "cpu":
        from . import cpu_backend as module
    elif name == "triton":
        from . import triton_backend as module
    else:
        module = importlib.import_module(_REGISTRY[name].split(":")[0])
    return module


def get(name: str) -> Optional[Backend]:
    """The backend object, or None if its module cannot be imported (reason kept)."""
    if name in _INSTANCES:
        return _INSTANCES[name]
    if name in _IMPORT_ERRORS:
        return None
    mod_name, attr = _REGISTRY[name].split(":")
    try:
        backend = getattr(_import(name), attr)()
    except ImportError as e:  # a missing optional dependency, reported by available_backends()
        _IMPORT_ERRORS[name] = f"cannot import {mod_name}: {e}"
        return None
    _INSTANCES[name] = backend
    return backend


def fwd_out_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """``Backend.fwd_out_dtype`` read from the backend's class: no instance is made (fake kernels call
    this while torch.compile traces, and a new entry in ``_INSTANCES`` then would fail its guards)."""
    cls = getattr(_import(name), _REGISTRY[name].split(":")[1])
    return cls.fwd_out_dtype(cls, dtype)


def unavailable_reason(name: str) -> Optional[str]:
    backend = get(name)
    if backend is None:
        return _IMPORT_ERRORS[name]
    return backend.unavailable_reason()


def available_backends() -> dict[str, Optional[str]]:
    """``{name: None if usable in this process, else the reason it is not}``."""
    return {name: unavailable_reason(name) for name in _REGISTRY}


def resolve(name: str, spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[str, dict]:
    """``(chosen, skipped)``: the backend that serves this call and, for each backend tried and
    passed over, the reasons. ``spec`` is an ``AttnSpec`` or a score name (no modifiers).

    Raises ``ValueError`` naming the reasons when an explicitly requested backend cannot serve, or
    when no backend serves an ``"auto"`` call (a device no backend runs on, e.g. ``meta``).
    """
    if name == "auto":
        skipped = {}
        for cand in _AUTO_ORDER.get(q.device.type, ("reference",)):
            backend = get(cand)
            reasons = [_IMPORT_ERRORS[cand]] if backend is None else \
                backend.not_supported_reasons(spec, q, k, v)
            if not reasons:
                return cand, skipped
            skipped[cand] = reasons
        why = "; ".join(f"{n}: {', '.join(r)}" for n, r in skipped.items())
        raise ValueError(f"no backend can run {spec if isinstance(spec, str) else str(spec)} on q "
                         f"{tuple(q.shape)} {q.dtype} on {q.device} ({why})")
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is unknown; choose one of {['auto', *_REGISTRY]}")
    backend = get(name)
    reasons = [_IMPORT_ERRORS[name]] if backend is None else backend.not_supported_reasons(spec, q, k, v)
    if reasons:
        what = spec if isinstance(spec, str) else str(spec)
        raise ValueError(f"backend={name!r} cannot run {what} on q {tuple(q.shape)} "
                         f"{q.dtype} on {q.device}: " + "; ".join(reasons))
    return name, {}


def select(name: str, spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The name of the backend that serves this call (see ``resolve``)."""
    return resolve(name, spec, q, k, v)[0]
