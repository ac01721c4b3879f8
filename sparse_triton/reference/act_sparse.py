"""Pure-torch twins of the activation-sparse kernels (``kernels.act_sparse``): the specification, the test
oracle and the CPU path.

The rule, everywhere: input channel ``k`` of row ``i`` is **active** unless ``|x[i, k]| <= t`` (``t`` the
layer's threshold, one value or one per input channel), the comparison made in float32 with ``x``
upcast exactly. An inactive channel contributes nothing; the result is
``F.linear(x * (|x| > t), W, b)``. A NaN input is active (``|NaN| <= t`` is false), so it reaches the
output as it does in that formula (NaN), never hidden by the skipping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats.nm import NMTensor

ACTIVATIONS = ("silu", "relu", "relu2")


def active(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., K]``: which inputs pass the threshold (NaN passes), compared in float32."""
    return ~(x.float().abs() <= threshold.float())


def masked(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``x`` with its inactive inputs set to zero (same dtype)."""
    return torch.where(active(x, threshold), x, torch.zeros((), dtype=x.dtype, device=x.device))


def act_sparse_matmul(x: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[M, N] = masked(x)[M, K] @ weight[N, K]^T (+ bias)`` in ``x``'s dtype."""
    return F.linear(masked(x, threshold), weight, bias)


def act_sparse_nm_matmul(x: torch.Tensor, weight_t: NMTensor, threshold: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """As :func:`act_sparse_matmul` with the input-major weight ``W^T[K, N]`` N:M compressed along N."""
    return F.linear(masked(x, threshold), weight_t.to_dense().t(), bias)


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
    xm = masked(x, threshold).float()
    g = F.linear(xm, w_gate.float())
    u = F.linear(xm, w_up.float())
    return (activate(g, activation) * u).to(x.dtype)


def act_sparse_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                   threshold_in: torch.Tensor, threshold_mid: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """A gated MLP with both sparse inputs: ``masked(h, t_mid) @ Wd^T``, ``h`` from
    :func:`act_sparse_gate_up`. ``w_down``: ``[H, I]``; returns ``[M, H]``."""
    h = act_sparse_gate_up(x, w_gate, w_up, threshold_in, activation)
    return act_sparse_matmul(h, w_down, threshold_mid)
