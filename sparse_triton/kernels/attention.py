"""Block-sparse attention for prefill and training: forward with online softmax, and backward.

The mask is a :class:`~sparse_triton.formats.block_mask.BlockMask`: for every (batch, query head,
query block) a list of *partial* kv blocks (element mask applied inside) and a list of *full* kv blocks
(no element mask), plus the transposed lists (per kv block, the query blocks that read it).

* ``_attn_fwd_kernel``: one program per (query tile, batch x query head). It walks the partial list,
  then the full list, and only those kv blocks: work is proportional to the blocks kept. Scores are
  prescaled by ``scale * log2(e)`` so the online softmax runs on ``exp2``. Writes ``o`` and the
  natural-log ``lse`` (fp32) that the backward needs.
* ``_attn_bwd_dq_kernel``: one program per (query tile, batch x query head), over the same lists as
  the forward: ``dq = scale * sum_j dS_j K_j``.
* ``_attn_bwd_dkv_kernel``: one program per (kv tile, batch x kv head) over the *transposed* lists of
  every query head of its GQA group, so each program owns its ``dk``/``dv`` rows outright: no atomics,
  deterministic.

Masking. In a partial block the kernels apply the bounds (``k < Skv``), the causal rule ``k <= q``
when causal, and the block's element bitmask (``partial_bits[slot]``, one bit per (query, key) pair)
when its slot is ``>= 0``. A full block is unmasked, except that in the forward a scalar test per tile catches
the two cases a hand-made mask may leave there (a tile that crosses the kv tail or the causal diagonal
is masked); the backward kernels apply only the causal rule to full blocks, since keys past the tail
load as zeros and add nothing to dQ, and feed only dK/dV rows that are never stored. Tiles entirely
above the diagonal are skipped. A query row with no allowed key ends with
``l = 0``: it writes ``o = 0`` and ``lse = -inf`` (the running max is kept finite for the exponentials,
so no NaN appears), and contributes nothing to any gradient.

Non-finite inputs. A key a query cannot see is not in that query's sum, so a NaN or inf in its k or v
reaches neither the query's ``o``/``lse`` nor its ``dq``, nor ``dk``/``dv`` of other keys; a non-finite
value at a visible key reaches the query as the dense formula over the allowed keys says
(``reference/attention.py``; an lse is ``+inf`` where a score is ``+inf``, NaN where one is NaN). Masked
scores are selected to ``-inf`` and masked dS in dQ to 0 (a masked key's NaN goes with them), so only
the products can carry a masked value into a sum, as ``0 * inf = NaN``: ``P @ V`` (forward), ``dS @ K``
(dQ), and in dK/dV a key's own v or k against a masked pair or a query row past Sq. Such a leak always
leaves a NaN. So the forward kernel checks its tile once after the loops and records per program whether
a row holds a NaN (nothing changes in the loops, and full tiles, which have no masked pair, are exact
anyway); the backward kernels, where even that cost registers, are left as they are. A second launch
(``_attn_fix_kernel`` after the forward, ``_attn_bwd_fix_kernel`` after the backward, for dQ and dK/dV)
exits at once in the programs where nothing was recorded (after the backward: reads the tile's rows of
dq, or of dk and dv), and otherwise recomputes each row whose stored output holds a NaN (a leak, or a
NaN the formula gives) one row at a time, with vector code that adds a pair's terms only where the pair
is allowed (``_fwd_row_step``, ``_dq_row_step``, ``_kv_row_step``). Kept out of the fast kernels, that
rare code costs them no registers; the price is one launch that reads a flag per forward program, and
dq, dk, dv after the backward.

The kernels' tiles (BM query rows x BN keys) divide the mask's blocks (BQ x BK); a program handles
the sub-tiles of one block in turn. GQA/MQA is native: query head ``h`` reads kv head ``h // G``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._env import TRITON_INTERPRET as INTERPRET
from ._launch import on_device, specializations, tf32_enabled

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

HEAD_DIMS = (32, 64, 96, 128, 256)
BLOCK_SIZES = (64, 128)  # mask blocks (BQ, BK) of prefill and training; decode also takes smaller BK

# --------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _elem_mask(offs_m, offs_n, Skv, slot, p_bits, ROWS_ARE_Q: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_BITS: tl.constexpr):
    """Allowed (query, key) pairs of a tile: ``[len(offs_m), len(offs_n)]`` when ``ROWS_ARE_Q``, else
    ``[len(offs_n), len(offs_m)]`` (the dK/dV kernel works on the transposed scores)."""
    W: tl.constexpr = (BK + 31) // 32
    if ROWS_ARE_Q:
        q = offs_m[:, None]
        k = offs_n[None, :]
    else:
        q = offs_m[None, :]
        k = offs_n[:, None]
    allowed = k < Skv
    if IS_CAUSAL:
        allowed = allowed & (k <= q)
    if HAS_BITS:
        col = k % BK
        # slot -1 (no bitmask) reads as all bits set
        m_slot = (tl.zeros_like(q + k) + slot) >= 0
        words = tl.load(p_bits + slot * (BQ * W) + (q % BQ) * W + col // 32, mask=m_slot, other=-1)
        allowed = allowed & (((words >> (col % 32)) & 1) != 0)
    return allowed


@triton.jit
def _visible(start_n, last_m, IS_CAUSAL: tl.constexpr):
    """Whether a tile whose first key is ``start_n`` has any key ``<= last_m`` (its last query) when
    causal: tiles entirely above the diagonal are skipped."""
    if IS_CAUSAL:
        return start_n <= last_m
    else:
        return start_n >= 0


@triton.jit
def _final_lse(m_i, l_i, unit):
    """The lse of an online softmax ``(m, l)`` (log2 units) times ``unit`` (ln 2 for natural log): ``-inf``
    for a row without keys (``l = 0``), ``+inf`` for a row with a ``+inf`` score (there ``l`` is NaN,
    ``inf - inf``), NaN for a NaN score."""
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))) * unit)
    return tl.where(m_i == float("inf"), float("inf"), lse)


@triton.jit
def _any_nan(acc, m_row):
    """int32 scalar: 1 if a valid row (``m_row``) of ``acc [BM, BLOCK_D]`` holds a NaN, else 0."""
    return tl.max(tl.max(tl.where(m_row[:, None] & (acc != acc), 1, 0), 1), 0)


@triton.jit
def _fwd_tile(acc, m_i, l_i, b_q, p_k, p_v, s_ks, s_vs, offs_m, start_n, Skv, slot, p_bits, qk_scale,
              MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr,
              BK: tl.constexpr, BN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BITS: tl.constexpr,
              PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    m_ld = (offs_n < Skv)[None, :] & (offs_d < HEAD_DIM)[:, None]
    b_kt = tl.load(p_k + offs_n[None, :] * s_ks + offs_d[:, None], mask=m_ld, other=0.0)  # [BLOCK_D, BN]
    s = tl.dot(b_q, b_kt, input_precision=PRECISION, out_dtype=tl.float32) * qk_scale  # [BM, BN], log2 units
    if MASKED:
        allowed = _elem_mask(offs_m, offs_n, Skv, slot, p_bits, True, BQ, BK, IS_CAUSAL, HAS_BITS)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row with every key masked so far keeps m = -inf; exponentiate against 0 instead (p = 0, no NaN)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    b_v = tl.load(p_v + offs_n[:, None] * s_vs + offs_d[None, :], mask=tl.trans(m_ld), other=0.0)  # [BN, BLOCK_D]
    acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v, input_precision=PRECISION, out_dtype=tl.float32)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(p_q, p_k, p_v, p_o, p_lse, p_kvn, p_kvi, p_fkvn, p_fkvi, p_bits, p_slot, p_flag,
                     Sq, Skv, Hq, G, qk_scale,
                     s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_ob, s_oh, s_os,
                     s_nb, s_nh, s_nq, s_ib, s_ih, s_iq,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BITS: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Forward over the kept kv blocks of one query tile.

    p_q ``[B, Hq, Sq, D]``, p_k/p_v ``[B, Hkv, Skv, D]``, p_o ``[B, Hq, Sq, D]`` (unit stride along D);
    p_lse fp32 ``[B, Hq, Sq]`` contiguous. Mask (int32, B/H strides may be 0): p_kvn/p_fkvn
    ``[B, H, NQ]`` partial/full counts, p_kvi/p_fkvi ``[B, H, NQ, NKV]`` their sorted kv block indices,
    p_slot ``[B, H, NQ, NKV]`` bitmask slots aligned with p_kvi, p_bits ``[P, BQ, ceil(BK/32)]``. p_flag
    int32 ``[B * Hq, cdiv(Sq, BM)]``: written 1 where a row of the tile holds a NaN, else 0.
    """
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // G
    start_m = i_m * BM
    i_qb = start_m // BQ
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)

    b_q = tl.load(p_q + i_b * s_qb + i_h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :],
                  mask=(offs_m < Sq)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [BM, BLOCK_D]
    p_k += i_b * s_kb + i_hk * s_kh
    p_v += i_b * s_vb + i_hk * s_vh
    o_n = i_b * s_nb + i_h * s_nh + i_qb * s_nq
    o_i = i_b * s_ib + i_h * s_ih + i_qb * s_iq

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    last_m = start_m + BM - 1

    n_part = tl.load(p_kvn + o_n)
    for t in range(0, n_part):
        i_kb = tl.load(p_kvi + o_i + t)
        slot = -1
        if HAS_BITS:
            slot = tl.load(p_slot + o_i + t)
        for sub in range(0, BK // BN):
            start_n = i_kb * BK + sub * BN
            if _visible(start_n, last_m, IS_CAUSAL):
                acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, b_q, p_k, p_v, s_ks, s_vs, offs_m, start_n, Skv, slot,
                                          p_bits, qk_scale, True, HEAD_DIM, BLOCK_D, BQ, BK, BN, IS_CAUSAL,
                                          HAS_BITS, PRECISION)

    n_full = tl.load(p_fkvn + o_n)
    for t in range(0, n_full):
        i_kb = tl.load(p_fkvi + o_i + t)
        for sub in range(0, BK // BN):
            start_n = i_kb * BK + sub * BN
            edge = start_n + BN > Skv
            if IS_CAUSAL:
                edge = edge | (start_n + BN - 1 > start_m)
            if _visible(start_n, last_m, IS_CAUSAL):
                if edge:
                    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, b_q, p_k, p_v, s_ks, s_vs, offs_m, start_n, Skv, -1,
                                              p_bits, qk_scale, True, HEAD_DIM, BLOCK_D, BQ, BK, BN, IS_CAUSAL,
                                              False, PRECISION)
                else:
                    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, b_q, p_k, p_v, s_ks, s_vs, offs_m, start_n, Skv, -1,
                                              p_bits, qk_scale, False, HEAD_DIM, BLOCK_D, BQ, BK, BN, IS_CAUSAL,
                                              False, PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a NaN l (NaN or +inf score) keeps the row NaN
    lse = _final_lse(m_i, l_i, 0.6931471805599453)
    m_row = offs_m < Sq
    tl.store(p_o + i_b * s_ob + i_h * s_oh + offs_m[:, None] * s_os + offs_d[None, :],
             out.to(p_o.dtype.element_ty), mask=m_row[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(p_lse + i_bh * Sq + offs_m, lse, mask=m_row)
    # for _attn_fix_kernel: whether a row holds a NaN (a masked key's inf/NaN v, or the formula's NaN)
    tl.store(p_flag + i_bh * tl.num_programs(0) + i_m, _any_nan(acc, m_row))


@triton.jit
def _dq_tile(dq, b_q, b_do, lse2, delta, p_k, p_v, s_ks, s_vs, offs_m, start_n, Skv, slot, p_bits, qk_scale,
             MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr,
             BK: tl.constexpr, BN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BITS: tl.constexpr,
             PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    m_ld = (offs_n < Skv)[None, :] & (offs_d < HEAD_DIM)[:, None]
    b_kt = tl.load(p_k + offs_n[None, :] * s_ks + offs_d[:, None], mask=m_ld, other=0.0)  # [BLOCK_D, BN]
    b_vt = tl.load(p_v + offs_n[None, :] * s_vs + offs_d[:, None], mask=m_ld, other=0.0)  # [BLOCK_D, BN]
    s = tl.dot(b_q, b_kt, input_precision=PRECISION, out_dtype=tl.float32) * qk_scale  # [BM, BN]
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(b_do, b_vt, input_precision=PRECISION, out_dtype=tl.float32)  # [BM, BN]
    ds = p * (dp - delta[:, None])
    if MASKED:
        # selected (not multiplied) to 0: a masked key's NaN score or inf/NaN v makes p or dp NaN there
        allowed = _elem_mask(offs_m, offs_n, Skv, slot, p_bits, True, BQ, BK, IS_CAUSAL, HAS_BITS)
        ds = tl.where(allowed, ds, 0.0)
    dq = tl.dot(ds.to(b_kt.dtype), tl.trans(b_kt), dq, input_precision=PRECISION, out_dtype=tl.float32)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(p_q, p_k, p_v, p_do, p_lse, p_delta, p_dq, p_kvn, p_kvi, p_fkvn, p_fkvi, p_bits, p_slot,
                        Sq, Skv, Hq, G, qk_scale, sm_scale,
                        s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos,
                        s_nb, s_nh, s_nq, s_ib, s_ih, s_iq,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BITS: tl.constexpr,
                        PRECISION: tl.constexpr):
    """dQ of one query tile over the forward's kv lists.

    p_q/p_do ``[B, Hq, Sq, D]``, p_k/p_v ``[B, Hkv, Skv, D]`` (unit stride along D); p_lse/p_delta fp32
    ``[B, Hq, Sq]`` contiguous (``delta = rowsum(o * do)``); p_dq ``[B, Hq, Sq, D]`` contiguous, written
    in q's dtype. Mask pointers as in ``_attn_fwd_kernel``.
    """
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hq
    i_h = i_bh % Hq
    i_hk = i_h // G
    start_m = i_m * BM
    i_qb = start_m // BQ
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)
    m_row = offs_m < Sq
    m_qd = m_row[:, None] & (offs_d < HEAD_DIM)[None, :]

    b_q = tl.load(p_q + i_b * s_qb + i_h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :], mask=m_qd, other=0.0)
    b_do = tl.load(p_do + i_b * s_dob + i_h * s_doh + offs_m[:, None] * s_dos + offs_d[None, :], mask=m_qd,
                   other=0.0)
    lse = tl.load(p_lse + i_bh * Sq + offs_m, mask=m_row, other=float("-inf"))
    # rows without any key (lse = -inf) get p = exp2(s - inf) = 0
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(p_delta + i_bh * Sq + offs_m, mask=m_row, other=0.0)
    p_k += i_b * s_kb + i_hk * s_kh
    p_v += i_b * s_vb + i_hk * s_vh
    o_n = i_b * s_nb + i_h * s_nh + i_qb * s_nq
    o_i = i_b * s_ib + i_h * s_ih + i_qb * s_iq
    last_m = start_m + BM - 1
    dq = tl.zeros([BM, BLOCK_D], tl.float32)

    n_part = tl.load(p_kvn + o_n)
    for t in range(0, n_part):
        i_kb = tl.load(p_kvi + o_i + t)
        slot = -1
        if HAS_BITS:
            slot = tl.load(p_slot + o_i + t)
        for sub in range(0, BK // BN):
            start_n = i_kb * BK + sub * BN
            if IS_CAUSAL:
                if start_n <= last_m:
                    dq = _dq_tile(dq, b_q, b_do, lse2, delta, p_k, p_v, s_ks, s_vs, offs_m, start_n, Skv, slot,
                                  p_bits, qk_scale, True, HEAD_DIM, BLOCK_D, BQ, BK, BN, True, HAS_BITS, PRECISION)
            else:
                dq = _dq_tile(dq, b_q, b_do, lse2, delta, p_k, p_v, s_ks, s_vs, offs_m, start_n, Skv, slot, p_bits,
                              qk_scale, True, HEAD_DIM, BLOCK_D, BQ, BK, BN, False, HAS_BITS, PRECISION)

    # Full tiles need no element mask in dQ except the causal diagonal: keys past Skv load as zeros, so
    # their dS * K adds nothing. One tile body per kernel keeps the register budget of the partial loop.
    n_full = tl.load(p_fkvn + o_n)
    for t in range(0, n_full):
        i_kb = tl.load(p_fkvi + o_i + t)
        for sub in range(0, BK // BN):
            start_n = i_kb * BK + sub * BN
            if IS_CAUSAL:
                if start_n <= last_m:
                    dq = _dq_tile(dq, b_q, b_do, lse2, delta, p_k, p_v, s_ks, s_vs, offs_m, start_n, Skv, -1,
                                  p_bits, qk_scale, True, HEAD_DIM, BLOCK_D, BQ, BK, BN, True, False, PRECISION)
            else:
                dq = _dq_tile(dq, b_q, b_do, lse2, delta, p_k, p_v, s_ks, s_vs, offs_m, start_n, Skv, -1, p_bits,
                              qk_scale, False, HEAD_DIM, BLOCK_D, BQ, BK, BN, False, False, PRECISION)

    tl.store(p_dq + i_bh * Sq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(p_dq.dtype.element_ty), mask=m_qd)


@triton.jit
def _dkv_tile(dk, dv, b_k, b_v, p_q, p_do, p_lse, p_delta, s_qs, s_dos, start_m, offs_n, Sq, Skv, slot, p_bits,
              qk_scale, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr,
              BK: tl.constexpr, BM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BITS: tl.constexpr,
              PRECISION: tl.constexpr):
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)
    m_row = offs_m < Sq
    m_qd = m_row[:, None] & (offs_d < HEAD_DIM)[None, :]
    b_q = tl.load(p_q + offs_m[:, None] * s_qs + offs_d[None, :], mask=m_qd, other=0.0)  # [BM, BLOCK_D]
    b_do = tl.load(p_do + offs_m[:, None] * s_dos + offs_d[None, :], mask=m_qd, other=0.0)  # [BM, BLOCK_D]
    lse = tl.load(p_lse + offs_m, mask=m_row, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(p_delta + offs_m, mask=m_row, other=0.0)
    st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION, out_dtype=tl.float32) * qk_scale  # [BN, BM]
    pt = tl.exp2(st - lse2[None, :])
    if MASKED:
        allowed = _elem_mask(offs_m, offs_n, Skv, slot, p_bits, False, BQ, BK, IS_CAUSAL, HAS_BITS)
        pt = tl.where(allowed, pt, 0.0)
    dv = tl.dot(pt.to(b_do.dtype), b_do, dv, input_precision=PRECISION, out_dtype=tl.float32)
    dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION, out_dtype=tl.float32)  # [BN, BM]
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(b_q.dtype), b_q, dk, input_precision=PRECISION, out_dtype=tl.float32)
    return dk, dv


