"""The activation-sparse ops: custom ops, autograd, ``act_sparse_linear`` and ``act_sparse_mlp``.

``sparse_triton::act_sparse_linear_fwd``     y  = (x * (|x| > t)) @ W^T (+ b)   kernel / dense / reference
``sparse_triton::act_sparse_nm_linear_fwd``  the same with W^T N:M compressed along N
``sparse_triton::act_sparse_linear_bwd_dx``  dx = (dy @ W) * (|x| > t)
``sparse_triton::act_sparse_linear_bwd_dw``  dW = dy^T @ (x * (|x| > t))
``sparse_triton::act_sparse_mlp_fwd``        a gated MLP in two launches: gate+up (shared active set,
                                             activation in the epilogue), then the sparse-input down

Gradients are those of the masked dense op ``F.linear(x * (|x| > t), W, b)`` (the mask is a step, so
it passes no gradient to ``t`` and zeroes ``dx`` where the input was skipped): fine-tuning with the
sparsity in the loop works. Which implementation runs on a GPU is the tuner's choice
(``ops.act_sparse_tuning``: our kernel or the masked dense product, whichever measured faster).
"""

from __future__ import annotations

import math
import threading
import weakref

import torch

from ..formats.nm import NMTensor
from ..reference import act_sparse as reference
from ..tuning.tuner import default_tuner
from . import act_sparse_tuning as tuned
from ._dispatch import use_kernels
from ._prepared import prepared
from .nm_linear import _check_bias, _check_input

NM_KERNEL_M = (2, 4, 8, 16)


def _kernels_for(x: torch.Tensor) -> bool:
    return use_kernels(x) and 0 < x.shape[0] <= tuned.MAX_ROWS


def input_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight[N, K]`` stored input-major: the same values as a ``[N, K]`` view of a contiguous
    ``[K, N]`` tensor, the layout the activation-sparse kernels read without a copy.

    >>> w = input_major(torch.randn(8, 4))
    >>> w.shape, w.t().is_contiguous()
    (torch.Size([8, 4]), True)
    """
    if weight.dim() != 2:
        raise ValueError(f"input_major: weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}")
    return weight if weight.t().is_contiguous() else weight.t().contiguous().t()


def _weight_t(weight: torch.Tensor) -> torch.Tensor:
    """``W^T[K, N]`` with unit column stride: a view of an input-major weight, else a transposed copy
    kept while the weight is unchanged."""
    wt = weight.t()
    if wt.stride(1) == 1:
        return wt
    return prepared(weight, None, "input_major", lambda: wt.contiguous())


# ------------------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("sparse_triton::act_sparse_linear_fwd", mutates_args=())
def act_sparse_linear_fwd(x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """``y[M, N] = (x * (|x| > t))[M, K] @ weight[N, K]^T (+ bias)``; t fp32 ``[]`` or ``[K]``."""
    if not _kernels_for(x):
        if use_kernels(x):  # past the union rule's range: dense on the masked input
            return tuned.run_mm(tuned.DENSE, x, weight.t(), threshold, bias)
        return reference.act_sparse_matmul(x, weight, threshold, bias)
    wt = _weight_t(weight)
    key = tuned.fwd_key(x, wt.shape[1], wt.shape[0], bias is not None, threshold)
    cand = default_tuner().choose(tuned.FWD, key, x.device)
    return tuned.run_mm(cand, x, wt, threshold, bias)


@act_sparse_linear_fwd.register_fake
def _(x, weight, threshold, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("sparse_triton::act_sparse_nm_linear_fwd", mutates_args=())
def act_sparse_nm_linear_fwd(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, threshold: torch.Tensor,
                             bias: torch.Tensor | None, n: int, m: int, N: int) -> torch.Tensor:
    """As ``act_sparse_linear_fwd`` with ``W^T[K, N]`` given as N:M ``(values[K, S], indices[K, Wd])``."""
    if m not in NM_KERNEL_M or not use_kernels(x):
        w_t = NMTensor(values, indices, (x.shape[1], N), n, m)
        return reference.act_sparse_nm_matmul(x, w_t, threshold, bias)
    values, indices = values.contiguous(), indices.contiguous()
    if not _kernels_for(x):
        return tuned.run_nm_mm(tuned.DENSE, x, values, indices, n, m, N, threshold, bias)
    key = tuned.nm_fwd_key(x, n, m, N, x.shape[1], bias is not None, threshold)
    cand = default_tuner().choose(tuned.NM_FWD, key, x.device)
    return tuned.run_nm_mm(cand, x, values, indices, n, m, N, threshold, bias)


@act_sparse_nm_linear_fwd.register_fake
def _(x, values, indices, threshold, bias, n, m, N):
    return x.new_empty(x.shape[0], N)


@torch.library.custom_op("sparse_triton::act_sparse_linear_bwd_dx", mutates_args=())
def act_sparse_linear_bwd_dx(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             threshold: torch.Tensor) -> torch.Tensor:
    """``dx[M, K] = (dy @ weight) * (|x| > t)``: no gradient reaches a skipped input."""
    dx = dy @ weight
    return torch.where(reference.active(x, threshold), dx, torch.zeros((), dtype=dx.dtype, device=dx.device))


@act_sparse_linear_bwd_dx.register_fake
def _(dy, x, weight, threshold):
    return dy.new_empty(dy.shape[0], weight.shape[1])


@torch.library.custom_op("sparse_triton::act_sparse_linear_bwd_dw", mutates_args=())
def act_sparse_linear_bwd_dw(dy: torch.Tensor, x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``dW[N, K] = dy^T @ (x * (|x| > t))``: the weight's gradient from the inputs the forward used."""
    return dy.t() @ reference.masked(x, threshold)


