"""Pure-torch twin of ``kernels.nm_matmul``: the N:M linear forward and its gradients."""

from __future__ import annotations

import torch

from ..formats.nm import NMTensor


def _dense(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, K: int) -> torch.Tensor:
    return NMTensor(values, indices, (values.shape[0], K), n, m).to_dense()


def nm_matmul_fwd(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                  n: int, m: int, K: int, config=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y[M, N] = x[M, K] @ W^T (+ bias)`` with ``W[N, K]`` given compressed (N:M along K).

    ``config`` is accepted for signature parity with the kernel launcher and ignored.
    """
    y = torch.nn.functional.linear(x, _dense(values, indices, n, m, K), bias)
    return y if out is None else out.copy_(y)


def nm_matmul_bwd_dx(dy: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     n: int, m: int, K: int, config=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dx[M, K] = dy[M, N] @ W`` with ``W[N, K]`` given compressed (N:M along K).

    ``config`` is accepted for signature parity with the kernel launcher and ignored.
    """
    dx = dy @ _dense(values, indices, n, m, K)
    return dx if out is None else out.copy_(dx)


def nm_decompress(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, K: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense ``W[N, K]`` of a compressed n:m weight."""
    w = _dense(values, indices, n, m, K)
    return w if out is None else out.copy_(w)
