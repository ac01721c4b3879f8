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
from collections import OrderedDict

import torch

from ..formats.nm import NMTensor, check_indices
from ..reference import act_sparse as reference
from ..tuning.tuner import default_tuner
from . import act_sparse_tuning as tuned
from ._dispatch import use_kernels
from ._prepared import known_finite
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


def _is_input_major(weight: torch.Tensor) -> bool:
    """Whether ``weight[N, K]`` is stored input-major (``W^T`` rows are contiguous), the layout the kernels
    read. Any other layout runs the masked dense product: the kernels would need a transposed copy, and a
    kept copy goes stale when the weight is written where the version counter cannot see (``.data``)."""
    return weight.stride(0) == 1 or weight.shape[0] <= 1


# ------------------------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("sparse_triton::act_sparse_linear_fwd", mutates_args=())
def act_sparse_linear_fwd(x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """``y[M, N] = (x * (|x| > t))[M, K] @ weight[N, K]^T (+ bias)``; t fp32 ``[]`` or ``[K]``."""
    if not _kernels_for(x) or not _is_input_major(weight):
        if use_kernels(x):  # past the union rule's range, or not input-major: dense on the masked input
            return tuned.run_mm(tuned.DENSE, x, weight.t(), threshold, bias, finite=known_finite(weight))
        return reference.act_sparse_matmul(x, weight, threshold, bias)
    wt = weight.t()
    key = tuned.fwd_key(x, wt.shape[1], wt.shape[0], bias is not None, threshold)
    cand = default_tuner().choose(tuned.FWD, key, x.device)
    return tuned.run_mm(cand, x, wt, threshold, bias, finite=known_finite(weight))


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
    finite = known_finite(values)
    values, indices = values.contiguous(), indices.contiguous()
    if not _kernels_for(x):
        return tuned.run_nm_mm(tuned.DENSE, x, values, indices, n, m, N, threshold, bias, finite=finite)
    key = tuned.nm_fwd_key(x, n, m, N, x.shape[1], bias is not None, threshold)
    cand = default_tuner().choose(tuned.NM_FWD, key, x.device)
    return tuned.run_nm_mm(cand, x, values, indices, n, m, N, threshold, bias, finite=finite)


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
    if not use_kernels(x):
        return reference.act_sparse_mlp(x, w_gate, w_up, w_down, threshold_in, threshold_mid, activation)
    finite_in, finite_down = known_finite(w_gate, w_up), known_finite(w_down)
    if not _kernels_for(x):
        h = tuned.run_gate_up(tuned.DENSE, x, w_gate.t(), w_up.t(), threshold_in, activation, finite=finite_in)
        return tuned.run_mm(tuned.DENSE, h, w_down.t(), threshold_mid, None, finite=finite_down)
    # Each projection runs a kernel if its weight is stored input-major, else the masked dense product.
    wg_t, wu_t, wd_t = w_gate.t(), w_up.t(), w_down.t()
    cand = tuned.DENSE
    if _is_input_major(w_gate) and _is_input_major(w_up):
        key = tuned.gate_up_key(x, wg_t.shape[1], wg_t.shape[0], activation, threshold_in)
        cand = default_tuner().choose(tuned.GATE_UP, key, x.device)
    h = tuned.run_gate_up(cand, x, wg_t, wu_t, threshold_in, activation, finite=finite_in)
    cand = tuned.DENSE
    if _is_input_major(w_down):
        key = tuned.fwd_key(h, wd_t.shape[1], wd_t.shape[0], False, threshold_mid)
        cand = default_tuner().choose(tuned.FWD, key, x.device)
    return tuned.run_mm(cand, h, wd_t, threshold_mid, None, finite=finite_down)


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

# Values from this one on round to inf in float32 (round to nearest: the midpoint between the largest
# float32, 2**128 - 2**104, and 2**128 rounds up, its last mantissa bit being odd).
_FP32_OVERFLOW = 2.0**128 - 2.0**103
_FP32_MAX = torch.finfo(torch.float32).max
# Python-float thresholds become cached fp32 scalar tensors, the most recently used SCALAR_CACHE_SIZE of
# them (per value and device): a float threshold costs no allocation per call, and a program that sweeps
# thresholds does not grow the cache. An evicted value is made again on its next use. A cached scalar is
# never read during CUDA-graph capture (a graph gets a scalar of its own, filled on each replay), so
# eviction never frees memory a graph reads.
SCALAR_CACHE_SIZE = 256

_scalar_lock = threading.Lock()
_scalars: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_checked: dict[int, tuple[weakref.ref, tuple]] = {}


def _float_threshold(value, where: str, name: str) -> float:
    """A Python number threshold as a float, checked: finite, >= 0 and finite once rounded to float32."""
    try:
        v = float(value)
    except OverflowError:  # an int beyond float64
        v = math.inf if value > 0 else -math.inf
    shown = repr(value) if len(repr(value)) <= 24 else repr(value)[:21] + "..."
    if math.isnan(v) or v < 0 or (math.isinf(v) and isinstance(value, float)):
        raise ValueError(f"{where}: {name} must be finite and >= 0, got {shown}")
    if v >= _FP32_OVERFLOW:
        raise ValueError(f"{where}: {name} must be finite and >= 0, got {shown}, which is beyond float32 range "
                         "(it rounds to inf; thresholds are compared in float32)")
    return min(v, _FP32_MAX)  # between the largest float32 and the overflow edge: rounds to the largest


def _scalar(value: float, device: torch.device, where: str, name: str) -> torch.Tensor:
    """The float threshold ``value`` as an fp32 scalar tensor on ``device``, checked, from a bounded LRU cache.

    While tracing (``torch.compile``) or capturing a CUDA graph it is made fresh: the graph fills its own
    scalar on every run, and tracing never touches the cache's lock."""
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.full((), _float_threshold(value, where, name), dtype=torch.float32, device=device)
    key = (value, device)  # -0.0 and 0.0 share an entry (equal keys); a bad value raises before it is stored
    with _scalar_lock:
        t = _scalars.get(key)
        if t is not None:
            _scalars.move_to_end(key)
            return t
    t = torch.full((), _float_threshold(value, where, name), dtype=torch.float32, device=device)
    with _scalar_lock:
        _scalars[key] = t
        while len(_scalars) > SCALAR_CACHE_SIZE:
            _scalars.popitem(last=False)
    return t


def _forget(ident: int):
    def callback(ref: weakref.ref) -> None:
        with _scalar_lock:
            entry = _checked.get(ident)
            if entry is not None and entry[0] is ref:
                del _checked[ident]
    return callback


def _check_values(threshold: torch.Tensor, t32: torch.Tensor, where: str, name: str) -> None:
    """Raise unless every value of ``threshold`` is >= 0 and its float32 rounding ``t32`` is finite."""
    bad = ~torch.isfinite(t32) | (threshold < 0)
    if not bool(bad.any()):
        return
    at = bad.nonzero()[0]
    v = threshold[tuple(at)].item()
    at_s = f" (at {at.tolist()})" if threshold.dim() else ""
    if math.isfinite(v) and v >= 0:  # finite in its own dtype, inf in float32
        raise ValueError(f"{where}: {name} must be finite and >= 0, got {v}{at_s}, which is beyond float32 range "
                         "(it rounds to inf; thresholds are compared in float32)")
    raise ValueError(f"{where}: {name} must be finite and >= 0, got {v}{at_s}")


def check_threshold(threshold, K: int, device: torch.device, where: str, name: str = "threshold") -> torch.Tensor:
    """The threshold as an fp32 tensor on ``device``: ``[]`` or ``[K]``, finite and >= 0.

    A float64 threshold (a Python float or an fp64 tensor) is rounded to the nearest float32, and the
    comparison ``|x| > t`` is made in float32 with that value; a value that rounds to inf (beyond
    float32 range, ``>= 2**128 - 2**103``) raises ``ValueError``. Python floats become cached fp32
    scalars (the :data:`SCALAR_CACHE_SIZE` most recently used). A tensor's values are checked once per
    version of the tensor (a check reads them back, a host sync) and not at all during CUDA-graph capture,
    under ``torch.compile`` or on the meta device: modules check theirs when they are set.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, torch.Tensor)):
        raise TypeError(f"{where}: {name} must be a float or a tensor, got {type(threshold).__name__}")
    if not isinstance(threshold, torch.Tensor):
        return _scalar(threshold, device, where, name)
    if not threshold.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype={threshold.dtype}")
    if threshold.dim() > 1 or (threshold.dim() == 1 and threshold.shape[0] != K):
        raise ValueError(f"{where}: {name} must be a scalar or have one value per input channel ({K},), "
                         f"got shape {tuple(threshold.shape)}")
    if threshold.device != device:
        raise ValueError(f"{where}: device mismatch, {name} is on {threshold.device} but x is on {device}")
    t32 = threshold if threshold.dtype == torch.float32 else threshold.float()
    if not (torch.compiler.is_compiling() or threshold.device.type == "meta"
            or (threshold.is_cuda and torch.cuda.is_current_stream_capturing())):
        try:
            stamp = (threshold.data_ptr(), threshold._version)
        except RuntimeError:
            stamp = None
        entry = _checked.get(id(threshold))
        if stamp is None or entry is None or entry[0]() is not threshold or entry[1] != stamp:
            _check_values(threshold, t32, where, name)
            if stamp is not None:
                with _scalar_lock:
                    _checked[id(threshold)] = (weakref.ref(threshold, _forget(id(threshold))), stamp)
    return t32


def _flat(x: torch.Tensor, K: int) -> torch.Tensor:
    return x.reshape(math.prod(x.shape[:-1]), K)


def act_sparse_linear(x: torch.Tensor, weight, threshold, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x * (x.abs() > threshold), weight, bias)``, reading only the weight rows of active inputs.

    x: ``[..., K]``; weight: ``[N, K]``, or an :class:`~sparse_triton.NMTensor` of ``W^T`` (shape
    ``[K, N]``, N:M along N, from :func:`nm_input_major`) so that both sparsities multiply. The kernels
    read a dense weight stored input-major (see :func:`input_major`; the modules store theirs so) without
    a copy; a weight in any other layout (e.g. ``nn.Linear.weight``) runs the masked dense product, what
    ``F.linear`` costs: no transposed copy is made or kept, so no copy can go stale. threshold: a float or
    a float tensor ``[]`` / ``[K]`` (per input channel), >= 0, rounded to the nearest float32 (beyond
    float32 range raises ``ValueError``); bias ``[N]`` or None. The comparison is made in float32 (x upcast
    exactly) whatever x's dtype; a NaN input counts as active, so it reaches the output as in the dense
    formula. Returns ``[..., N]`` in x's dtype; differentiable for x, weight and bias (the gradients of the
    masked dense op; N:M weights: x and bias).

    On CUDA (fp16, bf16, fp32), up to 64 rows run our kernel or the masked dense product, whichever the
    tuner measured faster for the shape; a weight row is read if its input is active in any row of a tile.
    More rows run dense. CPU tensors run the pure-torch reference.

    Non-finite weights: on every path an inactive input contributes exactly nothing, so an inf or NaN in
    the weight row of an input inactive in a row never reaches that row (where ``F.linear`` would give
    ``0 * inf = NaN``; a NaN input is active). A weight found finite (checked once per version, one host
    sync) runs the plain kernels and products; one holding inf/NaN runs their exact forms.

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
    # A hand-built W^T with malformed positions would make the kernel read garbage: checked once per version.
    check_indices(w_t.indices, w_t.values.shape[-1], w_t.n, w_t.m, where)
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

    x: ``[..., H]``; w_gate, w_up: ``[I, H]``; w_down: ``[H, I]`` (stored input-major for the kernels;
    a projection whose weight is not runs the masked dense product); thresholds: floats or float ``[]`` /
    per-channel tensors (``[H]`` and ``[I]``), compared in float32 as in :func:`act_sparse_linear`;
    activation: ``silu`` (SwiGLU), ``relu`` or ``relu2`` (ReLU squared; with threshold 0 only exact zeros
    are skipped).
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
