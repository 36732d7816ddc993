"""fusedattn: fused additive (Bahdanau) and dot-product attention for PyTorch."""
from .backends import available_backends

__all__ = ["available_backends"]
