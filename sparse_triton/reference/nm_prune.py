"""Pure-torch twin of ``kernels.nm_prune``: dense rows -> N:M compressed (values, packed indices)."""

from __future__ import annotations

import torch

from ..formats.nm import NMTensor, _grouped, _mask_last, pack_indices


def nm_prune_compress(w: torch.Tensor, n: int, m: int, config=None,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress ``w[R, K]`` along its last dim: ``values[R, S]`` (``w.dtype``), ``indices[R, W]`` (int32).

    ``S = ceil(K / m) * n`` and ``W = ceil(S / P)``; layout in ``sparse_triton.formats.nm``. ``config``
    is accepted for signature parity with the kernel launcher and ignored.
    """
    R = w.shape[0]
    keep = _mask_last(w, n, m)  # [R, G, m]
    G = keep.shape[1]
    # Kept positions in ascending order: a stable sort puts the kept ones first, in position order.
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :n]  # [R, G, n]
    values = _grouped(w, m, 0).gather(-1, order).reshape(R, G * n)
    values, indices = values.contiguous(), pack_indices(order.reshape(R, G * n), m)
    if out is not None:
        out[0].copy_(values)
        out[1].copy_(indices)
        return out
    return values, indices


def nm_gather(dense: torch.Tensor, indices: torch.Tensor, n: int, m: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Read ``dense[R, K]`` at the kept positions given by packed ``indices``: ``values[R, S]``."""
    R, K = dense.shape
    proto = NMTensor(dense.new_empty(R, NMTensor.slots_for(K, n, m)), indices, (R, K), n, m)
    values = proto.gather(dense)
    return values if out is None else out.copy_(values)
