"""``BlockSparseAttention``: a drop-in attention core that computes only the tiles a mask policy selects.

A policy decides the :class:`~sparse_triton.formats.block_mask.BlockMask` for each call:

* fixed: one ``BlockMask`` (:meth:`BlockSparseAttention.fixed`), or a builder ``(Sq, Skv, device) ->
  BlockMask`` whose masks are cached per ``(Sq, Skv, device)`` (:meth:`~BlockSparseAttention.causal`,
  :meth:`~BlockSparseAttention.sliding_window` (both a :class:`BandMasks`), or any callable passed as
  ``block_mask``);
* dynamic (:meth:`BlockSparseAttention.dynamic_topk`): per query block, the kv blocks with the highest
  pooled scores ``mean(q block) . mean(k block)`` (:func:`pooled_block_scores`, a Triton kernel that
  never forms the ``Sq x Skv`` scores), then ``BlockMask.topk``; no host sync.

Query positions. ``forward(q, k, v)`` is the classic call: query ``i`` and key ``j`` sit at positions
``i`` and ``j`` (top-left aligned, like the op's ``causal``). ``forward(q, k, v, q_offset=o)`` computes
the rows ``o .. o + Sq - 1`` of the attention over keys ``0 .. Skv - 1``: query ``i`` sits at ``o + i``
(``o = Skv - Sq`` when decoding with a KV cache: bottom-right aligned). Causality and windows then
follow absolute positions, a fixed mask built for the full length supplies its rows for those
positions, and the ``BlockMask`` handed to the op carries the whole rule in its element bitmasks (the
op's top-left ``causal`` flag is not used). With at most 16 queries (and no gradient) the mask has one
query block of 16 rows, the layout the split-kv decode kernel runs on CUDA. Causal and window masks for
such calls cost ``O(Skv / BK)`` to build, so a decode loop whose ``Skv`` grows every step needs no cache.

The attention itself is ``sparse_triton.block_sparse_attention`` (GQA-native, differentiable). Every
policy is plain data plus module-level classes: modules pickle, deepcopy and ``torch.save`` whole.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from ..formats._checks import check_block_size, check_bool, check_int
from ..formats.block_mask import BlockMask, check_block_mask, pack_bits, unpack_bits
from ..kernels import block_scores as kernel
from ..ops._dispatch import use_kernels
from ..ops.attention import block_sparse_attention
from ..reference import block_scores as reference

MaskBuilder = Callable[[int, int, torch.device], BlockMask]
_CACHE_SIZE = 8  # masks kept per module: a few sequence lengths x devices
DECODE_QUERY_BLOCK = 16  # query block of q_offset masks with <= 16 queries: one block, as the decode kernel takes
_EMPTY, _PARTIAL, _FULL = 0, 1, 2  # tile kinds, as in formats/block_mask.py


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
    check_bool(causal, "causal", "pooled_block_scores")
    bq, bk = reference.block_sizes(block_size)
    D = q.shape[-1]
    if (use_kernels(q) and q.dtype == k.dtype and q.device == k.device and bq in kernel.BLOCK_SIZES
            and bk in kernel.BLOCK_SIZES and D in kernel.HEAD_DIMS):
        return kernel.block_scores(q.detach(), k.detach(), (bq, bk), scale=scale, causal=causal)
    return reference.block_scores(q, k, (bq, bk), scale=scale, causal=causal)


def forced_blocks(nq: int, nkv: int, bq: int, bk: int, diagonal: bool, first: bool, device) -> torch.Tensor | None:
    """Bool ``[nq, nkv]``: the kv blocks dynamic top-k always keeps, i.e. those overlapping the query
    block's own positions (``diagonal``) and kv block 0 (``first``, the attention sink); None if neither."""
    check_bool(diagonal, "diagonal", "forced_blocks")
    check_bool(first, "first", "forced_blocks")
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


# ------------------------------------------------------------------------------------------------------
# masks for the rows q_offset .. q_offset + Sq - 1 of a full-length attention


def _is_flex_block_mask(value) -> bool:
    flex = sys.modules.get("torch.nn.attention.flex_attention")  # loaded wherever such a mask exists
    return flex is not None and isinstance(value, getattr(flex, "BlockMask", ()))


