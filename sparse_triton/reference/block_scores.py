"""Pure-torch twin of ``kernels.block_scores``: pooled query-block x key-block attention scores.

``scores[b, h, i, j] = scale * mean(q[b, h, query block i]) . mean(k[b, h // G, kv block j])``: the
means run over the rows a block really holds (the last block of a ragged sequence is shorter), and
with ``causal`` a block entirely above the diagonal (``j * BK > (i + 1) * BQ - 1``) scores ``-inf``.
These cheap estimates of where the attention mass lies are what dynamic top-k block selection ranks.
"""

from __future__ import annotations

import torch


def block_sizes(block_size) -> tuple[int, int]:
    """``(BQ, BK)`` from an int or a pair of ints."""
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        return block_size, block_size
    try:
        bq, bk = block_size
    except (TypeError, ValueError):
        raise TypeError(f"block_scores: block_size must be an int or a (BQ, BK) pair, got {block_size!r}") from None
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in (bq, bk)):
        raise TypeError(f"block_scores: block_size must be an int or a (BQ, BK) pair of ints, got {block_size!r}")
    return bq, bk


def causal_block_mask(nq: int, nkv: int, bq: int, bk: int, device) -> torch.Tensor:
    """Bool ``[nq, nkv]``: True where kv block j lies entirely above the diagonal of query block i."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nkv, device=device)[None, :]
    return j * bk > (i + 1) * bq - 1


def _pool(x: torch.Tensor, bs: int, dtype: torch.dtype) -> torch.Tensor:
    """Means of consecutive row blocks of ``x[B, H, S, D]``: ``[B, H, ceil(S / bs), D]``."""
    B, H, S, D = x.shape
    n = -(-S // bs)
    xp = torch.zeros(B, H, n * bs, D, dtype=dtype, device=x.device)
    xp[:, :, :S] = x
    counts = (S - torch.arange(n, device=x.device) * bs).clamp(max=bs).to(dtype)
    return xp.view(B, H, n, bs, D).sum(3) / counts[:, None]


def block_scores(q: torch.Tensor, k: torch.Tensor, block_size, scale: float | None = None,
                 causal: bool = False, config=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled block scores ``[B, Hq, ceil(Sq / BQ), ceil(Skv / BK)]`` of ``q[B, Hq, Sq, D]``, ``k[B, Hkv, Skv, D]``.

    ``block_size`` is ``BQ`` = ``BK`` or a pair ``(BQ, BK)``; ``scale`` defaults to ``D ** -0.5``. Float32
    out (float64 for float64 inputs). ``config`` is accepted for signature parity with the kernel
    launcher and ignored; ``out`` receives the scores.

    >>> q, k = torch.ones(1, 1, 48, 32), torch.ones(1, 1, 40, 32)
    >>> block_scores(q, k, 16, scale=1.0, causal=True)[0, 0].tolist()
    [[32.0, -inf, -inf], [32.0, 32.0, -inf], [32.0, 32.0, 32.0]]
    """
    bq, bk = block_sizes(block_size)
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"block_scores: q [B, Hq, Sq, D] and k [B, Hkv, Skv, D] must be 4-D and share B and D, "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    Hq, D, Hkv = q.shape[1], q.shape[3], k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"block_scores: q heads ({Hq}) must be a multiple of k heads ({Hkv})")
    if bq < 1 or bk < 1:
        raise ValueError(f"block_scores: block sizes must be positive, got ({bq}, {bk})")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D ** -0.5 if scale is None else float(scale)
    qp = _pool(q.detach(), bq, dtype)  # [B, Hq, NQ, D]
    kp = _pool(k.detach(), bk, dtype).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, NKV, D]
    scores = (qp @ kp.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(causal_block_mask(qp.shape[2], kp.shape[2], bq, bk, q.device), float("-inf"))
    return scores if out is None else out.copy_(scores)
