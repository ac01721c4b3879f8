"""The N:M linear op: custom ops for forward and backward, their autograd, and ``nm_linear``.

``sparse_triton::nm_linear_fwd``       y  = x @ W^T (+ bias)        Triton kernel / reference
``sparse_triton::nm_linear_bwd_dx``    dx = dy @ W                  Triton kernel / reference
``sparse_triton::nm_linear_bwd_dvalues`` dvalues = (dy^T @ x) at W's kept positions (dense matmul
                                        on cuBLAS, then the gather kernel: the flops of dense training)

``NMLinearFunction`` composes them; ``torch.compile(fullgraph=True)`` traces it without breaks. Which
implementation runs the first two on a GPU is the tuner's choice (``ops.nm_tuning``: ours, cuSPARSELt
or dense cuBLAS, whichever measured fastest for the shape).
"""

from __future__ import annotations

import math

import torch

from ..formats.nm import NMTensor, check_indices
from ..kernels import nm_matmul as kernel
from ..kernels import nm_prune as prune_kernel
from ..reference import nm_matmul as reference
from ..reference import nm_prune as prune_reference
from ..tuning.tuner import default_tuner
from . import nm_tuning as tuned
from ._dispatch import use_kernels

# Group sizes the matmul kernels rebuild in registers (a power of two); others use the reference.
KERNEL_M = (2, 4, 8, 16)


def _kernels_for(a: torch.Tensor, m: int) -> bool:
    return m in KERNEL_M and use_kernels(a)


@torch.library.custom_op("sparse_triton::nm_linear_fwd", mutates_args=())
def nm_linear_fwd(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                  n: int, m: int, K: int) -> torch.Tensor:
    """``y[M, N] = x[M, K] @ W^T (+ bias)``, ``W[N, K]`` given as compressed ``(values, indices)``.

    On the kernel path the tuner picks the implementation (ours, cuSPARSELt or dense cuBLAS) and config.
    """
    if not _kernels_for(x, m):
        return reference.nm_matmul_fwd(x, values, indices, bias, n, m, K)
    values, indices = values.contiguous(), indices.contiguous()
    if x.shape[0] == 0:
        return kernel.nm_matmul_fwd(x, values, indices, bias, n, m, K)
    key = tuned.fwd_key(x, values.shape[0], K, n, m, bias is not None)
    cand = default_tuner().choose(tuned.FWD, key, x.device)
    return tuned.run_fwd(cand, x, values, indices, bias, n, m, K)


@nm_linear_fwd.register_fake
def _(x, values, indices, bias, n, m, K):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("sparse_triton::nm_linear_bwd_dx", mutates_args=())
def nm_linear_bwd_dx(dy: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     n: int, m: int, K: int) -> torch.Tensor:
    """``dx[M, K] = dy[M, N] @ W``; on the kernel path the tuner picks ours or dense cuBLAS."""
    if not _kernels_for(dy, m):
        return reference.nm_matmul_bwd_dx(dy, values, indices, n, m, K)
    values, indices = values.contiguous(), indices.contiguous()
    if dy.shape[0] == 0:
        return kernel.nm_matmul_bwd_dx(dy, values, indices, n, m, K)
    cand = default_tuner().choose(tuned.BWD_DX, tuned.bwd_dx_key(dy, values.shape[0], K, n, m), dy.device)
    return tuned.run_bwd_dx(cand, dy, values, indices, n, m, K)


@nm_linear_bwd_dx.register_fake
def _(dy, values, indices, n, m, K):
    return dy.new_empty(dy.shape[0], K)


@torch.library.custom_op("sparse_triton::nm_linear_bwd_dvalues", mutates_args=())
def nm_linear_bwd_dvalues(dy: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                          n: int, m: int, K: int) -> torch.Tensor:
    """Gradient of the compressed values: ``(dy^T @ x)[N, K]`` at the kept positions, ``[N, S]``."""
    dw = dy.t() @ x  # dense [N, K] on cuBLAS: the flops of dense training
    if use_kernels(dw):
        cand = default_tuner().choose(tuned.GATHER, tuned.mem_key(dw, n, m), dw.device)
        return prune_kernel.nm_gather(dw, indices.contiguous(), n, m, config=cand.config)
    return prune_reference.nm_gather(dw, indices, n, m)


@nm_linear_bwd_dvalues.register_fake
def _(dy, x, indices, n, m, K):
    return dy.new_empty(dy.shape[1], NMTensor.slots_for(K, n, m))


