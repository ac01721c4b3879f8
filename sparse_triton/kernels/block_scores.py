"""Pooled block scores: ``scores[b, h, i, j] = scale * mean(q block i) . mean(k block j)`` without ever
forming the ``Sq x Skv`` score matrix.

Two launches, no host sync:

1. ``_pool_blocks_kernel`` reads q and k once and writes the fp32 mean of every query block
   (``[B, Hq, NQ, D]``) and every kv block (``[B, Hkv, NKV, D]``) into one small workspace: the q
   programs come first, then the k programs, so program ``pid`` writes row ``pid`` of the workspace.
2. ``_block_scores_dot_kernel`` multiplies the pooled tiles, ``[BI, D] x [D, BJ]`` per program with
   ``tl.dot`` in exact fp32 (IEEE, not TF32: the scores are ranked by top-k, and TF32 rounding would
   reorder near ties against the reference), and writes ``-inf`` above the causal block diagonal.

Pooling first costs ``(NQ * Hq + NKV * Hkv) * D`` fp32 of extra traffic, ~1/BQ of reading q and k,
and lets GQA query heads share their kv head's pooled keys instead of re-reducing k per query head.
Layout and semantics in ``sparse_triton.reference.block_scores`` (the twin).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._env import TRITON_INTERPRET as INTERPRET
from ..reference.block_scores import block_sizes
from ._launch import on_device, specializations

BLOCK_SIZES = (16, 32, 64, 128)
HEAD_DIMS = (32, 64, 96, 128, 256)


@triton.jit
def _pool_rows(p_src, p_out, n_rows, stride_s, stride_d, D,
               BR: tl.constexpr, BD: tl.constexpr):
    """``p_out[d] = mean over r < n_rows of p_src[r * stride_s + d * stride_d]`` for ``d < D``, in fp32."""
    o_r = tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    acc = tl.zeros([BR, BD], dtype=tl.float32)
    # Elementwise accumulation, one cross-row reduction at the end.
    for r0 in range(0, n_rows, BR):
        o_s = (r0 + o_r).to(tl.int64)
        m = (o_s < n_rows)[:, None] & m_d[None, :]
        b_x = tl.load(p_src + o_s[:, None] * stride_s + o_d[None, :] * stride_d, mask=m, other=0.0)  # [BR, BD]
        acc += b_x.to(tl.float32)
    b_mean = tl.sum(acc, axis=0) / n_rows.to(tl.float32)  # [BD]
    tl.store(p_out + o_d, b_mean, mask=m_d)


@triton.jit
def _pool_blocks_kernel(p_q, p_k, p_pool, NQP, Hq, Hkv, Sq, Skv, NQ, NKV, BQ, BK, D,
                        stride_qb, stride_qh, stride_qs, stride_qd,
                        stride_kb, stride_kh, stride_ks, stride_kd,
                        BR: tl.constexpr, BD: tl.constexpr):
    """Mean of one query block or one kv block per program.

    p_q: ``[B, Hq, Sq, D]``, p_k: ``[B, Hkv, Skv, D]`` (any strides, fp16/bf16/fp32); p_pool: fp32
    ``[NQP + B * Hkv * NKV, D]`` contiguous: rows ``(b * Hq + h) * NQ + i`` hold the query block
    means, then rows ``NQP + (b * Hkv + h) * NKV + j`` the kv block means (``NQP = B * Hq * NQ``). Program
    ``pid`` writes row ``pid``. BQ, BK (the block sizes) are runtime values: one compiled kernel serves
    every block size, and the last block of a sequence averages only the rows it holds.
    """
    pid = tl.program_id(0).to(tl.int64)
    p_out = p_pool + pid * D
    if pid < NQP:
        i_bh = pid // NQ
        i_blk = pid % NQ
        i_b = i_bh // Hq
        i_h = i_bh % Hq
        start = i_blk * BQ
        p_src = p_q + i_b * stride_qb + i_h * stride_qh + start * stride_qs
        _pool_rows(p_src, p_out, tl.minimum(Sq - start, BQ), stride_qs, stride_qd, D, BR, BD)
    else:
        pk = pid - NQP
        i_bh = pk // NKV
        i_blk = pk % NKV
        i_b = i_bh // Hkv
        i_h = i_bh % Hkv
        start = i_blk * BK
        p_src = p_k + i_b * stride_kb + i_h * stride_kh + start * stride_ks
        _pool_rows(p_src, p_out, tl.minimum(Skv - start, BK), stride_ks, stride_kd, D, BR, BD)


@triton.jit
def _block_scores_dot_kernel(p_qp, p_kp, p_s, Hq, Hkv, NQ, NKV, BQ, BK, D, scale,
                             IS_CAUSAL: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BDK: tl.constexpr):
    """``p_s[b, h, i, j] = scale * p_qp[b, h, i] . p_kp[b, h // (Hq // Hkv), j]`` for a ``[BI, BJ]`` tile.

    p_qp: fp32 ``[B, Hq, NQ, D]`` and p_kp: fp32 ``[B, Hkv, NKV, D]``, both contiguous (the pooled
    workspace); p_s: fp32 ``[B, Hq, NQ, NKV]`` contiguous. With IS_CAUSAL, ``-inf`` where
    ``j * BK > (i + 1) * BQ - 1`` (the kv block starts after the query block's last row).
    """
    i_i = tl.program_id(0)
    i_j = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_hk = (i_bh // Hq) * Hkv + (i_bh % Hq) // (Hq // Hkv)
    o_i = i_i * BI + tl.arange(0, BI)
    o_j = i_j * BJ + tl.arange(0, BJ)
    o_d = tl.arange(0, BDK)
    m_i = o_i < NQ
    m_j = o_j < NKV
    p_qrow = p_qp + (i_bh * NQ + o_i)[:, None] * D
    p_kcol = p_kp + (i_hk * NKV + o_j)[None, :] * D
    d_end = D
    if IS_CAUSAL:
        # A tile wholly above the diagonal only writes -inf: skip its reduction.
        d_end = tl.where(i_j * BJ * BK > (i_i * BI + BI) * BQ - 1, 0, D)
    acc = tl.zeros([BI, BJ], dtype=tl.float32)
    for d0 in range(0, d_end, BDK):
        m_d = (d0 + o_d) < D
        b_q = tl.load(p_qrow + (d0 + o_d)[None, :], mask=m_i[:, None] & m_d[None, :], other=0.0)  # [BI, BDK]
        b_k = tl.load(p_kcol + (d0 + o_d)[:, None], mask=m_d[:, None] & m_j[None, :], other=0.0)  # [BDK, BJ]
        acc = tl.dot(b_q, b_k, acc, input_precision="ieee", out_dtype=tl.float32)
    b_s = acc * scale
    if IS_CAUSAL:
        b_s = tl.where(o_j[None, :] * BK > (o_i[:, None] + 1) * BQ - 1, float("-inf"), b_s)
    p_out = p_s + (i_bh * NQ + o_i)[:, None] * NKV + o_j[None, :]
    tl.store(p_out, b_s, mask=m_i[:, None] & m_j[None, :])


@dataclass(frozen=True)
class BlockScoresConfig:
    """BR: rows per pooling step (a ``[BR, next_pow2(D)]`` tile); BI x BJ: score tile of the dot kernel,
    reduced over D in BDK steps."""

    BR: int
    BI: int = 64
    BJ: int = 64
    BDK: int = 32
    num_warps: int = 4


def heuristic_config(D: int, bq: int, bk: int) -> BlockScoresConfig:
    """About 4k elements per pooling step (32 fp32 partials a thread at 4 warps), at most one block's rows.

    Under the interpreter a program costs the same whatever its tile: one step per block.
    """
    bd = triton.next_power_of_2(D)
    if INTERPRET:
        return BlockScoresConfig(BR=max(bq, bk))
    return BlockScoresConfig(BR=max(1, min(max(bq, bk), 4096 // bd)))


def _check(q: torch.Tensor, k: torch.Tensor, bq: int, bk: int) -> None:
    where = "block_scores"
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{where}: {name} must be a 4-D [B, H, S, D] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{where}: kernels support float16, bfloat16 and float32, got {name}.dtype={t.dtype}")
    if k.dtype != q.dtype or k.device != q.device:
        raise TypeError(f"{where}: q and k must share dtype and device, got {q.dtype}/{q.device} and "
                        f"{k.dtype}/{k.device}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{where}: q {tuple(q.shape)} and k {tuple(k.shape)} must share B and D")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{where}: q heads ({q.shape[1]}) must be a multiple of k heads ({k.shape[1]})")
    for name, b in (("BQ", bq), ("BK", bk)):
        if b not in BLOCK_SIZES:
            raise ValueError(f"{where}: block size {name}={b} not supported, expected one of {BLOCK_SIZES}")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"{where}: head dim D={q.shape[3]} not supported, expected one of {HEAD_DIMS}")


def block_scores(q: torch.Tensor, k: torch.Tensor, block_size, scale: float | None = None,
                 causal: bool = False, config: BlockScoresConfig | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled block scores ``[B, Hq, ceil(Sq / BQ), ceil(Skv / BK)]`` float32 of ``q[B, Hq, Sq, D]`` and
    ``k[B, Hkv, Skv, D]`` (``Hq % Hkv == 0``; fp16, bf16 or fp32, any strides).

    ``block_size``: ``BQ`` = ``BK`` or a pair ``(BQ, BK)``, each in {16, 32, 64, 128}; ``D`` in
    {32, 64, 96, 128, 256}; ``scale`` defaults to ``D ** -0.5``; ``out`` (contiguous float32 of the
    result's shape) receives the scores. Semantics in ``sparse_triton.reference.block_scores``.
    """
    bq, bk = block_sizes(block_size)
    _check(q, k, bq, bk)
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    NQ, NKV = triton.cdiv(Sq, bq), triton.cdiv(Skv, bk)
    shape = (B, Hq, NQ, NKV)
    if out is None:
        scores = torch.empty(shape, dtype=torch.float32, device=q.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"block_scores: out must be a contiguous float32 tensor of shape {shape} on {q.device}")
    else:
        scores = out
    if scores.numel() == 0:
        return scores
    scale = float(D ** -0.5 if scale is None else scale)
    cfg = config or heuristic_config(D, bq, bk)
    n_q, n_k = B * Hq * NQ, B * Hkv * NKV
    pool = torch.empty((n_q + n_k, D), dtype=torch.float32, device=q.device)
    with on_device(q):
        _pool_blocks_kernel[(n_q + n_k,)](
            q, k, pool, n_q, Hq, Hkv, Sq, Skv, NQ, NKV, bq, bk, D, *q.stride(), *k.stride(),
            BR=cfg.BR, BD=triton.next_power_of_2(D), num_warps=cfg.num_warps)
        grid = (triton.cdiv(NQ, cfg.BI), triton.cdiv(NKV, cfg.BJ), B * Hq)
        _block_scores_dot_kernel[grid](
            pool[:n_q], pool[n_q:], scores, Hq, Hkv, NQ, NKV, bq, bk, D, scale,
            IS_CAUSAL=bool(causal), BI=cfg.BI, BJ=cfg.BJ, BDK=cfg.BDK, num_warps=cfg.num_warps)
    return scores


def compile_variants():
    """Yield ``(label, kernel, signature, constexprs, options, attrs)``: the pooling kernel for every
    head dim in fp16, bf16 and fp32 (block sizes are runtime values), and the dot kernel with and
    without the causal rule; each as a ragged and an aligned launch."""
    ptrs = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    pool_ints = ("NQP", "Hq", "Hkv", "Sq", "Skv", "NQ", "NKV", "BQ", "BK", "D", "stride_qb", "stride_qh", "stride_qs",
                 "stride_qd", "stride_kb", "stride_kh", "stride_ks", "stride_kd")
    for dtype, ptr in ptrs.items():
        for D in HEAD_DIMS:
            cfg = BlockScoresConfig(BR=max(1, min(128, 4096 // triton.next_power_of_2(D))))
            sig = {"p_q": ptr, "p_k": ptr, "p_pool": "*fp32", **dict.fromkeys(pool_ints, "i32")}
            const = {"BR": cfg.BR, "BD": triton.next_power_of_2(D)}
            yield from specializations(f"block_scores.pool {str(dtype)[6:]} D={D} BR={cfg.BR}", _pool_blocks_kernel,
                                       sig, const, {"num_warps": cfg.num_warps}, unit=("stride_qd", "stride_kd"))
    cfg = BlockScoresConfig(BR=1)
    for causal in (False, True):
        sig = {"p_qp": "*fp32", "p_kp": "*fp32", "p_s": "*fp32",
               **dict.fromkeys(("Hq", "Hkv", "NQ", "NKV", "BQ", "BK", "D"), "i32"), "scale": "fp32"}
        const = {"IS_CAUSAL": causal, "BI": cfg.BI, "BJ": cfg.BJ, "BDK": cfg.BDK}
        yield from specializations(f"block_scores.dot causal={causal}", _block_scores_dot_kernel, sig, const,
                                   {"num_warps": cfg.num_warps})
