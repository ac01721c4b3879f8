"""Where an op runs: compiled kernels (CUDA), interpreted kernels (CPU + TRITON_INTERPRET=1), or the
pure-torch reference (any other CPU tensor, or a case the kernels do not cover)."""

from __future__ import annotations

import torch

from .._env import TRITON_INTERPRET

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when the kernels were defined for Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    return TRITON_INTERPRET


def use_kernels(t: torch.Tensor) -> bool:
    """Whether a tensor on ``t``'s device and of its dtype goes to the Triton kernels.

    CUDA: always, for fp16/bf16/fp32. CPU: only when interpreting, and never bf16, which the
    interpreter computes wrongly (the reference runs instead).
    """
    if t.dtype not in KERNEL_DTYPES:
        return False
    if t.device.type == "cuda":
        return not TRITON_INTERPRET
    return t.device.type == "cpu" and TRITON_INTERPRET and t.dtype != torch.bfloat16
