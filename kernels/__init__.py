"""Triton kernels (installed as ``fusedattn.kernels``). Importing this package imports triton."""
