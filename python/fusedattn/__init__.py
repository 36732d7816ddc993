"""fusedattn: fused additive (Bahdanau) and dot-product attention for PyTorch.

Importing the package imports neither triton nor the C++ extension and never
queries a GPU; ``available_backends()`` says which backends are usable here.
"""
from . import reference
from .api import additive_attention, attention_weights, available_backends, dot_product_attention

__all__ = [
    "additive_attention",
    "attention_weights",
    "available_backends",
    "dot_product_attention",
    "reference",
]
__version__ = "0.1.0"