@triton.jit
def _attn_bwd_dkv_kernel(p_q, p_k, p_v, p_do, p_lse, p_delta, p_dk, p_dv, p_qn, p_qi, p_fqn, p_fqi, p_bits, p_slot,
                         Sq, Skv, Hkv, G, qk_scale, sm_scale,
                         s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos,
                         s_nb, s_nh, s_nk, s_ib, s_ih, s_ik,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BITS: tl.constexpr,
                         PRECISION: tl.constexpr):
    """dK, dV of one kv tile over the transposed lists of the G query heads sharing its kv head.

    p_q/p_do ``[B, Hq, Sq, D]``, p_k/p_v ``[B, Hkv, Skv, D]`` (unit stride along D); p_lse/p_delta fp32
    ``[B, Hq, Sq]`` contiguous; p_dk/p_dv ``[B, Hkv, Skv, D]`` contiguous, written in k's dtype. Mask
    (int32, B/H strides may be 0): p_qn/p_fqn ``[B, H, NKV]`` partial/full counts, p_qi/p_fqi
    ``[B, H, NKV, NQ]`` sorted query block indices, p_slot ``[B, H, NKV, NQ]`` bitmask slots aligned
    with p_qi, p_bits ``[P, BQ, ceil(BK/32)]``.
    """
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // Hkv
    i_hk = i_bh % Hkv
    start_n = i_n * BN
    i_kb = start_n // BK
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    m_kd = (offs_n < Skv)[:, None] & (offs_d < HEAD_DIM)[None, :]
    b_k = tl.load(p_k + i_b * s_kb + i_hk * s_kh + offs_n[:, None] * s_ks + offs_d[None, :], mask=m_kd, other=0.0)
    b_v = tl.load(p_v + i_b * s_vb + i_hk * s_vh + offs_n[:, None] * s_vs + offs_d[None, :], mask=m_kd, other=0.0)
    dk = tl.zeros([BN, BLOCK_D], tl.float32)
    dv = tl.zeros([BN, BLOCK_D], tl.float32)
    Hq = Hkv * G

    for g in range(0, G):
        i_h = i_hk * G + g
        q_base = p_q + i_b * s_qb + i_h * s_qh
        do_base = p_do + i_b * s_dob + i_h * s_doh
        r_base = (i_b * Hq + i_h) * Sq
        o_n = i_b * s_nb + i_h * s_nh + i_kb * s_nk
        o_i = i_b * s_ib + i_h * s_ih + i_kb * s_ik

        n_part = tl.load(p_qn + o_n)
        for t in range(0, n_part):
            i_qb = tl.load(p_qi + o_i + t)
            slot = -1
            if HAS_BITS:
                slot = tl.load(p_slot + o_i + t)
            for sub in range(0, BQ // BM):
                start_m = i_qb * BQ + sub * BM
                if IS_CAUSAL:
                    if start_m + BM - 1 >= start_n:
                        dk, dv = _dkv_tile(dk, dv, b_k, b_v, q_base, do_base, p_lse + r_base, p_delta + r_base,
                                           s_qs, s_dos, start_m, offs_n, Sq, Skv, slot, p_bits, qk_scale, True,
                                           HEAD_DIM, BLOCK_D, BQ, BK, BM, True, HAS_BITS, PRECISION)
                else:
                    dk, dv = _dkv_tile(dk, dv, b_k, b_v, q_base, do_base, p_lse + r_base, p_delta + r_base, s_qs,
                                       s_dos, start_m, offs_n, Sq, Skv, slot, p_bits, qk_scale, True, HEAD_DIM,
                                       BLOCK_D, BQ, BK, BM, False, HAS_BITS, PRECISION)

        # Keys past Skv only feed dK/dV rows that are never stored, so full tiles need the element mask for
        # the causal diagonal alone; one tile body per kernel keeps the register budget of the partial loop.
        n_full = tl.load(p_fqn + o_n)
        for t in range(0, n_full):
            i_qb = tl.load(p_fqi + o_i + t)
            for sub in range(0, BQ // BM):
                start_m = i_qb * BQ + sub * BM
                if IS_CAUSAL:
                    if start_m + BM - 1 >= start_n:
                        dk, dv = _dkv_tile(dk, dv, b_k, b_v, q_base, do_base, p_lse + r_base, p_delta + r_base,
                                           s_qs, s_dos, start_m, offs_n, Sq, Skv, -1, p_bits, qk_scale, True,
                                           HEAD_DIM, BLOCK_D, BQ, BK, BM, True, False, PRECISION)
                else:
                    dk, dv = _dkv_tile(dk, dv, b_k, b_v, q_base, do_base, p_lse + r_base, p_delta + r_base, s_qs,
                                       s_dos, start_m, offs_n, Sq, Skv, -1, p_bits, qk_scale, False, HEAD_DIM,
                                       BLOCK_D, BQ, BK, BM, False, False, PRECISION)

    o_out = i_bh * Skv * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(p_dk + o_out, (dk * sm_scale).to(p_dk.dtype.element_ty), mask=m_kd)
    tl.store(p_dv + o_out, dv.to(p_dv.dtype.element_ty), mask=m_kd)


# --------------------------------------------------------------------------------------------------
# exact fix-up of rows that hold a NaN (rare; see the module docstring)


@triton.jit
def _row_mask(q, offs_n, Skv, slot, p_bits, BQ: tl.constexpr, BK: tl.constexpr, IS_CAUSAL: tl.constexpr,
              HAS_BITS: tl.constexpr):
    """``_elem_mask`` of one query ``q`` (a scalar) and the keys ``offs_n``: bool ``[len(offs_n)]``."""
    W: tl.constexpr = (BK + 31) // 32
    allowed = offs_n < Skv
    if IS_CAUSAL:
        allowed = allowed & (offs_n <= q)
    if HAS_BITS:
        col = offs_n % BK
        # slot -1 (no bitmask) reads as all bits set
        words = tl.load(p_bits + slot * (BQ * W) + (q % BQ) * W + col // 32, mask=(col * 0 + slot) >= 0, other=-1)
        allowed = allowed & (((words >> (col % 32)) & 1) != 0)
    return allowed


@triton.jit
def _row_keys(p_k, p_v, s_ks, s_vs, row, start_n, Skv, slot, p_bits, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BQ: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, IS_CAUSAL: tl.constexpr,
              HAS_BITS: tl.constexpr):
    """The K and V rows ``[BN, BLOCK_D]`` (fp32) of the keys ``start_n ..`` and which the query ``row`` may
    see ``[BN]``."""
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    m_ld = (offs_n < Skv)[:, None] & (offs_d < HEAD_DIM)[None, :]
    b_k = tl.load(p_k + offs_n[:, None] * s_ks + offs_d[None, :], mask=m_ld, other=0.0).to(tl.float32)
    b_v = tl.load(p_v + offs_n[:, None] * s_vs + offs_d[None, :], mask=m_ld, other=0.0).to(tl.float32)
    return b_k, b_v, _row_mask(row, offs_n, Skv, slot, p_bits, BQ, BK, IS_CAUSAL, HAS_BITS)


@triton.jit
def _fwd_row_step(acc, m_i, l_i, q_row, b_k, b_v, allowed, qk_scale):
    """One online-softmax step of one query row over a key tile, exact for inf and NaN: a NaN score makes
    the running max NaN (a hardware max skips it), and a key adds ``p * v`` only where it is allowed."""
    s = tl.where(allowed, tl.sum(b_k * q_row[None, :], 1) * qk_scale, float("-inf"))  # [BN], log2 units
    s_max = tl.where(tl.max(tl.where(s != s, 1, 0), 0) > 0, float("nan"), tl.max(s, 0))
    m_new = tl.maximum(m_i, s_max, propagate_nan=tl.PropagateNan.ALL)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use)
    l_i = l_i * alpha + tl.sum(p, 0)
    acc = acc * alpha + tl.sum(tl.where(allowed[:, None], p[:, None] * b_v, 0.0), 0)  # [BLOCK_D]
    return acc, m_new, l_i


@triton.jit
def _dq_row_step(dq, q_row, do_row, lse2, delta, b_k, b_v, allowed, qk_scale):
    """dQ (unscaled) of one query row over a key tile, a key's ``dS * k`` added only where it is allowed."""
    p = tl.exp2(tl.sum(b_k * q_row[None, :], 1) * qk_scale - lse2)  # [BN]
    ds = tl.where(allowed, p * (tl.sum(b_v * do_row[None, :], 1) - delta), 0.0)
    return dq + tl.sum(tl.where(allowed[:, None], ds[:, None] * b_k, 0.0), 0)  # [BLOCK_D]


@triton.jit
def _col_mask(offs_m, key, Sq, Skv, slot, p_bits, BQ: tl.constexpr, BK: tl.constexpr, IS_CAUSAL: tl.constexpr,
              HAS_BITS: tl.constexpr):
    """The element rule of the queries ``offs_m`` and one ``key`` (a scalar): bool ``[len(offs_m)]``."""
    W: tl.constexpr = (BK + 31) // 32
    allowed = (offs_m < Sq) & (key < Skv)
    if IS_CAUSAL:
        allowed = allowed & (key <= offs_m)
    if HAS_BITS:
        col = key % BK
        # slot -1 (no bitmask) reads as all bits set
        words = tl.load(p_bits + slot * (BQ * W) + (offs_m % BQ) * W + col // 32, mask=(offs_m * 0 + slot) >= 0,
                        other=-1)
        allowed = allowed & (((words >> (col % 32)) & 1) != 0)
    return allowed


@triton.jit
def _row_stats(p_lse, p_delta, offs_m, m_row):
    """The rows' log2-unit lse (``+inf`` for a row without keys: its p = exp2(s - inf) = 0) and delta."""
    lse = tl.load(p_lse + offs_m, mask=m_row, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return lse2, tl.load(p_delta + offs_m, mask=m_row, other=0.0)


@triton.jit
def _kv_row_step(dk, dv, k_row, v_row, b_q, b_do, lse2, delta, allowed, qk_scale):
    """dK (unscaled) and dV of one key over a query tile, a query's terms added only where allowed."""
    p = tl.exp2(tl.sum(b_q * k_row[None, :], 1) * qk_scale - lse2)  # [BM]
    ds = tl.where(allowed, p * (tl.sum(b_do * v_row[None, :], 1) - delta), 0.0)
    dv += tl.sum(tl.where(allowed[:, None], p[:, None] * b_do, 0.0), 0)
    dk += tl.sum(tl.where(allowed[:, None], ds[:, None] * b_q, 0.0), 0)
    return dk, dv


@triton.jit
def _fix_q_tile(i_m, i_bh, n_m, p_q, p_k, p_v, p_do, p_lse, p_delta, p_out, p_lse_out, p_kvn, p_kvi, p_fkvn, p_fkvi,
                p_bits, p_slot, p_flag, Sq, Skv, Hq, G, qk_scale, sm_scale,
                s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos, s_ob, s_oh, s_os,
                s_nb, s_nh, s_nq, s_ib, s_ih, s_iq,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BITS: tl.constexpr, DQ: tl.constexpr):
    """Query tile ``i_m`` of ``i_bh`` (one program of the fast grid, ``n_m`` tiles per row of it): its
    rows whose stored output (o, or dq with DQ) holds a NaN, recomputed one at a time over the tile's kv
    lists (``_fwd_row_step`` / ``_dq_row_step``) and stored again (o and lse; dq). The forward records
    whether its tile holds a NaN (``p_flag``); the dQ kernel, where the flag cost registers, does not:
    its rows are read here instead."""
    go = 1
    if not DQ:
        go = tl.load(p_flag + i_bh * n_m + i_m)
    if go != 0:
        i_b = i_bh // Hq
        i_h = i_bh % Hq
        i_hk = i_h // G
        start_m = i_m * BM
        i_qb = start_m // BQ
        offs_d = tl.arange(0, BLOCK_D)
        m_d = offs_d < HEAD_DIM
        p_q += i_b * s_qb + i_h * s_qh
        p_k += i_b * s_kb + i_hk * s_kh
        p_v += i_b * s_vb + i_hk * s_vh
        p_out += i_b * s_ob + i_h * s_oh
        o_n = i_b * s_nb + i_h * s_nh + i_qb * s_nq
        o_i = i_b * s_ib + i_h * s_ih + i_qb * s_iq
        n_part = tl.load(p_kvn + o_n)
        n_full = tl.load(p_fkvn + o_n)
        for row in range(start_m, tl.minimum(start_m + BM, Sq)):
            stored = tl.load(p_out + row * s_os + offs_d, mask=m_d, other=0.0)
            if tl.max(tl.where(stored != stored, 1, 0), 0) > 0:
                q_row = tl.load(p_q + row * s_qs + offs_d, mask=m_d, other=0.0).to(tl.float32)
                acc = tl.zeros([BLOCK_D], tl.float32)
                m_i = float("-inf")
                l_i = 0.0
                lse2 = 0.0
                delta = 0.0
                do_row = q_row
                if DQ:
                    do_row = tl.load(p_do + i_b * s_dob + i_h * s_doh + row * s_dos + offs_d, mask=m_d,
                                     other=0.0).to(tl.float32)
                    lse = tl.load(p_lse + i_bh * Sq + row)
                    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
                    delta = tl.load(p_delta + i_bh * Sq + row)
                for t in range(0, n_part + n_full):
                    slot = -1
                    if t < n_part:
                        i_kb = tl.load(p_kvi + o_i + t)
                        if HAS_BITS:
                            slot = tl.load(p_slot + o_i + t)
                    else:
                        i_kb = tl.load(p_fkvi + o_i + t - n_part)
                    for sub in range(0, BK // BN):
                        b_k, b_v, allowed = _row_keys(p_k, p_v, s_ks, s_vs, row, i_kb * BK + sub * BN, Skv, slot,
                                                      p_bits, HEAD_DIM, BLOCK_D, BQ, BK, BN, IS_CAUSAL, HAS_BITS)
                        if DQ:
                            acc = _dq_row_step(acc, q_row, do_row, lse2, delta, b_k, b_v, allowed, qk_scale)
                        else:
                            acc, m_i, l_i = _fwd_row_step(acc, m_i, l_i, q_row, b_k, b_v, allowed, qk_scale)
                if DQ:
                    tl.store(p_out + row * s_os + offs_d, (acc * sm_scale).to(p_out.dtype.element_ty), mask=m_d)
                else:
                    out = acc / tl.where(l_i == 0.0, 1.0, l_i)
                    tl.store(p_out + row * s_os + offs_d, out.to(p_out.dtype.element_ty), mask=m_d)
                    tl.store(p_lse_out + i_bh * Sq + row, _final_lse(m_i, l_i, 0.6931471805599453))


@triton.jit
def _fix_kv_tile(i_n, i_bkh, p_q, p_k, p_v, p_do, p_lse, p_delta, p_dk, p_dv, p_qn, p_qi, p_fqn, p_fqi, p_bits,
                 p_slot, Sq, Skv, Hkv, G, qk_scale, sm_scale,
                 s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos,
                 s_nb, s_nh, s_nk, s_ib, s_ih, s_ik,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                 FIX_BM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BITS: tl.constexpr):
    """Kv tile ``i_n`` (``BN`` keys) of ``i_bkh``: its keys whose stored dk or dv holds a NaN, recomputed one at
    a time over the transposed lists of every query head of the group, FIX_BM queries a step
    (``_kv_row_step``), and stored again. Where the fast kernel multiplies dS by a key's own v or k, a
    masked pair with an inf/NaN there (or a query row past Sq times an inf k) makes 0 * inf; here it is
    not in the sum. The dK/dV kernel keeps no flag (it has no register to spare): the tile's dk and dv rows
    are read here instead."""
    i_b = i_bkh // Hkv
    i_hk = i_bkh % Hkv
    Hq = Hkv * G
    start_n = i_n * BN
    i_kb = start_n // BK
    offs_d = tl.arange(0, BLOCK_D)
    m_d = offs_d < HEAD_DIM
    p_dkt = p_dk + i_bkh * Skv * HEAD_DIM
    p_dvt = p_dv + i_bkh * Skv * HEAD_DIM
    for key in range(start_n, tl.minimum(start_n + BN, Skv)):
        sk = tl.load(p_dkt + key * HEAD_DIM + offs_d, mask=m_d, other=0.0)
        sv = tl.load(p_dvt + key * HEAD_DIM + offs_d, mask=m_d, other=0.0)
        if tl.max(tl.where((sk != sk) | (sv != sv), 1, 0), 0) > 0:
            k_row = tl.load(p_k + i_b * s_kb + i_hk * s_kh + key * s_ks + offs_d, mask=m_d, other=0.0)
            v_row = tl.load(p_v + i_b * s_vb + i_hk * s_vh + key * s_vs + offs_d, mask=m_d, other=0.0)
            k_row = k_row.to(tl.float32)
            v_row = v_row.to(tl.float32)
            dk = tl.zeros([BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_D], tl.float32)
            for g in range(0, G):
                i_h = i_hk * G + g
                q_base = p_q + i_b * s_qb + i_h * s_qh
                do_base = p_do + i_b * s_dob + i_h * s_doh
                r_base = (i_b * Hq + i_h) * Sq
                o_n = i_b * s_nb + i_h * s_nh + i_kb * s_nk
                o_i = i_b * s_ib + i_h * s_ih + i_kb * s_ik
                n_part = tl.load(p_qn + o_n)
                n_full = tl.load(p_fqn + o_n)
                for t in range(0, n_part + n_full):
                    slot = -1
                    if t < n_part:
                        i_qb = tl.load(p_qi + o_i + t)
                        if HAS_BITS:
                            slot = tl.load(p_slot + o_i + t)
                    else:
                        i_qb = tl.load(p_fqi + o_i + t - n_part)
                    for sub in range(0, BQ // FIX_BM):
                        offs_m = i_qb * BQ + sub * FIX_BM + tl.arange(0, FIX_BM)
                        m_m = offs_m < Sq
                        m_md = m_m[:, None] & m_d[None, :]
                        b_q = tl.load(q_base + offs_m[:, None] * s_qs + offs_d[None, :], mask=m_md,
                                      other=0.0).to(tl.float32)
                        b_do = tl.load(do_base + offs_m[:, None] * s_dos + offs_d[None, :], mask=m_md,
                                       other=0.0).to(tl.float32)
                        lse2, delta = _row_stats(p_lse + r_base, p_delta + r_base, offs_m, m_m)
                        allowed = _col_mask(offs_m, key, Sq, Skv, slot, p_bits, BQ, BK, IS_CAUSAL, HAS_BITS)
                        dk, dv = _kv_row_step(dk, dv, k_row, v_row, b_q, b_do, lse2, delta, allowed, qk_scale)
            tl.store(p_dkt + key * HEAD_DIM + offs_d, (dk * sm_scale).to(p_dk.dtype.element_ty), mask=m_d)
            tl.store(p_dvt + key * HEAD_DIM + offs_d, dv.to(p_dv.dtype.element_ty), mask=m_d)


@triton.jit
def _attn_fix_kernel(p_q, p_k, p_v, p_o, p_lse, p_kvn, p_kvi, p_fkvn, p_fkvi, p_bits, p_slot, p_flag,
                     Sq, Skv, Hq, G, qk_scale,
                     s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_ob, s_oh, s_os,
                     s_nb, s_nh, s_nq, s_ib, s_ih, s_iq,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BITS: tl.constexpr):
    """After ``_attn_fwd_kernel``, on its grid and with its arguments: the rows of a query tile whose o
    holds a NaN, recomputed exactly (o and lse), where that program recorded a NaN in ``p_flag``; BN keys
    a step."""
    _fix_q_tile(tl.program_id(0), tl.program_id(1), tl.num_programs(0), p_q, p_k, p_v, p_q, p_lse, p_lse, p_o, p_lse,
                p_kvn, p_kvi, p_fkvn, p_fkvi, p_bits, p_slot, p_flag, Sq, Skv, Hq, G, qk_scale, 1.0,
                s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, 0, 0, 0, s_ob, s_oh, s_os,
                s_nb, s_nh, s_nq, s_ib, s_ih, s_iq, HEAD_DIM, BLOCK_D, BQ, BK, BM, BN, IS_CAUSAL, HAS_BITS, False)


@triton.jit
def _attn_bwd_fix_kernel(p_q, p_k, p_v, p_do, p_lse, p_delta, p_dq, p_dk, p_dv, p_kvn, p_kvi, p_fkvn, p_fkvi, p_kslot,
                         p_qn, p_qi, p_fqn, p_fqi, p_qslot, p_bits,
                         Sq, Skv, Hq, Hkv, G, NQH, n_m, n_n, qk_scale, sm_scale,
                         s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos,
                         s_nb, s_nh, s_nq, s_ib, s_ih, s_iq, s_tb, s_th, s_tk, s_jb, s_jh, s_jk,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, FIX_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                         HAS_BITS: tl.constexpr):
    """After the backward kernels, one launch for both: programs ``(i, j)`` with ``j < NQH`` (= B * Hq) are the dQ
    kernel's (query tile ``i < n_m`` of ``BM`` rows; rows fixed as ``_fix_q_tile``), the others the dK/dV kernel's
    (kv tile ``i < n_n`` of ``BN`` keys of ``j - NQH``; keys fixed as ``_fix_kv_tile``). Pointers and strides as in
    those kernels: the forward lists (``s_n*``, ``s_i*``; slots p_kslot) and the transposed ones (``s_t*``,
    ``s_j*``; slots p_qslot); dq/dk/dv contiguous. FIX_N keys (queries) a step."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    if j < NQH:
        if i < n_m:
            _fix_q_tile(i, j, n_m, p_q, p_k, p_v, p_do, p_lse, p_delta, p_dq, p_lse, p_kvn, p_kvi, p_fkvn, p_fkvi,
                        p_bits, p_kslot, p_kslot, Sq, Skv, Hq, G, qk_scale, sm_scale,
                        s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos,
                        Hq * Sq * HEAD_DIM, Sq * HEAD_DIM, HEAD_DIM, s_nb, s_nh, s_nq, s_ib, s_ih, s_iq,
                        HEAD_DIM, BLOCK_D, BQ, BK, BM, FIX_N, IS_CAUSAL, HAS_BITS, True)
    else:
        if i < n_n:
            _fix_kv_tile(i, j - NQH, p_q, p_k, p_v, p_do, p_lse, p_delta, p_dk, p_dv, p_qn, p_qi, p_fqn, p_fqi,
                         p_bits, p_qslot, Sq, Skv, Hkv, G, qk_scale, sm_scale,
                         s_qb, s_qh, s_qs, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_dob, s_doh, s_dos,
                         s_tb, s_th, s_tk, s_jb, s_jh, s_jk, HEAD_DIM, BLOCK_D, BQ, BK, BN, FIX_N, IS_CAUSAL,
                         HAS_BITS)


# --------------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class AttnConfig:
    """Tiles and launch options of one attention kernel. ``BM`` query rows x ``BN`` keys per tile; a
    tile larger than the mask's block is clamped to it (tiles divide blocks: both are powers of two)."""

    BM: int
    BN: int
    num_warps: int = 4
    num_stages: int = 2

    def clamp(self, BQ: int, BK: int) -> AttnConfig:
        return AttnConfig(min(self.BM, BQ), min(self.BN, BK), self.num_warps, self.num_stages)


@dataclass(frozen=True)
class AttnBwdConfig:
    """The two backward kernels' configs: ``dq`` (query tiles) and ``dkv`` (kv tiles)."""

    dq: AttnConfig
    dkv: AttnConfig


INTERPRET_CONFIG = AttnConfig(BM=64, BN=64)
# The fix-up kernels (rare: rows that hold a NaN): keys (queries) per step, warps and a register cap. Their
# query (kv) tiles are the fast kernels'. The cap lets ptxas use registers instead of trading a few spills
# for occupancy, which a kernel that is idle but for its flag check does not need. Under the interpreter,
# whose cost is per step, a step takes a whole 64-key block.
FIX_BN, FIX_WARPS, FIX_MAXNREG = (64 if INTERPRET else 16), 4, 255
_D256_DQ = AttnConfig(32, 16, 8, 1)
_D256_DKV = AttnConfig(16, 32, 4, 1)
INTERPRET_BWD_CONFIG = AttnBwdConfig(dq=INTERPRET_CONFIG, dkv=INTERPRET_CONFIG)


def fwd_config(head_dim: int, dtype: torch.dtype, has_bits: bool = False, precision: str = "tf32") -> AttnConfig:
    """The forward's default tiles: 128 query rows share every K/V tile loaded, 64 keys per step keep
    the score tile and the fp32 accumulator in registers; fp32 operands, D = 256 and masks with element
    bitmasks (one more score-sized tile live) take narrower tiles so nothing spills on sm_90 (3xTF32,
    fp32 without TF32, triples the operand registers)."""
    if INTERPRET:
        return INTERPRET_CONFIG
    wide = dtype == torch.float32
    if head_dim <= 64:
        return AttnConfig(128, 32 if wide else 64, 8, 3)
    if precision == "tf32x3" or (wide and head_dim > 128):
        return AttnConfig(16, 32 if head_dim <= 128 else 16, 4, 1)
    if head_dim <= 128:
        if wide:
            return AttnConfig(32, 32, 4, 2)
        return AttnConfig(128, 32 if has_bits else 64, 8, 3)
    return AttnConfig(64, 32, 8, 1 if wide else 2)


def bwd_config(head_dim: int, dtype: torch.dtype, precision: str = "tf32",
               block_size: tuple[int, int] = (128, 128)) -> AttnBwdConfig:
    """The backward's default tiles: dQ takes more query rows than keys per tile (its MMAs' M side is the
    query tile), dK/dV more keys than query rows. The sizes are the largest whose fp32 accumulators,
    recomputed score tile and element mask compile without spills on sm_90 for every mask flag (the
    compile check); wider head dims and fp32 take smaller tiles."""
    if INTERPRET:
        return INTERPRET_BWD_CONFIG
    BQ, BK = block_size
    if dtype == torch.float32:
        if precision == "tf32x3" and head_dim > 64:
            if head_dim > 128:
                return AttnBwdConfig(dq=AttnConfig(16, 16, 4, 1), dkv=AttnConfig(16, 16, 4, 1))
            return AttnBwdConfig(dq=AttnConfig(16, 32, 8, 1), dkv=AttnConfig(16, 16, 4, 1))
        if head_dim > 128:
            return AttnBwdConfig(dq=AttnConfig(16, 16, 4, 1), dkv=AttnConfig(16, 16, 4, 1))
        return AttnBwdConfig(dq=AttnConfig(16, 32, 4, 2),
                             dkv=AttnConfig(16, 32, 4, 2) if head_dim <= 64 else AttnConfig(16, 16, 4, 1))
    if head_dim > 128:
        return AttnBwdConfig(dq=_D256_DQ, dkv=_D256_DKV)
    if head_dim <= 64:
        dq = AttnConfig(128, 32, 8, 2) if BQ >= 128 else AttnConfig(64, 32, 4, 2)
        dkv = AttnConfig(32, 64, 4, 2)
    else:
        dq, dkv = AttnConfig(64, 16, 4, 2), AttnConfig(16, 32, 4, 1)
    return AttnBwdConfig(dq=dq, dkv=dkv)


# --------------------------------------------------------------------------------------------------
# launchers


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs: ``tf32`` when PyTorch allows TF32 for matmuls, else ``tf32x3`` (three TF32 products
    per product: about fp32 accuracy, still on tensor cores; a CUDA-core fp32 dot of attention-sized tiles
    does not fit in registers)."""
    if dtype == torch.float32 and not tf32_enabled():
        return "tf32x3"
    return "tf32"


def _block_dim(head_dim: int) -> int:
    return triton.next_power_of_2(head_dim)


def unsupported(q: torch.Tensor, block_mask) -> str | None:
    """Why the prefill kernels cannot run this case (None when they can)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (kernels take float16, bfloat16, float32)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} (kernels take {HEAD_DIMS})"
    BQ, BK = block_mask.block_size
    if BQ not in BLOCK_SIZES or BK not in BLOCK_SIZES:
        return f"block_size {(BQ, BK)} (kernels take BQ, BK in {BLOCK_SIZES})"
    if q.dtype == torch.float32 and q.shape[-1] > 128 and _precision(q.dtype) == "tf32x3":
        # 3xTF32 tiles of D = 256 spilled on sm_90 down to 16 x 16; TF32 (or fp16/bf16) runs the kernels
        return "float32 at head dim 256 without TF32 (torch.backends.cuda.matmul allows no TF32)"
    return None


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _lists(counts: torch.Tensor, indices: torch.Tensor, full_counts: torch.Tensor, full_indices: torch.Tensor,
           slots: torch.Tensor | None, B: int, H: int) -> tuple[list[torch.Tensor], tuple[int, ...], tuple[int, ...]]:
    """Broadcast a mask's (counts, indices, full counts, full indices, slots) to batch B and H heads and
    return them with one stride triple for the counts and one for the index-shaped tensors (a tensor
    whose broadcast differs from its siblings' is materialised so that they share strides)."""
    c = [counts.expand(B, H, *counts.shape[2:]), full_counts.expand(B, H, *full_counts.shape[2:])]
    ix = [indices.expand(B, H, *indices.shape[2:]), full_indices.expand(B, H, *full_indices.shape[2:])]
    if slots is not None:
        ix.append(slots.expand(B, H, *slots.shape[2:]))
    if any(t.stride() != c[0].stride() for t in c):
        c = [t.contiguous() for t in c]
    if any(t.stride() != ix[0].stride() for t in ix) or ix[0].stride(-1) != 1:
        ix = [t.contiguous() for t in ix]
    return c + ix, tuple(c[0].stride()), tuple(ix[0].stride()[:3])


def _check(q: torch.Tensor, block_mask, where: str) -> None:
    why = unsupported(q, block_mask)
    if why is not None:
        raise ValueError(f"{where}: the kernels do not support {why}")
    if INTERPRET and q.dtype == torch.bfloat16:
        raise TypeError(f"{where}: Triton's interpreter computes bfloat16 wrongly; use the reference on CPU")


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float, causal: bool,
                  config: AttnConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of block-sparse attention: o ``[B, Hq, Sq, D]`` in q's dtype, lse fp32 ``[B, Hq, Sq]``
    (natural log; ``-inf`` and ``o = 0`` for a query with no allowed key).

    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` with ``Hq % Hkv == 0``; ``block_mask`` a BlockMask for
    (Sq, Skv) whose B and H are 1 or the inputs'. The element rule ``k <= q`` is applied when ``causal``
    or ``block_mask.causal``.
    """
    _check(q, block_mask, "attention_fwd")
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    o = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        lse.fill_(float("-inf"))
        return o, lse
    BQ, BK = block_mask.block_size
    has_bits = block_mask.partial_bits is not None
    cfg = (config or fwd_config(D, q.dtype, has_bits, _precision(q.dtype))).clamp(BQ, BK)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    tensors, sn, si = _lists(block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                             block_mask.full_kv_indices, block_mask.kv_bits_slot if has_bits else None, B, Hq)
    kvn, fkvn, kvi, fkvi = tensors[:4]
    slot = tensors[4] if has_bits else kvi
    bits = block_mask.partial_bits if has_bits else kvi
    grid = (triton.cdiv(Sq, cfg.BM), B * Hq)
    flag = torch.empty(grid[0] * grid[1], dtype=torch.int32, device=q.device)
    is_causal = bool(causal or block_mask.causal)
    with on_device(q):
        _attn_fwd_kernel[grid](
            q, k, v, o, lse, kvn, kvi, fkvn, fkvi, bits, slot, flag, Sq, Skv, Hq, Hq // Hkv, float(scale) * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), *sn, *si,
            HEAD_DIM=D, BLOCK_D=_block_dim(D), BQ=BQ, BK=BK, BM=cfg.BM, BN=cfg.BN,
            IS_CAUSAL=is_causal, HAS_BITS=has_bits, PRECISION=_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _attn_fix_kernel[grid](  # rows that hold a NaN, recomputed exactly; at once done elsewhere
            q, k, v, o, lse, kvn, kvi, fkvn, fkvi, bits, slot, flag, Sq, Skv, Hq, Hq // Hkv, float(scale) * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), *sn, *si,
            HEAD_DIM=D, BLOCK_D=_block_dim(D), BQ=BQ, BK=BK, BM=cfg.BM, BN=FIX_BN, IS_CAUSAL=is_causal,
            HAS_BITS=has_bits, num_warps=FIX_WARPS, num_stages=1, maxnreg=FIX_MAXNREG)
    return o, lse


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, block_mask, scale: float, causal: bool,
                  config: AttnBwdConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`attention_fwd` given the output gradient ``do`` (like o), and the
    forward's ``o`` and ``lse``. dk/dv sum over the query heads sharing a kv head."""
    _check(q, block_mask, "attention_bwd")
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    dq = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Skv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, Skv, D), dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    BQ, BK = block_mask.block_size
    cfg = config or bwd_config(D, q.dtype, _precision(q.dtype), (BQ, BK))
    cq, ckv = cfg.dq.clamp(BQ, BK), cfg.dkv.clamp(BQ, BK)
    q, k, v, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do)
    lse = lse.contiguous()
    delta = (o.float() * do.float()).sum(-1).contiguous()  # [B, Hq, Sq]: rowsum(o * do)
    has_bits = block_mask.partial_bits is not None
    causal = bool(causal or block_mask.causal)
    precision = _precision(q.dtype)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    flags = dict(HEAD_DIM=D, BLOCK_D=_block_dim(D), BQ=BQ, BK=BK, IS_CAUSAL=causal, HAS_BITS=has_bits,
                 PRECISION=precision)
    qk_scale = float(scale) * LOG2E
    with on_device(q):
        tensors, sn, si = _lists(block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                                 block_mask.full_kv_indices, block_mask.kv_bits_slot if has_bits else None, B, Hq)
        kvn, fkvn, kvi, fkvi = tensors[:4]
        bits = block_mask.partial_bits if has_bits else kvi
        slot = tensors[4] if has_bits else kvi
        n_m, n_n = triton.cdiv(Sq, cq.BM), triton.cdiv(Skv, ckv.BN)
        _attn_bwd_dq_kernel[(n_m, B * Hq)](
            q, k, v, do, lse, delta, dq, kvn, kvi, fkvn, fkvi, bits, slot,
            Sq, Skv, Hq, Hq // Hkv, qk_scale, float(scale), *strides, *sn, *si,
            BM=cq.BM, BN=cq.BN, num_warps=cq.num_warps, num_stages=cq.num_stages, **flags)
        tensors, tn, ti = _lists(block_mask.q_num_blocks, block_mask.q_indices, block_mask.full_q_num_blocks,
                                 block_mask.full_q_indices, block_mask.q_bits_slot if has_bits else None, B, Hq)
        qn, fqn, qi, fqi = tensors[:4]
        qslot = tensors[4] if has_bits else qi
        _attn_bwd_dkv_kernel[(n_n, B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, qn, qi, fqn, fqi, bits, qslot,
            Sq, Skv, Hkv, Hq // Hkv, qk_scale, float(scale), *strides, *tn, *ti,
            BM=ckv.BM, BN=ckv.BN, num_warps=ckv.num_warps, num_stages=ckv.num_stages, **flags)
        _attn_bwd_fix_kernel[(max(n_m, n_n), B * Hq + B * Hkv)](  # rows that hold a NaN; at once done elsewhere
            q, k, v, do, lse, delta, dq, dk, dv, kvn, kvi, fkvn, fkvi, slot, qn, qi, fqn, fqi, qslot, bits,
            Sq, Skv, Hq, Hkv, Hq // Hkv, B * Hq, n_m, n_n, qk_scale, float(scale), *strides, *sn, *si,
            *tn, *ti, BM=cq.BM, BN=ckv.BN, FIX_N=FIX_BN, num_warps=FIX_WARPS, num_stages=1, maxnreg=FIX_MAXNREG,
            **{k_: v_ for k_, v_ in flags.items() if k_ != "PRECISION"})
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# ahead-of-time compile check (tests/compile_sm90.py)

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_INT_ARGS = {
    "fwd": ("Sq", "Skv", "Hq", "G", "s_qb", "s_qh", "s_qs", "s_kb", "s_kh", "s_ks", "s_vb", "s_vh", "s_vs",
            "s_ob", "s_oh", "s_os", "s_nb", "s_nh", "s_nq", "s_ib", "s_ih", "s_iq"),
    "dq": ("Sq", "Skv", "Hq", "G", "s_qb", "s_qh", "s_qs", "s_kb", "s_kh", "s_ks", "s_vb", "s_vh", "s_vs",
           "s_dob", "s_doh", "s_dos", "s_nb", "s_nh", "s_nq", "s_ib", "s_ih", "s_iq"),
    "dkv": ("Sq", "Skv", "Hkv", "G", "s_qb", "s_qh", "s_qs", "s_kb", "s_kh", "s_ks", "s_vb", "s_vh", "s_vs",
            "s_dob", "s_doh", "s_dos", "s_nb", "s_nh", "s_nk", "s_ib", "s_ih", "s_ik"),
    "fix": ("Sq", "Skv", "Hq", "G", "s_qb", "s_qh", "s_qs", "s_kb", "s_kh", "s_ks", "s_vb", "s_vh", "s_vs",
            "s_ob", "s_oh", "s_os", "s_nb", "s_nh", "s_nq", "s_ib", "s_ih", "s_iq"),
    "bwd_fix": ("Sq", "Skv", "Hq", "Hkv", "G", "NQH", "n_m", "n_n", "s_qb", "s_qh", "s_qs", "s_kb", "s_kh", "s_ks",
                "s_vb", "s_vh", "s_vs", "s_dob", "s_doh", "s_dos", "s_nb", "s_nh", "s_nq", "s_ib", "s_ih", "s_iq",
                "s_tb", "s_th", "s_tk", "s_jb", "s_jh", "s_jk"),
}
_KERNELS = {"fwd": _attn_fwd_kernel, "dq": _attn_bwd_dq_kernel, "dkv": _attn_bwd_dkv_kernel,
            "fix": _attn_fix_kernel, "bwd_fix": _attn_bwd_fix_kernel}


def _signature(kname: str, dtype: torch.dtype) -> dict[str, str]:
    ptr = _PTR[dtype]
    if kname == "fwd":
        sig = {"p_q": ptr, "p_k": ptr, "p_v": ptr, "p_o": ptr, "p_lse": "*fp32"}
    elif kname == "dq":
        sig = {"p_q": ptr, "p_k": ptr, "p_v": ptr, "p_do": ptr, "p_lse": "*fp32", "p_delta": "*fp32", "p_dq": ptr}
    elif kname == "fix":
        sig = {"p_q": ptr, "p_k": ptr, "p_v": ptr, "p_o": ptr, "p_lse": "*fp32"}
    elif kname == "bwd_fix":
        sig = {"p_q": ptr, "p_k": ptr, "p_v": ptr, "p_do": ptr, "p_lse": "*fp32", "p_delta": "*fp32", "p_dq": ptr,
               "p_dk": ptr, "p_dv": ptr, "p_kslot": "*i32", "p_qslot": "*i32",
               **dict.fromkeys(("p_qn", "p_qi", "p_fqn", "p_fqi"), "*i32")}
    else:
        sig = {"p_q": ptr, "p_k": ptr, "p_v": ptr, "p_do": ptr, "p_lse": "*fp32", "p_delta": "*fp32",
               "p_dk": ptr, "p_dv": ptr}
    mask = ("p_kvn", "p_kvi", "p_fkvn", "p_fkvi") if kname != "dkv" else ("p_qn", "p_qi", "p_fqn", "p_fqi")
    sig.update(dict.fromkeys((*mask, "p_bits", "p_slot"), "*i32"))
    if kname in ("fwd", "fix"):
        sig["p_flag"] = "*i32"
    if kname == "bwd_fix":
        del sig["p_slot"]  # the backward fix-up takes the slots of both list directions
    sig.update(dict.fromkeys(_INT_ARGS[kname], "i32"))
    sig["qk_scale"] = "fp32"
    if kname not in ("fwd", "fix"):
        sig["sm_scale"] = "fp32"
    return sig


def _variant(kname: str, dtype: torch.dtype, D: int, causal: bool, bits: bool, block: tuple[int, int],
             cfg: AttnConfig, precision: str, both: bool):
    BQ, BK = block
    cfg = cfg.clamp(BQ, BK)
    const = {"HEAD_DIM": D, "BLOCK_D": _block_dim(D), "BQ": BQ, "BK": BK, "BM": cfg.BM, "BN": cfg.BN,
             "IS_CAUSAL": causal, "HAS_BITS": bits, "PRECISION": precision}
    label = (f"attention.{kname} {str(dtype)[6:]} D{D} {BQ}x{BK} BM{cfg.BM} BN{cfg.BN} w{cfg.num_warps} "
             f"s{cfg.num_stages}{' causal' if causal else ''}{' bits' if bits else ''} {precision}")
    unit = ("s_qs", "s_ks", "s_vs", "s_os", "s_dos")
    sig = _signature(kname, dtype)
    variants = specializations(label, _KERNELS[kname], sig, const,
                               {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                               tuple(u for u in unit if u in sig))
    return variants if both else list(variants)[1:]


def compile_variants():
    """Every kernel at its default config for: fp16 at D 64/128 with every (causal, bitmask) pair (ragged
    and aligned launches); each other head dim, bf16 and fp32 (as TF32 and as 3xTF32) with causal + bitmask
    (the superset of the code); mask blocks 64 x 64, 128 x 64 and 64 x 128 (tiles clamped); the
    interpreter's config; and the fix-up kernel."""
    for kname in ("fwd", "dq", "dkv"):
        def cfg_of(D, dtype, bits, precision="tf32", block=(128, 128), kname=kname):
            if kname == "fwd":
                return fwd_config(D, dtype, bits, precision)
            return getattr(bwd_config(D, dtype, precision, block), kname)

        for D in (64, 128):
            for causal in (False, True):
                for bits in (False, True):
                    yield from _variant(kname, torch.float16, D, causal, bits, (128, 128),
                                        cfg_of(D, torch.float16, bits), "tf32", True)
        for D in (32, 96, 256):
            yield from _variant(kname, torch.float16, D, True, True, (128, 128), cfg_of(D, torch.float16, True),
                                "tf32", False)
        for D in (64, 128):
            yield from _variant(kname, torch.bfloat16, D, True, True, (128, 128), cfg_of(D, torch.bfloat16, True),
                                "tf32", False)
        for D in (64, 128, 256):
            for precision in ("tf32", "tf32x3") if D <= 128 else ("tf32",):
                yield from _variant(kname, torch.float32, D, True, True, (128, 128),
                                    cfg_of(D, torch.float32, True, precision), precision, False)
        for block in ((64, 64), (128, 64), (64, 128)):
            for D in (64, 128):
                yield from _variant(kname, torch.float16, D, True, True, block,
                                    cfg_of(D, torch.float16, True, "tf32", block), "tf32", False)
        if kname == "fwd":  # the backward kernels' interpreter tiles are their block-64 configs' shape
            yield from _variant(kname, torch.float16, 64, True, True, (64, 64), INTERPRET_CONFIG, "tf32", False)
    # The fix-up kernels (vector code, no dot) of the forward and of the backward: every head dim in fp16,
    # the widest in bf16 and fp32, with causal + bitmask (the superset of their code), 128 x 128 blocks.
    for dtype, dims in ((torch.float16, (32, 64, 96, 128, 256)), (torch.bfloat16, (128, 256)),
                        (torch.float32, (128, 256))):
        for D in dims:
            base = {"HEAD_DIM": D, "BLOCK_D": _block_dim(D), "BQ": 128, "BK": 128, "IS_CAUSAL": True,
                    "HAS_BITS": True}
            for kname, const in (("fix", {**base, "BM": 128, "BN": FIX_BN}),
                                 ("bwd_fix", {**base, "BM": 64, "BN": 64, "FIX_N": FIX_BN})):
                label = f"attention.{kname} {str(dtype)[6:]} D{D} N{FIX_BN} w{FIX_WARPS}"
                sig = _signature(kname, dtype)
                yield from specializations(label, _KERNELS[kname], sig, const,
                                           {"num_warps": FIX_WARPS, "num_stages": 1, "maxnreg": FIX_MAXNREG},
                                           tuple(u for u in ("s_qs", "s_ks", "s_vs", "s_os", "s_dos") if u in sig))
