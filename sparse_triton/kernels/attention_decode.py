"""Block-sparse attention for decode (few queries per sequence): split-kv with a log-sum-exp merge.

``attention_decode(q, k, v, block_mask, scale, causal)`` for ``q [B, Hq, Sq, D]`` with ``Sq <= 16``
and ``k``/``v [B, Hkv, Skv, D]`` (GQA/MQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``). The
element rule is the BlockMask contract (``formats/block_mask.py``, spec in the module docstring of
``reference/attention.py``); the pure-torch twin is ``reference.attention.attention_decode``.

Why split-kv: a decode step has too few (batch, head) rows to fill the GPU, and each row's work is a
long reduction over the kv cache. So the selected kv blocks of each row are dealt out to
``NUM_SPLITS`` programs; each runs an online softmax over its share and writes an fp32 partial output
and its log-sum-exp to a workspace, and ``_decode_merge_kernel`` folds the splits (deterministic, no
atomics).

Layout of the work of one program:

* **Rows** (the M side of ``tl.dot``): when the mask is shared by all query heads (mask H == 1), the
  ``G = Hq // Hkv`` query heads that read one kv head are packed with their ``Sq`` queries into the
  rows of one tile (row ``r`` = head ``r // Sq``, query ``r % Sq``), so each K/V tile is read once per
  kv head. A per-head mask (mask H == Hq) packs one query head (rows = its queries). Rows pad to
  ``BLOCK_M`` >= 16 (tensor cores need M >= 16); more rows than ``BLOCK_M`` take several row tiles.
* **Keys** (the N side): the full list and then the partial list of the query block are walked as
  one virtual sequence of ``(nf + np) * BK`` keys in ``BLOCK_N`` tiles; key ``e`` of it is key
  ``e % BK`` of block ``list[e // BK]``. The tile is independent of the mask's BK (a tile may span
  several small blocks or a part of a large one), so one compiled kernel serves every BK. Split ``s``
  takes a contiguous, balanced run of those tiles.
* **Masking**: the tiles of full blocks only (one loop) test, with one scalar load (lists are
  ascending), whether their last key touches the kv tail or crosses the causal diagonal, and only then
  mask bounds + causal. The remaining tiles (partial blocks; a second loop) apply the whole element
  rule: bounds, causal ``k <= q`` (query position = its index, top-left), the partial block's bitmask.
  Loads are always bounded by ``k < Skv`` (and ``k < Sq`` under causal, where no query sees further).

Causal and "has bitmasks" are 0/1 runtime arguments (a compare per element of masked tiles) and no
argument is specialized on its value or alignment: a decode loop whose Skv grows every step runs one
binary per (dtype, head-dim tile), and the compile check builds 16 + 3 variants in all. The vector
loads' alignment is stated by hints instead (the launcher copies any q/k/v that lacks it).

Rows with no allowed key give ``o = 0``, ``lse = -inf`` (the online softmax and the merge both guard
``m = -inf``). Scores are scaled by ``scale * log2(e)`` once and exponentiated with ``exp2``.

Non-finite inputs follow the prefill kernels' rule (``kernels/attention.py``): a NaN or inf in k or v at
a key a query cannot see never reaches it, one at a key it can see does as the dense formula says.
Masked scores are selected to ``-inf``, so a masked key's value can only leak through ``P @ V`` (``0 *
inf``), which leaves a NaN in the split's output, and the merge adds nothing from a split without keys
(``lse = -inf``) and keeps a NaN lse NaN. The split kernel is unchanged by this: the merge, after
folding, recomputes each query row whose columns hold a NaN, one row at a time with vector code that
adds a key's ``p * v`` only where the pair is allowed (``_exact_row``; rare, and the merge's registers
are few, so the fast split kernel keeps its own budget).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._env import TRITON_INTERPRET as INTERPRET
from ._launch import on_device, specializations, tf32_enabled
from .attention import _final_lse

__all__ = ["DECODE_MAX_Q", "DecodeConfig", "attention_decode", "compile_variants", "heuristic_config",
           "pick_splits", "supported"]

DECODE_MAX_Q = 16  # most queries per sequence the decode kernel takes (rows of one query block)
BLOCK_SIZES_K = (16, 32, 64, 128)  # mask BK values the kernel reads
HEAD_DIMS = (32, 64, 96, 128, 256)  # head dims with a compiled variant (96 runs as 128 with a D mask)
_LOG2E = 1.4426950408889634

# --------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _qk_tile(b_q, p_kb, o_k, m_k, m_d, stride_ks, qk_scale, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Scores ``[BLOCK_M, BLOCK_N]`` (log2 units) of the rows ``b_q`` against keys ``o_k`` (``m_k``: loadable)."""
    # The launcher hands over k/v with 16-byte aligned bases and row strides (it copies them otherwise;
    # real KV caches qualify), so K rows load as 16-byte vectors in every launch specialization.
    VEC: tl.constexpr = 128 // p_kb.dtype.element_ty.primitive_bitwidth
    o_kr = tl.multiple_of(o_k.to(tl.int64) * stride_ks, VEC)  # int64: Skv * row stride may pass 2^31
    b_k = tl.load(p_kb + o_kr[:, None] + tl.arange(0, BLOCK_D)[None, :], mask=m_k[:, None] & m_d[None, :],
                  other=0.0)  # [BLOCK_N, BLOCK_D]
    return tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION, out_dtype=tl.float32) * qk_scale


