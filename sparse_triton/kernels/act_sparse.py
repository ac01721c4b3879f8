"""Activation-sparse matmul for decoding: ``y = (x * (|x| > t)) @ W^T (+ bias)`` reading only the weight
rows of active inputs.

**Layout.** The weight is stored input-major, ``Wt[K, N]`` (``W^T``, one contiguous row per input
channel), so an inactive input channel is one contiguous weight row nobody reads: the loads of a tile's
inactive rows are predicated off and issue no memory traffic. With an N:M weight, ``Wt`` is N:M along
N (groups of m consecutive *output* features inside one input channel's row, ``nm_compress(W.t(), n, m)``):
each input row is then stored compressed and contiguous, and the two savings multiply (bytes read
~ activation density x n/m). Along K (the usual layout for tensor-core 2:4) a skipped input would
free only scattered slots of many rows, so the savings would not compose.

**Threshold.** Tested inside the kernel on every load of x (no compaction pass, no host sync): input
``k`` of row ``i`` is active unless ``|x[i, k]| <= t`` (``t`` one fp32 value or one per channel, read
from memory so a CUDA graph sees updates), compared in fp32; NaN is active. For a block of BM rows a
weight row is read when its channel is active in *any* row of the block (the union rule): rows
inactive for one token but not for another still get the exact masked product, since the inactive
token's x is zeroed.

**Non-finite weights.** An inactive input contributes exactly nothing: its weight row is never read for
that row, so an inf or NaN there does not reach the row's output (where ``F.linear(x * (|x| > t), W)``
would give ``0 * inf = NaN``); a NaN input counts as active and makes its row NaN. One row per tile
(BM = 1, decode) reads exactly its own rows. Under the union rule (BM > 1) a row meets the weight rows
of inputs active only in other rows, and ``0 * inf`` would leak into it; such a leak always leaves a
NaN in the row. So after a BM > 1 launch, ``_act_sparse_fix_kernel`` reads the output once and, only
for a row that holds a NaN (a leak, or a NaN the rule gives), recomputes it reading only the weight rows
of its own active inputs. In a kernel of its own that rare code costs the fast kernels nothing (their
code is as it was); the price is one small launch and one read of the output, paid only where the
caller does not know the weight to be finite (``exact=True``: the ops check each weight once per
version and pass ``exact=False`` for a finite one, where no leak can happen). The reference
(``reference/act_sparse.py``) computes the same rule. The gate's ReLU keeps a NaN NaN (torch.relu does).

**Parallelism.** Decode GEMVs have few output tiles, so the reduction over K is split across
``SPLIT`` programs. Partial sums go to an fp32 workspace and the *last* program of a tile to arrive
(an atomic counter per tile) folds them in split order (deterministic), adds the bias, writes the
output and resets its counter to zero for the next launch: one launch per GEMV, which is what keeps
the fused SwiGLU FFN at two (gate+up with ``silu(gate) * up`` in the epilogue, then down).

Inner products per config: broadcast multiply + one reduction after the K loop (BM = 1, decode),
broadcast-sum per step (2 <= BM <= 8, and fp32), or ``tl.dot`` (BM >= 16, fp16/bf16).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._env import TRITON_INTERPRET as INTERPRET
from ..formats.nm import index_bits
from ._launch import on_device, specializations
from .nm_matmul import _load_nm_tile

ACT_CODES = {"silu": 0, "relu": 1, "relu2": 2}

# --------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _x_tile(p_x, p_t, t, o_m, m_m, o_k, m_k, stride_xm, PER_CHANNEL: tl.constexpr):
    """The thresholded x tile ``[BM, BK]`` (fp32, inactive entries 0) and the union of active channels
    ``[BK]``. Padding rows and columns load as 0, which is never active (t >= 0)."""
    b_x = tl.load(p_x + o_m[:, None] * stride_xm + o_k[None, :], mask=m_m[:, None] & m_k[None, :],
                  other=0.0).to(tl.float32)  # [BM, BK]
    if PER_CHANNEL:
        b_t = tl.load(p_t + o_k, mask=m_k, other=0.0)[None, :]  # [1, BK]
    else:
        b_t = t
    b_on = (tl.abs(b_x) > b_t) | (b_x != b_x)  # NaN is active: it reaches the output
    b_x = tl.where(b_on, b_x, 0.0)
    a_k = tl.max(b_on.to(tl.int32), axis=0) > 0  # [BK]
    return b_x, a_k


@triton.jit
def _w_tile(p_w, p_idx, o_k, m_r, i_n, o_n, m_n, G, stride_wk, stride_ik,
            BK: tl.constexpr, BN: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr, BITS: tl.constexpr):
    """Weight rows ``o_k`` (only those in ``m_r``: the rest are never read) x columns of tile ``i_n``:
    ``[BK, BN]``, dense or rebuilt from the N:M form (groups along N)."""
    if NM_M == 0:
        return tl.load(p_w + o_k.to(tl.int64)[:, None] * stride_wk + o_n[None, :],
                       mask=m_r[:, None] & m_n[None, :], other=0.0)
    else:
        return _load_nm_tile(p_w, p_idx, o_k, m_r, i_n * (BN // NM_M), G, stride_wk, stride_ik,
                             BK, BN // NM_M, NM_N, NM_M, BITS)


@triton.jit
def _mac(acc, b_x, b_w, BM: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr):
    if USE_DOT:
        return tl.dot(b_x.to(b_w.dtype), b_w, acc, out_dtype=tl.float32)
    elif BM == 1:
        # Decode: per-lane partial products in the weight tile's own layout, reduced once after the loop.
        return acc + tl.reshape(b_x, [BK, 1]) * b_w.to(tl.float32)
    else:
        return acc + tl.sum(b_x[:, :, None] * b_w.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _acc_init(BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr):
    if BM == 1 and not USE_DOT:
        return tl.zeros([BK, BN], dtype=tl.float32)
    else:
        return tl.zeros([BM, BN], dtype=tl.float32)


@triton.jit
def _acc_final(acc, BM: tl.constexpr, USE_DOT: tl.constexpr):
    if BM == 1 and not USE_DOT:
        return tl.sum(acc, axis=0)[None, :]
    else:
        return acc


@triton.jit
def _arrive(p_cnt, tile, n_split):
    """After this program stored its partials: count it in, and return whether it is the last of its
    tile. The barrier orders every thread's stores before the (releasing) count."""
    tl.debug_barrier()
    count = tl.atomic_add(p_cnt + tile, 1, sem="acq_rel")
    return count == n_split - 1


