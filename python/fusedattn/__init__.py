"""fusedattn: fused additive (Bahdanau) and dot-product attention for PyTorch.

Importing the package imports neither triton nor the C++ extension and never
queries a GPU; ``available_backends()`` says which backends are usable here.
"""
from . import reference
from .api import (
    ReferenceFallbackWarning,
    Resolution,
    additive_attention,
    additive_attention_varlen,
    attention_weights,
    available_backends,
    dot_product_attention,
    dot_product_attention_varlen,
    resolve_backend,
)
from .spec import AttnSpec

__all__ = [
    "AttnSpec",
    "ReferenceFallbackWarning",
    "Resolution",
    "additive_attention",
    "additive_attention_varlen",
    "attention_weights",
    "available_backends",
    "dot_product_attention",
    "dot_product_attention_varlen",
    "reference",
    "resolve_backend",
]
__version__ = "0.1.0"

# submodules reachable as attributes (``fusedattn.nn``) and imported on first access, so that
# ``import fusedattn`` stays as light as before; ``from fusedattn import nn`` works as usual
_LAZY_SUBMODULES = ("nn", "viz", "distributed", "integrations", "testing")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the submodule exists but one of its own imports is missing
            raise AttributeError(f"module {__name__!r} has no attribute {name!r} "
                                 f"(fusedattn.{name} is not installed in this version)") from e
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
