"""pytest-benchmark settings for benchmarks/: torch threads (FUSEDATTN_BENCH_THREADS, default 2)."""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    torch.set_num_threads(int(os.environ.get("FUSEDATTN_BENCH_THREADS", "2")))
    yield