@act_sparse_linear_bwd_dw.register_fake
def _(dy, x, threshold):
    return dy.new_empty(dy.shape[1], x.shape[1])


@torch.library.custom_op("sparse_triton::act_sparse_mlp_fwd", mutates_args=())
def act_sparse_mlp_fwd(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                       threshold_in: torch.Tensor, threshold_mid: torch.Tensor, activation: str) -> torch.Tensor:
    """``down(masked(act(gate(xs)) * up(xs), t_mid))`` with ``xs = masked(x, t_in)``; weights ``[out, in]``."""
    if not _kernels_for(x):
        if use_kernels(x):
            h = tuned.run_gate_up(tuned.DENSE, x, w_gate.t(), w_up.t(), threshold_in, activation)
            return tuned.run_mm(tuned.DENSE, h, w_down.t(), threshold_mid, None)
        return reference.act_sparse_mlp(x, w_gate, w_up, w_down, threshold_in, threshold_mid, activation)
    wg_t, wu_t, wd_t = _weight_t(w_gate), _weight_t(w_up), _weight_t(w_down)
    key = tuned.gate_up_key(x, wg_t.shape[1], wg_t.shape[0], activation, threshold_in)
    h = tuned.run_gate_up(default_tuner().choose(tuned.GATE_UP, key, x.device), x, wg_t, wu_t, threshold_in,
                          activation)
    key = tuned.fwd_key(h, wd_t.shape[1], wd_t.shape[0], False, threshold_mid)
    return tuned.run_mm(default_tuner().choose(tuned.FWD, key, x.device), h, wd_t, threshold_mid, None)


@act_sparse_mlp_fwd.register_fake
def _(x, w_gate, w_up, w_down, threshold_in, threshold_mid, activation):
    return x.new_empty(x.shape[0], w_down.shape[0])


