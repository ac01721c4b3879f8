"""Launch helpers shared by the kernel modules (device, TF32 setting), and the launch
specializations for the ahead-of-time compile check (``tests/compile_sm90.py``).

At launch, Triton specializes integer arguments equal to 1 into constants and marks pointers and
integers divisible by 16 as such. The compiled code differs between the two cases (vector widths,
async copies and so shared memory), so every variant is checked twice: as a ragged launch (nothing
known) and as an aligned one (real-model shapes: every pointer and size a multiple of 16, unit
strides folded to 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from triton.runtime.jit import JITFunction


def tf32_enabled() -> bool:
    """Whether PyTorch lets fp32 matmuls run as TF32, read without mixing its legacy and new APIs
    (reading ``allow_tf32`` raises once TF32 was set through ``fp32_precision``)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def on_device(t: torch.Tensor):
    """Make ``t``'s GPU current for a launch (Triton launches on the current device and its stream)."""
    if t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def specializations(label: str, kernel, signature: dict, constexprs: dict, options: dict,
                    unit: tuple[str, ...] = ()) -> Iterator[tuple]:
    """Yield ``(label, kernel, signature, constexprs, options, attrs)`` for the ragged and aligned launch.

    ``unit`` names the arguments that are 1 in the aligned case. ``kernel`` may be wrapped (e.g. by
    ``triton.heuristics``); the check compiles the JIT function inside.
    """
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    yield f"{label} ragged", kernel, signature, constexprs, options, {}
    sig = {k: v for k, v in signature.items() if k not in unit}
    const = {**constexprs, **dict.fromkeys(unit, 1)}
    # Only pointers and integers carry divisibility (a float scalar such as a softmax scale never does).
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
             if k != "M" and (v.startswith("*") or v in ("i32", "i64"))}
    yield f"{label} aligned", kernel, sig, const, options, attrs