@triton.jit
def _softmax_pv(b_s, m_i, l_i, acc, p_vb, o_k, m_k, m_d, stride_vs, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax step: fold the masked, log2-unit scores ``b_s`` and the V rows ``o_k`` into
    ``(m_i, l_i, acc)``."""
    VEC: tl.constexpr = 128 // p_vb.dtype.element_ty.primitive_bitwidth
    m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
    # A row with no allowed key so far keeps m = -inf: subtract 0 instead (exp2(-inf) = 0, no NaN).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    b_p = tl.exp2(b_s - m_use[:, None])  # [BLOCK_M, BLOCK_N]
    l_i = l_i * alpha + tl.sum(b_p, axis=1)
    o_vr = tl.multiple_of(o_k.to(tl.int64) * stride_vs, VEC)
    b_v = tl.load(p_vb + o_vr[:, None] + tl.arange(0, BLOCK_D)[None, :], mask=m_k[:, None] & m_d[None, :],
                  other=0.0)  # [BLOCK_N, BLOCK_D]
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION, out_dtype=tl.float32)
    return m_new, l_i, acc


_SPLIT_PTRS = ("p_q", "p_k", "p_v", "p_fn", "p_fi", "p_pn", "p_pi", "p_slot", "p_bits", "p_wo", "p_wl")
_SPLIT_INTS = ("Sq", "Skv", "D", "R", "G", "PACK", "NHG", "NUM_SPLITS", "LOG_BK", "causal", "has_bits")
_SPLIT_STRIDES = ("stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks", "stride_vb",
                  "stride_vh", "stride_vs", "stride_nb", "stride_nh", "stride_ib", "stride_ih", "stride_bp",
                  "stride_br")


# No launch specialization (values 1 / multiples of 16, pointer alignment): Skv grows every decode
# step and would flip between specializations, each a fresh JIT compile. One binary per config and
# dtype instead, with the alignment the vector loads need stated by hints (the launcher guarantees it).
@triton.jit(do_not_specialize=_SPLIT_INTS + _SPLIT_STRIDES, do_not_specialize_on_alignment=_SPLIT_PTRS)
def _decode_split_kernel(p_q, p_k, p_v, p_fn, p_fi, p_pn, p_pi, p_slot, p_bits, p_wo, p_wl,
                         Sq, Skv, D, R, G, PACK, NHG, NUM_SPLITS, LOG_BK, qk_scale, causal, has_bits,
                         stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                         stride_vb, stride_vh, stride_vs, stride_nb, stride_nh, stride_ib, stride_ih,
                         stride_bp, stride_br,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr):
    """One split of one row tile of one (batch, query-head group): partial ``(o, lse)`` over its share.

    p_q: ``[B, Hq, Sq, D]``; p_k / p_v: ``[B, Hkv, Skv, D]`` (unit stride on D, other strides any multiple
    of 16 bytes, 16-byte aligned). Mask (query block 0, ``NQ == 1``; B/H strides 0 where broadcast):
    p_fn / p_pn: full / partial block counts ``[B, H, 1]`` (strides ``stride_nb, stride_nh``); p_fi /
    p_pi / p_slot: full / partial block indices and the partial blocks' bitmask slots ``[B, H, 1, NKV]``
    (``stride_ib, stride_ih``, unit last stride); p_bits: ``[P, BQ, ceil(BK / 32)]`` int32 words
    (``stride_bp, stride_br``, unit last stride). Without bitmasks (``has_bits`` false) p_slot / p_bits
    are never read. p_wo: fp32 workspace ``[B * Hq, NUM_SPLITS, Sq, D]``, p_wl: fp32 ``[B * Hq,
    NUM_SPLITS, Sq]``, log-sum-exp in base 2 (``-inf`` for rows without keys). ``causal`` and
    ``has_bits`` are 0/1 runtime flags (a compare per element of masked tiles; a quarter of the compiles).
    Grid: (B * NHG head groups of PACK query heads, NUM_SPLITS, row tiles of ``R = PACK * Sq`` rows).
    """
    i_bg = tl.program_id(0)
    i_s = tl.program_id(1)
    i_r = tl.program_id(2)
    i_b = i_bg // NHG
    h0 = (i_bg % NHG) * PACK  # first query head of the group
    i_kvh = h0 // G

    o_r = i_r * BLOCK_M + tl.arange(0, BLOCK_M)
    g_r = o_r // Sq  # head within the group
    q_r = o_r - g_r * Sq  # query position (top-left: its index)
    m_r = o_r < R
    h_r = (h0 + g_r).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    D32 = (D >> 5) << 5  # = D (a multiple of 32), known as such: the D mask is constant over vectors
    m_d = o_d < D32

    # int64 bases: a kv cache's B * Hkv * Skv * D passes 2^31.
    p_qr = tl.multiple_of(p_q + (i_b.to(tl.int64) * stride_qb + h_r * stride_qh + q_r * stride_qs), 16)  # [BLOCK_M]
    b_q = tl.load(p_qr[:, None] + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    p_kb = tl.multiple_of(p_k + (i_b.to(tl.int64) * stride_kb + i_kvh.to(tl.int64) * stride_kh), 16)
    p_vb = tl.multiple_of(p_v + (i_b.to(tl.int64) * stride_vb + i_kvh.to(tl.int64) * stride_vh), 16)

    off_n = i_b * stride_nb + h0 * stride_nh
    off_i = i_b * stride_ib + h0 * stride_ih
    n_full = tl.load(p_fn + off_n)
    n_part = tl.load(p_pn + off_n)
    BK = 1 << LOG_BK
    # The full list then the partial list, as one virtual sequence of keys: key e is key e % BK of
    # block list[e // BK]. This split's tiles [t_lo, t_hi): first those of full blocks only, then the
    # rest (partial blocks, a tile straddling both lists or the list's end), which always mask.
    e_full = n_full << LOG_BK
    e_all = (n_full + n_part) << LOG_BK
    n_tiles = tl.cdiv(e_all, BLOCK_N)
    t_lo = i_s * n_tiles // NUM_SPLITS
    t_hi = (i_s + 1) * n_tiles // NUM_SPLITS
    t_mid = tl.minimum(tl.maximum(e_full // BLOCK_N, t_lo), t_hi)
    # Key k is allowed for row r only if k <= k_max[r]: the kv tail, and under (top-left) causal the
    # row's query position; keys past kv_end are allowed for no row and never loaded. A full tile is
    # exact when its last key is <= the smallest k_max (0 under causal).
    is_causal = causal != 0
    kv_end = tl.where(is_causal, tl.minimum(Skv, Sq), Skv)
    k_max = tl.where(is_causal, tl.minimum(q_r, Skv - 1), Skv - 1)  # [BLOCK_M]
    k_ok = tl.where(is_causal, 0, Skv - 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in range(t_lo, t_mid):
        o_e = t * BLOCK_N + tl.arange(0, BLOCK_N)
        o_k = (tl.load(p_fi + off_i + (o_e >> LOG_BK)) << LOG_BK) + (o_e & (BK - 1))  # [BLOCK_N] key index
        m_k = o_k < kv_end
        b_s = _qk_tile(b_q, p_kb, o_k, m_k, m_d, stride_ks, qk_scale, BLOCK_D, PRECISION)
        # Scalar test: full blocks are exact unless the tile's largest (= last: the list ascends) key is
        # past the kv tail or the causal diagonal.
        e_last = t * BLOCK_N + BLOCK_N - 1
        k_last = (tl.load(p_fi + off_i + (e_last >> LOG_BK)) << LOG_BK) + (e_last & (BK - 1))
        if k_last > k_ok:
            b_s = tl.where(o_k[None, :] <= k_max[:, None], b_s, float("-inf"))
        m_i, l_i, acc = _softmax_pv(b_s, m_i, l_i, acc, p_vb, o_k, m_k, m_d, stride_vs, BLOCK_D, PRECISION)
    for t in range(t_mid, t_hi):
        o_e = t * BLOCK_N + tl.arange(0, BLOCK_N)
        m_e = o_e < e_all
        o_pos = o_e >> LOG_BK  # position in the concatenated (full, partial) list
        o_kk = o_e & (BK - 1)  # key within its block
        is_p = o_pos >= n_full
        b_blk = tl.where(is_p,
                         tl.load(p_pi + off_i + (o_pos - n_full), mask=m_e & is_p, other=0),
                         tl.load(p_fi + off_i + o_pos, mask=m_e & (o_pos < n_full), other=0))
        o_k = (b_blk << LOG_BK) + o_kk  # [BLOCK_N] key index
        m_k = m_e & (o_k < kv_end)
        b_s = _qk_tile(b_q, p_kb, o_k, m_k, m_d, stride_ks, qk_scale, BLOCK_D, PRECISION)
        m_s = m_e[None, :] & (o_k[None, :] <= k_max[:, None])  # [BLOCK_M, BLOCK_N]
        # Bitmask of a partial block; slot -1 (none, a full block, no bitmasks at all) reads as an
        # all-ones word: every key allowed.
        b_slot = tl.load(p_slot + off_i + (o_pos - n_full), mask=m_e & is_p & (has_bits != 0), other=-1)  # [BLOCK_N]
        b_w = tl.load(p_bits + b_slot[None, :] * stride_bp + q_r[:, None] * stride_br + (o_kk >> 5)[None, :],
                      mask=(b_slot >= 0)[None, :] & m_r[:, None], other=-1)  # [BLOCK_M, BLOCK_N]
        m_s = m_s & (((b_w >> (o_kk & 31)[None, :]) & 1) != 0)
        b_s = tl.where(m_s, b_s, float("-inf"))
        m_i, l_i, acc = _softmax_pv(b_s, m_i, l_i, acc, p_vb, o_k, m_k, m_d, stride_vs, BLOCK_D, PRECISION)

    b_o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a NaN l (NaN or +inf score) keeps the row NaN
    b_lse = _final_lse(m_i, l_i, 1.0)  # log2 units, for the merge
    # Workspace row of (batch, head h_r, split, query q_r).
    o_w = ((i_b.to(tl.int64) * (NHG * PACK) + h_r) * NUM_SPLITS + i_s) * Sq + q_r  # [BLOCK_M]
    tl.store(p_wl + o_w, b_lse, mask=m_r)
    p_wr = tl.multiple_of(p_wo + o_w * D32, 16)  # [BLOCK_M]
    tl.store(p_wr[:, None] + o_d[None, :], b_o, mask=m_r[:, None] & m_d[None, :])


MERGE_BLOCK_D = 32  # every supported head dim is a multiple of 32: no D mask in the merge


FIX_N = 16  # keys per step of the merge's exact recompute of a row that holds a NaN
_MERGE_INTS = ("Sq", "Skv", "D", "NUM_SPLITS", "Hq", "G", "LOG_BK", "causal", "has_bits")
_MERGE_STRIDES = ("stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks", "stride_vb",
                  "stride_vh", "stride_vs", "stride_nb", "stride_nh", "stride_ib", "stride_ih", "stride_bp",
                  "stride_br")
_MERGE_PTRS = ("p_wo", "p_wl", "p_o", "p_lse", "p_q", "p_k", "p_v", "p_fn", "p_fi", "p_pn", "p_pi", "p_slot", "p_bits")


@triton.jit
def _exact_row(p_q, p_k, p_v, p_fn, p_fi, p_pn, p_pi, p_slot, p_bits, off_n, off_i, qpos, o_d, Skv, D, LOG_BK,
               qk_scale, is_causal, has_bits, stride_ks, stride_vs, stride_bp, stride_br,
               BLOCK_D: tl.constexpr, FIX_N: tl.constexpr):
    """``(acc [BLOCK_D], m, l)`` of the online softmax of the query at ``p_q`` (its position ``qpos``) over
    its allowed keys (the full, then the partial list), for the columns ``o_d`` of V: vector code, exact
    for inf and NaN (a NaN score makes the running max NaN; a key adds ``p * v`` only where allowed)."""
    BK = 1 << LOG_BK
    n_full = tl.load(p_fn + off_n)
    n_all = n_full + tl.load(p_pn + off_n)
    k_max = tl.where(is_causal, tl.minimum(qpos, Skv - 1), Skv - 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    m_i = float("-inf")
    l_i = 0.0
    for t in range(0, n_all):
        is_p = t >= n_full
        slot = -1
        if is_p:
            blk = tl.load(p_pi + off_i + t - n_full)
            if has_bits != 0:
                slot = tl.load(p_slot + off_i + t - n_full)
        else:
            blk = tl.load(p_fi + off_i + t)
        for k0 in range(0, BK, FIX_N):
            o_kk = k0 + tl.arange(0, FIX_N)  # key within its block
            o_k = (blk << LOG_BK) + o_kk  # [FIX_N]
            allowed = o_k <= k_max
            words = tl.load(p_bits + slot * stride_bp + qpos * stride_br + (o_kk >> 5), mask=(o_kk * 0 + slot) >= 0,
                            other=-1)
            allowed = allowed & (((words >> (o_kk & 31)) & 1) != 0)
            p_kr = p_k + o_k.to(tl.int64) * stride_ks
            s = tl.zeros([FIX_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):  # the score over all of D, BLOCK_D columns at a time
                o_c = d0 + tl.arange(0, BLOCK_D)
                b_k = tl.load(p_kr[:, None] + o_c[None, :], mask=allowed[:, None], other=0.0).to(tl.float32)
                s += tl.sum(b_k * tl.load(p_q + o_c).to(tl.float32)[None, :], 1)
            s = tl.where(allowed, s * qk_scale, float("-inf"))
            s_max = tl.where(tl.max(tl.where(s != s, 1, 0), 0) > 0, float("nan"), tl.max(s, 0))
            m_new = tl.maximum(m_i, s_max, propagate_nan=tl.PropagateNan.ALL)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use)
            l_i = l_i * alpha + tl.sum(p, 0)
            b_v = tl.load(p_v + o_k.to(tl.int64)[:, None] * stride_vs + o_d[None, :], mask=allowed[:, None],
                          other=0.0).to(tl.float32)  # [FIX_N, BLOCK_D]
            acc = acc * alpha + tl.sum(tl.where(allowed[:, None], p[:, None] * b_v, 0.0), 0)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=_MERGE_INTS + _MERGE_STRIDES, do_not_specialize_on_alignment=_MERGE_PTRS)
def _decode_merge_kernel(p_wo, p_wl, p_o, p_lse, p_q, p_k, p_v, p_fn, p_fi, p_pn, p_pi, p_slot, p_bits,
                         Sq, Skv, D, NUM_SPLITS, Hq, G, LOG_BK, qk_scale, causal, has_bits,
                         stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh,
                         stride_vs, stride_nb, stride_nh, stride_ib, stride_ih, stride_bp, stride_br,
                         BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, FIX_N: tl.constexpr):
    """Fold the splits of one (batch, query head) by log-sum-exp, ``BLOCK_D`` columns per program; then
    recompute, exactly, each query row whose folded columns hold a NaN.

    p_wo: fp32 ``[B * Hq, NUM_SPLITS, Sq, D]``, p_wl: fp32 base-2 lse ``[B * Hq, NUM_SPLITS, Sq]``
    (from ``_decode_split_kernel``); p_o: contiguous output ``[B * Hq, Sq, D]`` in q's dtype, p_lse:
    fp32 ``[B * Hq, Sq]``, natural log (written by the first column block). D is a multiple of
    BLOCK_D; all four are fresh allocations (16-byte aligned). Grid: (B * Hq, D // BLOCK_D).
    For the recompute (rare: a masked key's inf/NaN v leaked into a split through ``0 * inf``, or the
    formula gives NaN; every leak leaves a NaN) the split kernel's inputs: q, k, v, the mask lists and
    bitmasks with their strides (as in ``_decode_split_kernel``), ``Hq``, ``G = Hq // Hkv``,
    ``LOG_BK``, ``qk_scale`` (log2 units) and the 0/1 flags ``causal``, ``has_bits``.
    """
    i_bh = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1)
    o_q = tl.arange(0, BLOCK_Q)
    m_q = o_q < Sq
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    D_ = (D // BLOCK_D) * BLOCK_D  # = D, known as a multiple of BLOCK_D
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    o_w = i_bh * NUM_SPLITS * Sq + o_q  # [BLOCK_Q] workspace rows of split 0
    for _ in range(NUM_SPLITS):
        b_lse = tl.load(p_wl + o_w, mask=m_q, other=float("-inf"))
        p_wr = tl.multiple_of(p_wo + o_w * D_, 16)
        b_o = tl.load(p_wr[:, None] + o_d[None, :], mask=m_q[:, None], other=0.0)  # [BLOCK_Q, BLOCK_D]
        m_new = tl.maximum(m_i, b_lse, propagate_nan=tl.PropagateNan.ALL)  # a NaN lse stays NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # every split so far empty: no NaN
        alpha = tl.exp2(m_i - m_use)
        w = tl.exp2(b_lse - m_use)
        l_i = l_i * alpha + w
        # a split without keys (lse = -inf) adds nothing: selected, not multiplied by w = 0
        acc = acc * alpha[:, None] + tl.where((b_lse == float("-inf"))[:, None], 0.0, w[:, None] * b_o)
        m_i = m_new
        o_w += Sq
    b_o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_out = i_bh * Sq + o_q
    p_or = tl.multiple_of(p_o + o_out * D_, 16)
    tl.store(p_or[:, None] + o_d[None, :], b_o.to(p_o.dtype.element_ty), mask=m_q[:, None])
    if i_d == 0:
        tl.store(p_lse + o_out, _final_lse(m_i, l_i, 0.6931471805599453), mask=m_q)

    row_nan = tl.max(tl.where(m_q[:, None] & (b_o != b_o), 1, 0), 1)  # [BLOCK_Q]
    if tl.max(row_nan, 0) > 0:
        i_b = i_bh // Hq
        i_h = i_bh % Hq
        off_n = i_b * stride_nb + i_h * stride_nh  # the mask's B/H strides are 0 where it broadcasts
        off_i = i_b * stride_ib + i_h * stride_ih
        p_kh = p_k + i_b * stride_kb + (i_h // G) * stride_kh
        p_vh = p_v + i_b * stride_vb + (i_h // G) * stride_vh
        for qpos in range(0, Sq):
            if tl.sum(tl.where(o_q == qpos, row_nan, 0), 0) > 0:
                acc_r, m_r, l_r = _exact_row(p_q + i_b * stride_qb + i_h * stride_qh + qpos * stride_qs, p_kh, p_vh,
                                             p_fn, p_fi, p_pn, p_pi, p_slot, p_bits, off_n, off_i, qpos, o_d, Skv, D,
                                             LOG_BK, qk_scale, causal != 0, has_bits, stride_ks, stride_vs, stride_bp,
                                             stride_br, BLOCK_D, FIX_N)
                out_r = acc_r / tl.where(l_r == 0.0, 1.0, l_r)
                tl.store(p_o + (i_bh * Sq + qpos) * D_ + o_d, out_r.to(p_o.dtype.element_ty))
                if i_d == 0:
                    tl.store(p_lse + i_bh * Sq + qpos, _final_lse(m_r, l_r, 0.6931471805599453))


# --------------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class DecodeConfig:
    """Launch config of ``_decode_split_kernel``.

    BLOCK_N: keys per tile (a power of two >= 16, independent of the mask's BK). ``num_splits``:
    programs sharing one row tile's kv blocks; None picks it (``pick_splits``) from the mask's NKV, an
    upper bound of the selected blocks known on the host without a sync, and the programs the rows
    already give, aiming at ``programs_per_sm`` programs per SM, at most ``max_splits``. The row tile is
    always ``BLOCK_M`` = 16 rows (see the module docstring).
    """

    BLOCK_N: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None
    max_splits: int = 64
    programs_per_sm: int = 2


BLOCK_M = 16  # rows per program: tensor cores need M >= 16; more rows take more row tiles
H100_SMS = 132
# BLOCK_D -> config. Registers hold q (BLOCK_M x BLOCK_D), acc (fp32, same) and the scores
# (BLOCK_M x BLOCK_N); K/V tiles (BLOCK_N x BLOCK_D) stream through shared memory, double-buffered.
_CONFIGS_16 = {32: DecodeConfig(BLOCK_N=64), 64: DecodeConfig(BLOCK_N=64), 128: DecodeConfig(BLOCK_N=64),
               256: DecodeConfig(BLOCK_N=32)}
# fp32 (TF32 or exact): twice the bytes per element.
_CONFIGS_32 = {32: DecodeConfig(BLOCK_N=64), 64: DecodeConfig(BLOCK_N=32), 128: DecodeConfig(BLOCK_N=32),
               256: DecodeConfig(BLOCK_N=16)}
# Under TRITON_INTERPRET=1: big key tiles keep the interpreter fast.
INTERPRET_CONFIG = DecodeConfig(BLOCK_N=64)


def heuristic_config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """Default config for head dim ``head_dim`` and input ``dtype`` on a GPU."""
    return (_CONFIGS_32 if dtype == torch.float32 else _CONFIGS_16)[_block_d(head_dim)]


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_splits(programs: int, max_tiles: int, cfg: DecodeConfig, sms: int = H100_SMS) -> int:
    """Splits per row tile: enough that ``programs`` x splits reaches ``cfg.programs_per_sm`` per SM,
    while each split keeps at least two tiles of the host-known upper bound ``max_tiles`` (a sparse
    mask selects fewer; splits left without a tile write ``lse = -inf`` and cost one small program).
    ``cfg.num_splits`` overrides (capped at ``max_tiles``)."""
    if cfg.num_splits is not None:
        return max(1, min(cfg.num_splits, max_tiles))
    want = _cdiv(cfg.programs_per_sm * sms, max(programs, 1))
    return max(1, min(want, cfg.max_splits, max_tiles // 2))


def _precision(dtype: torch.dtype) -> str:
    """``ieee`` for fp32 unless PyTorch allows TF32 for matmuls."""
    if dtype == torch.float32 and not tf32_enabled():
        return "ieee"
    return "tf32"


# --------------------------------------------------------------------------------------------------
# launcher

_WHERE = "attention_decode"


def _mask_fields(block_mask) -> tuple:
    fields = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "block_size", "seq_lens")
    missing = [f for f in fields if not hasattr(block_mask, f)]
    if missing:
        raise ValueError(f"{_WHERE}: block_mask lacks {', '.join(missing)} (expected a BlockMask)")
    return tuple(getattr(block_mask, f) for f in fields)


def supported(q: torch.Tensor, k: torch.Tensor, block_mask) -> str | None:
    """None if the decode kernel handles ``q``, ``k`` (``v`` like ``k``) and ``block_mask``, else why not.

    The op layer calls this to fall back (prefill kernel or reference) instead of raising.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} must be a 4-D tensor [B, H, S, D]"
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Skv, Dk = k.shape
    if Sq > DECODE_MAX_Q:
        return f"q has Sq={Sq} queries; the decode kernel takes at most DECODE_MAX_Q={DECODE_MAX_Q}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"q.dtype={q.dtype}; the kernel supports float16, bfloat16 and float32"
    if k.dtype != q.dtype:
        return f"k.dtype={k.dtype} differs from q.dtype={q.dtype}"
    if INTERPRET and q.dtype == torch.bfloat16:
        return "Triton's interpreter computes bfloat16 wrongly (use the reference on CPU)"
    if k.device != q.device:
        return f"k is on {k.device} but q is on {q.device}"
    if q.device.type != "cuda" and not INTERPRET:
        return f"q is on {q.device}; the kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1)"
    if (Bk, Dk) != (B, D) or Hkv == 0 or Hq % Hkv:
        return f"k.shape={tuple(k.shape)} does not match q.shape={tuple(q.shape)} (same B and D, Hq % Hkv == 0)"
    if D not in HEAD_DIMS:
        return f"head dim D={D} is not one of {HEAD_DIMS}"
    if block_mask is None:
        return None
    try:
        _, kv_idx, _, _, (BQ, BK), seq_lens = _mask_fields(block_mask)
    except ValueError as e:
        return str(e).removeprefix(f"{_WHERE}: ")
    if BK not in BLOCK_SIZES_K:
        return f"block_mask BK={BK} is not one of {BLOCK_SIZES_K}"
    if tuple(seq_lens) != (Sq, Skv):
        return f"block_mask seq_lens={tuple(seq_lens)} but the inputs have (Sq, Skv)=({Sq}, {Skv})"
    mb, mh, nq = kv_idx.shape[:3]
    if nq != 1:
        return f"block_mask has NQ={nq} query blocks (BQ={BQ} < Sq={Sq}); decode needs one query block"
    if mb not in (1, B) or mh not in (1, Hq):
        return f"block_mask is for B={mb}, H={mh}; need B in (1, {B}) and H in (1, {Hq})"
    if kv_idx.device != q.device:
        return f"block_mask is on {kv_idx.device} but q is on {q.device}"
    return None


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit last stride, a 16-byte aligned base and 16-byte multiple strides (what the
    kernel's vector loads assume), copied only if it has not."""
    es = t.element_size()
    # Strides of size-1 dims never move the address (the kernel multiplies them by 0).
    if t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
            n == 1 or (s * es) % 16 == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1])):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _index_strides(t: torch.Tensor) -> tuple[int, int]:
    """(B, H) strides of a mask tensor, 0 on broadcast dims."""
    return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)


