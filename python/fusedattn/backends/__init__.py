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
# "auto" tries these in order for each device type; reference is the last resort.
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}

_INSTANCES: dict[str, Backend] = {}
_IMPORT_ERRORS: dict[str, str] = {}


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Optional[Backend]:
    """The backend object, or None if its module cannot be imported (reason kept)."""
    if name in _INSTANCES:
        return _INSTANCES[name]
    if name in _IMPORT_ERRORS:
        return None
    mod_name, attr = _REGISTRY[name].split(":")
    try:
        backend = getattr(importlib.import_module(mod_name), attr)()
    except ImportError as e:  # a missing optional dependency, reported by available_backends()
        _IMPORT_ERRORS[name] = f"cannot import {mod_name}: {e}"
        return None
    _INSTANCES[name] = backend
    return backend


def unavailable_reason(name: str) -> Optional[str]:
    backend = get(name)
    if backend is None:
        return _IMPORT_ERRORS[name]
    return backend.unavailable_reason()


def available_backends() -> dict[str, Optional[str]]:
    """``{name: None if usable in this process, else the reason it is not}``."""
    return {name: unavailable_reason(name) for name in _REGISTRY}


def select(name: str, score: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Resolve ``name`` (a backend name or "auto") to a backend that can serve this call.

    Raises ``ValueError`` naming the reasons when an explicitly requested backend cannot.
    """
    if name == "auto":
        for cand in _AUTO_ORDER.get(q.device.type, ("reference",)):
            backend = get(cand)
            if backend is not None and not backend.not_supported_reasons(score, q, k, v):
                return cand
        return "reference"
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is unknown; choose one of {['auto', *_REGISTRY]}")
    backend = get(name)
    reasons = [_IMPORT_ERRORS[name]] if backend is None else \
        backend.not_supported_reasons(score, q, k, v)
    if reasons:
        raise ValueError(
            f"backend={name!r} cannot run {score} attention on q {tuple(q.shape)} "
            f"{q.dtype} on {q.device}: " + "; ".join(reasons))
    return name
