"""The shared test kit: one tolerance table, the two closeness rules, a fake timer and the device facts
the tuning tests use. Every test file imports what it needs from here (``from kit import ...``; pytest
puts ``tests/`` on the path), so tolerances cannot drift between files.

Rules (shared/DESIGN.md, "Tolerances"):

- :func:`assert_close`: against an fp64 reference, ``rtol`` of the output dtype plus an ``atol`` that
  grows like ``sqrt(K)`` for a reduction of length ``K`` over products of magnitude ``scale``
  (an fp32 accumulator's error grows like ``sqrt(K)``).
- :func:`assert_within_own_error`: at most 2x PyTorch's own error in the same dtype, plus the dtype's
  ``own_atol`` relative to the reference's magnitude (for attention and other ops whose rounding
  PyTorch itself cannot avoid).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sparse_triton.tuning import cache as _cache


@dataclass(frozen=True)
class Tol:
    """Per-dtype tolerances.

    ``rtol``: relative, the output's rounding. ``atol``: absolute per ``sqrt(K)`` per unit product
    magnitude. The fp32 value is > 10x fp32 rounding (6e-8); the fp16 value is below the ~5e-4 an fp16
    accumulator would add, so an accumulation in the wrong dtype fails. ``own_atol``: the additive
    term of the "2x PyTorch's own error" rule, per unit of the reference's largest magnitude; also the
    absolute tolerance of softmax-weighted averages (attention outputs, magnitude ~1), with half of it as
    their relative tolerance. ``lse``: absolute and relative tolerance of a log-sum-exp (always computed in
    fp32; the error comes from the inputs' rounding).
    """

    rtol: float
    atol: float
    own_atol: float
    lse: float


TOLERANCES: dict[torch.dtype, Tol] = {
    torch.float64: Tol(rtol=1e-10, atol=1e-10, own_atol=1e-10, lse=1e-10),
    torch.float32: Tol(rtol=1e-5, atol=1e-6, own_atol=2e-5, lse=2e-5),
    torch.float16: Tol(rtol=1e-3, atol=1e-4, own_atol=2e-3, lse=1e-4),
    torch.bfloat16: Tol(rtol=8e-3, atol=8e-3, own_atol=1.6e-2, lse=1e-3),
}


def tol(dtype: torch.dtype) -> Tol:
    """The tolerances of ``dtype`` (a ``KeyError`` for a dtype with no entry: add one, never inline)."""
    return TOLERANCES[dtype]


def assert_close(got: torch.Tensor, want: torch.Tensor, K: int = 1, *, scale: float = 1.0, dtype=None,
                 msg: str | None = None) -> None:
    """``got`` (in ``dtype``, default its own) vs the fp64 ``want`` for a reduction of length ``K`` over
    products of magnitude ``scale``."""
    t = tol(dtype or got.dtype)
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=t.rtol,
                               atol=t.atol * math.sqrt(max(K, 1)) * scale, msg=msg)


def assert_close_avg(got: torch.Tensor, want: torch.Tensor, dtype=None, msg: str | None = None) -> None:
    """A softmax-weighted average (attention output) ``got`` vs the fp64 ``want``."""
    t = tol(dtype or got.dtype)
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), atol=t.own_atol, rtol=t.own_atol / 2, msg=msg)


def assert_close_lse(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """A log-sum-exp (fp32) of inputs in ``dtype`` vs the fp64 ``want``: -inf exactly where ``want`` is,
    finite entries within the dtype's ``lse`` tolerance."""
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(got.isneginf(), want.isneginf()), "lse: -inf in different places"
    fin = want.isfinite()
    t = tol(dtype).lse
    torch.testing.assert_close(got[fin], want[fin], atol=t, rtol=t)


def assert_within_bound(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> None:
    """Elementwise ``|got - want| <= bound`` (an analytic error bound, e.g. reduction length x eps x sum of
    |terms|), with -inf exactly where ``want`` has it and no NaN."""
    got, want, bound = got.double().cpu(), want.double().cpu(), bound.double().cpu()
    assert torch.equal(got.isneginf(), want.isneginf()), "-inf in different places"
    assert not got.isnan().any(), "NaN in the result"
    finite = ~want.isneginf()
    err = (got - want).abs()[finite]
    assert (err <= bound[finite]).all(), f"max err {err.max().item():.3g}"


def own_error_bound(want: torch.Tensor, own: torch.Tensor, dtype: torch.dtype) -> float:
    """2x the error of PyTorch's own ``dtype`` computation ``own`` against the fp64 ``want``, plus the
    dtype's ``own_atol`` times ``max(1, max|want|)``."""
    want = want.double().cpu()
    own_err = (own.double().cpu() - want).abs().max().item() if want.numel() else 0.0
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    return 2 * own_err + tol(dtype).own_atol * scale


def assert_within_own_error(got: torch.Tensor, want: torch.Tensor, own: torch.Tensor, dtype: torch.dtype,
                            what: str = "output") -> None:
    """``got`` vs the fp64 ``want``: max error at most 2x PyTorch's own error in ``dtype`` (``own``) + atol."""
    want64 = want.double().cpu()
    err = (got.double().cpu() - want64).abs().max().item() if want64.numel() else 0.0
    bound = own_error_bound(want64, own, dtype)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


class FakeTimer:
    """A tuner timer that runs each candidate once and reports a fixed time instead of measuring.

    ``times``: name -> ms, or ``fastest``: that name takes 1.0 ms and every other 5.0 ms. ``calls``
    lists the names timed, in order.
    """

    def __init__(self, times: dict[str, float] | None = None, *, fastest: str | None = None):
        if (times is None) == (fastest is None):
            raise ValueError("FakeTimer: pass exactly one of times= or fastest=")
        self.times, self.fastest = times, fastest
        self.calls: list[str] = []

    def __call__(self, name, fn) -> float:
        fn()
        self.calls.append(name)
        if self.times is not None:
            return self.times[name]
        return 1.0 if name == self.fastest else 5.0


def no_timer(name, fn) -> float:
    """A timer for tuners that must never time anything."""
    raise AssertionError(f"timed {name}")


@contextlib.contextmanager
def tf32(on: bool) -> Iterator[None]:
    """TF32 for fp32 matmuls on or off inside the block, restored after it, through the one API this torch
    uses: ``torch.backends.cuda.matmul.fp32_precision`` where it exists (torch >= 2.9; its ``__getattr__``
    makes it invisible to ``monkeypatch`` on 2.14), the legacy ``allow_tf32`` otherwise. Never mixes the two:
    torch raises on reading the legacy flag once the new one was set."""
    matmul = torch.backends.cuda.matmul
    try:
        old = matmul.fp32_precision
    except AttributeError:
        old = None
    if old is None:
        legacy = matmul.allow_tf32
        matmul.allow_tf32 = bool(on)
        try:
            yield
        finally:
            matmul.allow_tf32 = legacy
        return
    matmul.fp32_precision = "tf32" if on else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = old


# The GPU the tuning tests pretend to be on (nothing runs on it).
H100_INFO = _cache.DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), "3.6.0", "2.11.0", "0.1.0")
CUDA = torch.device("cuda", 0)  # candidate lists only: nothing runs on it here
CPU = torch.device("cpu")
