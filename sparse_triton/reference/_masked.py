"""``masked_matmul``: a matrix product over the allowed terms only.

The rule both sparse references share with their kernels: a term the mask excludes (a key a query
cannot see, an inactive input channel) is not in the sum at all, so a NaN or inf there never reaches
the result, while an allowed term is the ordinary IEEE product. ``(a * allowed) @ b`` is not that:
``0 * inf`` and ``0 * NaN`` are NaN.
"""

from __future__ import annotations

import torch

__all__ = ["masked_matmul"]


def masked_matmul(a: torch.Tensor, b: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """``out[..., i, :] = sum of a[..., i, j] * b[..., j, :] over the j with allowed[..., i, j]``.

    a ``[..., I, J]``, b ``[..., J, N]`` (batch dims broadcast as in ``@``), allowed bool broadcastable to
    a's shape (None: every term). An excluded term adds nothing whatever ``a`` or ``b`` hold there; an
    allowed one adds ``a * b`` as IEEE arithmetic has it (``0 * inf`` = NaN, ``2 * inf`` = inf, and two
    infinities of opposite sign give NaN), which is what the dense formula restricted to the allowed terms
    gives. Differentiable in ``a`` and ``b`` (the non-finite terms carry no gradient).

    On CPU a finite ``b`` (one test) takes the plain product. Otherwise, and always on CUDA (no host
    sync), the finite part of ``b`` goes through one product and its infinities and NaNs through
    products of 0/1 indicators that count, per output, the allowed terms giving +inf, -inf or NaN.

    >>> a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> b = torch.tensor([[1.0], [float("inf")]])
    >>> masked_matmul(a, b, torch.tensor([[True, False], [True, True]])).flatten().tolist()
    [1.0, inf]
    """
    if allowed is None:
        return a @ b
    a = a.masked_fill(~allowed, 0)
    finite = torch.isfinite(b)
    if not b.is_cuda and bool(finite.all()):
        return a @ b
    zero = torch.zeros((), dtype=b.dtype, device=b.device)
    out = a @ torch.where(finite, b, zero)  # a NaN in an allowed a[i, j] makes its row NaN here already
    count = torch.float64 if a.dtype == torch.float64 else torch.float32  # exact counts up to 2^24 terms

    def f(m: torch.Tensor) -> torch.Tensor:
        return m.to(count)

    pos, neg = f(allowed & (a > 0)), f(allowed & (a < 0))
    at_zero = f(allowed & (a == 0))
    b_pinf, b_ninf = f(b == float("inf")), f(b == float("-inf"))
    n_pinf = pos @ b_pinf + neg @ b_ninf
    n_ninf = pos @ b_ninf + neg @ b_pinf
    n_nan = (pos + neg) @ f(b.isnan()) + at_zero @ f(~finite)
    extra = torch.where((n_nan > 0) | ((n_pinf > 0) & (n_ninf > 0)), float("nan"),
                        torch.where(n_pinf > 0, float("inf"), torch.where(n_ninf > 0, float("-inf"), 0.0)))
    return out + extra.to(out.dtype)
