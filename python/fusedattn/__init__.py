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
