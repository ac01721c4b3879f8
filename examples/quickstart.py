"""Quickstart: sparsify a transformer-style MLP stack to 2:4 and compare it with the dense model.

    python examples/quickstart.py [--dim 1024] [--layers 4] [--dtype fp16]

1. builds a stack of pre-norm MLP blocks (LayerNorm -> Linear -> GELU -> Linear, residual);
2. ``st.sparsify(model, st.NMSparsity(2, 4))`` swaps every nn.Linear for a SparseLinear in place;
3. checks the sparse model against the dense model whose weights were pruned the same way;
4. prints dense vs sparse time per forward for a few token counts, on the device at hand
   (CUDA: the compiled Triton kernels; CPU: the pure-torch reference path).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch
from torch import nn

import sparse_triton as st


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def build(dim: int, layers: int) -> nn.Module:
    return nn.Sequential(*[MLPBlock(dim, 4 * dim) for _ in range(layers)])


def prune_dense_copy(model: nn.Module, n: int, m: int) -> nn.Module:
    """The dense model with each Linear weight pruned exactly as sparsify prunes it."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for mod in masked.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(st.nm_prune(mod.weight, n, m))
    return masked


def time_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn()``: CUDA events on a GPU, the host clock on a CPU."""
    fn()  # warm up: kernel compilation, allocator
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=None, help="model width (default: 2048 on GPU, 256 on CPU)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                        help="default: fp16 on GPU, fp32 on CPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    dim = args.dim or (2048 if device.type == "cuda" else 256)
    torch.manual_seed(0)

    dense = build(dim, args.layers).to(device=device, dtype=dtype).eval()
    masked = prune_dense_copy(dense, 2, 4)
    sparse = st.sparsify(copy.deepcopy(dense), st.NMSparsity(2, 4))
    n_sparse = sum(isinstance(mod, st.nn.SparseLinear) for mod in sparse.modules())
    print(f"sparsified {n_sparse} Linear layers to 2:4  ({args.layers} blocks, dim {dim}, {str(dtype)[6:]})")

    # 1. correctness against the masked dense model (fp64 on the CPU as the referee)
    x = torch.randn(8, dim, device=device, dtype=dtype)
    with torch.no_grad():
        y_sparse = sparse(x)
        y_masked = masked(x)
        y_ref = prune_dense_copy(dense, 2, 4).double().cpu()(x.double().cpu())
    err_sparse = ((y_sparse.double().cpu() - y_ref).norm() / y_ref.norm()).item()
    err_masked = ((y_masked.double().cpu() - y_ref).norm() / y_ref.norm()).item()
    print(f"relative error vs fp64: sparse {err_sparse:.2e}, masked dense {err_masked:.2e}")
    if not err_sparse <= 2 * err_masked + 1e-6:
        raise SystemExit(f"sparse output is off: {err_sparse:.2e} vs dense {err_masked:.2e}")
    print("outputs match the masked dense model")

    # 2. timing
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (compiled Triton kernels)"
        tokens, reps = [1, 16, 256, 4096], 50
    else:
        where = "CPU (pure-torch reference path; the speedups need a CUDA GPU)"
        tokens, reps = [1, 16, 256], 5
    print(f"\ndense vs 2:4 sparse forward on {where}, torch {torch.__version__}")
    print(f"{'tokens':>8} {'dense ms':>10} {'sparse ms':>10} {'speedup':>8}")
    for M in tokens:
        xm = torch.randn(M, dim, device=device, dtype=dtype)
        with torch.no_grad():
            t_dense = time_ms(lambda: masked(xm), device, reps)  # noqa: B023
            t_sparse = time_ms(lambda: sparse(xm), device, reps)  # noqa: B023
        print(f"{M:>8} {t_dense:>10.3f} {t_sparse:>10.3f} {t_dense / t_sparse:>7.2f}x")


if __name__ == "__main__":
    main()
