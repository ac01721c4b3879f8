"""``BlockSparseAttention``: a drop-in attention core that computes only the tiles a mask policy selects.

A policy decides the :class:`~sparse_triton.formats.block_mask.BlockMask` for each call:

* fixed: one ``BlockMask`` (:meth:`BlockSparseAttention.fixed`), or a builder ``(Sq, Skv, device) ->
  BlockMask`` whose masks are cached per ``(Sq, Skv, device)`` (:meth:`~BlockSparseAttention.causal`,
  :meth:`~BlockSparseAttention.sliding_window`, or any callable passed as ``block_mask``);
* dynamic (:meth:`BlockSparseAttention.dynamic_topk`): per query block, the kv blocks with the highest
  pooled scores ``mean(q block) . mean(k block)`` (:func:`pooled_block_scores`, a Triton kernel that
  never forms the ``Sq x Skv`` scores), then ``BlockMask.topk``; no host sync.

The attention itself is ``sparse_triton.block_sparse_attention`` (GQA-native, differentiable).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from ..formats.block_mask import BlockMask
from ..kernels import block_scores as kernel
from ..ops._dispatch import use_kernels
from ..ops.attention import block_sparse_attention
from ..reference import block_scores as reference

MaskBuilder = Callable[[int, int, torch.device], BlockMask]
_CACHE_SIZE = 8  # masks kept per module: a few sequence lengths x devices


def pooled_block_scores(q: torch.Tensor, k: torch.Tensor, block_size=64, scale: float | None = None,
                        causal: bool = False) -> torch.Tensor:
    """Pooled block scores ``[B, Hq, ceil(Sq / BQ), ceil(Skv / BK)]`` (float32, no gradient).

    ``scores[b, h, i, j] = scale * mean(q[b, h, block i]) . mean(k[b, h // (Hq // Hkv), block j])`` for
    ``q[B, Hq, Sq, D]``, ``k[B, Hkv, Skv, D]``; means over the rows a (ragged last) block holds; with
    ``causal`` a kv block wholly after the query block's last row scores ``-inf``. ``block_size`` is an
    int or ``(BQ, BK)``; ``scale`` defaults to ``D ** -0.5``. CUDA tensors (fp16, bf16, fp32; block sizes
    16..128, D in {32, 64, 96, 128, 256}) run the Triton kernel, everything else the pure-torch reference.

    >>> q, k = torch.randn(1, 4, 100, 64), torch.randn(1, 2, 100, 64)
    >>> pooled_block_scores(q, k, 32, causal=True).shape
    torch.Size([1, 4, 4, 4])
    """
    bq, bk = reference.block_sizes(block_size)
    D = q.shape[-1]
    if (use_kernels(q) and q.dtype == k.dtype and q.device == k.device and bq in kernel.BLOCK_SIZES
            and bk in kernel.BLOCK_SIZES and D in kernel.HEAD_DIMS):
        return kernel.block_scores(q.detach(), k.detach(), (bq, bk), scale=scale, causal=causal)
    return reference.block_scores(q, k, (bq, bk), scale=scale, causal=causal)


def forced_blocks(nq: int, nkv: int, bq: int, bk: int, diagonal: bool, first: bool, device) -> torch.Tensor | None:
    """Bool ``[nq, nkv]``: the kv blocks dynamic top-k always keeps, i.e. those overlapping the query
    block's own positions (``diagonal``) and kv block 0 (``first``, the attention sink); None if neither."""
    if not (diagonal or first):
        return None
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nkv, device=device)[None, :]
    keep = torch.zeros(nq, nkv, dtype=torch.bool, device=device)
    if diagonal:
        keep |= (j * bk < (i + 1) * bq) & ((j + 1) * bk > i * bq)
    if first:
        keep |= j == 0
    return keep


class BlockSparseAttention(nn.Module):
    """Scaled dot-product attention over the tiles a mask policy selects: ``forward(q, k, v) -> o``.

    q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Skv, D]`` with ``Hq % Hkv == 0`` (query head ``h`` uses kv
    head ``h // (Hq // Hkv)``; k/v are never repeated). Returns ``o`` like q. Differentiable w.r.t.
    q, k, v. Build it with a constructor: :meth:`fixed`, :meth:`causal`, :meth:`sliding_window`,
    :meth:`dynamic_topk`, or pass ``block_mask`` (a ``BlockMask`` or a builder
    ``(Sq, Skv, device) -> BlockMask``, cached per ``(Sq, Skv, device)``).

    ``scale`` defaults to ``D ** -0.5``; ``causal`` (stored as ``is_causal``, the default of ``forward``'s
    ``causal``) ANDs the top-left aligned rule ``k <= q`` into the mask. The module holds no parameters
    or buffers (its state_dict is empty), so swapping it into a model leaves checkpoints unchanged.

    >>> import sparse_triton as st
    >>> attn = st.nn.BlockSparseAttention.sliding_window(64, block_size=64)
    >>> q = torch.randn(1, 4, 160, 64)
    >>> k = v = torch.randn(1, 2, 160, 64)
    >>> attn(q, k, v).shape
    torch.Size([1, 4, 160, 64])
    """

    def __init__(self, block_mask: BlockMask | MaskBuilder | None = None, *, scale: float | None = None,
                 causal: bool = False, name: str | None = None):
        super().__init__()
        where = "BlockSparseAttention"
        if block_mask is not None and not isinstance(block_mask, BlockMask) and not callable(block_mask):
            raise TypeError(f"{where}: block_mask must be a BlockMask, a callable (Sq, Skv, device) -> BlockMask "
                            f"or None (a dynamic policy), got {type(block_mask).__name__}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise TypeError(f"{where}: scale must be a float or None, got {type(scale).__name__}")
        self.block_mask = block_mask
        self.scale = None if scale is None else float(scale)
        self.is_causal = bool(causal)
        self.policy = name or ("fixed" if isinstance(block_mask, BlockMask) else "callable")
        self.policy_args: dict = {}
        self.topk: dict | None = None  # dynamic top-k settings (see dynamic_topk)
        self._masks: OrderedDict = OrderedDict()

    # -- constructors -----------------------------------------------------------------------------------

    @classmethod
    def fixed(cls, block_mask: BlockMask, *, scale: float | None = None, causal: bool = False) -> BlockSparseAttention:
        """Always the same ``block_mask`` (moved to the inputs' device on first use, then cached)."""
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"BlockSparseAttention.fixed: expected a BlockMask, got {type(block_mask).__name__}")
        return cls(block_mask, scale=scale, causal=causal, name="fixed")

    @classmethod
    def causal(cls, block_size=128, *, scale: float | None = None) -> BlockSparseAttention:
        """Dense causal attention (every tile on or below the diagonal): ``SDPA(is_causal=True)``."""
        def build(sq, skv, device):
            return BlockMask.causal((sq, skv), block_size=block_size, device=device)

        self = cls(build, scale=scale, causal=True, name="causal")
        self.policy_args = {"block_size": block_size}
        return self

    @classmethod
    def sliding_window(cls, window: int, block_size=128, *, causal: bool = True,
                       scale: float | None = None) -> BlockSparseAttention:
        """Local attention: causal ``q - window < k <= q``, non-causal ``|q - k| < window``."""
        def build(sq, skv, device):
            return BlockMask.sliding_window((sq, skv), window, block_size=block_size, causal=causal, device=device)

        self = cls(build, scale=scale, causal=causal, name="sliding_window")
        self.policy_args = {"window": window, "block_size": block_size}
        return self

    @classmethod
    def dynamic_topk(cls, k_blocks: int | None = None, *, density: float | None = None, block_size: int = 64,
                     causal: bool = True, always_keep_diagonal: bool = True, keep_first_block: bool = True,
                     scale: float | None = None) -> BlockSparseAttention:
        """Per query block, the ``k_blocks`` kv blocks (or ``ceil(density * NKV)``) with the highest pooled
        score ``mean(q block) . mean(k block)``, chosen per batch element and query head on every call.

        ``always_keep_diagonal`` keeps the kv blocks overlapping the query block's own positions and
        ``keep_first_block`` kv block 0 (the attention sink); both count toward the budget, which is
        raised to cover them. With ``causal`` blocks above the diagonal are never chosen.

        >>> attn = BlockSparseAttention.dynamic_topk(k_blocks=2, block_size=64)
        >>> q = k = v = torch.randn(1, 2, 300, 32)
        >>> attn.block_mask_for(q, k).to_dense().sum(-1).tolist()
        [[[1, 2, 2, 2, 2], [1, 2, 2, 2, 2]]]
        """
        where = "BlockSparseAttention.dynamic_topk"
        if (k_blocks is None) == (density is None):
            raise ValueError(f"{where}: give exactly one of k_blocks and density")
        if k_blocks is not None and (isinstance(k_blocks, bool) or not isinstance(k_blocks, int) or k_blocks < 1):
            raise ValueError(f"{where}: k_blocks must be a positive int, got {k_blocks!r}")
        if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
            raise ValueError(f"{where}: density must be in (0, 1], got {density!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{where}: block_size must be a positive int, got {block_size!r}")
        self = cls(None, scale=scale, causal=causal, name="dynamic_topk")
        self.topk = {"k_blocks": k_blocks, "density": None if density is None else float(density),
                     "block_size": block_size, "always_keep_diagonal": bool(always_keep_diagonal),
                     "keep_first_block": bool(keep_first_block)}
        self.policy_args = {k: v for k, v in self.topk.items() if v is not None}
        return self

    # -- masks --------------------------------------------------------------------------------------------

    def block_mask_for(self, q: torch.Tensor, k: torch.Tensor, causal: bool | None = None) -> BlockMask:
        """The ``BlockMask`` this module uses for ``q[B, Hq, Sq, D]`` and ``k[B, Hkv, Skv, D]``."""
        causal = self.is_causal if causal is None else bool(causal)
        Sq, Skv = q.shape[2], k.shape[2]
        if self.topk is not None:
            return self._topk_mask(q, k, causal)
        key = (Sq, Skv, q.device)
        mask = self._masks.get(key)
        if mask is None:
            if isinstance(self.block_mask, BlockMask):
                mask = self.block_mask.to(q.device)
            else:
                mask = self.block_mask(Sq, Skv, q.device)
                if not isinstance(mask, BlockMask):
                    raise TypeError(f"BlockSparseAttention: the mask builder returned {type(mask).__name__}, "
                                    "expected a BlockMask")
            self._masks[key] = mask
            if len(self._masks) > _CACHE_SIZE:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(key)
        return mask

    def _topk_mask(self, q: torch.Tensor, k: torch.Tensor, causal: bool) -> BlockMask:
        cfg = self.topk
        bs = cfg["block_size"]
        Sq, Skv = q.shape[2], k.shape[2]
        nq, nkv = -(-Sq // bs), -(-Skv // bs)
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        with torch.no_grad():
            scores = pooled_block_scores(q, k, bs, scale=scale, causal=causal)
            kk = cfg["k_blocks"] if cfg["k_blocks"] is not None else math.ceil(cfg["density"] * nkv)
            keep = forced_blocks(nq, nkv, bs, bs, cfg["always_keep_diagonal"], cfg["keep_first_block"], q.device)
            if keep is not None:
                # +inf ranks first in BlockMask.topk; with BQ == BK a row forces at most 2 blocks.
                scores = scores.masked_fill(keep, float("inf"))
                kk = max(kk, int(cfg["always_keep_diagonal"]) + int(cfg["keep_first_block"]))
        return BlockMask.topk(scores, max(1, kk), block_size=bs, seq_lens=(Sq, Skv), causal=causal)

    # -- forward --------------------------------------------------------------------------------------------

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool | None = None,
                scale: float | None = None) -> torch.Tensor:
        """``o[B, Hq, Sq, D]``; ``causal`` and ``scale`` override the module's defaults for this call."""
        causal = self.is_causal if causal is None else bool(causal)
        scale = self.scale if scale is None else float(scale)
        mask = self.block_mask_for(q, k, causal)
        return block_sparse_attention(q, k, v, mask, scale=scale, causal=causal)

    def extra_repr(self) -> str:
        args = "".join(f", {k}={v}" for k, v in self.policy_args.items())
        return f"policy={self.policy}{args}, causal={self.is_causal}, scale={self.scale}"