@triton.jit
def _fold(p_ws, o_mn, m_mn, split_stride, n_split, BM: tl.constexpr, BN: tl.constexpr):
    """Sum of the ``n_split`` partials of a tile, in split order. ``.cg`` reads from L2, where the other
    programs' stores are."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for s in range(n_split):
        acc += tl.load(p_ws + s * split_stride + o_mn, mask=m_mn, other=0.0, cache_modifier=".cg")
    return acc


@triton.heuristics({"HAS_BIAS": lambda args: args["p_b"] is not None})
@triton.jit
def _act_sparse_mm_kernel(p_x, p_w, p_idx, p_t, p_b, p_y, p_ws, p_cnt,
                          M, N, K, G, k_per_split, n_split, stride_xm, stride_wk, stride_ik, stride_ym,
                          HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, USE_WS: tl.constexpr,
                          USE_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          NM_N: tl.constexpr, NM_M: tl.constexpr, BITS: tl.constexpr):
    """``y[M, N] = (x * (|x| > t))[M, K] @ Wt[K, N] (+ bias)``.

    p_x: ``[M, K]`` (row stride ``stride_xm``, unit column stride); p_w: the input-major weight
    ``Wt[K, N]`` (row stride ``stride_wk``, unit column stride) or, with NM_M > 0, its N:M values
    ``[K, S]`` with p_idx the packed positions ``[K, Wd]`` (row stride ``stride_ik``, ``G`` groups per
    row); p_t: fp32 threshold, one value (``[]``) or ``[K]`` with PER_CHANNEL; p_b: bias ``[N]`` or None;
    p_y: ``[M, N]`` (row stride ``stride_ym``). With USE_WS: p_ws the fp32 workspace
    ``[n_split, M, N]`` and p_cnt int32 counters, one per output tile, zero between launches.
    Grid: (column tiles, n_split, row tiles); split ``s`` reduces K rows ``[s, s + 1) * k_per_split``.
    """
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    i_m = tl.program_id(2)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N
    t = 0.0
    if not PER_CHANNEL:
        t = tl.load(p_t)
    k_lo = i_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = _acc_init(BM, BN, BK, USE_DOT)
    for k0 in range(k_lo, k_hi, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < k_hi
        b_x, a_k = _x_tile(p_x, p_t, t, o_m, m_m, o_k, m_k, stride_xm, PER_CHANNEL)  # [BM, BK], [BK]
        b_w = _w_tile(p_w, p_idx, o_k, a_k & m_k, i_n, o_n, m_n, G, stride_wk, stride_ik,
                      BK, BN, NM_N, NM_M, BITS)  # [BK, BN]
        acc = _mac(acc, b_x, b_w, BM, BK, USE_DOT)
    acc = _acc_final(acc, BM, USE_DOT)  # [BM, BN]
    m_y = m_m[:, None] & m_n[None, :]
    last = True
    if USE_WS:
        o_mn = o_m[:, None] * N + o_n[None, :]
        tl.store(p_ws + i_s * M * N + o_mn, acc, mask=m_y)
        last = _arrive(p_cnt, i_m * tl.num_programs(0) + i_n, n_split)
        if last:
            acc = _fold(p_ws, o_mn, m_y, M * N, n_split, BM, BN)
            tl.atomic_xchg(p_cnt + i_m * tl.num_programs(0) + i_n, 0)
    if last:
        if HAS_BIAS:
            acc += tl.load(p_b + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        tl.store(p_y + o_m[:, None] * stride_ym + o_n[None, :], acc.to(p_y.dtype.element_ty), mask=m_y)


@triton.jit
def _gated(g, u, ACT: tl.constexpr):
    # a NaN-propagating max: a NaN gate stays NaN, as torch.relu has it (a hardware max would give 0)
    if ACT == 0:
        a = g * tl.sigmoid(g)
    elif ACT == 1:
        a = tl.maximum(g, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        a = tl.maximum(g, 0.0, propagate_nan=tl.PropagateNan.ALL)
        a = a * a
    return a * u


@triton.heuristics({"HAS_BIAS": lambda args: args["p_b"] is not None})
@triton.jit
def _act_sparse_fix_kernel(p_x, p_w, p_w2, p_idx, p_t, p_b, p_y, M, N, K, G, stride_xm, stride_wk, stride_ik,
                           stride_ym, HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, GATED: tl.constexpr,
                           ACT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NM_N: tl.constexpr,
                           NM_M: tl.constexpr, BITS: tl.constexpr):
    """After a launch with BM > 1: the ``BN`` outputs of row ``program_id(1)`` recomputed, reading only the
    weight rows of the row's own active inputs, if the stored ones hold a NaN; else nothing.

    Pointers as in ``_act_sparse_mm_kernel`` (GATED: as in ``_act_sparse_gate_up_kernel``, p_w / p_w2
    the gate / up weights, ``act(x Wg) * (x Wu)`` with ACT); p_y: the output just written ``[M, N]`` (row
    stride ``stride_ym``). Grid: (column tiles of BN, M)."""
    i_n = tl.program_id(0)
    row = tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    stored = tl.load(p_y + row * stride_ym + o_n, mask=m_n, other=0.0)
    if tl.max(tl.where(stored != stored, 1, 0), 0) > 0:
        # per-lane partial products, reduced once after the loop (the decode GEMV's form)
        y = tl.zeros([BK, BN], dtype=tl.float32)
        y2 = tl.zeros([BK, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            m_k = o_k < K
            b_x = tl.load(p_x + row * stride_xm + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BK]
            if PER_CHANNEL:
                b_t = tl.load(p_t + o_k, mask=m_k, other=0.0)
            else:
                b_t = tl.load(p_t)
            on = ((tl.abs(b_x) > b_t) | (b_x != b_x)) & m_k  # NaN is active
            b_x = tl.where(on, b_x, 0.0)
            b_w = _w_tile(p_w, p_idx, o_k, on, i_n, o_n, m_n, G, stride_wk, stride_ik, BK, BN, NM_N, NM_M,
                          BITS)  # [BK, BN], zero in the rows of inactive inputs (never read)
            y += b_x[:, None] * b_w.to(tl.float32)
            if GATED:
                b_w2 = _w_tile(p_w2, p_idx, o_k, on, i_n, o_n, m_n, G, stride_wk, stride_ik, BK, BN, NM_N, NM_M,
                               BITS)
                y2 += b_x[:, None] * b_w2.to(tl.float32)
        out = tl.sum(y, 0)
        if GATED:
            out = _gated(out, tl.sum(y2, 0), ACT)
        elif HAS_BIAS:
            out += tl.load(p_b + o_n, mask=m_n, other=0.0).to(tl.float32)
        tl.store(p_y + row * stride_ym + o_n, out.to(p_y.dtype.element_ty), mask=m_n)


@triton.jit
def _act_sparse_gate_up_kernel(p_x, p_wg, p_wu, p_t, p_h, p_ws, p_cnt,
                               M, N, K, k_per_split, n_split, stride_xm, stride_wk, stride_hm,
                               PER_CHANNEL: tl.constexpr, USE_WS: tl.constexpr, USE_DOT: tl.constexpr,
                               ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``h[M, N] = act(xs @ Wgt) * (xs @ Wut)`` with ``xs = x * (|x| > t)``: gate and up share one read of x
    and one active set; ACT 0 = silu, 1 = relu, 2 = relu^2, applied in fp32.

    p_x: ``[M, K]`` (row stride ``stride_xm``); p_wg, p_wu: input-major ``[K, N]`` (row stride
    ``stride_wk``, both); p_t: fp32 threshold ``[]`` or ``[K]``; p_h: ``[M, N]`` (row stride
    ``stride_hm``). With USE_WS: p_ws the fp32 workspace ``[2, n_split, M, N]`` (gate partials, then
    up) and p_cnt the per-tile counters. Grid as ``_act_sparse_mm_kernel``.
    """
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    i_m = tl.program_id(2)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N
    t = 0.0
    if not PER_CHANNEL:
        t = tl.load(p_t)
    k_lo = i_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc_g = _acc_init(BM, BN, BK, USE_DOT)
    acc_u = _acc_init(BM, BN, BK, USE_DOT)
    for k0 in range(k_lo, k_hi, BK):
        o_k = k0 + tl.arange(0, BK)
        m_k = o_k < k_hi
        b_x, a_k = _x_tile(p_x, p_t, t, o_m, m_m, o_k, m_k, stride_xm, PER_CHANNEL)  # [BM, BK], [BK]
        m_w = (a_k & m_k)[:, None] & m_n[None, :]
        o_w = o_k.to(tl.int64)[:, None] * stride_wk + o_n[None, :]
        b_g = tl.load(p_wg + o_w, mask=m_w, other=0.0)  # [BK, BN]
        b_u = tl.load(p_wu + o_w, mask=m_w, other=0.0)  # [BK, BN]
        acc_g = _mac(acc_g, b_x, b_g, BM, BK, USE_DOT)
        acc_u = _mac(acc_u, b_x, b_u, BM, BK, USE_DOT)
    acc_g = _acc_final(acc_g, BM, USE_DOT)  # [BM, BN]
    acc_u = _acc_final(acc_u, BM, USE_DOT)
    m_y = m_m[:, None] & m_n[None, :]
    last = True
    if USE_WS:
        o_mn = o_m[:, None] * N + o_n[None, :]
        tl.store(p_ws + i_s * M * N + o_mn, acc_g, mask=m_y)
        tl.store(p_ws + (n_split + i_s) * M * N + o_mn, acc_u, mask=m_y)
        last = _arrive(p_cnt, i_m * tl.num_programs(0) + i_n, n_split)
        if last:
            acc_g = _fold(p_ws, o_mn, m_y, M * N, n_split, BM, BN)
            acc_u = _fold(p_ws + n_split * M * N, o_mn, m_y, M * N, n_split, BM, BN)
            tl.atomic_xchg(p_cnt + i_m * tl.num_programs(0) + i_n, 0)
    if last:
        b_h = _gated(acc_g, acc_u, ACT)
        tl.store(p_h + o_m[:, None] * stride_hm + o_n[None, :], b_h.to(p_h.dtype.element_ty), mask=m_y)