class ActSparseLinearFunction(torch.autograd.Function):
    """Differentiable ``x2d[M, K] -> (x2d * (|x2d| > t)) @ W^T + b`` with the masked dense op's gradients
    for x, W and b (none for the threshold)."""

    @staticmethod
    def forward(x, weight, threshold, bias):
        return torch.ops.sparse_triton.act_sparse_linear_fwd(x, weight, threshold, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, threshold, bias = inputs
        ctx.save_for_backward(x, weight, threshold)

    @staticmethod
    def backward(ctx, dy):
        x, weight, threshold = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.sparse_triton.act_sparse_linear_bwd_dx(dy, x, weight, threshold)
        if ctx.needs_input_grad[1]:
            dw = torch.ops.sparse_triton.act_sparse_linear_bwd_dw(dy, x, threshold)
        if ctx.needs_input_grad[3]:
            db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        return dx, dw, None, db


# ------------------------------------------------------------------------------------------------ validation

_scalar_lock = threading.Lock()
# Kept for the process's life: a captured CUDA graph may hold a scalar's address.
_scalars: dict[tuple, torch.Tensor] = {}
_checked: dict[int, tuple[weakref.ref, tuple]] = {}


def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """A cached fp32 scalar tensor (a Python threshold costs no copy per call; each distinct value is kept).
    One made during CUDA-graph capture holds its value only once the graph runs, so it is never cached."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.full((), float(value), dtype=torch.float32, device=device)
    key = (float(value), device)
    with _scalar_lock:
        t = _scalars.get(key)
        if t is None:
            t = _scalars[key] = torch.full((), float(value), dtype=torch.float32, device=device)
    return t


def _forget(ident: int):
    def callback(ref: weakref.ref) -> None:
        with _scalar_lock:
            entry = _checked.get(ident)
            if entry is not None and entry[0] is ref:
                del _checked[ident]
    return callback


def check_threshold(threshold, K: int, device: torch.device, where: str, name: str = "threshold") -> torch.Tensor:
    """The threshold as an fp32 tensor on ``device``: ``[]`` or ``[K]``, finite and >= 0.

    A CUDA tensor's values are checked once per version of the tensor (a check reads them back, a host
    sync) and not at all during CUDA-graph capture or under ``torch.compile``: modules check theirs when
    they are set.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, torch.Tensor)):
        raise TypeError(f"{where}: {name} must be a float or a tensor, got {type(threshold).__name__}")
    if not isinstance(threshold, torch.Tensor):
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"{where}: {name} must be finite and >= 0, got {threshold}")
        return _scalar(threshold, device)
    if not threshold.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype={threshold.dtype}")
    if threshold.dim() > 1 or (threshold.dim() == 1 and threshold.shape[0] != K):
        raise ValueError(f"{where}: {name} must be a scalar or have one value per input channel ({K},), "
                         f"got shape {tuple(threshold.shape)}")
    if threshold.device != device:
        raise ValueError(f"{where}: device mismatch, {name} is on {threshold.device} but x is on {device}")
    if not (torch.compiler.is_compiling() or (threshold.is_cuda and torch.cuda.is_current_stream_capturing())):
        try:
            stamp = (threshold.data_ptr(), threshold._version)
        except RuntimeError:
            stamp = None
        entry = _checked.get(id(threshold))
        if stamp is None or entry is None or entry[0]() is not threshold or entry[1] != stamp:
            bad = ~torch.isfinite(threshold) | (threshold < 0)
            if bool(bad.any()):
                raise ValueError(f"{where}: {name} must be finite and >= 0, got "
                                 f"{threshold[bad].flatten()[0].item()} (at {bad.nonzero()[0].tolist()})")
            if stamp is not None:
                with _scalar_lock:
                    _checked[id(threshold)] = (weakref.ref(threshold, _forget(id(threshold))), stamp)
    return threshold if threshold.dtype == torch.float32 else threshold.float()


def _flat(x: torch.Tensor, K: int) -> torch.Tensor:
    return x.reshape(math.prod(x.shape[:-1]), K)