def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float | None,
                     causal: bool = False, config: DecodeConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention for ``Sq <= 16`` queries: ``(o [B, Hq, Sq, D] in q.dtype, lse [B, Hq, Sq] fp32)``.

    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` (``Hq % Hkv == 0``, any strides: copied unless the last
    is 1 and the rest are 16-byte multiples), ``block_mask`` a BlockMask for ``(Sq, Skv)`` with one query
    block (``BQ >= Sq``) and BK in (16, 32, 64, 128), or None (every key). ``scale`` None means
    ``1/sqrt(D)``. Effective causal = ``causal or block_mask.causal`` (``k <= q``, top-left aligned).
    Same math as ``reference.attention.attention_decode``: ``lse`` is the natural-log log-sum-exp of
    the scaled, masked scores; a query without keys gets ``o = 0``, ``lse = -inf``. No host sync.

    >>> q, k, v = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 200, 64), torch.randn(1, 2, 200, 64)
    >>> o, lse = attention_decode(q, k, v, None, None)  # doctest: +SKIP
    """
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{_WHERE}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if v.shape != k.shape:
        raise ValueError(f"{_WHERE}: v.shape={tuple(v.shape)} must equal k.shape={tuple(k.shape)}")
    if v.dtype != k.dtype or v.device != k.device:
        raise ValueError(f"{_WHERE}: v ({v.dtype} on {v.device}) must match k ({k.dtype} on {k.device})")
    reason = supported(q, k, block_mask)
    if reason is not None:
        raise ValueError(f"{_WHERE}: {reason}")
    if config is not None and (config.BLOCK_N < 16 or config.BLOCK_N & (config.BLOCK_N - 1)):
        raise ValueError(f"{_WHERE}: config.BLOCK_N={config.BLOCK_N} must be a power of two >= 16")
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    o = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    if Skv == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    if block_mask is None:
        BK, nkv = 64, _cdiv(Skv, 64)
        fn = torch.full((1, 1, 1), nkv, dtype=torch.int32, device=q.device)
        fi = torch.arange(nkv, dtype=torch.int32, device=q.device).view(1, 1, 1, nkv)
        pn, pi, slot, bits, mask_h, is_causal = torch.zeros_like(fn), fi, None, None, 1, bool(causal)
    else:
        pn, pi, fn, fi, (_, BK), _ = _mask_fields(block_mask)
        slot = getattr(block_mask, "kv_bits_slot", None)
        bits = getattr(block_mask, "partial_bits", None)
        if slot is None or bits is None:
            slot = bits = None
        mask_h, nkv = pi.shape[1], pi.shape[3]
        is_causal = bool(causal) or bool(getattr(block_mask, "causal", False))
    # The index tensors [B|1, H|1, 1, NKV] (and the counts [B|1, H|1, 1]) share one set of strides.
    pn, fn, pi, fi = (t.contiguous() for t in (pn, fn, pi, fi))
    if slot is not None:
        slot, bits = slot.contiguous(), bits.contiguous()
    if fi.shape != pi.shape or fn.shape != pn.shape or (slot is not None and slot.shape != pi.shape):
        raise ValueError(f"{_WHERE}: block_mask index tensors disagree in shape (kv_indices {tuple(pi.shape)}, "
                         f"full_kv_indices {tuple(fi.shape)})")

    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    G = Hq // Hkv
    pack = G if mask_h == 1 else 1  # a per-head mask: one query head per program
    rows = pack * Sq
    nhg = Hq // pack
    row_tiles = _cdiv(rows, BLOCK_M)
    if INTERPRET or q.device.type != "cuda":
        cfg, sms = config or INTERPRET_CONFIG, H100_SMS
    else:
        cfg = config or heuristic_config(D, q.dtype)
        sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
    splits = pick_splits(B * nhg * row_tiles, _cdiv(nkv * BK, cfg.BLOCK_N), cfg, sms)

    ws_o = torch.empty((B * Hq, splits, Sq, D), dtype=torch.float32, device=q.device)
    ws_l = torch.empty((B * Hq, splits, Sq), dtype=torch.float32, device=q.device)
    block_d = _block_d(D)
    with on_device(q):
        _decode_split_kernel[(B * nhg, splits, row_tiles)](
            q, k, v, fn, fi, pn, pi, pi if slot is None else slot, pi if bits is None else bits, ws_o, ws_l,
            Sq, Skv, D, rows, G, pack, nhg, splits, BK.bit_length() - 1, scale * _LOG2E, int(is_causal),
            int(slot is not None),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *_index_strides(fn), *_index_strides(fi),
            bits.stride(0) if bits is not None else 0, bits.stride(1) if bits is not None else 0,
            BLOCK_M=BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=block_d, PRECISION=_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _decode_merge_kernel[(B * Hq, D // MERGE_BLOCK_D)](
            ws_o, ws_l, o, lse, q, k, v, fn, fi, pn, pi, pi if slot is None else slot, pi if bits is None else bits,
            Sq, Skv, D, splits, Hq, G, BK.bit_length() - 1, scale * _LOG2E, int(is_causal), int(slot is not None),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *_index_strides(fn), *_index_strides(fi),
            bits.stride(0) if bits is not None else 0, bits.stride(1) if bits is not None else 0,
            BLOCK_Q=DECODE_MAX_Q, BLOCK_D=MERGE_BLOCK_D, FIX_N=FIX_N, num_warps=1)
    return o, lse


# --------------------------------------------------------------------------------------------------
# ahead-of-time compile check (tests/compile_sm90.py)

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _launched(variants):
    # Both kernels opt out of launch specialization, so the one build that ever runs is the
    # "ragged" one (nothing known about integer values or pointer alignment).
    for label, kern, sig, const, options, attrs in variants:
        if label.endswith(" ragged"):
            yield label.removesuffix(" ragged"), kern, sig, const, options, attrs


def compile_variants():
    """Yield ``(label, kernel, signature, constexprs, options, attrs)``: the split kernel for every
    dtype (fp32 as TF32 and exact) x head-dim tile (BLOCK_D 32, 64, 128, 256; D = 96 runs as 128)
    with its config, and the merge kernel for every output dtype. Causal and bitmask are 0/1 runtime
    flags, so each build covers all four (causal, bits) cases; neither kernel specializes on argument
    values or alignment, so each has a single launch specialization."""
    for dtype, precision in ((torch.float16, "tf32"), (torch.bfloat16, "tf32"), (torch.float32, "tf32"),
                             (torch.float32, "ieee")):
        ptr = _PTR[dtype]
        for block_d in sorted({_block_d(d) for d in HEAD_DIMS}):
            cfg = heuristic_config(block_d, dtype)
            sig = {**dict.fromkeys(_SPLIT_PTRS, "*i32"), "p_q": ptr, "p_k": ptr, "p_v": ptr, "p_wo": "*fp32",
                   "p_wl": "*fp32", **dict.fromkeys(_SPLIT_INTS, "i32"), "qk_scale": "fp32",
                   **dict.fromkeys(_SPLIT_STRIDES, "i32")}
            const = {"BLOCK_M": BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_D": block_d, "PRECISION": precision}
            label = (f"attention_decode.split {str(dtype)[6:]}{'/ieee' if precision == 'ieee' else ''} "
                     f"D{block_d} M{BLOCK_M}N{cfg.BLOCK_N}w{cfg.num_warps}s{cfg.num_stages}")
            yield from _launched(specializations(label, _decode_split_kernel, sig, const,
                                                 {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
    for dtype, ptr in _PTR.items():
        sig = {**dict.fromkeys(_MERGE_PTRS, "*i32"), "p_wo": "*fp32", "p_wl": "*fp32", "p_o": ptr, "p_lse": "*fp32",
               "p_q": ptr, "p_k": ptr, "p_v": ptr, **dict.fromkeys(_MERGE_INTS, "i32"), "qk_scale": "fp32",
               **dict.fromkeys(_MERGE_STRIDES, "i32")}
        yield from _launched(specializations(f"attention_decode.merge {str(dtype)[6:]}", _decode_merge_kernel, sig,
                                             {"BLOCK_Q": DECODE_MAX_Q, "BLOCK_D": MERGE_BLOCK_D, "FIX_N": FIX_N},
                                             {"num_warps": 1}))