# --------------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class ActSparseConfig:
    """Launch config of the activation-sparse kernels.

    BM rows of x share one read of each active weight row (the union rule); BN output columns per
    program; BK weight rows per step. USE_DOT: tensor cores (BM >= 16, fp16/bf16), else broadcast-sum.
    SPLIT: the most programs one reduction over K is split across (the launch uses fewer when K is
    short); 1 writes the output directly.
    """

    BM: int = 1
    BN: int = 128
    BK: int = 64
    SPLIT: int = 1
    USE_DOT: bool = False
    num_warps: int = 4
    num_stages: int = 2


# Large tiles for the interpreter (its cost is programs x loop steps).
INTERPRET_CONFIG = ActSparseConfig(BM=16, BN=128, BK=128)
# _act_sparse_fix_kernel: output columns per program (a read of the output, mostly), weight rows per step
# of a recompute (rare), warps, and a register cap that keeps ptxas from trading spills for occupancy
FIX_BN, FIX_BK, FIX_WARPS, FIX_MAXNREG = 128, 32, 4, 255

# (BN, BK, warps) of the broadcast-sum tiles: the largest that compile without spills on sm_90 for the
# ragged launch of both kernels (gate/up holds two accumulators) in every dtype, with the ptxas of every
# supported Triton (at 4 warps, Triton 3.8's ptxas 12.9 spills the fp16 BM = 2 and 4 tiles; 8 warps hold
# them in 80 / 64 registers).
_SUM_TILES = {1: (128, 32, 8), 2: (64, 32, 8), 4: (64, 16, 8), 8: (32, 16, 4)}
_MAX_SPLIT = 32
_WAVES = 2


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def heuristic(M: int, N: int, K: int, dtype: torch.dtype, sms: int = 132) -> ActSparseConfig:
    """The default config for an ``[M, K] x [K, N]`` product: decode GEMV tiles at M = 1, broadcast-sum
    tiles to M = 8 (all of fp32), tensor cores above; split K until about two waves of programs."""
    if M <= 8 or dtype == torch.float32:
        BM = min(_pow2(max(M, 1)), 8)
        BN, BK, warps = _SUM_TILES[BM]
        cfg = ActSparseConfig(BM=BM, BN=BN, BK=BK, num_warps=warps)
    else:
        BM = min(_pow2(M), 64)
        cfg = ActSparseConfig(BM=BM, BN=64, BK=64, USE_DOT=True, num_warps=8 if BM >= 32 else 4)
    tiles = triton.cdiv(N, cfg.BN) * triton.cdiv(max(M, 1), cfg.BM)
    split = 1
    while split < _MAX_SPLIT and tiles * split < _WAVES * sms and K // (2 * split) >= 4 * cfg.BK:
        split *= 2
    return ActSparseConfig(**{**cfg.__dict__, "SPLIT": split})


