"""``BlockMask``: which (query block, kv block) tiles block-sparse attention computes, and how.

Pure torch (never imports Triton). Names: ``B`` batch, ``H`` heads (1 = broadcast over the query
heads), ``Sq``/``Skv`` sequence lengths, ``BQ``/``BK`` block sizes, ``NQ = ceil(Sq/BQ)``,
``NKV = ceil(Skv/BK)``. Every index tensor is int32, contiguous, on the mask's device.

Layout
------
Each selected tile is either *full* (computed with no element masking) or *partial* (bounds, the
causal rule ``k <= q`` when ``causal`` and, when it has a slot, an element bitmask apply)::

    block grid of one (b, h), NQ = 4, NKV = 4        per query block i (row lists, forward):
                                                       full_kv_num_blocks[b,h,i] / full_kv_indices[b,h,i,:]
          kv block j ->  0   1   2   3                 kv_num_blocks[b,h,i]      / kv_indices[b,h,i,:]
    q block i = 0      [ P   .   .   . ]               i=0: full []      partial [0]
                1      [ F   P   .   . ]               i=1: full [0]     partial [1]
                2      [ F   F   P   . ]               i=2: full [0 1]   partial [2]
                3      [ F   F   F   P ]               i=3: full [0 1 2] partial [3]
                                                     per kv block j (column lists, backward dk/dv):
    F full, P partial, . not computed                  full_q_num_blocks[b,h,j] / full_q_indices[b,h,j,:]
                                                       q_num_blocks[b,h,j]      / q_indices[b,h,j,:]
                                                       j=0: full [1 2 3] partial [0]   ...

Only the first ``*_num_blocks`` entries of an index row are meaningful (strictly ascending); the rest
is padding (in range, never read). A tile is never both full and partial. Partial tiles may carry an
element bitmask: ``kv_bits_slot`` (aligned with ``kv_indices``; ``q_bits_slot`` with ``q_indices``)
picks one of ``partial_bits[P, BQ, ceil(BK/32)]`` (row r, word w, bit t = key ``32*w + t`` of the tile
allowed for query r of the tile), -1 means no bitmask. Identical bitmasks share a slot.

Element rule (``element_mask()`` returns it): allowed(b, h, q, k) = tile (q // BQ, k // BK) selected
AND (not causal or k <= q) AND (partial with slot s >= 0: bit (q % BQ, k % BK) of partial_bits[s])
AND q < Sq AND k < Skv. Builders put tiles that straddle the kv tail or the causal diagonal in the
partial list, so kernels may skip all masking in full tiles.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

from ._checks import check_block_size, check_bool, check_int

__all__ = ["BlockMask", "BlockMaskTensors", "check_block_mask", "pack_bits", "unpack_bits"]

_EMPTY, _PARTIAL, _FULL = 0, 1, 2
_EVAL_ELEMS = 1 << 22  # elements per chunk when evaluating an element rule on candidate tiles


class BlockMaskTensors(NamedTuple):
    """The index tensors of a ``BlockMask`` expanded to ``[B, Hq, ...]`` (stride-0 views on broadcast dims)."""

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    q_num_blocks: torch.Tensor
    q_indices: torch.Tensor
    full_q_num_blocks: torch.Tensor
    full_q_indices: torch.Tensor
    kv_bits_slot: torch.Tensor | None
    q_bits_slot: torch.Tensor | None


# ----------------------------------------------------------------------------------------------------
# small helpers


def pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., BQ, BK]`` -> int32 ``[..., BQ, ceil(BK/32)]`` (key ``32*w + t`` -> word w, bit t, LSB first).

    >>> pack_bits(torch.tensor([[True, False, True]])).tolist()
    [[5]]
    """
    BK = allowed.shape[-1]
    W = -(-BK // 32)
    a = torch.nn.functional.pad(allowed.to(torch.int64), (0, W * 32 - BK))
    a = a.reshape(*allowed.shape[:-1], W, 32)
    words = (a << torch.arange(32, device=a.device, dtype=torch.int64)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement, exact in int32
    return words.to(torch.int32)


def unpack_bits(bits: torch.Tensor, BK: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 ``[..., BQ, W]`` -> bool ``[..., BQ, BK]``."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    b = (bits.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: the low bit is right for negative words
    return b.flatten(-2)[..., :BK].bool()


def _seq_lens(seq_len, where: str, name: str = "seq_len") -> tuple[int, int]:
    sl = seq_len if isinstance(seq_len, (tuple, list)) else (seq_len, seq_len)
    if len(sl) != 2:
        raise ValueError(f"{where}: {name} must be an int or an (Sq, Skv) pair, got {seq_len!r}")
    return check_int(sl[0], name, where), check_int(sl[1], name, where)


def _tile_ranges(Sq, Skv, BQ, BK, device):
    """Per tile: first/last query of the block (last clipped to Sq) and first/last key (clipped and unclipped)."""
    NQ, NKV = -(-Sq // BQ), -(-Skv // BK)
    q0 = torch.arange(NQ, device=device)[:, None] * BQ  # [NQ, 1]
    q1 = torch.clamp(q0 + BQ, max=Sq) - 1
    k0 = torch.arange(NKV, device=device)[None, :] * BK  # [1, NKV]
    k1 = k0 + BK - 1
    return q0, q1, k0, k1


def _kind_from_selection(sel: torch.Tensor, Sq, Skv, BQ, BK, causal: bool) -> torch.Tensor:
    """Selected tiles -> int8 kind (0 empty, 1 partial, 2 full): kv-tail / diagonal tiles partial, tiles
    with no allowed element under ``causal`` dropped. No host sync."""
    q0, q1, k0, k1 = _tile_ranges(Sq, Skv, BQ, BK, sel.device)
    partial = (k1 >= Skv).expand(q0.shape[0], -1)
    if causal:
        sel = sel & (k0 <= q1)
        partial = partial | (k1 > q0)
    full = torch.full((), _FULL, dtype=torch.int8, device=sel.device)
    part = torch.full((), _PARTIAL, dtype=torch.int8, device=sel.device)
    return torch.where(sel, torch.where(partial, part, full), torch.zeros((), dtype=torch.int8, device=sel.device))


def _lists(kind: torch.Tensor, slot: torch.Tensor | None):
    """Row lists from a kind tensor [..., N]: (part_cnt, part_idx, full_cnt, full_idx, part_slot). One sort."""
    N = kind.shape[-1]
    kind = kind.contiguous()  # the transposed lists sort a transposed view: keep every output contiguous
    slot = None if slot is None else slot.contiguous()
    order = torch.sort(kind, dim=-1, descending=True, stable=True).indices  # full..., partial..., empty...
    full_cnt = (kind == _FULL).sum(-1, dtype=torch.int32)
    part_cnt = (kind == _PARTIAL).sum(-1, dtype=torch.int32)
    pos = torch.arange(N, device=kind.device)
    part_idx = torch.gather(order, -1, torch.clamp(pos + full_cnt.unsqueeze(-1), max=max(N - 1, 0)))
    part_slot = None
    if slot is not None:
        part_slot = torch.gather(slot, -1, part_idx)
        part_slot = torch.where(pos < part_cnt.unsqueeze(-1), part_slot, torch.full_like(part_slot, -1))
    return (part_cnt, part_idx.to(torch.int32).contiguous(), full_cnt, order.to(torch.int32).contiguous(),
            None if part_slot is None else part_slot.contiguous())


def _scatter_kind(cnt, idx, N, value, kind):
    """Mark the first ``cnt`` entries of each row of ``idx`` in ``kind[..., N + 1]`` (column N: the dump)."""
    pos = torch.arange(idx.shape[-1], device=idx.device)
    valid = pos < cnt.unsqueeze(-1).long()
    col = torch.where(valid, idx.long().clamp(0, N), torch.full_like(idx, N, dtype=torch.long))
    return kind.scatter_(-1, col, value), col


# ----------------------------------------------------------------------------------------------------


class BlockMask:
    """Block-sparse attention mask: full and partial kv-block lists per query block, and their transposes.

    Build it with a constructor classmethod (:meth:`from_dense`, :meth:`causal`, :meth:`sliding_window`,
    :meth:`local_global`, :meth:`document`, :meth:`topk`, :meth:`from_flex`) or from the row lists:
    ``kv_num_blocks [B, H, NQ]`` / ``kv_indices [B, H, NQ, NKV]`` (partial tiles) and optionally the
    full-tile lists of the same shapes (B/H of the two may broadcast). ``validate=True`` checks
    everything (and may sync the host); the transposed lists are computed on the device without a sync.

    >>> m = BlockMask.causal(200, block_size=64)
    >>> m.shape, m.seq_lens, m.kv_num_blocks.tolist(), m.full_kv_num_blocks.tolist()
    ((1, 1, 4, 4), (200, 200), [[[1, 1, 1, 1]]], [[[0, 1, 2, 3]]])
    >>> m.element_mask().shape
    torch.Size([1, 1, 200, 200])
    """

    _TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                "q_indices", "full_q_num_blocks", "full_q_indices", "partial_bits", "kv_bits_slot", "q_bits_slot",
                "_kind", "_slot")

    def __init__(self, kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None, *,
                 block_size=128, seq_lens=None, causal=False, partial_bits=None, kv_bits_slot=None,
                 validate=True):
        where = "BlockMask"
        BQ, BK = check_block_size(block_size, where)
        check_bool(causal, "causal", where)
        check_bool(validate, "validate", where)
        if validate:
            _validate_lists(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, partial_bits,
                            kv_bits_slot, BQ, BK)
        B, H, NQ, NKV = kv_indices.shape
        if full_kv_num_blocks is not None:
            B, H = max(B, full_kv_indices.shape[0]), max(H, full_kv_indices.shape[1])
        dev = kv_indices.device
        cnt = kv_num_blocks.to(torch.int32).expand(B, H, NQ).contiguous()
        idx = kv_indices.to(torch.int32).expand(B, H, NQ, NKV).contiguous()
        if full_kv_num_blocks is None:
            fcnt = torch.zeros(B, H, NQ, dtype=torch.int32, device=dev)
            fidx = torch.zeros(B, H, NQ, NKV, dtype=torch.int32, device=dev)
        else:
            fcnt = full_kv_num_blocks.to(torch.int32).expand(B, H, NQ).contiguous()
            fidx = full_kv_indices.to(torch.int32).expand(B, H, NQ, NKV).contiguous()
        kind = torch.zeros(B, H, NQ, NKV + 1, dtype=torch.int8, device=dev)
        kind, _ = _scatter_kind(fcnt, fidx, NKV, _FULL, kind)
        kind, col = _scatter_kind(cnt, idx, NKV, _PARTIAL, kind)
        slot = bits = kvs = None
        if partial_bits is not None:
            bits = partial_bits.to(torch.int32).contiguous()
            kvs = kv_bits_slot.to(torch.int32).expand(B, H, NQ, NKV).contiguous()
            slot = torch.full((B, H, NQ, NKV + 1), -1, dtype=torch.int32, device=dev).scatter_(-1, col, kvs)
            slot = slot[..., :NKV].contiguous()
        Sq, Skv = (NQ * BQ, NKV * BK) if seq_lens is None else _seq_lens(seq_lens, where, "seq_lens")
        if validate and (NQ != -(-Sq // BQ) or NKV != -(-Skv // BK)):
            raise ValueError(f"BlockMask: seq_lens=({Sq}, {Skv}) with block_size=({BQ}, {BK}) needs NQ={-(-Sq // BQ)}"
                             f", NKV={-(-Skv // BK)}, but kv_indices has NQ={NQ}, NKV={NKV}")
        self._set(kind[..., :NKV].contiguous(), slot, bits, (BQ, BK), (Sq, Skv), causal,
                  kv_lists=(cnt, idx, fcnt, fidx, kvs))

    # -- internal construction ------------------------------------------------------------------------

    def _set(self, kind, slot, bits, block_size, seq_lens, causal, kv_lists=None):
        """Fill every attribute from the dense tile kind [B, H, NQ, NKV] (and slot); no host sync."""
        self.block_size, self.seq_lens, self.causal = block_size, seq_lens, causal
        self._kind, self._slot, self.partial_bits = kind, slot, bits
        if kv_lists is None:
            cnt, idx, fcnt, fidx, kvs = _lists(kind, slot)
        else:
            cnt, idx, fcnt, fidx, kvs = kv_lists
        self.kv_num_blocks, self.kv_indices = cnt, idx
        self.full_kv_num_blocks, self.full_kv_indices = fcnt, fidx
        self.kv_bits_slot = kvs
        slot_t = None if slot is None else slot.transpose(-1, -2)
        q = _lists(kind.transpose(-1, -2), slot_t)
        self.q_num_blocks, self.q_indices, self.full_q_num_blocks, self.full_q_indices, self.q_bits_slot = q

    @classmethod
    def _from_kind(cls, kind, slot, bits, block_size, seq_lens, causal) -> BlockMask:
        self = cls.__new__(cls)
        self._set(kind.contiguous(), None if slot is None else slot.contiguous(), bits, block_size, seq_lens, causal)
        return self

    @classmethod
    def _from_rule(cls, rule, full, maybe, block_size, seq_lens, causal) -> BlockMask:
        """:meth:`_from_tiles` with a rule written in tensor ops: ``rule(b, h, q, k)`` is called once per chunk
        of tiles on broadcast index tensors (``b``, ``h`` ``[n, 1, 1]``, ``q`` ``[n, BQ, 1]``, ``k``
        ``[n, 1, BK]``) and returns bool broadcastable to ``[n, BQ, BK]``. For the builders' own rules."""

        def evaluate(t, q, k):
            return _eval_rule(rule, t[:, 0, None, None], t[:, 1, None, None], q, k, (t.shape[0], q.shape[1],
                                                                                       k.shape[2]))

        return cls._from_tiles(evaluate, full, maybe, block_size, seq_lens, causal)

    @classmethod
    def _from_tiles(cls, evaluate, full, maybe, block_size, seq_lens, causal) -> BlockMask:
        """Tiles ``full`` are full; tiles ``maybe`` are decided by their elements, ``evaluate(t, q, k)`` -> bool
        ``[n, BQ, BK]`` for a chunk of tiles ``t`` (``[n, 4]`` rows ``(b, h, i, j)``) with the query and key
        indices ``q[n, BQ, 1]``, ``k[n, 1, BK]`` of those tiles, clamped to ``Sq - 1`` / ``Skv - 1`` (indices
        past the ends are masked afterwards; clamping keeps a rule that indexes captured tensors in range).
        A tile with no allowed element is dropped, one with all allowed is full, else partial with a bitmask
        unless bounds + causal already say the same. Chunks hold at most ``_EVAL_ELEMS`` elements (one tile
        at least), so memory is bounded by the chunk, never by ``B * H * Sq * Skv``; the tiles of a chunk
        share one batch index ``b`` (see :func:`_flex_tile_evaluator`). Syncs the host (builders only)."""
        BQ, BK = block_size
        Sq, Skv = seq_lens
        dev = full.device
        Bm, Hm, NQ, NKV = full.shape
        q0, q1, k0, k1 = _tile_ranges(Sq, Skv, BQ, BK, dev)
        kind = torch.where(full, _FULL, _EMPTY).to(torch.int8)
        plain = full & (k1 >= Skv)  # full tiles on the kv tail become partial without a bitmask
        if causal:
            plain = plain | (full & (k1 > q0))
        kind[plain] = _PARTIAL
        slot = torch.full(kind.shape, -1, dtype=torch.int32, device=dev)
        tiles = (maybe & ~full).nonzero()  # [n, 4], sorted by (b, h, i, j)
        words = []
        ar_q, ar_k = torch.arange(BQ, device=dev), torch.arange(BK, device=dev)
        per_chunk = max(1, _EVAL_ELEMS // (BQ * BK))
        # chunks never straddle two batch elements: ends[b] = number of tiles with batch index <= b
        ends = torch.searchsorted(tiles[:, 0].contiguous(), torch.arange(1, Bm + 1, device=dev)).tolist()
        chunks = [(c, min(c + per_chunk, e)) for s, e in zip([0] + ends[:-1], ends) for c in range(s, e, per_chunk)]
        for c0, c1 in chunks:
            t = tiles[c0:c1]
            q = (t[:, 2] * BQ)[:, None, None] + ar_q[None, :, None]  # [n, BQ, 1]
            k = (t[:, 3] * BK)[:, None, None] + ar_k[None, None, :]  # [n, 1, BK]
            base = (q < Sq) & (k < Skv)
            if causal:
                base = base & (k <= q)
            # indices past the ends are clamped for the rule (it may index captured tensors); base masks them
            qc, kc = torch.clamp(q, max=max(Sq - 1, 0)), torch.clamp(k, max=max(Skv - 1, 0))
            e = evaluate(t, qc, kc) & base  # [n, BQ, BK]
            rows = q < Sq  # rows past Sq are never stored: they decide nothing
            is_all = (e | ~rows).flatten(1).all(1)
            is_any = e.flatten(1).any(1)
            needs_bits = ((e != base) & rows).flatten(1).any(1) & is_any & ~is_all
            ti = t.unbind(1)
            kind[ti] = torch.where(is_all, _FULL, torch.where(is_any, _PARTIAL, _EMPTY)).to(torch.int8)
            sel = needs_bits.nonzero().squeeze(1)
            if sel.numel():
                words.append((tuple(x[sel] for x in ti), pack_bits(e[sel])))
        bits = None
        if words:
            packed = torch.cat([w for _, w in words])
            bits, inverse = torch.unique(packed, dim=0, return_inverse=True)
            start = 0
            for ti, w in words:
                slot[ti] = inverse[start:start + w.shape[0]].to(torch.int32)
                start += w.shape[0]
            bits = bits.to(torch.int32).contiguous()
        return cls._from_kind(kind, slot if bits is not None else None, bits, block_size, seq_lens, causal)

    # -- builders ---------------------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, mask: torch.Tensor, block_size=128, seq_lens=None) -> BlockMask:
        """From a bool tile mask ``[B|1, H|1, NQ, NKV]`` (or ``[NQ, NKV]``). No host sync; runs on its device.

        Selected tiles are full, except those on the kv tail (``Skv % BK != 0``): partial, no bitmask.
        ``seq_lens`` defaults to ``(NQ * BQ, NKV * BK)``.

        >>> m = BlockMask.from_dense(torch.tensor([[True, False], [True, True]]), block_size=16)
        >>> m.full_kv_num_blocks.tolist(), m.full_q_num_blocks.tolist(), f"{m.sparsity():.2f}"
        ([[[1, 2]]], [[[2, 1]]], '0.25')
        """
        where = "BlockMask.from_dense"
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"{where}: mask must be a bool tensor [B, H, NQ, NKV] or [NQ, NKV], got {got}")
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4:
            raise ValueError(f"{where}: mask must be 2-D [NQ, NKV] or 4-D [B, H, NQ, NKV], got shape "
                             f"{tuple(mask.shape)}")
        BQ, BK = check_block_size(block_size, where)
        NQ, NKV = mask.shape[-2:]
        Sq, Skv = (NQ * BQ, NKV * BK) if seq_lens is None else _seq_lens(seq_lens, where, "seq_lens")
        _check_grid(where, NQ, NKV, Sq, Skv, BQ, BK)
        kind = _kind_from_selection(mask, Sq, Skv, BQ, BK, False)
        return cls._from_kind(kind, None, None, (BQ, BK), (Sq, Skv), False)

    @classmethod
    def causal(cls, seq_len, block_size=128, device=None) -> BlockMask:
        """Causal (``k <= q``, top-left aligned). Tiles below the diagonal full, on it partial, above dropped.

        >>> BlockMask.causal((100, 128), block_size=64).to_dense()[0, 0].tolist()
        [[True, False], [True, True]]
        """
        where = "BlockMask.causal"
        BQ, BK = check_block_size(block_size, where)
        Sq, Skv = _seq_lens(seq_len, where)
        sel = torch.ones(1, 1, -(-Sq // BQ), -(-Skv // BK), dtype=torch.bool, device=device)
        return cls._from_kind(_kind_from_selection(sel, Sq, Skv, BQ, BK, True), None, None, (BQ, BK), (Sq, Skv),
                              True)

    @classmethod
    def sliding_window(cls, seq_len, window: int, block_size=128, causal=True, device=None) -> BlockMask:
        """Sliding window: causal ``q - window < k <= q``; non-causal ``|q - k| < window``.

        Fully allowed tiles full, cut tiles partial (bitmask unless the causal flag says it all), rest dropped.

        >>> m = BlockMask.sliding_window(256, window=64, block_size=64)
        >>> m.full_kv_num_blocks.tolist(), m.kv_num_blocks.tolist()
        ([[[0, 0, 0, 0]]], [[[1, 2, 2, 2]]])
        """
        where = "BlockMask.sliding_window"
        BQ, BK = check_block_size(block_size, where)
        Sq, Skv = _seq_lens(seq_len, where)
        window = check_int(window, "window", where, 1)
        check_bool(causal, "causal", where)
        q0, q1, k0, k1 = _tile_ranges(Sq, Skv, BQ, BK, device)
        lo, hi = (0, window - 1) if causal else (1 - window, window - 1)  # allowed q - k in [lo, hi]
        dmin, dmax = q0 - torch.clamp(k1, max=Skv - 1), q1 - k0
        maybe = ((dmax >= lo) & (dmin <= hi))[None, None]
        full = ((q0 - k1 >= lo) & (q1 - k0 <= hi) & (k1 < Skv))[None, None]

        def rule(b, h, q, k):
            return (q - k >= lo) & (q - k <= hi)

        return cls._from_rule(rule, full, maybe, (BQ, BK), (Sq, Skv), causal)

    @classmethod
    def local_global(cls, seq_len, local_blocks: int, global_blocks: int, block_size=128, causal=False,
                     random_blocks: int = 0, generator: torch.Generator | None = None, device=None) -> BlockMask:
        """BigBird-style tile pattern (``[1, 1, NQ, NKV]``).

        Query block ``i`` sees kv blocks ``|j - c_i| <= local_blocks`` with ``c_i = i * BQ // BK`` (the kv
        block of its first query; ``c_i = i`` when BQ == BK), the first ``global_blocks`` kv blocks, and
        ``random_blocks`` more drawn uniformly (``generator``) from the rest; the first ``global_blocks``
        query blocks see every kv block. ``causal=True`` then drops tiles above the diagonal.

        >>> BlockMask.local_global(256, 0, 1, block_size=64).to_dense()[0, 0].int().tolist()
        [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]
        """
        where = "BlockMask.local_global"
        BQ, BK = check_block_size(block_size, where)
        Sq, Skv = _seq_lens(seq_len, where)
        local_blocks = check_int(local_blocks, "local_blocks", where)
        global_blocks = check_int(global_blocks, "global_blocks", where)
        random_blocks = check_int(random_blocks, "random_blocks", where)
        check_bool(causal, "causal", where)
        NQ, NKV = -(-Sq // BQ), -(-Skv // BK)
        i = torch.arange(NQ, device=device)[:, None]
        j = torch.arange(NKV, device=device)[None, :]
        sel = ((j - i * BQ // BK).abs() <= local_blocks) | (j < global_blocks) | (i < global_blocks)
        if causal:
            sel = sel & (j * BK <= torch.clamp((i + 1) * BQ, max=Sq) - 1)
        if random_blocks:
            cand = ~sel if not causal else ~sel & (j * BK <= torch.clamp((i + 1) * BQ, max=Sq) - 1)
            r = torch.rand(NQ, NKV, generator=generator, device=generator.device if generator else device)
            r = torch.where(cand, r.to(sel.device), torch.full_like(r, -1.0, device=sel.device))
            top = torch.sort(r, dim=-1, descending=True, stable=True)
            pick = torch.zeros_like(sel).scatter_(-1, top.indices[:, :min(random_blocks, NKV)], True)
            sel = sel | (pick & cand)
        kind = _kind_from_selection(sel[None, None], Sq, Skv, BQ, BK, causal)
        return cls._from_kind(kind, None, None, (BQ, BK), (Sq, Skv), causal)

    @classmethod
    def document(cls, document_ids: torch.Tensor, block_size=128, causal=False) -> BlockMask:
        """Packed sequences: ``q`` may see ``k`` iff ``document_ids[..., q] == document_ids[..., k]`` (and ``k <= q``).

        ``document_ids`` int ``[S]`` or ``[B, S]``; the mask is ``[1|B, 1, NQ, NQ]`` with ``Sq == Skv == S``.

        >>> m = BlockMask.document(torch.tensor([0] * 96 + [1] * 32), block_size=32)
        >>> m.full_kv_num_blocks.tolist(), m.kv_num_blocks.tolist()
        ([[[3, 3, 3, 1]]], [[[0, 0, 0, 0]]])
        """
        where = "BlockMask.document"
        if not isinstance(document_ids, torch.Tensor) or document_ids.is_floating_point() or \
                document_ids.is_complex() or document_ids.dtype == torch.bool:
            got = document_ids.dtype if isinstance(document_ids, torch.Tensor) else type(document_ids).__name__
            raise TypeError(f"{where}: document_ids must be an integer tensor [S] or [B, S], got {got}")
        if document_ids.dim() not in (1, 2):
            raise ValueError(f"{where}: document_ids must be [S] or [B, S], got shape {tuple(document_ids.shape)}")
        ids = document_ids.reshape(-1, document_ids.shape[-1]).long()
        BQ, BK = check_block_size(block_size, where)
        check_bool(causal, "causal", where)
        Bm, S = ids.shape
        NQ, NKV = -(-S // BQ), -(-S // BK)
        dev = ids.device
        _, compact = torch.unique(ids, return_inverse=True)
        nd = int(compact.max()) + 1 if compact.numel() else 1

        def presence(bs, n):
            p = torch.zeros(Bm, n, nd, device=dev)
            pos = torch.arange(S, device=dev) // bs
            return p.index_put_((torch.arange(Bm, device=dev)[:, None], pos[None], compact), torch.ones(()),
                                accumulate=True)

        pq, pk = presence(BQ, NQ), presence(BK, NKV)
        overlap = (pq > 0).float() @ (pk > 0).float().transpose(1, 2) > 0  # [Bm, NQ, NKV]
        single_q = ((pq > 0).sum(-1) == 1)[:, :, None]
        single_k = ((pk > 0).sum(-1) == 1)[:, None, :]
        full = overlap & single_q & single_k
        if causal:
            q0, q1, k0, k1 = _tile_ranges(S, S, BQ, BK, dev)
            full = full & (k1 <= q0)

        def rule(b, h, q, k):
            return ids[b, q] == ids[b, k]

        return cls._from_rule(rule, full[:, None], overlap[:, None], (BQ, BK), (S, S), causal)

    @classmethod
    def topk(cls, block_scores: torch.Tensor, k: int, *, block_size=128, seq_lens=None, causal=False) -> BlockMask:
        """Per query block keep the ``k`` highest-scoring kv blocks (ties -> lower index; -inf/NaN never kept).

        ``block_scores`` float ``[B|1, H|1, NQ, NKV]``; ``k`` is clamped to NKV. No host sync. With
        ``causal=True`` tiles above the diagonal are excluded first and diagonal tiles are partial.

        >>> s = torch.tensor([[3.0, 1.0, 3.0], [0.0, float("-inf"), float("-inf")]])
        >>> BlockMask.topk(s, 2, block_size=16).to_dense()[0, 0].tolist()
        [[True, False, True], [True, False, False]]
        """
        where = "BlockMask.topk"
        if not isinstance(block_scores, torch.Tensor) or not block_scores.is_floating_point():
            got = block_scores.dtype if isinstance(block_scores, torch.Tensor) else type(block_scores).__name__
            raise TypeError(f"{where}: block_scores must be a floating-point tensor [B, H, NQ, NKV], got {got}")
        if block_scores.dim() == 2:
            block_scores = block_scores[None, None]
        if block_scores.dim() != 4:
            raise ValueError(f"{where}: block_scores must be [B, H, NQ, NKV] (or [NQ, NKV]), got shape "
                             f"{tuple(block_scores.shape)}")
        k = check_int(k, "k", where)
        BQ, BK = check_block_size(block_size, where)
        check_bool(causal, "causal", where)
        NQ, NKV = block_scores.shape[-2:]
        Sq, Skv = (NQ * BQ, NKV * BK) if seq_lens is None else _seq_lens(seq_lens, where, "seq_lens")
        _check_grid(where, NQ, NKV, Sq, Skv, BQ, BK)
        s = torch.nan_to_num(block_scores, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        if causal:
            q0, q1, k0, k1 = _tile_ranges(Sq, Skv, BQ, BK, s.device)
            s = s.masked_fill(k0 > q1, float("-inf"))
        top = torch.sort(s, dim=-1, descending=True, stable=True)
        kk = min(k, NKV)
        keep = top.values[..., :kk] > float("-inf")
        sel = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, top.indices[..., :kk], keep)
        kind = _kind_from_selection(sel, Sq, Skv, BQ, BK, causal)
        return cls._from_kind(kind, None, None, (BQ, BK), (Sq, Skv), causal)

    @classmethod
    def from_flex(cls, flex_block_mask) -> BlockMask:
        """From ``torch.nn.attention.flex_attention.BlockMask`` (same tiles, block size and seq lengths).

        Its full tiles stay full (kv-tail ones become partial); the elements of its partial tiles come from
        its ``mask_mod``, evaluated on those tiles only and packed into ``partial_bits`` (deduplicated).
        For a mask from ``create_block_mask(mask_mod, B, H, Sq, Skv)``, ``element_mask()`` equals
        ``flex_attention.create_mask(mask_mod, B, H, Sq, Skv)`` and the attention equals
        ``flex_attention(q, k, v, block_mask=flex_block_mask)``.

        The ``mask_mod`` is evaluated exactly as FlexAttention evaluates it: once per element, on 0-d index
        tensors under ``torch.vmap``, through FlexAttention's own ``create_mask`` (so chained indexing such
        as ``doc[b][q]`` and reductions such as ``k < pad[b].sum()`` mean what they mean there). Partial
        tiles go through it in chunks of at most ``_EVAL_ELEMS`` elements, so memory is bounded by the
        chunk, not by ``B * H * Sq * Skv``. Syncs the host: convert once, outside the attention call.

        >>> from torch.nn.attention.flex_attention import create_block_mask
        >>> f = create_block_mask(lambda b, h, q, k: k <= q, 1, 1, 200, 200, device="cpu", BLOCK_SIZE=64)
        >>> m = BlockMask.from_flex(f)
        >>> m.kv_num_blocks.tolist(), m.full_kv_num_blocks.tolist()
        ([[[1, 1, 1, 1]]], [[[0, 1, 2, 3]]])
        """
        fa = _flex("BlockMask.from_flex")
        if not isinstance(flex_block_mask, fa.BlockMask):
            raise TypeError(f"BlockMask.from_flex: flex_block_mask must be a torch.nn.attention.flex_attention."
                            f"BlockMask, got {type(flex_block_mask).__name__}")
        fbm = flex_block_mask
        BQ, BK = check_block_size(tuple(fbm.BLOCK_SIZE), "BlockMask.from_flex")
        Sq, Skv = _seq_lens(tuple(fbm.seq_lengths), "BlockMask.from_flex", "seq_lengths")
        NQ, NKV = -(-Sq // BQ), -(-Skv // BK)
        cnt, idx = fbm.kv_num_blocks[..., :NQ], fbm.kv_indices[..., :NQ, :]
        Bm, Hm, dev = cnt.shape[0], cnt.shape[1], cnt.device
        kind = torch.zeros(Bm, Hm, NQ, NKV + 1, dtype=torch.int8, device=dev)
        if fbm.full_kv_num_blocks is not None:
            kind, _ = _scatter_kind(fbm.full_kv_num_blocks[..., :NQ], fbm.full_kv_indices[..., :NQ, :], NKV,
                                    _FULL, kind)
        partial = torch.zeros_like(kind)
        partial, _ = _scatter_kind(cnt, idx, NKV, _PARTIAL, partial)
        kind, partial = kind[..., :NKV], partial[..., :NKV] > 0
        evaluate = _flex_tile_evaluator(fa, fbm.mask_mod, dev)
        return cls._from_tiles(evaluate, kind == _FULL, partial & (kind != _FULL), (BQ, BK), (Sq, Skv), False)

    def to_flex(self):
        """To ``torch.nn.attention.flex_attention.BlockMask`` with a ``mask_mod`` reproducing :meth:`element_mask`.

        Full tiles that straddle the kv tail or (when causal) the diagonal go to FlexAttention's partial
        list, where its ``mask_mod`` (tiles + bounds + causal + bitmasks, through captured tensors) applies.
        """
        fa = _flex("BlockMask.to_flex")
        (BQ, BK), (Sq, Skv) = self.block_size, self.seq_lens
        Bm, Hm, NQ, NKV = self.shape
        q0, q1, k0, k1 = _tile_ranges(Sq, Skv, BQ, BK, self.device)
        loose = (k1 >= Skv) | (k1 > q0) if self.causal else (k1 >= Skv)
        kind = torch.where((self._kind == _FULL) & loose, torch.tensor(_PARTIAL, dtype=torch.int8, device=self.device),
                           self._kind)
        cnt, idx, fcnt, fidx, _ = _lists(kind, None)
        tile, slot, bits, causal = self._kind, self._slot, self.partial_bits, self.causal
        use_bits = bits is not None and bits.shape[0] > 0

        def mask_mod(b, h, q_idx, kv_idx):
            bi = b if Bm > 1 else torch.zeros_like(b)
            hi = h if Hm > 1 else torch.zeros_like(h)
            qc, kc = torch.clamp(q_idx, 0, max(Sq - 1, 0)), torch.clamp(kv_idx, 0, max(Skv - 1, 0))
            ok = (tile[bi, hi, qc // BQ, kc // BK] > 0) & (q_idx < Sq) & (kv_idx < Skv)
            if causal:
                ok = ok & (kv_idx <= q_idx)
            if use_bits:
                s = slot[bi, hi, qc // BQ, kc // BK]
                word = bits[torch.clamp(s, min=0), qc % BQ, (kc % BK) // 32]
                ok = ok & ((s < 0) | (((word >> ((kc % BK) % 32)) & 1) == 1))
            return ok

        return fa.BlockMask.from_kv_blocks(cnt, idx, fcnt, fidx, BLOCK_SIZE=(BQ, BK), mask_mod=mask_mod,
                                           seq_lengths=(Sq, Skv))

    # -- passing through custom ops ----------------------------------------------------------------------

    def _parts(self) -> list[torch.Tensor]:
        """Every tensor of the mask in ``_TENSORS`` order, None as an empty int32 tensor: what a
        ``torch.library`` custom op can take (see ``ops/attention.py``); ``_from_parts`` inverts it."""
        empty = torch.empty(0, dtype=torch.int32, device=self.device)
        return [empty if getattr(self, n) is None else getattr(self, n) for n in self._TENSORS]

    @classmethod
    def _from_parts(cls, parts, block_size, seq_lens, causal: bool, has_bits: bool) -> BlockMask:
        """The mask ``_parts`` came from, rebuilt without recomputing anything."""
        self = cls.__new__(cls)
        self.block_size, self.seq_lens, self.causal = tuple(block_size), tuple(seq_lens), bool(causal)
        for name, t in zip(self._TENSORS, parts):
            optional = name in ("partial_bits", "kv_bits_slot", "q_bits_slot", "_slot")
            setattr(self, name, None if optional and not has_bits else t)
        return self

    # -- views ------------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, NQ, NKV)`` (B and/or H may be 1: broadcast)."""
        return tuple(self.kv_indices.shape)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def to(self, device=None, dtype=None, *, non_blocking: bool = False) -> BlockMask:
        """A copy with every tensor on ``device``: a ``torch.device``, a string (``"cuda:0"``) or a device
        ordinal, positional or ``device=``; ``non_blocking`` as for ``Tensor.to``.

        Only the device can change: the mask holds int32 block indices, so a dtype (``to(torch.float16)``,
        ``to(dtype=torch.float32)``, ``to("cuda", torch.half)``) raises ``TypeError`` rather than being
        ignored, and so does a tensor (``to(q)`` would also mean q's dtype: use ``to(q.device)``).

        >>> BlockMask.causal(128, 64).to("cpu").device
        device(type='cpu')
        """
        where = "BlockMask.to"
        if dtype is not None or isinstance(device, torch.dtype):
            got = dtype if dtype is not None else device
            raise TypeError(f"{where}: dtype={got} is not supported: a BlockMask holds int32 block indices and "
                            f"only moves between devices (pass a device only)")
        if isinstance(device, torch.Tensor):
            raise TypeError(f"{where}: device must be a torch.device, str or int, got a Tensor (pass "
                            f"tensor.device: to(tensor) would also mean the tensor's dtype)")
        if device is None or isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
            raise TypeError(f"{where}: device must be a torch.device, str or int, got {type(device).__name__}")
        check_bool(non_blocking, "non_blocking", where)
        try:
            device = torch.device(device)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{where}: device={device!r} is not a valid device ({e})") from None
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        for name in self._TENSORS:
            t = getattr(self, name)
            setattr(out, name, None if t is None else t.to(device, non_blocking=non_blocking))
        return out

    def to_dense(self) -> torch.Tensor:
        """Bool ``[B, H, NQ, NKV]``: tiles that are computed (full or partial)."""
        return self._kind > 0

    def element_mask(self) -> torch.Tensor:
        """Bool ``[B, H, Sq, Skv]``: the element rule of the module docstring (the attention definition)."""
        (BQ, BK), (Sq, Skv) = self.block_size, self.seq_lens
        B, H, NQ, NKV = self.shape
        tile = (self._kind > 0)[:, :, :, None, :, None].expand(B, H, NQ, BQ, NKV, BK)
        if self.partial_bits is not None and self.partial_bits.shape[0] > 0:
            e = unpack_bits(self.partial_bits, BK)[self._slot.clamp(min=0)]  # [B, H, NQ, NKV, BQ, BK]
            e = e | (self._slot < 0)[..., None, None]
            tile = tile & e.permute(0, 1, 2, 4, 3, 5)
        m = tile.reshape(B, H, NQ * BQ, NKV * BK)[:, :, :Sq, :Skv]
        if self.causal:
            m = m & torch.ones(Sq, Skv, dtype=torch.bool, device=self.device).tril()
        return m.contiguous()

    def sparsity(self) -> float:
        """Fraction of the ``B * H * NQ * NKV`` tiles that are not computed (syncs the host)."""
        n = self._kind.numel()
        return 0.0 if n == 0 else 1.0 - (self._kind > 0).sum().item() / n

    def __repr__(self) -> str:
        bits = "" if self.partial_bits is None else f", bitmasks={self.partial_bits.shape[0]}"
        return (f"BlockMask(shape={self.shape}, block_size={self.block_size}, seq_lens={self.seq_lens}, "
                f"causal={self.causal}, sparsity={100 * self.sparsity():.2f}%{bits})")

    def check_compatible(self, where: str, B: int, Hq: int, Sq: int, Skv: int) -> None:
        """Raise ``ValueError`` naming ``block_mask`` unless it fits inputs of batch B, Hq heads, Sq x Skv."""
        mb, mh = self.shape[:2]
        if (Sq, Skv) != tuple(self.seq_lens):
            raise ValueError(f"{where}: block_mask was built for seq_lens={tuple(self.seq_lens)} but the inputs "
                             f"have Sq={Sq}, Skv={Skv}")
        if mh not in (1, Hq):
            raise ValueError(f"{where}: block_mask has H={mh} heads, expected 1 or the {Hq} query heads")
        if mb not in (1, B):
            raise ValueError(f"{where}: block_mask has B={mb}, expected 1 or the batch size {B}")

    def expand(self, B: int, Hq: int) -> BlockMaskTensors:
        """The index tensors as ``[B, Hq, ...]`` stride-0 views on broadcast dims (for kernel launchers)."""
        mb, mh = self.shape[:2]
        if mb not in (1, B) or mh not in (1, Hq):
            raise ValueError(f"BlockMask.expand: block_mask is [B={mb}, H={mh}], cannot expand to B={B}, H={Hq}")

        def ex(t):
            return None if t is None else t.expand(B, Hq, *t.shape[2:])

        return BlockMaskTensors(*(ex(getattr(self, f)) for f in BlockMaskTensors._fields))

    def plot(self, b: int = 0, h: int = 0, ax=None):
        """Draw the tiles of ``(b, h)``: full dark, partial light, empty white. Returns the matplotlib Axes."""
        try:
            import matplotlib.pyplot as plt
            from matplotlib.colors import ListedColormap
            from matplotlib.patches import Patch
        except ImportError as e:
            raise ImportError("BlockMask.plot needs matplotlib (pip install matplotlib)") from e
        if ax is None:
            _, ax = plt.subplots()
        colors = ["white", "#f4a582", "#2166ac"]
        grid = self._kind[min(b, self.shape[0] - 1), min(h, self.shape[1] - 1)].cpu().numpy()
        ax.imshow(grid, cmap=ListedColormap(colors), vmin=0, vmax=2, interpolation="nearest")
        ax.set_xlabel(f"kv block (BK={self.block_size[1]})")
        ax.set_ylabel(f"query block (BQ={self.block_size[0]})")
        flag = ", causal" if self.causal else ""
        ax.set_title(f"BlockMask b={b} h={h}: {100 * self.sparsity():.1f}% sparse{flag}")
        ax.legend(handles=[Patch(color=colors[2], label="full"), Patch(color=colors[1], label="partial")],
                  loc="upper right", fontsize="small")
        return ax


# ----------------------------------------------------------------------------------------------------
# validation and misc


def check_block_mask(value, name: str, where: str) -> BlockMask:
    """Return ``value`` if it is a :class:`BlockMask`, else raise ``TypeError`` naming ``where`` and ``name``.

    A FlexAttention ``BlockMask`` is refused with the conversion to use, ``st.BlockMask.from_flex(mask)``:
    converting it implicitly inside an op would evaluate its ``mask_mod`` and sync the host on every call
    (no CUDA graphs, no ``fullgraph`` compile), so the conversion is done once, by the caller.
    """
    if isinstance(value, BlockMask):
        return value
    flex = sys.modules.get("torch.nn.attention.flex_attention")  # loaded wherever such a mask exists
    if flex is not None and isinstance(value, getattr(flex, "BlockMask", ())):
        raise TypeError(f"{where}: {name} is a FlexAttention BlockMask (torch.nn.attention.flex_attention."
                        f"BlockMask); convert it once with st.BlockMask.from_flex({name}) and pass the result "
                        f"(the conversion evaluates its mask_mod and syncs the host, so no op does it per call)")
    raise TypeError(f"{where}: {name} must be a sparse_triton.BlockMask, got {type(value).__name__}")


def _flex(where: str):
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError as e:
        raise RuntimeError(f"{where}: this torch ({torch.__version__}) has no "
                           f"torch.nn.attention.flex_attention") from e
    if not hasattr(fa, "BlockMask"):
        raise RuntimeError(f"{where}: this torch ({torch.__version__}) has no flex_attention.BlockMask")
    return fa


def _flex_tile_evaluator(fa, mask_mod, device):
    """``evaluate(t, q, k)`` for :meth:`BlockMask._from_tiles` that runs a FlexAttention ``mask_mod`` per element.

    FlexAttention defines a ``mask_mod`` through ``create_mask``: ``torch.vmap`` over each of b, h, q, kv
    (the function sees 0-d index tensors, one element at a time) under a mode that turns tensor indexing
    into vmappable ops. Calling a ``mask_mod`` on broadcast index tensors instead changes what it means
    (``pad[b].sum()`` sums a whole batch of rows; ``doc[b][q]`` indexes the wrong dimension). So the tiles
    go through ``create_mask`` itself, relabelled: its "batch" enumerates the chunk's tiles and its
    ``(Q_LEN, KV_LEN) = (BQ, BK)`` grid the positions in a tile, mapped back to the tile's
    ``(b, h, q, k)`` by 0-d lookups the same vmap evaluates. The result has ``n * BQ * BK`` elements.

    All tiles of a chunk share their batch index (``_from_tiles`` splits chunks there), and ``b`` is passed
    as that one 0-d tensor, not batched over the tiles: a ``mask_mod`` indexing a captured ``[B, S]``
    tensor with ``b`` (``doc[b][q]``) then materializes one ``[S]`` row, not one per tile.
    """

    def evaluate(t, q, k):
        n, BQ, BK = t.shape[0], q.shape[1], k.shape[2]
        b, th, tq, tk = t[0, 0], t[:, 1], q[:, :, 0], k[:, 0, :]  # 0-d, [n], [n, BQ], [n, BK]

        def per_element(i, _, r, c):  # i: tile, r / c: row / column in the tile (0-d tensors under vmap)
            return mask_mod(b, th[i], tq[i][r], tk[i][c])

        return fa.create_mask(per_element, n, 1, BQ, BK, device=device)[:, 0].bool()  # [n, BQ, BK]

    return evaluate


def _eval_rule(rule, b, h, q, k, shape) -> torch.Tensor:
    out = rule(b, h, q, k)
    if not isinstance(out, torch.Tensor):
        out = torch.tensor(bool(out), device=q.device)
    return torch.broadcast_to(out.bool(), shape)


def _check_grid(where, NQ, NKV, Sq, Skv, BQ, BK) -> None:
    if NQ != -(-Sq // BQ) or NKV != -(-Skv // BK):
        raise ValueError(f"{where}: seq_lens=({Sq}, {Skv}) with block_size=({BQ}, {BK}) needs NQ={-(-Sq // BQ)}, "
                         f"NKV={-(-Skv // BK)}, but got NQ={NQ}, NKV={NKV}")


def _check_int_tensor(t, name: str, ndim: int, where: str = "BlockMask") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{where}: {name} must be an integer tensor, got dtype={t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{where}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_list(cnt, idx, prefix: str) -> None:
    """Counts in [0, NKV]; the first ``cnt`` entries in [0, NKV) and strictly ascending."""
    NKV = idx.shape[-1]
    if cnt.numel() and (int(cnt.min()) < 0 or int(cnt.max()) > NKV):
        raise ValueError(f"BlockMask: {prefix}kv_num_blocks must be in [0, NKV={NKV}], got values in "
                         f"[{int(cnt.min())}, {int(cnt.max())}]")
    valid = torch.arange(NKV, device=idx.device) < cnt.unsqueeze(-1)
    if bool(((idx < 0) | (idx >= NKV))[valid].any()):
        raise ValueError(f"BlockMask: {prefix}kv_indices entries must be in [0, NKV={NKV})")
    if NKV > 1 and bool((idx[..., 1:] <= idx[..., :-1])[valid[..., 1:]].any()):
        raise ValueError(f"BlockMask: {prefix}kv_indices must be strictly ascending in their first "
                         f"{prefix}kv_num_blocks entries")


def _validate_lists(cnt, idx, fcnt, fidx, bits, slot, BQ, BK) -> None:
    _check_int_tensor(cnt, "kv_num_blocks", 3)
    _check_int_tensor(idx, "kv_indices", 4)
    if tuple(cnt.shape) != tuple(idx.shape[:3]):
        raise ValueError(f"BlockMask: kv_num_blocks.shape={tuple(cnt.shape)} must equal kv_indices.shape[:3]="
                         f"{tuple(idx.shape[:3])}")
    B, H, NQ, NKV = idx.shape
    _check_list(cnt, idx, "")
    if (fcnt is None) != (fidx is None):
        raise ValueError("BlockMask: full_kv_num_blocks and full_kv_indices must be given together")
    if fcnt is not None:
        _check_int_tensor(fcnt, "full_kv_num_blocks", 3)
        _check_int_tensor(fidx, "full_kv_indices", 4)
        if tuple(fcnt.shape) != tuple(fidx.shape[:3]):
            raise ValueError(f"BlockMask: full_kv_num_blocks.shape={tuple(fcnt.shape)} must equal "
                             f"full_kv_indices.shape[:3]={tuple(fidx.shape[:3])}")
        fb, fh, fq, fk = fidx.shape
        if (fq, fk) != (NQ, NKV) or fb not in (1, B) and B != 1 or fh not in (1, H) and H != 1:
            raise ValueError(f"BlockMask: full_kv_indices.shape={tuple(fidx.shape)} does not match (or broadcast "
                             f"with) kv_indices.shape={tuple(idx.shape)}")
        if fidx.device != idx.device or fcnt.device != idx.device or cnt.device != idx.device:
            raise ValueError("BlockMask: all index tensors must be on one device")
        _check_list(fcnt, fidx, "full_")
        B, H = max(B, fb), max(H, fh)
        kp = _scatter_kind(cnt.expand(B, H, NQ), idx.expand(B, H, NQ, NKV), NKV, 1,
                           torch.zeros(B, H, NQ, NKV + 1, dtype=torch.int8, device=idx.device))[0]
        kf = _scatter_kind(fcnt.expand(B, H, NQ), fidx.expand(B, H, NQ, NKV), NKV, 1,
                           torch.zeros(B, H, NQ, NKV + 1, dtype=torch.int8, device=idx.device))[0]
        if bool((kp[..., :NKV] & kf[..., :NKV]).any()):
            raise ValueError("BlockMask: a kv block is in both the full and the partial list of a query block")
    if (bits is None) != (slot is None):
        raise ValueError("BlockMask: partial_bits and kv_bits_slot must be given together")
    if bits is not None:
        _check_int_tensor(bits, "partial_bits", 3)
        _check_int_tensor(slot, "kv_bits_slot", 4)
        W = -(-BK // 32)
        if tuple(bits.shape[1:]) != (BQ, W):
            raise ValueError(f"BlockMask: partial_bits must be [P, BQ={BQ}, ceil(BK/32)={W}], got shape "
                             f"{tuple(bits.shape)}")
        sb, sh, sq, sk = slot.shape
        if (sq, sk) != (NQ, NKV) or sb not in (1, B) or sh not in (1, H):
            raise ValueError(f"BlockMask: kv_bits_slot.shape={tuple(slot.shape)} must broadcast to "
                             f"kv_indices' [B={B}, H={H}, NQ={NQ}, NKV={NKV}]")
        P = bits.shape[0]
        valid = torch.arange(NKV, device=idx.device) < cnt.unsqueeze(-1)
        s = slot.expand(B, H, NQ, NKV)[valid.expand(B, H, NQ, NKV)]
        if s.numel() and (int(s.min()) < -1 or int(s.max()) >= P):
            raise ValueError(f"BlockMask: kv_bits_slot entries must be in [-1, P={P}), got values in "
                             f"[{int(s.min())}, {int(s.max())}]")
