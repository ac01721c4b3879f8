"""The public surface: ``__all__``, no CUDA at import, registered custom ops, runnable docstrings."""

import doctest
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparse_triton as st

REPO = Path(__file__).resolve().parents[1]

EXPECTED_ALL = {
    "ActSparseLinearFunction",
    "ActivationSparsity",
    "BlockMask",
    "BlockSparseAttentionFunction",
    "NMLinearFunction",
    "NMSparsity",
    "NMTensor",
    "Thresholds",
    "__version__",
    "act_sparse_linear",
    "act_sparse_mlp",
    "activation_sparsity_report",
    "block_sparse_attention",
    "calibrate_thresholds",
    "nm_compress",
    "nm_linear",
    "nm_mask",
    "nm_prune",
    "nn",
    "ops",
    "sparsify",
    "tuning",
}

CUSTOM_OPS = ["nm_linear_fwd", "nm_linear_bwd_dx", "nm_linear_bwd_dvalues", "nm_prune_compress",
              "act_sparse_linear_fwd", "act_sparse_nm_linear_fwd", "act_sparse_linear_bwd_dx",
              "act_sparse_linear_bwd_dw", "act_sparse_mlp_fwd"]

DOCTEST_MODULES = [
    "sparse_triton.formats.block_mask",
    "sparse_triton.reference.attention",
    "sparse_triton.ops.attention",
    "sparse_triton.nn.attention",
    "sparse_triton.reference.block_scores",
    "sparse_triton.formats.nm",
    "sparse_triton.ops.act_sparse",
    "sparse_triton.calibration",
    "sparse_triton.nn.act_sparse",
    "sparse_triton.ops.nm_linear",
    "sparse_triton.nn.linear",
    "sparse_triton.sparsify",
    "sparse_triton.tuning",
    "sparse_triton.tuning.cache",
    "sparse_triton.tuning.mode",
    "sparse_triton.tuning.tables",
]


def test_all_is_exact_and_resolves():
    assert set(st.__all__) == EXPECTED_ALL
    assert len(st.__all__) == len(set(st.__all__))  # no duplicates
    for name in st.__all__:
        assert getattr(st, name) is not None, name
    assert isinstance(st.__version__, str)


def test_public_names_are_the_documented_objects():
    from sparse_triton.formats import nm
    from sparse_triton.nn import SparseLinear

    # importlib: sparse_triton.ops re-exports the function nm_linear over its submodule of that name.
    ops_nm_linear = importlib.import_module("sparse_triton.ops.nm_linear")
    assert st.nm_compress is nm.nm_compress and st.NMTensor is nm.NMTensor
    assert st.nm_linear is ops_nm_linear.nm_linear and st.NMLinearFunction is ops_nm_linear.NMLinearFunction
    assert st.nn.SparseLinear is SparseLinear
    assert st.nn.__all__ == ["ActSparseLinear", "ActSparseMLP", "BlockSparseAttention", "SparseLinear",
                            "pooled_block_scores"]
    ops_attention = importlib.import_module("sparse_triton.ops.attention")
    assert st.block_sparse_attention is ops_attention.block_sparse_attention
    assert st.BlockMask is importlib.import_module("sparse_triton.formats.block_mask").BlockMask
    ops_act = importlib.import_module("sparse_triton.ops.act_sparse")
    assert st.act_sparse_linear is ops_act.act_sparse_linear and st.act_sparse_mlp is ops_act.act_sparse_mlp
    assert st.calibrate_thresholds is importlib.import_module("sparse_triton.calibration").calibrate_thresholds
    assert callable(st.sparsify)


def test_subpackage_all_resolves():
    for modname in ("sparse_triton.nn", "sparse_triton.ops", "sparse_triton.formats", "sparse_triton.formats.nm",
                    "sparse_triton.formats.block_mask", "sparse_triton.reference", "sparse_triton.tuning"):
        mod = importlib.import_module(modname)
        for name in mod.__all__:
            assert hasattr(mod, name), f"{modname}.{name}"


# Spies on the torch.cuda entry points that query or initialise the driver, installed before the import.
_NO_CUDA_SCRIPT = textwrap.dedent("""
    import torch
    calls = []
    def spy(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper
    for name in ("_lazy_init", "init", "is_available", "device_count", "current_device",
                 "get_device_properties", "get_device_capability", "get_device_name", "synchronize"):
        setattr(torch.cuda, name, spy(name, getattr(torch.cuda, name)))
    import sparse_triton as st
    assert not torch.cuda.is_initialized(), "CUDA initialised by import"
    assert calls == [], f"torch.cuda queried at import: {calls}"
    # CPU work does not touch CUDA either.
    w = st.nm_compress(torch.randn(8, 16), 2, 4)
    st.nm_linear(torch.randn(2, 16), w)
    st.sparsify(torch.nn.Sequential(torch.nn.Linear(16, 8)), st.NMSparsity(2, 4))
    assert not torch.cuda.is_initialized(), "CUDA initialised by a CPU op"
    assert calls == [], f"torch.cuda queried by a CPU op: {calls}"
    print("ok")
""")


@pytest.mark.slow  # a fresh interpreter importing torch and triton: ~2.5 s
def test_import_does_not_touch_cuda():
    env = dict(os.environ)  # same env as this process (TRITON_INTERPRET included)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", _NO_CUDA_SCRIPT], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


@pytest.mark.parametrize("name", CUSTOM_OPS)
def test_custom_ops_are_registered(name):
    assert hasattr(torch.ops.sparse_triton, name)
    packet = getattr(torch.ops.sparse_triton, name)
    assert isinstance(packet, torch._ops.OpOverloadPacket)
    assert packet.default._schema.name == f"sparse_triton::{name}"


@pytest.mark.parametrize("modname", DOCTEST_MODULES)
def test_docstring_examples_run(modname):
    # importlib, not attribute access: the package re-exports the function sparsify over the module.
    mod = importlib.import_module(modname)
    result = doctest.testmod(mod, extraglobs={"torch": torch}, verbose=False, report=True)
    assert result.attempted > 0, f"{modname} has no docstring examples"
    assert result.failed == 0


def test_public_functions_have_examples():
    for obj in (st.nm_mask, st.nm_prune, st.nm_compress, st.nm_linear, st.sparsify, st.NMSparsity, st.NMTensor,
                st.nn.SparseLinear, st.BlockMask, st.BlockMask.from_dense, st.block_sparse_attention,
                st.nn.BlockSparseAttention, st.act_sparse_linear, st.act_sparse_mlp, st.calibrate_thresholds):
        assert obj.__doc__ and ">>>" in obj.__doc__, obj.__name__
