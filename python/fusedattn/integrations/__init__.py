"""Adapters that plug fusedattn into other libraries.

``fusedattn.integrations.transformers``: HuggingFace transformers' ``AttentionInterface``
(``register()``, then ``attn_implementation="fusedattn"``). Each adapter imports its library
only when used; importing this package imports nothing else.
"""

__all__ = ["transformers"]


def __getattr__(name: str):
    if name in __all__:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
