"""Build fusedattn: the pure-Python package, the Triton kernels (as fusedattn.kernels)
and, when a C++ compiler is present, the CPU extension fusedattn._C from csrc/.

Install with `pip install --no-build-isolation -e .` so the torch already installed
is used (an isolated build would pull a CUDA torch).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("FUSEDATTN_NO_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        "fusedattn._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fusedattn",
    version="0.1.0",
    description="Fused additive (Bahdanau) and dot-product attention kernels for PyTorch",
    packages=["fusedattn", "fusedattn.kernels",
              *(f"fusedattn.{p}" for p in find_packages("python/fusedattn"))],
    package_dir={"fusedattn": "python/fusedattn", "fusedattn.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton"],
        "viz": ["matplotlib"],
        "transformers": ["transformers>=5.24"],   # the version the integration is tested with
        "test": ["pytest", "pytest-benchmark", "hypothesis", "ruff"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