def query_block(Sq: int, BQ: int, needs_grad: bool) -> int:
    """Query block size of a ``q_offset`` mask: 16 (one block, the decode kernel's layout) for at most 16
    queries without gradient, else the policy's ``BQ`` (the prefill and backward kernels take 64 / 128)."""
    return DECODE_QUERY_BLOCK if Sq <= DECODE_QUERY_BLOCK and not needs_grad else BQ


def _row_lists(kind: torch.Tensor, slot: torch.Tensor | None):
    """Tile kinds ``[B, H, NQ, NKV]`` (int8: 0 empty, 1 partial, 2 full) and per-tile bitmask slots ->
    ``BlockMask``'s row lists ``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
    kv_bits_slot)``: one stable sort, no host sync."""
    N = kind.shape[-1]
    order = torch.sort(kind, dim=-1, descending=True, stable=True).indices  # full..., partial..., empty...
    full_cnt = (kind == _FULL).sum(-1, dtype=torch.int32)
    part_cnt = (kind == _PARTIAL).sum(-1, dtype=torch.int32)
    pos = torch.arange(N, device=kind.device)
    part_idx = torch.gather(order, -1, torch.clamp(pos + full_cnt.unsqueeze(-1), max=max(N - 1, 0)))
    part_slot = None
    if slot is not None:
        part_slot = torch.gather(slot.expand(kind.shape), -1, part_idx)
        part_slot = torch.where(pos < part_cnt.unsqueeze(-1), part_slot, torch.full_like(part_slot, -1))
    return part_cnt, part_idx.to(torch.int32), full_cnt, order.to(torch.int32), part_slot


def _assemble(kind, slot, bits, block_size, seq_lens) -> BlockMask:
    cnt, idx, fcnt, fidx, part_slot = _row_lists(kind, slot if bits is not None else None)
    return BlockMask(cnt, idx, fcnt, fidx, block_size=block_size, seq_lens=seq_lens, causal=False,
                     partial_bits=bits, kv_bits_slot=part_slot if bits is not None else None, validate=False)