def act_sparse_linear(x: torch.Tensor, weight, threshold, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x * (x.abs() > threshold), weight, bias)``, reading only the weight rows of active inputs.

    x: ``[..., K]``; weight: ``[N, K]`` (stored input-major, see :func:`input_major`, it is read without a
    copy; any other layout is transposed once and the copy kept while the weight is unchanged), or an
    :class:`~sparse_triton.NMTensor` of ``W^T`` (shape ``[K, N]``, N:M along N, from
    :func:`nm_input_major`) so that both sparsities multiply; threshold: a float or an fp32 tensor
    ``[]`` / ``[K]`` (per input channel), >= 0; bias ``[N]`` or None. The comparison is made in float32
    (x upcast exactly) whatever x's dtype; a NaN input counts as active, so it reaches the output as in the
    dense formula. Returns ``[..., N]`` in x's dtype; differentiable for x, weight and bias (the gradients
    of the masked dense op; N:M weights: x and bias).

    On CUDA (fp16, bf16, fp32), up to 64 rows run our kernel or the masked dense product, whichever the
    tuner measured faster for the shape; a weight row is read if its input is active in any row of a tile.
    More rows run dense. CPU tensors run the pure-torch reference.

    >>> import sparse_triton as st
    >>> x, w = torch.randn(2, 64), torch.randn(32, 64)
    >>> y = st.act_sparse_linear(x, w, 0.5)
    >>> torch.allclose(y, torch.nn.functional.linear(x * (x.abs() > 0.5), w), atol=1e-5)
    True
    """
    where = "act_sparse_linear"
    if isinstance(weight, NMTensor):
        return _nm_linear(x, weight, threshold, bias, where)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{where}: weight must be a torch.Tensor or an NMTensor, got {type(weight).__name__}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{where}: weight must be a 2-D floating-point [out_features, in_features] tensor, "
                         f"got shape={tuple(weight.shape)} dtype={weight.dtype}")
    N, K = weight.shape
    _check_input(x, K, weight.dtype, weight.device, where)
    _check_bias(bias, N, weight.dtype, weight.device, where)
    t = check_threshold(threshold, K, x.device, where)
    x2d = _flat(x, K)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = ActSparseLinearFunction.apply(x2d, weight, t, bias)
    else:
        y = torch.ops.sparse_triton.act_sparse_linear_fwd(x2d, weight, t, bias)
    return y.reshape(*x.shape[:-1], N)


class _ActSparseNMFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, values, indices, threshold, bias, n, m, N):
        return torch.ops.sparse_triton.act_sparse_nm_linear_fwd(x, values, indices, threshold, bias, n, m, N)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, values, indices, threshold, bias, n, m, N = inputs
        ctx.save_for_backward(x, values, indices, threshold)
        ctx.nm = (n, m, N)

    @staticmethod
    def backward(ctx, dy):
        x, values, indices, threshold = ctx.saved_tensors
        n, m, N = ctx.nm
        dx = db = None
        if ctx.needs_input_grad[0]:
            # dy @ W = dy @ (W^T)^T: the N:M forward op on W^T's compressed form.
            dyw = torch.ops.sparse_triton.nm_linear_fwd(dy, values, indices, None, n, m, N)
            dx = torch.where(reference.active(x, threshold), dyw, torch.zeros((), dtype=dyw.dtype, device=dyw.device))
        if ctx.needs_input_grad[4]:
            db = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        return dx, None, None, None, db, None, None, None


def nm_input_major(weight: torch.Tensor, n: int, m: int) -> NMTensor:
    """Prune ``weight[N, K]`` n:m along its *output* features and compress it input-major: an
    :class:`~sparse_triton.NMTensor` of ``W^T`` (shape ``[K, N]``) for :func:`act_sparse_linear`. In
    each input channel's row, every m consecutive outputs keep their n largest weights.

    >>> import sparse_triton as st
    >>> w_t = st.ops.act_sparse.nm_input_major(torch.randn(32, 64), 2, 4)
    >>> tuple(w_t.shape)
    (64, 32)
    """
    from ..formats.nm import nm_compress

    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("nm_input_major: weight must be a 2-D [out_features, in_features] tensor")
    return nm_compress(weight.t().contiguous(), n, m)


def _nm_linear(x, w_t: NMTensor, threshold, bias, where: str) -> torch.Tensor:
    if len(w_t.shape) != 2 or w_t.dim != 1:
        raise ValueError(f"{where}: an NMTensor weight must be W^T [in_features, out_features], N:M along its "
                         f"last dim (see nm_input_major), got shape={tuple(w_t.shape)} grouped along dim {w_t.dim}")
    K, N = w_t.shape
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[-1] != K:
        raise ValueError(f"{where}: x.shape[-1]={x.shape[-1]} but the NMTensor weight has in_features={K} (it holds "
                         f"W^T [in_features, out_features], N:M along out_features: see nm_input_major)")
    _check_input(x, K, w_t.dtype, w_t.device, where)
    _check_bias(bias, N, w_t.dtype, w_t.device, where)
    t = check_threshold(threshold, K, x.device, where)
    x2d = _flat(x, K)
    args = (x2d, w_t.values, w_t.indices, t, bias, w_t.n, w_t.m, N)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        y = _ActSparseNMFunction.apply(*args)
    else:
        y = torch.ops.sparse_triton.act_sparse_nm_linear_fwd(*args)
    return y.reshape(*x.shape[:-1], N)


def act_sparse_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                   threshold_in, threshold_mid, activation: str = "silu") -> torch.Tensor:
    """A gated MLP with sparse inputs, ``down(h * (|h| > t_mid))`` with
    ``h = act(gate(xs)) * up(xs)`` and ``xs = x * (|x| > t_in)``: two launches on a GPU (gate and up share
    one read of x and its active set; the activation runs in their epilogue), forward only.

    x: ``[..., H]``; w_gate, w_up: ``[I, H]``; w_down: ``[H, I]`` (input-major storage avoids copies);
    thresholds: floats or fp32 ``[]`` / per-channel tensors (``[H]`` and ``[I]``); activation: ``silu``
    (SwiGLU), ``relu`` or ``relu2`` (ReLU squared; with threshold 0 only exact zeros are skipped).
    Returns ``[..., H]``. For gradients use :class:`~sparse_triton.nn.ActSparseMLP` in training mode.

    >>> import sparse_triton as st
    >>> x, wg, wu, wd = torch.randn(1, 64), torch.randn(128, 64), torch.randn(128, 64), torch.randn(64, 128)
    >>> st.act_sparse_mlp(x, wg, wu, wd, 0.5, 0.1).shape
    torch.Size([1, 64])
    """
    where = "act_sparse_mlp"
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"{where}: {name} must be a 2-D floating-point tensor")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"{where}: activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
    F_, H = w_gate.shape
    if tuple(w_up.shape) != (F_, H) or tuple(w_down.shape) != (H, F_):
        raise ValueError(f"{where}: expected w_gate and w_up [I, H] and w_down [H, I], got "
                         f"{tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}")
    for name, w in (("w_up", w_up), ("w_down", w_down)):
        if w.dtype != w_gate.dtype or w.device != w_gate.device:
            raise ValueError(f"{where}: {name} is {w.dtype} on {w.device}, w_gate is {w_gate.dtype} on {w_gate.device}")
    _check_input(x, H, w_gate.dtype, w_gate.device, where)
    t_in = check_threshold(threshold_in, H, x.device, where, "threshold_in")
    t_mid = check_threshold(threshold_mid, F_, x.device, where, "threshold_mid")
    y = torch.ops.sparse_triton.act_sparse_mlp_fwd(_flat(x, H), w_gate, w_up, w_down, t_in, t_mid, activation)
    return y.reshape(*x.shape[:-1], H)