def config_space(M: int, N: int, K: int, dtype: torch.dtype, sms: int = 132) -> list[ActSparseConfig]:
    """What the tuner times for a shape: tile shapes around the heuristic's, a range of splits, warps."""
    base = heuristic(M, N, K, dtype, sms)
    shapes: list[tuple[int, int, int, bool]] = [(base.BM, base.BN, base.BK, base.USE_DOT)]
    if base.USE_DOT:
        shapes += [(base.BM, 128, 64, True), (base.BM, 64, 128, True), (base.BM, 32, 64, True)]
    elif base.BM == 1:
        shapes += [(1, 256, 32, False), (1, 64, 64, False), (1, 128, 64, False), (1, 256, 64, False)]
    else:
        shapes += [(base.BM, base.BN // 2, base.BK * 2, False), (base.BM, base.BN * 2, base.BK // 2, False)]
    out = []
    for BM, BN, BK, dot in shapes:
        splits = sorted({max(1, base.SPLIT // 2), base.SPLIT, min(_MAX_SPLIT, base.SPLIT * 2)})
        for split in splits:
            for warps, stages in ((4, 2), (8, 2), (8, 3)):
                out.append(ActSparseConfig(BM, BN, BK, split, dot, warps, stages))
    return list(dict.fromkeys(out))


def config_name(cfg: ActSparseConfig) -> str:
    """e.g. ``sum1x128x64w4s2k8``: unique within a tuning space."""
    kind = "dot" if cfg.USE_DOT else "sum"
    return f"{kind}{cfg.BM}x{cfg.BN}x{cfg.BK}w{cfg.num_warps}s{cfg.num_stages}k{cfg.SPLIT}"


def config_from_dict(d: dict) -> ActSparseConfig | None:
    """A config from a stored tuning entry, or None when it is not one this version can run."""
    try:
        cfg = ActSparseConfig(**d)
    except TypeError:
        return None
    pow2 = all(isinstance(v, int) and v >= 1 and v & (v - 1) == 0
               for v in (cfg.BM, cfg.BN, cfg.BK, cfg.SPLIT, cfg.num_warps))
    if not pow2 or cfg.BM > 64 or cfg.BN > 512 or cfg.BK > 256 or cfg.SPLIT > _MAX_SPLIT:
        return None
    if cfg.USE_DOT and (cfg.BM < 16 or cfg.BK < 16 or cfg.BN < 16):
        return None
    if not cfg.USE_DOT and cfg.BM * cfg.BK * cfg.BN > 32768:
        return None
    return cfg


# --------------------------------------------------------------------------------------------------
# launchers

_COUNTERS = 4096
_counter_lock = threading.Lock()
_counters: dict[tuple, torch.Tensor] = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters for a split launch: one buffer per (device, stream), made outside CUDA-graph
    capture and kept for reuse (each launch leaves its counters zero; launches on one stream run in order,
    so they never share one). A launch with more tiles, or one being captured on a stream without a buffer
    yet, gets fresh zeros (captured, the zeroing is part of the graph)."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    with _counter_lock:
        buf = _counters.get(key)
        if buf is None and not capturing and tiles <= _COUNTERS:
            buf = _counters[key] = torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
    if buf is None or tiles > _COUNTERS:
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    return buf


def _splits(K: int, cfg: ActSparseConfig) -> tuple[int, int]:
    """(K rows per split, a multiple of BK; number of splits)."""
    steps = triton.cdiv(max(K, 1), cfg.BK)
    per = triton.cdiv(steps, min(cfg.SPLIT, steps)) * cfg.BK
    return per, triton.cdiv(max(K, 1), per)


def _threshold(threshold: torch.Tensor, K: int) -> tuple[torch.Tensor, bool]:
    t = threshold.to(torch.float32).contiguous()
    return t, t.dim() == 1 and t.shape[0] == K and t.dim() > 0


def _config(config: ActSparseConfig | None, M: int, N: int, K: int, dtype: torch.dtype) -> ActSparseConfig:
    if config is not None:
        return config
    return INTERPRET_CONFIG if INTERPRET else heuristic(M, N, K, dtype)


def _launch_mm(x, w, idx, threshold, bias, out, N, G, stride_wk, stride_ik, nm, cfg, exact):
    M, K = x.shape
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(bias.expand_as(out)) if bias is not None else out.zero_()
    if cfg.USE_DOT and x.dtype == torch.float32:
        raise ValueError("act_sparse: USE_DOT configs run fp16/bf16 only")
    t, per_channel = _threshold(threshold, K)
    per, n_split = _splits(K, cfg)
    grid = (triton.cdiv(N, cfg.BN), n_split, triton.cdiv(M, cfg.BM))
    ws = cnt = out
    if n_split > 1:
        ws = torch.empty((n_split, M, N), dtype=torch.float32, device=x.device)
        cnt = _tile_counters(x.device, grid[0] * grid[2])
    n, m = nm
    with on_device(x):
        _act_sparse_mm_kernel[grid](
            x, w, idx, t, bias, out, ws, cnt, M, N, K, G, per, n_split, x.stride(0), stride_wk, stride_ik,
            out.stride(0), PER_CHANNEL=per_channel, USE_WS=n_split > 1, USE_DOT=cfg.USE_DOT, BM=cfg.BM,
            BN=cfg.BN, BK=cfg.BK, NM_N=n, NM_M=m, BITS=index_bits(m) if m else 1,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if exact and cfg.BM > 1:
            _fix(x, w, w, idx, t, per_channel, bias, out, N, G, stride_wk, stride_ik, nm, False, 0)
    return out


def _fix(x, w, w2, idx, t, per_channel, bias, out, N, G, stride_wk, stride_ik, nm, gated, act):
    """Launch ``_act_sparse_fix_kernel`` over ``out [M, N]`` (after a BM > 1 launch)."""
    M, K = x.shape
    n, m = nm
    _act_sparse_fix_kernel[(triton.cdiv(N, FIX_BN), M)](
        x, w, w2, idx, t, bias, out, M, N, K, G, x.stride(0), stride_wk, stride_ik, out.stride(0),
        PER_CHANNEL=per_channel, GATED=gated, ACT=act, BN=FIX_BN, BK=FIX_BK, NM_N=n, NM_M=m,
        BITS=index_bits(m) if m else 1, num_warps=FIX_WARPS, num_stages=1, maxnreg=FIX_MAXNREG)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def act_sparse_mm(x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor,
                  bias: torch.Tensor | None = None, config: ActSparseConfig | None = None,
                  out: torch.Tensor | None = None, exact: bool = True) -> torch.Tensor:
    """``y[M, N] = (x * (|x| > t)) @ weight_t (+ bias)``.

    x: ``[M, K]``; weight_t: input-major ``[K, N]`` (unit column stride); threshold: fp32 ``[]`` or
    ``[K]`` (>= 0, validated by the caller); bias ``[N]`` or None. Returns ``[M, N]`` in x's dtype.
    ``exact=False``: the caller knows the weight holds only finite values, so the union rule cannot leak
    ``0 * inf`` into a row and the fix-up launch after a multi-row tile is skipped.
    """
    x, weight_t = _rows(x), _rows(weight_t)
    M, K = x.shape
    N = weight_t.shape[1]
    cfg = _config(config, M, N, K, x.dtype)
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    return _launch_mm(x, weight_t, weight_t, threshold, bias, out, N, 0, weight_t.stride(0), 0, (0, 0), cfg, exact)


def act_sparse_nm_mm(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int, N: int,
                     threshold: torch.Tensor, bias: torch.Tensor | None = None,
                     config: ActSparseConfig | None = None, out: torch.Tensor | None = None,
                     exact: bool = True) -> torch.Tensor:
    """As :func:`act_sparse_mm` with ``Wt[K, N]`` n:m compressed along N: ``values[K, S]`` and packed
    ``indices[K, Wd]`` (an :class:`~sparse_triton.NMTensor` of ``W^T``). ``m`` a power of two <= 16 and
    a divisor of the config's BN."""
    x = _rows(x)
    values, indices = values.contiguous(), indices.contiguous()
    M, K = x.shape
    cfg = _config(config, M, N, K, x.dtype)
    if cfg.BN % m:
        raise ValueError(f"act_sparse_nm_mm: BN={cfg.BN} is not a multiple of m={m}")
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    return _launch_mm(x, values, indices, threshold, bias, out, N, triton.cdiv(N, m), values.stride(0),
                      indices.stride(0), (n, m), cfg, exact)


def act_sparse_gate_up(x: torch.Tensor, wg_t: torch.Tensor, wu_t: torch.Tensor, threshold: torch.Tensor,
                       activation: str = "silu", config: ActSparseConfig | None = None,
                       out: torch.Tensor | None = None, exact: bool = True) -> torch.Tensor:
    """``h[M, I] = act(xs @ wg_t) * (xs @ wu_t)``, ``xs = x * (|x| > t)``, in one launch.

    x: ``[M, K]``; wg_t, wu_t: input-major ``[K, I]`` with equal strides; activation: ``silu``,
    ``relu`` or ``relu2``. Returns ``[M, I]`` in x's dtype. ``exact`` as in :func:`act_sparse_mm`.
    """
    x, wg_t, wu_t = _rows(x), _rows(wg_t), _rows(wu_t)
    if wg_t.stride() != wu_t.stride():
        wg_t, wu_t = wg_t.contiguous(), wu_t.contiguous()
    M, K = x.shape
    N = wg_t.shape[1]
    cfg = _config(config, M, N, K, x.dtype)
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    t, per_channel = _threshold(threshold, K)
    per, n_split = _splits(K, cfg)
    grid = (triton.cdiv(N, cfg.BN), n_split, triton.cdiv(M, cfg.BM))
    ws = cnt = out
    if n_split > 1:
        ws = torch.empty((2, n_split, M, N), dtype=torch.float32, device=x.device)
        cnt = _tile_counters(x.device, grid[0] * grid[2])
    with on_device(x):
        _act_sparse_gate_up_kernel[grid](
            x, wg_t, wu_t, t, out, ws, cnt, M, N, K, per, n_split, x.stride(0), wg_t.stride(0), out.stride(0),
            PER_CHANNEL=per_channel, USE_WS=n_split > 1, USE_DOT=cfg.USE_DOT, ACT=ACT_CODES[activation],
            BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if exact and cfg.BM > 1:
            _fix(x, wg_t, wu_t, wg_t, t, per_channel, None, out, N, 0, wg_t.stride(0), 0, (0, 0), True,
                 ACT_CODES[activation])
    return out


# --------------------------------------------------------------------------------------------------
# compile check

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _default_configs(dtype: torch.dtype) -> list[ActSparseConfig]:
    """Every tile shape the heuristic returns for decode to batch 64 (splits 1 and > 1)."""
    out = []
    for M in (1, 2, 4, 8, 16, 32, 64):
        base = heuristic(M, 4096, 14336, dtype)
        out += [ActSparseConfig(**{**base.__dict__, "SPLIT": s}) for s in (1, 2)]
    return list(dict.fromkeys(out))


def compile_variants():
    """Yield ``(label, kernel, signature, constexprs, options, attrs)``: the heuristic's configs for every
    dtype and both threshold kinds, N:M patterns on the decode and a tensor-core config, the gate/up
    kernel with each activation, and the fix-up kernel; each as a ragged and an aligned launch. (The
    interpreter's config runs on CPU only; its code shape is the broadcast-sum one checked here.)"""
    ints = ("M", "N", "K", "G", "k_per_split", "n_split", "stride_xm", "stride_wk", "stride_ik", "stride_ym")
    for dtype, ptr in _PTR.items():
        for cfg in _default_configs(dtype):
            use_ws = cfg.SPLIT > 1
            patterns = [(0, 0)]
            if dtype == torch.float16 and cfg.BM in (1, 16):
                patterns += [(2, 4), (1, 4), (2, 8), (4, 16)]
            for (n, m) in patterns:
                for per_channel in (False, True) if n == 0 else (False,):
                    sig = {"p_x": ptr, "p_w": ptr, "p_idx": "*i32" if m else ptr, "p_t": "*fp32", "p_b": ptr,
                           "p_y": ptr, "p_ws": "*fp32" if use_ws else ptr, "p_cnt": "*i32" if use_ws else ptr}
                    sig.update(dict.fromkeys(ints, "i32"))
                    const = {"HAS_BIAS": True, "PER_CHANNEL": per_channel, "USE_WS": use_ws, "USE_DOT": cfg.USE_DOT,
                             "BM": cfg.BM, "BN": cfg.BN, "BK": cfg.BK, "NM_N": n, "NM_M": m,
                             "BITS": index_bits(m) if m else 1}
                    unit = ("M",) if cfg.BM == 1 else ()
                    label = (f"act_sparse.mm {config_name(cfg)} {str(dtype)[6:]}"
                             f"{f' {n}:{m}' if m else ''}{' channel' if per_channel else ''}")
                    yield from specializations(label, _act_sparse_mm_kernel, sig, const,
                                               {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, unit)
            for act in ACT_CODES:
                if act != "silu" and (dtype != torch.float16 or use_ws):
                    continue
                sig = {"p_x": ptr, "p_wg": ptr, "p_wu": ptr, "p_t": "*fp32", "p_h": ptr,
                       "p_ws": "*fp32" if use_ws else ptr, "p_cnt": "*i32" if use_ws else ptr}
                sig.update(dict.fromkeys(("M", "N", "K", "k_per_split", "n_split", "stride_xm", "stride_wk",
                                          "stride_hm"), "i32"))
                const = {"PER_CHANNEL": False, "USE_WS": use_ws, "USE_DOT": cfg.USE_DOT, "ACT": ACT_CODES[act],
                         "BM": cfg.BM, "BN": cfg.BN, "BK": cfg.BK}
                yield from specializations(f"act_sparse.gate_up {config_name(cfg)} {str(dtype)[6:]} {act}",
                                           _act_sparse_gate_up_kernel, sig, const,
                                           {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                                           ("M",) if cfg.BM == 1 else ())
        # the fix-up after a BM > 1 launch: dense and N:M weights, both threshold kinds, and the gated form
        fix_ints = ("M", "N", "K", "G", "stride_xm", "stride_wk", "stride_ik", "stride_ym")
        for (n, m), per_channel, gated in (((0, 0), False, False), ((0, 0), True, False), ((2, 4), False, False),
                                           ((4, 16), False, False), ((0, 0), False, True)):
            sig = {"p_x": ptr, "p_w": ptr, "p_w2": ptr, "p_idx": "*i32" if m else ptr, "p_t": "*fp32", "p_b": ptr,
                   "p_y": ptr, **dict.fromkeys(fix_ints, "i32")}
            const = {"HAS_BIAS": not gated, "PER_CHANNEL": per_channel, "GATED": gated, "ACT": 0, "BN": FIX_BN,
                     "BK": FIX_BK, "NM_N": n, "NM_M": m, "BITS": index_bits(m) if m else 1}
            label = (f"act_sparse.fix {str(dtype)[6:]}{f' {n}:{m}' if m else ''}{' channel' if per_channel else ''}"
                     f"{' gated' if gated else ''}")
            yield from specializations(label, _act_sparse_fix_kernel, sig, const,
                                       {"num_warps": FIX_WARPS, "num_stages": 1, "maxnreg": FIX_MAXNREG})
