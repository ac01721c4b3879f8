"""Where an op runs: compiled kernels (CUDA), interpreted kernels (CPU + TRITON_INTERPRET=1), or the
pure-torch reference (any other CPU tensor, or a case the kernels do not cover)."""

from __future__ import annotations

import os

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1`` set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_kernels(t: torch.Tensor) -> bool:
    """Whether a tensor on ``t``'s device and of its dtype goes to the Triton kernels."""
    if t.dtype not in KERNEL_DTYPES:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and interpreting()
