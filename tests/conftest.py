"""Test session set-up.

No machine here has a GPU: Triton kernels run under the interpreter on CPU
tensors. ``triton.jit`` reads TRITON_INTERPRET when a kernel module is imported,
so it is set here, before any test module imports one.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
