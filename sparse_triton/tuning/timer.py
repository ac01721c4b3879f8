"""How candidates are timed: CUDA events around each call, L2 flushed before each, median of repeats.

A timer is any callable ``timer(name, fn) -> milliseconds``; :class:`CudaTimer` is the real one and tests
inject fakes (``name`` lets a fake answer per candidate). Inputs are the tuner's business: it builds
random, never-zero tensors, so data-dependent fast paths cannot flatter a candidate.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Protocol

import torch


class Timer(Protocol):
    def __call__(self, name: str, fn: Callable[[], object]) -> float: ...


class CudaTimer:
    """Median of ``fn``'s GPU time over repeats, each after an L2 flush, timed with CUDA events.

    The repeat count adapts to the kernel's length: enough repeats to fill ``budget_ms`` of GPU
    time, at least ``min_reps`` and at most ``max_reps``. The flush writes a buffer larger than any
    current GPU's L2 (the L2 size is read from the device when torch reports it), so every repeat
    reads its weights from HBM, as a decode step of a model too large for L2 does.
    """

    def __init__(self, budget_ms: float = 30.0, min_reps: int = 5, max_reps: int = 100, warmup: int = 2):
        self.budget_ms = budget_ms
        self.min_reps = min_reps
        self.max_reps = max_reps
        self.warmup = warmup
        self._flush: dict[int, torch.Tensor] = {}

    def _flush_buffer(self, device: int) -> torch.Tensor:
        buf = self._flush.get(device)
        if buf is None:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
            nbytes = max(4 * l2, 256 << 20)
            buf = self._flush[device] = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
        return buf

    def __call__(self, name: str, fn: Callable[[], object]) -> float:
        device = torch.cuda.current_device()
        flush = self._flush_buffer(device)
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        # One timed call (after a flush) sizes the repeat count.
        first = self._time_once(fn, flush)
        reps = int(min(self.max_reps, max(self.min_reps, self.budget_ms / max(first, 1e-3))))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))

    def release(self) -> None:
        """Drop the flush buffers (the tuner calls this when a key is done)."""
        self._flush.clear()

    @staticmethod
    def _time_once(fn: Callable[[], object], flush: torch.Tensor) -> float:
        flush.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
