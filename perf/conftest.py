"""Fixtures for ``pytest perf`` (pytest-benchmark entries; GPU only).

``pytest perf`` must name the directory: the repository's pytest config collects ``tests/`` by default.
Unlike ``tests/conftest.py``, nothing here sets ``TRITON_INTERPRET``: these benchmarks time compiled
kernels, and the test module skips itself when the interpreter is on or no CUDA GPU is present.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import pytest
import torch

try:
    import pytest_benchmark  # noqa: F401 - only probing whether the plugin (and its fixture) exists
except ImportError:

    @pytest.fixture
    def benchmark() -> None:
        """Stand-in for pytest-benchmark's fixture on machines without the plugin."""
        pytest.skip("pytest-benchmark is not installed; the JSON suites (python -m perf.suites.*) need only torch")


NMWeight = tuple[object, torch.Tensor]


@pytest.fixture(scope="session")
def nm_weight() -> Callable[[int, int, int, int, torch.dtype], NMWeight]:
    """Factory ``(N, K, n, m, dtype) -> (st.NMTensor, dense pruned weight)`` on CUDA, cached per session.

    The weight is random (fixed seed), never zeros: zeros hide indexing bugs and can time faster.
    """
    import sparse_triton as st

    cache: dict[tuple[int, int, int, int, torch.dtype], NMWeight] = {}

    def make(N: int, K: int, n: int, m: int, dtype: torch.dtype) -> NMWeight:
        key = (N, K, n, m, dtype)
        if key not in cache:
            gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(key).encode()))
            w = torch.randn(N, K, device="cuda", generator=gen).mul_(K ** -0.5).to(dtype)
            w_nm = st.nm_compress(w, n, m)
            cache[key] = (w_nm, w_nm.to_dense().contiguous())
        return cache[key]

    return make