def band_rows_mask(q_offset: int, Sq: int, Skv: int, block_size, lo: int | None, hi: int | None, device,
                   select: torch.Tensor | None = None) -> BlockMask:
    """The rows ``q_offset .. q_offset + Sq - 1`` of the band rule ``lo <= q - k <= hi`` (None: unbounded;
    causal is ``lo = 0``, a causal window of ``w`` adds ``hi = w - 1``) over keys ``0 .. Skv - 1``, as a
    ``BlockMask`` for ``(Sq, Skv)`` (``causal=False``: the rule lives in its bitmasks).

    Tiles are classified by arithmetic on their corner positions (``O(NQ * NKV)``); element bitmasks are
    evaluated only for the few tiles per query block that a band edge or the kv tail cuts
    (``O(NQ * BQ * BK)``), so a decode step costs ``O(Skv / BK)``, and nothing syncs the host.
    ``select``: optional bool ``[B|1, H|1, NQ, NKV]``, the only tiles to keep (dynamic top-k).

    >>> m = band_rows_mask(999, 1, 1000, (16, 64), 0, 99, "cpu")  # decode: query 999 sees keys 900..999
    >>> m.shape, m.element_mask()[0, 0, 0].nonzero().flatten()[[0, -1]].tolist()
    ((1, 1, 1, 16), [900, 999])
    """
    BQ, BK = block_size
    NQ, NKV = -(-Sq // BQ), -(-Skv // BK)
    i = torch.arange(NQ, device=device)[:, None]
    j = torch.arange(NKV, device=device)[None, :]
    q0 = q_offset + i * BQ  # first and last (real) query position of each query block
    q1 = q_offset + torch.clamp((i + 1) * BQ, max=Sq) - 1
    k0 = j * BK
    k1 = torch.clamp(k0 + BK, max=Skv) - 1
    tail = k0 + BK > Skv
    dmin, dmax = q0 - k1, q1 - k0  # q - k takes every integer value in between on the tile
    some = torch.ones(NQ, NKV, dtype=torch.bool, device=device)
    inside = some.clone()
    if lo is not None:
        some, inside = some & (dmax >= lo), inside & (dmin >= lo)
    if hi is not None:
        some, inside = some & (dmin <= hi), inside & (dmax <= hi)
    kind = torch.where(some, torch.where(inside & ~tail, _FULL, _PARTIAL), _EMPTY).to(torch.int8)
    # A tile the band only partly covers holds a key q - lo (or q - hi) of one of its rows: per query
    # block, the kv blocks of keys q0 - edge .. q1 - edge, plus the kv tail. Clamped duplicates are harmless.
    span = (BQ - 1) // BK + 2
    t = torch.arange(span, device=device)[None, :]
    cols = [torch.div(q0 - edge, BK, rounding_mode="floor") + t for edge in (lo, hi) if edge is not None]
    cols.append(torch.full((NQ, 1), NKV - 1, device=device))
    cols = torch.cat(cols, 1).clamp(0, max(NKV - 1, 0))  # [NQ, C]
    C = cols.shape[1]
    r = (i * BQ)[:, :, None, None] + torch.arange(BQ, device=device)[:, None]  # [NQ, 1, BQ, 1]
    k = (cols * BK)[:, :, None, None] + torch.arange(BK, device=device)  # [NQ, C, 1, BK]
    d = q_offset + r - k
    e = (r < Sq) & (k < Skv)
    if lo is not None:
        e = e & (d >= lo)
    if hi is not None:
        e = e & (d <= hi)
    bits = pack_bits(e).reshape(NQ * C, BQ, -1)  # [NQ * C, BQ, ceil(BK / 32)]
    ids = (torch.arange(NQ, device=device)[:, None] * C + torch.arange(C, device=device)).to(torch.int32)
    slot = torch.full((NQ, NKV), -1, dtype=torch.int32, device=device).scatter_(1, cols, ids)
    kind, slot = kind[None, None], slot[None, None]
    if select is not None:
        kind = torch.where(select, kind, torch.zeros((), dtype=torch.int8, device=device))
    return _assemble(kind, slot, bits, (BQ, BK), (Sq, Skv))


def element_rows_mask(allowed: torch.Tensor, block_size) -> BlockMask:
    """A ``BlockMask`` for ``(Sq, Skv)`` with exactly the element rule ``allowed`` (bool ``[B|1, H|1, Sq,
    Skv]``): tiles with no allowed element dropped, fully allowed in-bounds tiles full, the rest partial
    with a bitmask each (``O(Sq * Skv)``). ``causal=False``."""
    BQ, BK = block_size
    Bm, Hm, Sq, Skv = allowed.shape
    NQ, NKV = -(-Sq // BQ), -(-Skv // BK)
    e = allowed.new_zeros(Bm, Hm, NQ * BQ, NKV * BK)
    e[:, :, :Sq, :Skv] = allowed
    tiles = e.view(Bm, Hm, NQ, BQ, NKV, BK).permute(0, 1, 2, 4, 3, 5)  # [Bm, Hm, NQ, NKV, BQ, BK]
    real = (torch.arange(NQ * BQ, device=e.device) < Sq).view(NQ, 1, BQ, 1)
    any_ = tiles.flatten(-2).any(-1)
    all_ = (tiles | ~real).flatten(-2).all(-1)  # keys past Skv are never allowed: the kv tail stays partial
    kind = torch.where(any_, torch.where(all_, _FULL, _PARTIAL), _EMPTY).to(torch.int8)
    bits = pack_bits(tiles).reshape(Bm * Hm * NQ * NKV, BQ, -1)
    slot = torch.arange(Bm * Hm * NQ * NKV, dtype=torch.int32, device=e.device).view(Bm, Hm, NQ, NKV)
    return _assemble(kind, slot, bits, (BQ, BK), (Sq, Skv))


def mask_rows(mask: BlockMask, q_offset: int, Sq: int, Skv: int, BQ: int, causal: bool) -> BlockMask:
    """Rows ``q_offset .. q_offset + Sq - 1`` and columns ``0 .. Skv - 1`` of the element rule of ``mask``
    (a mask for the full length), ANDed with causal ``k <= q`` (absolute positions) if ``causal``, as a
    ``BlockMask`` for ``(Sq, Skv)`` with query blocks of ``BQ`` and ``mask``'s BK. Reads only the mask's
    rows for those positions (``O(Sq * Skv)``).

    >>> full = BlockMask.sliding_window(256, window=64, block_size=64)
    >>> rows = mask_rows(full, 200, 1, 201, 16, causal=False)
    >>> torch.equal(rows.element_mask()[0, 0], full.element_mask()[0, 0, 200:201, :201])
    True
    """
    where = "BlockSparseAttention"
    (BQm, BK), (Sm, Skm) = mask.block_size, mask.seq_lens
    if q_offset + Sq > Sm or Skv > Skm:
        raise ValueError(f"{where}: block_mask was built for seq_lens=({Sm}, {Skm}); the call needs its rows "
                         f"{q_offset}..{q_offset + Sq - 1} over {Skv} keys (q_offset={q_offset}, Sq={Sq}, Skv={Skv})")
    dev = mask.device
    Bm, Hm, NQm, NKVm = mask.shape
    NKV = -(-Skv // BK)
    p = q_offset + torch.arange(Sq, device=dev)  # absolute query positions
    a = torch.div(p, BQm, rounding_mode="floor")  # their query blocks in ``mask``
    allowed = mask.to_dense()[:, :, a, :NKV, None].expand(Bm, Hm, Sq, NKV, BK)
    if mask.partial_bits is not None and mask.partial_bits.shape[0] > 0:
        cnt, idx = mask.kv_num_blocks[:, :, a], mask.kv_indices[:, :, a].long()
        col = torch.where(torch.arange(NKVm, device=dev) < cnt.unsqueeze(-1), idx, NKVm)
        src = mask.kv_bits_slot.expand(Bm, Hm, NQm, NKVm)[:, :, a]
        slot = torch.full((Bm, Hm, Sq, NKVm + 1), -1, dtype=torch.int32, device=dev).scatter_(-1, col, src)
        slot = slot[..., :NKV]
        words = mask.partial_bits[slot.clamp(min=0), (p % BQm)[:, None]]  # [Bm, Hm, Sq, NKV, W]
        allowed = allowed & ((slot < 0).unsqueeze(-1) | unpack_bits(words, BK))
    allowed = allowed.reshape(Bm, Hm, Sq, NKV * BK)[..., :Skv]
    if causal or mask.causal:
        allowed = allowed & (torch.arange(Skv, device=dev) <= p[:, None])
    return element_rows_mask(allowed, (BQ, BK))


class BandMasks:
    """Mask builder of the causal and sliding-window policies: ``(Sq, Skv, device) -> BlockMask``
    (top-left: :meth:`BlockMask.causal` / :meth:`BlockMask.sliding_window`), and :meth:`rows` for calls
    with a query offset. A module-level class holding only numbers, so policies pickle.

    ``window=None``: causal (``causal=True``) or every key; else causal ``q - window < k <= q`` or, with
    ``causal=False``, ``|q - k| < window``.

    >>> BandMasks(64, 64)(128, 128, "cpu").kv_num_blocks.tolist()
    [[[1, 2]]]
    """

    def __init__(self, window: int | None, block_size=128, causal: bool = True):
        where = "BandMasks"
        self.window = None if window is None else check_int(window, "window", where, 1)
        self.block_size = check_block_size(block_size, where)
        self.causal = check_bool(causal, "causal", where)

    def __call__(self, Sq: int, Skv: int, device) -> BlockMask:
        if self.window is not None and torch.device(device).type == "meta":
            # BlockMask.sliding_window finds its cut tiles with nonzero(), which meta tensors cannot run;
            # the band builder states the same rule without data-dependent shapes.
            return self.rows(0, Sq, Skv, device)
        if self.window is not None:
            return BlockMask.sliding_window((Sq, Skv), self.window, block_size=self.block_size, causal=self.causal,
                                            device=device)
        if self.causal:
            return BlockMask.causal((Sq, Skv), block_size=self.block_size, device=device)
        BQ, BK = self.block_size
        sel = torch.ones(-(-Sq // BQ), -(-Skv // BK), dtype=torch.bool, device=device)
        return BlockMask.from_dense(sel, block_size=self.block_size, seq_lens=(Sq, Skv))

    def band(self, causal: bool = False) -> tuple[int | None, int | None]:
        """``(lo, hi)`` of the rule ``lo <= q - k <= hi`` (None: unbounded), ANDed with causal if ``causal``."""
        lo = hi = None
        if self.window is not None:
            lo, hi = (0 if self.causal else 1 - self.window), self.window - 1
        elif self.causal:
            lo = 0
        if causal:
            lo = 0 if lo is None else max(lo, 0)
        return lo, hi

    def rows(self, q_offset: int, Sq: int, Skv: int, device, causal: bool = False, BQ: int | None = None) -> BlockMask:
        """The mask of queries at positions ``q_offset .. q_offset + Sq - 1`` over keys ``0 .. Skv - 1``
        (:func:`band_rows_mask`), causal ANDed if ``causal``, query blocks of ``BQ`` (None: the builder's).

        A custom builder may offer the same method: ``BlockSparseAttention`` then calls it for every call
        with a query offset instead of building the full-length mask and taking its rows."""
        lo, hi = self.band(causal)
        return band_rows_mask(q_offset, Sq, Skv, (BQ or self.block_size[0], self.block_size[1]), lo, hi, device)

    def __repr__(self) -> str:
        return f"BandMasks(window={self.window}, block_size={self.block_size}, causal={self.causal})"


# ------------------------------------------------------------------------------------------------------


class BlockSparseAttention(nn.Module):
    """Scaled dot-product attention over the tiles a mask policy selects: ``forward(q, k, v) -> o``.

    q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Skv, D]`` with ``Hq % Hkv == 0`` (query head ``h`` uses kv
    head ``h // (Hq // Hkv)``; k/v are never repeated). Returns ``o`` like q. Differentiable w.r.t.
    q, k, v. Build it with a constructor: :meth:`fixed`, :meth:`causal`, :meth:`sliding_window`,
    :meth:`dynamic_topk`, or pass ``block_mask`` (a ``BlockMask`` or a builder
    ``(Sq, Skv, device) -> BlockMask``, cached per ``(Sq, Skv, device)``). Calls with ``q_offset`` use a
    builder's ``rows(q_offset, Sq, Skv, device, causal, BQ=None)`` method if it has one (as
    :class:`BandMasks` does), else the rows of its mask for the leading ``S x S`` square.

    ``scale`` defaults to ``D ** -0.5``; ``causal`` (stored as ``is_causal``, the default of ``forward``'s
    ``causal``) ANDs the causal rule ``k <= q`` into the mask (top-left aligned, or at absolute positions
    with ``q_offset``, see the module docstring). The module holds no parameters or buffers (its
    state_dict is empty), so swapping it into a model leaves checkpoints unchanged; the masks it caches
    are not pickled.

    >>> import sparse_triton as st
    >>> attn = st.nn.BlockSparseAttention.sliding_window(64, block_size=64)
    >>> q = torch.randn(1, 4, 160, 64)
    >>> k = v = torch.randn(1, 2, 160, 64)
    >>> attn(q, k, v).shape
    torch.Size([1, 4, 160, 64])
    >>> attn(q[:, :, -1:], k, v, q_offset=159).shape  # one decode step: query 159 against keys 0..159
    torch.Size([1, 4, 1, 64])
    """

    def __init__(self, block_mask: BlockMask | MaskBuilder | None = None, *, scale: float | None = None,
                 causal: bool = False, name: str | None = None):
        super().__init__()
        where = "BlockSparseAttention"
        if _is_flex_block_mask(block_mask):
            check_block_mask(block_mask, "block_mask", where)  # raises, naming BlockMask.from_flex
        if block_mask is not None and not isinstance(block_mask, BlockMask) and not callable(block_mask):
            raise TypeError(f"{where}: block_mask must be a BlockMask, a callable (Sq, Skv, device) -> BlockMask "
                            f"or None (a dynamic policy), got {type(block_mask).__name__}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise TypeError(f"{where}: scale must be a float or None, got {type(scale).__name__}")
        self.block_mask = block_mask
        self.scale = None if scale is None else float(scale)
        self.is_causal = check_bool(causal, "causal", where)
        self.policy = name or ("fixed" if isinstance(block_mask, BlockMask) else "callable")
        self.policy_args: dict = {}
        self.topk: dict | None = None  # dynamic top-k settings (see dynamic_topk)
        self._masks: OrderedDict = OrderedDict()

    def __getstate__(self) -> dict:
        # Cached masks are derived data (possibly large, on a device): pickles and deep copies start empty.
        state = self.__dict__.copy()
        state["_masks"] = OrderedDict()
        return state

    # -- constructors -----------------------------------------------------------------------------------

    @classmethod
    def fixed(cls, block_mask: BlockMask, *, scale: float | None = None, causal: bool = False) -> BlockSparseAttention:
        """Always the same ``block_mask`` (moved to the inputs' device on first use, then cached). Calls with
        ``q_offset`` use its rows for the queries' positions (and its first ``Skv`` columns)."""
        check_block_mask(block_mask, "block_mask", "BlockSparseAttention.fixed")
        return cls(block_mask, scale=scale, causal=causal, name="fixed")

    @classmethod
    def causal(cls, block_size=128, *, scale: float | None = None) -> BlockSparseAttention:
        """Dense causal attention (every tile on or below the diagonal): ``SDPA(is_causal=True)``."""
        self = cls(BandMasks(None, block_size, causal=True), scale=scale, causal=True, name="causal")
        self.policy_args = {"block_size": block_size}
        return self

    @classmethod
    def sliding_window(cls, window: int, block_size=128, *, causal: bool = True,
                       scale: float | None = None) -> BlockSparseAttention:
        """Local attention: causal ``q - window < k <= q``, non-causal ``|q - k| < window``."""
        check_bool(causal, "causal", "BlockSparseAttention.sliding_window")
        self = cls(BandMasks(window, block_size, causal=causal), scale=scale, causal=causal, name="sliding_window")
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

        With ``q_offset`` (decoding) the query block is the call's queries (up to 16 at once; more in
        blocks of ``block_size``) at their absolute positions: their pooled mean is scored against the
        same kv blocks as in prefill, the diagonal is the kv blocks holding those positions, and causality
        is applied per element. A decode step thus picks what prefill picks for a query block whose
        pooled query equals the step's queries; prefill's pooled mean also covers queries that a decode
        step cannot see yet, so in general the two choices may differ (they agree whenever the forced
        blocks fill the budget, or the budget covers every causal block).

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
        check_bool(causal, "causal", where)
        check_bool(always_keep_diagonal, "always_keep_diagonal", where)
        check_bool(keep_first_block, "keep_first_block", where)
        self = cls(None, scale=scale, causal=causal, name="dynamic_topk")
        self.topk = {"k_blocks": k_blocks, "density": None if density is None else float(density),
                     "block_size": block_size, "always_keep_diagonal": always_keep_diagonal,
                     "keep_first_block": keep_first_block}
        self.policy_args = {k: v for k, v in self.topk.items() if v is not None}
        return self

    # -- masks --------------------------------------------------------------------------------------------

    def block_mask_for(self, q: torch.Tensor, k: torch.Tensor, causal: bool | None = None, *,
                       q_offset: int | None = None) -> BlockMask:
        """The ``BlockMask`` this module uses for ``q[B, Hq, Sq, D]`` and ``k[B, Hkv, Skv, D]``.

        Without ``q_offset`` the op applies ``causal`` on top of it (top-left); with ``q_offset`` the mask
        already holds causality at absolute positions and the op runs with ``causal=False``.
        """
        return self._mask(q, k, causal, q_offset, needs_grad=False)[0]

    def _mask(self, q: torch.Tensor, k: torch.Tensor, causal: bool | None, q_offset: int | None,
              needs_grad: bool) -> tuple[BlockMask, bool]:
        """``(mask, causal flag for the op)``."""
        where = "BlockSparseAttention"
        causal = self.is_causal if causal is None else check_bool(causal, "causal", where)
        Sq, Skv = q.shape[2], k.shape[2]
        if q_offset is not None:
            if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
                raise ValueError(f"{where}: q_offset must be a non-negative int or None, got {q_offset!r}")
            fixed = self.block_mask if isinstance(self.block_mask, BlockMask) else None
            if q_offset == 0 and Sq == Skv and (fixed is None or tuple(fixed.seq_lens) == (Sq, Skv)):
                q_offset = None  # the rows of a square prefill: the classic call, same rule
        if q_offset is None:
            if self.topk is not None:
                return self._topk_mask(q, k, causal), causal
            return self._cached((Sq, Skv, q.device), lambda: self._build(Sq, Skv, q.device)), causal
        if self.topk is not None:
            return self._topk_rows(q, k, causal, q_offset, needs_grad), False
        return self._cached(("rows", q_offset, Sq, Skv, q.device, causal, needs_grad),
                            lambda: self._build_rows(q_offset, Sq, Skv, q.device, causal, needs_grad)), False

    def _cached(self, key, build) -> BlockMask:
        mask = self._masks.get(key)
        if mask is None:
            mask = build()
            self._masks[key] = mask
            if len(self._masks) > _CACHE_SIZE:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(key)
        return mask

    def _build(self, Sq: int, Skv: int, device) -> BlockMask:
        if isinstance(self.block_mask, BlockMask):
            return self.block_mask.to(device)
        mask = self.block_mask(Sq, Skv, device)
        if not isinstance(mask, BlockMask):
            raise TypeError(f"BlockSparseAttention: the mask builder returned {type(mask).__name__}, "
                            "expected a BlockMask")
        return mask

    def _build_rows(self, q_offset: int, Sq: int, Skv: int, device, causal: bool, needs_grad: bool) -> BlockMask:
        builder = self.block_mask
        if isinstance(builder, BlockMask):
            full = self._cached((None, device), lambda: builder.to(device))
        elif callable(getattr(builder, "rows", None)):  # BandMasks, or a user builder with the same method
            one_block = Sq <= DECODE_QUERY_BLOCK and not needs_grad
            mask = builder.rows(q_offset, Sq, Skv, device, causal, BQ=DECODE_QUERY_BLOCK if one_block else None)
            if not isinstance(mask, BlockMask):
                raise TypeError(f"BlockSparseAttention: the mask builder's rows() returned {type(mask).__name__}, "
                                "expected a BlockMask")
            return mask
        else:  # any other builder: its mask for the leading square, then the rows (O(S^2 / (BQ * BK)) a length)
            S = max(Skv, q_offset + Sq)
            full = self._cached((S, S, device), lambda: self._build(S, S, device))
        return mask_rows(full, q_offset, Sq, Skv, query_block(Sq, full.block_size[0], needs_grad), causal)

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

    def _topk_rows(self, q: torch.Tensor, k: torch.Tensor, causal: bool, q_offset: int,
                   needs_grad: bool) -> BlockMask:
        """Dynamic top-k for queries at ``q_offset ..``: see :meth:`dynamic_topk`."""
        cfg = self.topk
        bk = cfg["block_size"]
        Sq, Skv = q.shape[2], k.shape[2]
        bq = query_block(Sq, bk, needs_grad)
        nq, nkv = -(-Sq // bq), -(-Skv // bk)
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        dev = q.device
        with torch.no_grad():
            scores = pooled_block_scores(q, k, (bq, bk), scale=scale)
            i = torch.arange(nq, device=dev)[:, None]
            j = torch.arange(nkv, device=dev)[None, :]
            q0 = q_offset + i * bq
            q1 = q_offset + torch.clamp((i + 1) * bq, max=Sq) - 1
            kk = cfg["k_blocks"] if cfg["k_blocks"] is not None else math.ceil(cfg["density"] * nkv)
            keep = torch.zeros(nq, nkv, dtype=torch.bool, device=dev)
            if cfg["always_keep_diagonal"]:
                keep |= (j * bk <= q1) & ((j + 1) * bk > q0)
            if cfg["keep_first_block"]:
                keep |= j == 0
            scores = scores.masked_fill(keep, float("inf"))
            if causal:
                scores = scores.masked_fill(j * bk > q1, float("-inf"))
            # The budget covers the forced blocks of every query block (counted on the host, no sync).
            for b in range(nq):
                p0, p1 = q_offset + b * bq, q_offset + min((b + 1) * bq, Sq) - 1
                lo, hi = p0 // bk, min(p1 // bk, nkv - 1)
                diag = max(hi - lo + 1, 0) if cfg["always_keep_diagonal"] else 0
                first = int(cfg["keep_first_block"] and not (diag and lo == 0))
                kk = max(kk, diag + first)
            sel = BlockMask.topk(scores, max(1, kk), block_size=(bq, bk), seq_lens=(Sq, Skv)).to_dense()
        return band_rows_mask(q_offset, Sq, Skv, (bq, bk), 0 if causal else None, None, dev, select=sel)

    # -- forward --------------------------------------------------------------------------------------------

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool | None = None,
                scale: float | None = None, q_offset: int | None = None) -> torch.Tensor:
        """``o[B, Hq, Sq, D]``; ``causal`` and ``scale`` override the module's defaults for this call.

        ``q_offset``: the absolute position of query 0 (None: 0 with keys and queries aligned top-left
        and, for a fixed mask, exactly its sequence lengths); ``Skv - Sq`` for a decode step with a KV
        cache. See the module docstring.
        """
        scale = self.scale if scale is None else float(scale)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        mask, op_causal = self._mask(q, k, causal, q_offset, needs_grad)
        return block_sparse_attention(q, k, v, mask, scale=scale, causal=op_causal)

    def extra_repr(self) -> str:
        args = "".join(f", {k}={v}" for k, v in self.policy_args.items())
        return f"policy={self.policy}{args}, causal={self.is_causal}, scale={self.scale}"
