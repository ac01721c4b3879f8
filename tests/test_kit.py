"""tests/kit.py: the closeness rules fail where they must, and no test file keeps a tolerance table of its own."""

import ast
import math
from pathlib import Path

import pytest
import torch
from kit import (
    TOLERANCES,
    FakeTimer,
    assert_close,
    assert_close_avg,
    assert_close_lse,
    assert_within_own_error,
    tf32,
    tol,
)

TESTS = Path(__file__).parent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_assert_close_scales_atol_with_sqrt_k(dtype):
    want = torch.zeros(8, dtype=torch.float64)
    t = tol(dtype)
    just_in = torch.full((8,), 0.9 * t.atol * math.sqrt(64), dtype=dtype)
    assert_close(just_in, want, 64)
    with pytest.raises(AssertionError):
        assert_close(just_in, want, 1)  # the same error over a length-1 reduction is too large
    assert_close(just_in * 3, want, 64, scale=4.0)  # products 4x larger: 4x the room


def test_assert_close_uses_the_output_dtype():
    want = torch.ones(4, dtype=torch.float64)
    off = want * (1 + 5e-4)
    assert_close(off.half(), want)  # within fp16's rtol
    with pytest.raises(AssertionError):
        assert_close(off.float(), want)  # far outside fp32's


def test_own_error_rule():
    want = torch.linspace(-1, 1, 16, dtype=torch.float64)
    own = want + 1e-3  # PyTorch's own fp16 computation is 1e-3 off
    assert_within_own_error(want + 2e-3, want, own, torch.float16)  # 2x own
    with pytest.raises(AssertionError, match="max error"):
        assert_within_own_error(want + 2e-3 + 3 * tol(torch.float16).own_atol, want, own, torch.float16)


def test_avg_and_lse_rules():
    want = torch.tensor([0.5, -0.25], dtype=torch.float64)
    assert_close_avg(want.half(), want)
    with pytest.raises(AssertionError):
        assert_close_avg((want + 0.01).half(), want)
    lse = torch.tensor([1.0, float("-inf")], dtype=torch.float64)
    assert_close_lse(lse.float(), lse, torch.float16)
    with pytest.raises(AssertionError, match="-inf"):
        assert_close_lse(torch.tensor([1.0, 0.0]), lse, torch.float16)


def test_every_dtype_has_every_tolerance():
    assert set(TOLERANCES) == {torch.float64, torch.float32, torch.float16, torch.bfloat16}
    for t in TOLERANCES.values():
        assert 0 < t.rtol < 0.1 and 0 < t.atol < 0.1 and 0 < t.own_atol < 0.1 and 0 < t.lse < 0.1
    # the fp16 atol catches an fp16 accumulator (~5e-4 per sqrt(K) for unit products), fp32's fp32 rounding x 10
    assert tol(torch.float16).atol < 5e-4 and tol(torch.float32).atol > 10 * 2.0 ** -24


def test_fake_timer():
    timer = FakeTimer(fastest="b")
    ran = []
    assert timer("a", lambda: ran.append("a")) == 5.0 and timer("b", lambda: ran.append("b")) == 1.0
    assert ran == timer.calls == ["a", "b"]
    assert FakeTimer({"a": 2.5})("a", lambda: None) == 2.5
    with pytest.raises(ValueError):
        FakeTimer()


def test_tf32_restores_the_setting():
    from sparse_triton.kernels._launch import tf32_enabled

    before = tf32_enabled()
    with tf32(not before):
        assert tf32_enabled() is (not before)
    assert tf32_enabled() is before


def _is_dtype_key(node) -> bool:
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch"
            and node.attr in ("float16", "float32", "float64", "bfloat16", "half", "float", "double"))


@pytest.mark.parametrize("path", sorted(p.name for p in TESTS.glob("test_*.py")))
def test_no_test_file_keeps_its_own_tolerances(path):
    """Tolerances live in kit.py only: a dict keyed by torch dtypes whose values are numbers or tuples of
    numbers, or a local ``assert_close`` helper, is a copy that will drift."""
    tree = ast.parse((TESTS / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and node.keys and all(_is_dtype_key(k) for k in node.keys):
            numeric = all(isinstance(v, ast.Constant | ast.Tuple | ast.UnaryOp | ast.BinOp) for v in node.values)
            assert not numeric, f"{path}:{node.lineno}: a per-dtype tolerance table; use kit.tol / kit.TOLERANCES"
        if isinstance(node, ast.FunctionDef):
            assert node.name not in ("assert_close", "_assert_close", "assert_close_ref", "_tol", "_check"), \
                f"{path}:{node.lineno}: a local closeness helper {node.name}; use kit's"