class NMLinearFunction(torch.autograd.Function):
    """Differentiable ``x2d[M, K] -> x2d @ W^T + bias`` with gradients for x, the values and the bias.

    The indices (the mask) are fixed: the gradient of the values is taken at the kept positions only.
    """

    @staticmethod
    def forward(x, values, indices, bias, n, m, K):
        return torch.ops.sparse_triton.nm_linear_fwd(x, values, indices, bias, n, m, K)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, values, indices, bias, n, m, K = inputs
        # x is only needed for the values' gradient (a frozen sparse base keeps no activations).
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, values, indices)
        ctx.nmk = (n, m, K)

    @staticmethod
    def backward(ctx, dy):
        x, values, indices = ctx.saved_tensors
        n, m, K = ctx.nmk
        dx = dvalues = dbias = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.sparse_triton.nm_linear_bwd_dx(dy, values, indices, n, m, K)
        if ctx.needs_input_grad[1]:
            dvalues = torch.ops.sparse_triton.nm_linear_bwd_dvalues(dy, x, indices, n, m, K)
        if ctx.needs_input_grad[3]:
            dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        return dx, dvalues, None, dbias, None, None, None


def _check_input(x, K: int, dtype: torch.dtype, device: torch.device, where: str, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype={x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{where}: {name} must have at least 1 dim, got a 0-dim tensor")
    if x.shape[-1] != K:
        raise ValueError(f"{where}: {name}.shape[-1]={x.shape[-1]} but weight has K={K}")
    if x.dtype != dtype:
        raise TypeError(f"{where}: dtype mismatch, {name} is {x.dtype} but the weight is {dtype}")
    if x.device != device:
        raise ValueError(f"{where}: device mismatch, {name} is on {x.device} but the weight is on {device}")


def _check_bias(bias, N: int, dtype: torch.dtype, device: torch.device, where: str) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{where}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (N,):
        raise ValueError(f"{where}: bias.shape={tuple(bias.shape)}, expected ({N},)")
    if bias.dtype != dtype:
        raise TypeError(f"{where}: dtype mismatch, bias is {bias.dtype} but the weight is {dtype}")
    if bias.device != device:
        raise ValueError(f"{where}: device mismatch, bias is on {bias.device} but the weight is on {device}")


def linear_compressed(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                      n: int, m: int, K: int) -> torch.Tensor:
    """``nm_linear`` on the raw compressed parts, for callers that already validated their shapes, dtypes
    and devices. The packed positions are checked here, once per version of ``indices``
    (``formats.nm.check_indices``: malformed positions raise ``ValueError`` instead of computing garbage on
    any path; no check while tracing or capturing a CUDA graph)."""
    check_indices(indices, values.shape[-1], n, m, "nm_linear")
    lead = x.shape[:-1]
    x2d = x.reshape(math.prod(lead), K)
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = NMLinearFunction.apply(x2d, values, indices, bias, n, m, K)
    else:  # inference: straight to the op, no autograd bookkeeping on the hot path
        y = torch.ops.sparse_triton.nm_linear_fwd(x2d, values, indices, bias, n, m, K)
    return y.reshape(*lead, values.shape[0])


def nm_linear(x: torch.Tensor, w_nm: NMTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w_nm.to_dense(), bias)`` computed from the compressed weight; differentiable.

    x: ``[..., K]``; w_nm: an :class:`NMTensor` of dense shape ``[N, K]``, N:M along K (``dim=-1``);
    bias: ``[N]`` or None. Returns ``[..., N]`` in ``x.dtype``. Gradients flow to ``x``, ``bias`` and
    ``w_nm.values`` (at the kept positions; the mask stays fixed). A hand-built ``w_nm`` whose packed
    positions are malformed (out of range, not ascending, garbage padding) raises ``ValueError``; the check
    runs on the weight's device once per version of ``w_nm.indices``. CUDA tensors (fp16, bf16, fp32;
    m in {2, 4, 8, 16}) run whichever of our Triton kernels, cuSPARSELt (2:4) and dense cuBLAS the
    tuner measured fastest for the shape on this GPU (``sparse_triton.tuning``), so a tuned shape is
    never slower than the dense layer; other cases run the pure-torch reference.

    >>> import sparse_triton as st
    >>> w = st.nm_compress(torch.randn(32, 64), 2, 4)
    >>> x = torch.randn(3, 5, 64)
    >>> torch.allclose(st.nm_linear(x, w), torch.nn.functional.linear(x, w.to_dense()), atol=1e-5)
    True
    """
    where = "nm_linear"
    if not isinstance(w_nm, NMTensor):
        raise TypeError(f"{where}: w_nm must be an NMTensor (see nm_compress), got {type(w_nm).__name__}")
    if len(w_nm.shape) != 2 or w_nm.dim != 1:
        raise ValueError(
            f"{where}: w_nm must be a 2-D [out_features, in_features] weight that is N:M along its last dim, "
            f"got shape={tuple(w_nm.shape)} grouped along dim {w_nm.dim}"
        )
    N, K = w_nm.shape
    _check_input(x, K, w_nm.dtype, w_nm.device, where)
    _check_bias(bias, N, w_nm.dtype, w_nm.device, where)
    return linear_compressed(x, w_nm.values, w_nm.indices, bias, w_nm.n, w_nm.m, K)
