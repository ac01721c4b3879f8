"""Pure-torch twins of the activation-sparse kernels (``kernels.act_sparse``): the specification, the test
oracle and the CPU path.

The rule, everywhere: input channel ``k`` of row ``i`` is **active** unless ``|x[i, k]| <= t`` (``t`` the
layer's threshold, one value or one per input channel), the comparison made in float32 with ``x``
upcast exactly. An inactive channel contributes exactly nothing: its weight row is never read, so a
non-finite weight there does not reach the output; the result is ``F.linear(x * (|x| > t), W, b)``
wherever the weight rows of inactive channels are finite (there, ``0 * inf`` would make that formula
NaN; the rule gives the sum over the active channels alone). A NaN input is active (``|NaN| <= t`` is
false), so it reaches the output as it does in that formula (NaN), never hidden by the skipping. The
products over active channels run through :func:`._masked.masked_matmul`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats.nm import NMTensor
from ._masked import masked_matmul

ACTIVATIONS = ("silu", "relu", "relu2")


def active(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., K]``: which inputs pass the threshold (NaN passes), compared in float32."""
    return ~(x.float().abs() <= threshold.float())


def masked(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``x`` with its inactive inputs set to zero (same dtype)."""
    return torch.where(active(x, threshold), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _linear(x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """``x[M, K] @ weight_t[K, N] (+ bias)`` over each row's active channels only."""
    y = masked_matmul(x, weight_t, active(x, threshold))
    return y if bias is None else y + bias


def act_sparse_matmul(x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[M, N] = masked(x)[M, K] @ weight[N, K]^T (+ bias)`` in ``x``'s dtype; a non-finite weight of a
    channel inactive in row ``i`` does not reach ``y[i]`` (module docstring)."""
    return _linear(x, weight.t(), threshold, bias)


def act_sparse_nm_matmul(x: torch.Tensor, weight_t: NMTensor, threshold: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """As :func:`act_sparse_matmul` with the input-major weight ``W^T[K, N]`` N:M compressed along N."""
    return _linear(x, weight_t.to_dense(), threshold, bias)


def activate(g: torch.Tensor, activation: str) -> torch.Tensor:
    """The gate nonlinearity of a gated MLP: ``silu``, ``relu`` or ``relu2`` (ReLU squared)."""
    if activation == "silu":
        return F.silu(g)
    if activation == "relu":
        return torch.relu(g)
    if activation == "relu2":
        return torch.relu(g).square()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def act_sparse_gate_up(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, threshold: torch.Tensor,
                       activation: str) -> torch.Tensor:
    """The intermediate ``h[M, I] = act(masked(x) @ Wg^T) * (masked(x) @ Wu^T)``, computed in float32 (as
    the fused kernel does) and returned in ``x``'s dtype. ``w_gate``, ``w_up``: ``[I, K]``."""
    xf, on = x.float(), active(x, threshold)
    g = masked_matmul(xf, w_gate.float().t(), on)
    u = masked_matmul(xf, w_up.float().t(), on)
    return (activate(g, activation) * u).to(x.dtype)


def act_sparse_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                   threshold_in: torch.Tensor, threshold_mid: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """A gated MLP with both sparse inputs: ``masked(h, t_mid) @ Wd^T``, ``h`` from
    :func:`act_sparse_gate_up`. ``w_down``: ``[H, I]``; returns ``[M, H]``."""
    h = act_sparse_gate_up(x, w_gate, w_up, threshold_in, activation)
    return act_sparse_matmul(h, w_down, threshold_mid)
