"""Test tiers.

CPU tier (default, CI): ``TRITON_INTERPRET=1`` is set here, before anything imports Triton, so the
real kernels run interpreted on CPU tensors (fp16/fp32; the interpreter computes bf16 wrongly).
GPU tier: ``SPARSE_TRITON_GPU_TESTS=1`` leaves the interpreter off and runs the same tests on CUDA
with compiled kernels, plus the ``gpu``-marked tests (bf16, CUDA-graph capture).
"""

import os

GPU_TIER = os.environ.get("SPARSE_TRITON_GPU_TESTS", "0") == "1"
if not GPU_TIER:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    import tempfile

    # Tests never read or write the user's tuning cache; shapes run their heuristic defaults unless a
    # test turns tuning on (tests/test_gpu_tuning.py), so the tier's time goes to the tests themselves.
    os.environ["SPARSE_TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparse_triton_test_cache_")
    os.environ.setdefault("SPARSE_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("default", max_examples=12, deadline=None, derandomize=True, print_blob=True)
settings.load_profile("default")

DEVICE = "cuda" if GPU_TIER and torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # pytest -n 2 on 2 cores: intra-op threads on top of the workers oversubscribe the machine and make
    # small CPU ops (the interpreter issues thousands) several times slower.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cuda":
        return
    why = pytest.mark.skip(reason="needs a CUDA GPU and SPARSE_TRITON_GPU_TESTS=1 (the GPU tier)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(why)


@pytest.fixture
def device() -> str:
    """Where the kernels under test run: ``cpu`` (interpreted) or ``cuda`` (compiled, GPU tier)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tuner_factory(tmp_path):
    """``make(timer, **kw)`` -> a :class:`Tuner` that tunes on CPU into ``tmp_path`` as the H100 of
    ``kit.H100_INFO``; the default tuner and the prepared weight forms are restored afterwards."""
    from kit import H100_INFO

    import sparse_triton as st
    from sparse_triton.ops import _prepared
    from sparse_triton.tuning.tuner import Tuner

    def make(timer, **kw):
        kw.setdefault("device_info", H100_INFO)
        kw.setdefault("tune_on_cpu", True)
        return Tuner(timer=timer, cache_root=tmp_path / "cache", shipped_dir=tmp_path / "shipped", **kw)

    previous = st.tuning.set_default_tuner(None)
    yield make
    st.tuning.set_default_tuner(previous)
    _prepared.clear_weight_cache()


@pytest.fixture
def set_tf32():
    """``set_tf32(on)``: TF32 for fp32 matmuls on or off for the rest of the test (``kit.tf32``), restored at
    teardown."""
    import contextlib

    from kit import tf32

    with contextlib.ExitStack() as stack:
        yield lambda on: stack.enter_context(tf32(on))
