"""N:M weight-sparse matmul: ``Y = X @ W^T (+ bias)`` and ``dX = dY @ W`` with ``W`` compressed.

``W[N, K]`` is N:M sparse along K and stored as ``values[N, S]`` + bit-packed ``indices[N, Wd]`` (layout
in ``sparse_triton.formats.nm``). Both kernels rebuild dense W tiles in registers from the compressed
form, so a weight tile costs ``n/m`` of its dense bytes plus the index bits: at small M (decode) the op
is bound by weight bandwidth and that ratio is the speedup.

The rebuild (``_load_nm_tile``) reads a row's kept slots as one contiguous run (16-byte loads) and its
packed index words once each, then places every slot at its position with selects. Triton lays the
slot axis out over at most a couple of lanes, so the rebuild costs a few shuffles per tile and one
small layout exchange of the index words, not a pass through shared memory per element.

Two inner products, chosen per config:

* ``USE_DOT``: ``tl.dot`` on tensor cores (M > 8: prefill and training shapes; fp32 as TF32 when
  PyTorch allows TF32 for matmuls);
* otherwise a broadcast multiply + ``tl.sum`` (GEMV style, M <= 8, and exact fp32): the rebuilt tile
  never leaves registers, partial products stay per lane until one reduction after the K loop, and
  tiny M wastes no tensor-core padding.

Both split the reduction across ``SPLIT`` programs when the output alone gives too few programs to
fill the GPU; partial sums go to an fp32 workspace that ``_split_reduce_kernel`` folds (deterministic,
no atomics), adding the bias and casting on the way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .._env import TRITON_INTERPRET as INTERPRET
from ..formats.nm import index_bits
from ._launch import on_device, specializations, tf32_enabled

# --------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _load_nm_tile(p_val, p_idx, o_r, m_r, g0, G, stride_vr, stride_ir,
                  BR: tl.constexpr, BG: tl.constexpr, N: tl.constexpr, M: tl.constexpr,
                  BITS: tl.constexpr):
    """Rebuild rows ``o_r`` x groups ``[g0, g0 + BG)`` of the dense weight: ``[BR, BG * M]``.

    p_val: values ``[rows, S]`` (row stride ``stride_vr``, unit column stride); p_idx: int32 words
    ``[rows, Wd]`` (row stride ``stride_ir``). Groups at or past ``G`` and rows outside ``m_r`` read as 0.
    """
    PER: tl.constexpr = 32 // BITS
    o_r = o_r.to(tl.int64)
    o_e = tl.arange(0, M)
    if (N & (N - 1)) == 0:
        # n a power of two: the tile's kept slots are one contiguous run per row, loaded as such (wide,
        # coalesced loads), then viewed as [BR, BG, N] in registers.
        o_s = g0 * N + tl.arange(0, BG * N)
        m_s = m_r[:, None] & (o_s < G * N)[None, :]
        b_v = tl.load(p_val + o_r[:, None] * stride_vr + o_s[None, :], mask=m_s, other=0.0)  # [BR, BG*N]
        if (BG * N) % PER == 0:
            # Whole words: load each once and fan the PER positions out in registers.
            BW: tl.constexpr = BG * N // PER
            o_w = g0 * N // PER + tl.arange(0, BW)
            m_wd = m_r[:, None] & (o_w * PER < G * N)[None, :]
            b_word = tl.load(p_idx + o_r[:, None] * stride_ir + o_w[None, :], mask=m_wd, other=0)  # [BR, BW]
            o_sh = tl.arange(0, PER) * BITS
            b_pos = tl.reshape((b_word[:, :, None] >> o_sh[None, None, :]) & ((1 << BITS) - 1), [BR, BG * N])
        else:
            b_word = tl.load(p_idx + o_r[:, None] * stride_ir + (o_s // PER)[None, :], mask=m_s, other=0)
            b_pos = (b_word >> ((o_s % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
        b_v3 = tl.reshape(b_v, [BR, BG, N])
        b_pos3 = tl.reshape(b_pos, [BR, BG, N])
        o_sl = tl.arange(0, N)[None, None, :]
        b_w = tl.zeros([BR, BG, M], dtype=p_val.dtype.element_ty)
        for s in tl.static_range(N):
            # Slot s of every group, picked out of the thread's own registers (the slot axis is
            # innermost and contiguous, so this sum never crosses lanes).
            b_vs = tl.sum(tl.where(o_sl == s, b_v3, 0.0), axis=2).to(p_val.dtype.element_ty)  # [BR, BG]
            b_ps = tl.sum(tl.where(o_sl == s, b_pos3, 0), axis=2)  # [BR, BG]
            b_w = tl.where(b_ps[:, :, None] == o_e[None, None, :], b_vs[:, :, None], b_w)
    else:
        o_g = g0 + tl.arange(0, BG)
        m_vg = m_r[:, None] & (o_g < G)[None, :]  # [BR, BG]
        b_w = tl.zeros([BR, BG, M], dtype=p_val.dtype.element_ty)
        # Slot s of every group: its value, and its position pulled out of the packed word. Slots of a
        # group are distinct positions, so a select places each value exactly.
        for s in tl.static_range(N):
            o_j = o_g * N + s  # [BG] slot index in the row
            b_v = tl.load(p_val + o_r[:, None] * stride_vr + o_j[None, :], mask=m_vg, other=0.0)
            b_word = tl.load(p_idx + o_r[:, None] * stride_ir + (o_j // PER)[None, :], mask=m_vg, other=0)
            b_pos = (b_word >> ((o_j % PER) * BITS)[None, :]) & ((1 << BITS) - 1)  # [BR, BG]
            b_w = tl.where(b_pos[:, :, None] == o_e[None, None, :], b_v[:, :, None], b_w)
    return tl.reshape(b_w, [BR, BG * M])


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row tiles walk the same column tiles back to back, so the compressed
    # weight tiles they share are still in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _split_range(n_tiles, i_s, SPLIT):
    # Split i_s of SPLIT reduces a contiguous, balanced run of the reduction's tiles (sizes differ by
    # at most one, so no split sits idle while another does two runs' work).
    return i_s * n_tiles // SPLIT, (i_s + 1) * n_tiles // SPLIT


@triton.heuristics({"HAS_BIAS": lambda args: args["p_b"] is not None})
@triton.jit
def _nm_fwd_kernel(p_x, p_val, p_idx, p_b, p_y, M, N, K, G, SPLIT,
                   stride_xm, stride_xk, stride_vr, stride_ir, stride_ym, stride_ys,
                   HAS_BIAS: tl.constexpr, USE_WS: tl.constexpr, USE_DOT: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                   NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr, PRECISION: tl.constexpr):
    """``Y[M, N] = X[M, K] @ W[N, K]^T (+ bias)``, W rebuilt from its N:M compressed form.

    p_x: ``[M, K]`` any strides; p_val ``[N, S]`` / p_idx ``[N, Wd]``: the compressed weight, NN:MM along
    K; p_b: bias ``[N]`` or None; p_y: ``[M, N]`` with row stride ``stride_ym``, or with USE_WS the fp32
    workspace ``[SPLIT, M, N]`` (split stride ``stride_ys``) that ``_split_reduce_kernel`` folds.
    Grid: (row tiles x column tiles, SPLIT).
    """
    BG: tl.constexpr = BK // MM
    i_m, i_n = _tile_ids(M, N, BM, BN, GROUP_M)
    i_s = tl.program_id(1)
    # int64 row offsets: M * N and M * K pass 2^31 at training sizes (131k tokens x 28672).
    o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N
    t_lo, t_hi = _split_range(tl.cdiv(K, BK), i_s, SPLIT)
    # Broadcast-sum keeps per-lane partial products and reduces across lanes once, after the loop.
    # With one row (decode) the partials are 2-D and share the rebuilt tile's register layout.
    if USE_DOT:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    elif BM == 1:
        acc2 = tl.zeros([BN, BK], dtype=tl.float32)
    else:
        acc3 = tl.zeros([BM, BN, BK], dtype=tl.float32)
    for t in range(t_lo, t_hi):
        o_k = t * BK + tl.arange(0, BK)
        b_x = tl.load(p_x + o_m[:, None] * stride_xm + o_k.to(tl.int64)[None, :] * stride_xk,
                      mask=m_m[:, None] & (o_k < K)[None, :], other=0.0)  # [BM, BK]
        b_w = _load_nm_tile(p_val, p_idx, o_n, m_n, t * BG, G, stride_vr, stride_ir,
                            BN, BG, NN, MM, BITS)  # [BN, BK]
        if USE_DOT:
            acc = tl.dot(b_x, tl.trans(b_w), acc, input_precision=PRECISION, out_dtype=tl.float32)
        elif BM == 1:
            acc2 += b_w.to(tl.float32) * b_x.to(tl.float32)
        else:
            acc3 += b_x.to(tl.float32)[:, None, :] * b_w.to(tl.float32)[None, :, :]
    if not USE_DOT:
        if BM == 1:
            acc = tl.sum(acc2, axis=1)[None, :]
        else:
            acc = tl.sum(acc3, axis=2)
    m_y = m_m[:, None] & m_n[None, :]
    if not USE_WS:
        if HAS_BIAS:
            acc += tl.load(p_b + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        tl.store(p_y + o_m[:, None] * stride_ym + o_n[None, :], acc.to(p_y.dtype.element_ty), mask=m_y)
    else:
        tl.store(p_y + i_s.to(tl.int64) * stride_ys + o_m[:, None] * stride_ym + o_n[None, :], acc, mask=m_y)


@triton.jit
def _nm_bwd_dx_kernel(p_dy, p_val, p_idx, p_dx, M, N, K, G, SPLIT,
                      stride_dym, stride_dyn, stride_vr, stride_ir, stride_dxm, stride_dxs,
                      USE_WS: tl.constexpr, USE_DOT: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                      NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr, PRECISION: tl.constexpr):
    """``dX[M, K] = dY[M, N] @ W[N, K]``, W rebuilt from its N:M compressed form.

    p_dy: ``[M, N]`` any strides; p_val ``[N, S]`` / p_idx ``[N, Wd]``: the compressed weight; p_dx:
    ``[M, K]`` with row stride ``stride_dxm``, or with USE_WS the fp32 workspace ``[SPLIT, M, K]``.
    Each program owns BK output columns (BK / MM whole groups) and walks the reduction over N.
    """
    BG: tl.constexpr = BK // MM
    i_m, i_k = _tile_ids(M, K, BM, BK, GROUP_M)
    i_s = tl.program_id(1)
    o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)  # int64: M * K may pass 2^31
    o_k = i_k * BK + tl.arange(0, BK)
    m_m = o_m < M
    t_lo, t_hi = _split_range(tl.cdiv(N, BN), i_s, SPLIT)
    if USE_DOT:
        acc = tl.zeros([BM, BK], dtype=tl.float32)
    elif BM == 1:
        acc2 = tl.zeros([BN, BK], dtype=tl.float32)
    else:
        acc3 = tl.zeros([BM, BN, BK], dtype=tl.float32)
    for t in range(t_lo, t_hi):
        o_n = t * BN + tl.arange(0, BN)
        m_n = o_n < N
        b_dy = tl.load(p_dy + o_m[:, None] * stride_dym + o_n.to(tl.int64)[None, :] * stride_dyn,
                       mask=m_m[:, None] & m_n[None, :], other=0.0)  # [BM, BN]
        b_w = _load_nm_tile(p_val, p_idx, o_n, m_n, i_k * BG, G, stride_vr, stride_ir,
                            BN, BG, NN, MM, BITS)  # [BN, BK]
        if USE_DOT:
            acc = tl.dot(b_dy, b_w, acc, input_precision=PRECISION, out_dtype=tl.float32)
        elif BM == 1:
            acc2 += b_w.to(tl.float32) * tl.reshape(b_dy, [BN, 1]).to(tl.float32)
        else:
            acc3 += b_dy.to(tl.float32)[:, :, None] * b_w.to(tl.float32)[None, :, :]
    if not USE_DOT:
        if BM == 1:
            acc = tl.sum(acc2, axis=0)[None, :]
        else:
            acc = tl.sum(acc3, axis=1)
    m_dx = m_m[:, None] & (o_k < K)[None, :]
    if not USE_WS:
        tl.store(p_dx + o_m[:, None] * stride_dxm + o_k[None, :], acc.to(p_dx.dtype.element_ty), mask=m_dx)
    else:
        tl.store(p_dx + i_s.to(tl.int64) * stride_dxs + o_m[:, None] * stride_dxm + o_k[None, :], acc, mask=m_dx)


@triton.heuristics({"HAS_BIAS": lambda args: args["p_b"] is not None})
@triton.jit
def _split_reduce_kernel(p_ws, p_b, p_y, MN, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``y[i] = sum_s ws[s, i] (+ bias[i % N])`` over the flat ``[M * N]`` output.

    p_ws: fp32 workspace ``[SPLIT, M * N]``; p_b: bias ``[N]`` or None; p_y: contiguous output ``[M * N]``.
    """
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    p_s = p_ws + o
    for _ in range(SPLIT):
        acc += tl.load(p_s, mask=m, other=0.0)
        p_s += MN  # pointer steps: split * MN may pass 2^31
    if HAS_BIAS:
        acc += tl.load(p_b + o % N, mask=m, other=0.0).to(tl.float32)
    tl.store(p_y + o, acc.to(p_y.dtype.element_ty), mask=m)


@triton.jit
def _nm_decompress_kernel(p_val, p_idx, p_w, N, K, G, stride_vr, stride_ir, stride_wr,
                          BN: tl.constexpr, BK: tl.constexpr, NN: tl.constexpr, MM: tl.constexpr,
                          BITS: tl.constexpr):
    """The dense weight ``W[N, K]`` from its compressed form, one ``[BN, BK]`` tile per program.

    p_val ``[N, S]`` / p_idx ``[N, Wd]``: the compressed weight; p_w: ``[N, K]`` (row stride
    ``stride_wr``, unit column stride).
    """
    i_n = tl.program_id(0)
    i_k = tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_w = _load_nm_tile(p_val, p_idx, o_n, m_n, i_k * (BK // MM), G, stride_vr, stride_ir,
                        BN, BK // MM, NN, MM, BITS)  # [BN, BK]
    o_k = i_k * BK + tl.arange(0, BK)
    tl.store(p_w + o_n.to(tl.int64)[:, None] * stride_wr + o_k[None, :], b_w,
             mask=m_n[:, None] & (o_k < K)[None, :])


# --------------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class NMMatmulConfig:
    """Launch config of ``_nm_fwd_kernel`` / ``_nm_bwd_dx_kernel``.

    BM x BN x BK tiles: the forward's output is [BM, BN] and it reduces over K in BK steps; dX's output
    is [BM, BK] (BK / m whole groups) and it reduces over N in BN steps. BK is always a multiple of m.
    USE_DOT: tensor cores, else broadcast-sum (tiny M). SPLIT: programs sharing one reduction (a
    launch argument, not a code shape: SPLIT == 1 vs > 1 selects the store path, and like any integer
    argument Triton specializes a value divisible by 16).
    """

    BM: int
    BN: int
    BK: int
    USE_DOT: bool = True
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 2
    SPLIT: int = 1


# Broadcast-sum tiles for tiny M keep BM * BN * BK <= 4096 fp32 partials (32 per thread).
GEMV_CONFIGS = {
    1: NMMatmulConfig(BM=1, BN=16, BK=128, USE_DOT=False),
    2: NMMatmulConfig(BM=2, BN=16, BK=128, USE_DOT=False),
    4: NMMatmulConfig(BM=4, BN=32, BK=32, USE_DOT=False),
    8: NMMatmulConfig(BM=8, BN=16, BK=32, USE_DOT=False),
}
# Tensor-core tiles by token count, fp16 and bf16.
DOT_CONFIGS = {
    16: NMMatmulConfig(BM=16, BN=64, BK=64),
    32: NMMatmulConfig(BM=32, BN=64, BK=64),
    256: NMMatmulConfig(BM=64, BN=64, BK=64, num_stages=3),
    None: NMMatmulConfig(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
}
# fp32 as tf32 (torch.backends.cuda.matmul.allow_tf32): fp32 tiles take twice the registers.
TF32_CONFIGS = {
    32: NMMatmulConfig(BM=32, BN=32, BK=64),
    None: NMMatmulConfig(BM=32, BN=64, BK=32),
}
# fp32 with TF32 off runs the exact broadcast-sum path at any M (an "ieee" tl.dot spills on sm_90);
# the op layer prefers dense cuBLAS for that case past M = 8.

# Every config the heuristics can return (the compile check builds each one for sm_90).
CONFIGS: tuple[NMMatmulConfig, ...] = (*GEMV_CONFIGS.values(), *DOT_CONFIGS.values(), *TF32_CONFIGS.values())

# The single config used under TRITON_INTERPRET=1: large tiles keep the interpreter fast.
INTERPRET_CONFIG = NMMatmulConfig(BM=32, BN=64, BK=128)

_MAX_SPLIT = 16
H100_SHARED_MEMORY = 232448  # opt-in shared memory per block on sm_90


def config_label(cfg: NMMatmulConfig) -> str:
    """Short name of a config's code shape, e.g. ``dot64x64x64w4s3``."""
    kind = "dot" if cfg.USE_DOT else "sum"
    return f"{kind}{cfg.BM}x{cfg.BN}x{cfg.BK}w{cfg.num_warps}s{cfg.num_stages}"


def config_name(cfg: NMMatmulConfig) -> str:
    """``config_label`` plus the split, e.g. ``dot64x64x64w4s3k2``: unique within a tuning space."""
    group = "" if cfg.GROUP_M == 8 else f"g{cfg.GROUP_M}"
    return f"{config_label(cfg)}{group}k{cfg.SPLIT}"


# --------------------------------------------------------------------------------------------------
# tuning space: what the tuner times per key (the heuristic's pick is always among them)

# Broadcast-sum tiles (BN, BK, num_warps) per row count: 8..32 fp32 partials per thread.
_GEMV_TILES = {
    1: ((16, 128, 4), (32, 128, 4), (16, 256, 4), (32, 64, 4), (32, 256, 8), (64, 128, 8)),
    2: ((16, 128, 4), (32, 64, 4), (16, 64, 4), (32, 128, 8), (16, 256, 8)),
    4: ((32, 32, 4), (16, 64, 4), (32, 64, 8), (16, 128, 8)),
    8: ((16, 32, 4), (32, 32, 8), (16, 64, 8), (8, 64, 4)),
}
# Tensor-core tiles (BM, BN, BK, num_warps, num_stages) by token bucket, fp16 / bf16.
_DOT_TILES = {
    16: ((16, 64, 64, 4, 2), (16, 64, 128, 4, 3), (16, 128, 64, 4, 3), (16, 32, 128, 4, 2),
         (16, 128, 128, 8, 3)),
    32: ((32, 64, 64, 4, 2), (32, 64, 128, 4, 3), (32, 128, 64, 4, 3), (32, 128, 128, 8, 3),
         (16, 64, 128, 4, 3)),
    256: ((64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 8, 3), (64, 256, 64, 8, 3),
          (128, 64, 64, 4, 3), (64, 64, 128, 4, 4)),
    None: ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4), (128, 128, 64, 4, 4),
           (256, 128, 64, 8, 3), (64, 128, 64, 4, 4)),
}
# Tensor-core tiles for fp32 as TF32 (twice the registers and shared memory per element).
# (BM = 64 fails to compile for dX in fp32 on sm_90 with Triton 3.6.)
_TF32_TILES = {
    32: ((32, 32, 64, 4, 2), (16, 64, 32, 4, 2), (32, 64, 32, 4, 3), (32, 32, 32, 4, 3)),
    None: ((32, 64, 32, 4, 2), (32, 64, 32, 4, 3), (16, 64, 32, 4, 2), (32, 128, 32, 8, 2)),
}


def _space_tiles(bucket: int, dtype: torch.dtype, precision: str) -> list[NMMatmulConfig]:
    if bucket <= 8 or precision == "ieee":
        bm = min(bucket, 8)
        return [NMMatmulConfig(BM=bm, BN=bn, BK=bk, USE_DOT=False, num_warps=w, num_stages=st)
                for bn, bk, w in _GEMV_TILES[bm] for st in (2, 3)]
    table = _TF32_TILES if dtype == torch.float32 else _DOT_TILES
    tiles = next(t for cap, t in table.items() if cap is None or bucket <= cap)
    return [NMMatmulConfig(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=st) for bm, bn, bk, w, st in tiles]


def shared_memory_estimate(cfg: NMMatmulConfig, dtype: torch.dtype, for_dx: bool = False,
                           density: float = 0.5) -> int:
    """Bytes of shared memory a config needs, from above: per pipeline stage, the input tile (x's
    ``[BM, BK]``, or dY's ``[BM, BN]`` for dX) and the compressed weight tile (``density`` = n/m of the
    dense ``[BN, BK]`` tile, plus its index words and staging). Fitted to the sm_90 compiler's figures
    for the tuning space (tests/compile_sm90.py prints them); used to prune candidates before they are
    compiled. Broadcast-sum configs stage nothing that matters."""
    if not cfg.USE_DOT:
        return 0
    es = torch.empty((), dtype=dtype).element_size()
    a_tile = cfg.BM * (cfg.BN if for_dx else cfg.BK) * es
    w_tile = cfg.BN * cfg.BK * es * max(density, 0.5) * 1.5
    return int(max(cfg.num_stages, 1) * (a_tile + w_tile)) + 2048


def config_space(M: int, out_cols: int, red_len: int, dtype: torch.dtype, precision: str, n: int, m: int,
                 sms: int, shared_memory: int, for_dx: bool = False, weight_bytes: int = 0) -> list[NMMatmulConfig]:
    """Configs worth timing for M tokens (a bucket's upper end) on a device with ``sms`` SMs and
    ``shared_memory`` bytes per block; output ``[M, out_cols]``, reduction over ``red_len``.

    Tile shapes come from the bucket's table; each is tried at the split the heuristic would give it
    and at half and double that (a split is a launch argument: no extra compile). Tiles whose BK is not
    a multiple of ``m`` or whose shared memory would not fit are left out.
    """
    out: list[NMMatmulConfig] = []
    seen: set[NMMatmulConfig] = set()
    for base in _space_tiles(M, dtype, precision):
        if base.BK % m or shared_memory_estimate(base, dtype, for_dx, n / m) > shared_memory:
            continue
        out_tile, red_tile = (base.BK, base.BN) if for_dx else (base.BN, base.BK)
        out_tiles = _cdiv(M, base.BM) * _cdiv(out_cols, out_tile)
        red_tiles = _cdiv(red_len, red_tile)
        ws_per_split = 4 * M * out_cols
        cap = max(1, min(_MAX_SPLIT, weight_bytes // (4 * ws_per_split))) if weight_bytes else _MAX_SPLIT
        split = _pick_split(out_tiles, red_tiles, sms, cap)
        for s in (split, split // 2, split * 2):
            if 1 <= s <= cap and (s == 1 or red_tiles >= 2 * s):
                cfg = replace(base, SPLIT=s)
                if cfg not in seen:
                    seen.add(cfg)
                    out.append(cfg)
    return out


def config_from_dict(d: dict, m: int, precision: str) -> NMMatmulConfig | None:
    """The config a tuning entry stored, or None if it is malformed or cannot run here."""
    try:
        cfg = NMMatmulConfig(**d)
    except TypeError:
        return None
    ints = (cfg.BM, cfg.BN, cfg.BK, cfg.GROUP_M, cfg.num_warps, cfg.num_stages, cfg.SPLIT)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in ints):
        return None
    if not isinstance(cfg.USE_DOT, bool) or cfg.SPLIT > 64:
        return None
    pow2 = all(v & (v - 1) == 0 for v in (cfg.BM, cfg.BN, cfg.BK, cfg.num_warps))
    if not pow2 or cfg.BK % m or cfg.BK > 1024 or cfg.BN > 1024 or cfg.BM > 512 or cfg.num_warps > 32:
        return None
    if cfg.USE_DOT and (precision == "ieee" or min(cfg.BM, cfg.BN, cfg.BK) < 16):
        return None  # an exact-fp32 tl.dot spills; tl.dot needs tiles of at least 16
    return cfg


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pick_split(out_tiles: int, red_tiles: int, sms: int, max_split: int = _MAX_SPLIT) -> int:
    """Reduction splits so that about 4 programs per SM are in flight, capped by the work available
    (each split gets at least 2 reduction tiles) and by ``max_split``."""
    split = 1
    while (split * 2 <= max_split and out_tiles * split < 4 * sms and red_tiles >= 4 * split):
        split *= 2
    return split


def _base_config(M: int, dtype: torch.dtype, precision: str) -> NMMatmulConfig:
    if M <= 8 or precision == "ieee":
        return next((c for bm, c in GEMV_CONFIGS.items() if bm >= M), GEMV_CONFIGS[8])
    table = TF32_CONFIGS if dtype == torch.float32 else DOT_CONFIGS
    return next(c for cap, c in table.items() if cap is None or M <= cap)


@functools.lru_cache(maxsize=4096)
def heuristic_config(M: int, out_cols: int, red_len: int, dtype: torch.dtype, precision: str,
                     device_index: int, for_dx: bool = False, weight_bytes: int = 0) -> NMMatmulConfig:
    """Config for an output ``[M, out_cols]`` reducing over ``red_len`` on CUDA device ``device_index``
    (see ``heuristic_for``)."""
    return heuristic_for(M, out_cols, red_len, dtype, precision, _sm_count(device_index), for_dx, weight_bytes)


def heuristic_for(M: int, out_cols: int, red_len: int, dtype: torch.dtype, precision: str, sms: int,
                  for_dx: bool = False, weight_bytes: int = 0) -> NMMatmulConfig:
    """Config for an output ``[M, out_cols]`` reducing over ``red_len`` on a GPU with ``sms`` SMs: the
    default where no tuned entry exists, and the tuner's first candidate.

    The forward tiles its output with BN and reduces with BK; dX (``for_dx``) tiles with BK and
    reduces with BN. The split fills the GPU when the output alone gives too few programs, keeping the
    fp32 workspace under a quarter of the weight's bytes.
    """
    base = _base_config(M, dtype, precision)
    out_tile, red_tile = (base.BK, base.BN) if for_dx else (base.BN, base.BK)
    out_tiles = _cdiv(M, base.BM) * _cdiv(out_cols, out_tile)
    ws_per_split = 4 * M * out_cols
    max_split = max(1, min(_MAX_SPLIT, weight_bytes // (4 * ws_per_split))) if weight_bytes else _MAX_SPLIT
    split = _pick_split(out_tiles, _cdiv(red_len, red_tile), sms, max_split)
    return replace(base, SPLIT=split)


def _config(M: int, out_cols: int, red_len: int, a: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
            for_dx: bool) -> NMMatmulConfig:
    if INTERPRET or a.device.type != "cuda":
        return INTERPRET_CONFIG
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    weight_bytes = values.numel() * values.element_size() + indices.numel() * 4
    return heuristic_config(M, out_cols, red_len, a.dtype, _precision(a.dtype), index, for_dx, weight_bytes)


def _precision(dtype: torch.dtype) -> str:
    """``ieee`` for fp32 unless PyTorch allows TF32 for matmuls (then fp32 matches cuBLAS's TF32)."""
    if dtype == torch.float32 and not tf32_enabled():
        return "ieee"
    return "tf32"


# --------------------------------------------------------------------------------------------------
# launchers


def _check_launch(a: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, where: str) -> None:
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{where}: kernels support float16, bfloat16 and float32, got {a.dtype}")
    if values.dtype != a.dtype:
        raise TypeError(f"{where}: dtype mismatch, input is {a.dtype} but values are {values.dtype}")
    if INTERPRET and a.dtype == torch.bfloat16:
        raise TypeError(f"{where}: Triton's interpreter computes bfloat16 wrongly; use the reference on CPU")
    for name, t in (("values", values), ("indices", indices)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{where}: {name} must have a unit stride along its last dim")


def _output(out: torch.Tensor | None, shape: tuple[int, int], like: torch.Tensor, where: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"{where}: out must be a contiguous {like.dtype} tensor of shape {shape} on {like.device}")
    return out


def _finish_split(ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, N: int) -> None:
    MN = out.numel()
    BLOCK = 1024
    _split_reduce_kernel[(_cdiv(MN, BLOCK),)](ws, bias, out, MN, N, ws.shape[0], BLOCK=BLOCK, num_warps=4)


def nm_matmul_fwd(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                  n: int, m: int, K: int, config: NMMatmulConfig | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``y[M, N] = x[M, K] @ W^T (+ bias)`` with ``W[N, K]`` compressed as (values, indices), n:m along K.

    ``x`` may have any strides. Writes ``out`` (contiguous ``[M, N]``, ``x.dtype``) when given, else a
    new tensor, and returns it.
    """
    _check_launch(x, values, indices, "nm_matmul_fwd")
    M = x.shape[0]
    N = values.shape[0]
    y = _output(out, (M, N), x, "nm_matmul_fwd")
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.copy_(bias.expand(M, N)) if bias is not None else y.zero_()
    cfg = config or _config(M, N, K, x, values, indices, for_dx=False)
    if cfg.BK % m:
        raise ValueError(f"nm_matmul_fwd: config BK={cfg.BK} is not a multiple of m={m}")
    split = max(1, min(cfg.SPLIT, _cdiv(K, cfg.BK)))
    grid = (_cdiv(M, cfg.BM) * _cdiv(N, cfg.BN), split)
    ws = y if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    with on_device(x):
        _nm_fwd_kernel[grid](
            x, values, indices, bias if split == 1 else None, ws, M, N, K, _cdiv(K, m), split,
            x.stride(0), x.stride(1), values.stride(0), indices.stride(0), N, M * N,
            USE_WS=split > 1, USE_DOT=cfg.USE_DOT, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
            NN=n, MM=m, BITS=index_bits(m), PRECISION=_precision(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if split > 1:
            _finish_split(ws, bias, y, N)
    return y


def nm_matmul_bwd_dx(dy: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     n: int, m: int, K: int, config: NMMatmulConfig | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``dx[M, K] = dy[M, N] @ W`` with ``W[N, K]`` compressed as (values, indices), n:m along K.

    ``dy`` may have any strides. Writes ``out`` (contiguous ``[M, K]``, ``dy.dtype``) when given, else a
    new tensor, and returns it.
    """
    _check_launch(dy, values, indices, "nm_matmul_bwd_dx")
    M, N = dy.shape
    dx = _output(out, (M, K), dy, "nm_matmul_bwd_dx")
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()
    cfg = config or _config(M, K, N, dy, values, indices, for_dx=True)
    if cfg.BK % m:
        raise ValueError(f"nm_matmul_bwd_dx: config BK={cfg.BK} is not a multiple of m={m}")
    split = max(1, min(cfg.SPLIT, _cdiv(N, cfg.BN)))
    grid = (_cdiv(M, cfg.BM) * _cdiv(K, cfg.BK), split)
    ws = dx if split == 1 else torch.empty((split, M, K), dtype=torch.float32, device=dy.device)
    with on_device(dy):
        _nm_bwd_dx_kernel[grid](
            dy, values, indices, ws, M, N, K, _cdiv(K, m), split,
            dy.stride(0), dy.stride(1), values.stride(0), indices.stride(0), K, M * K,
            USE_WS=split > 1, USE_DOT=cfg.USE_DOT, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
            NN=n, MM=m, BITS=index_bits(m), PRECISION=_precision(dy.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if split > 1:
            _finish_split(ws, None, dx, K)
    return dx


def nm_decompress(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, K: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense ``W[N, K]`` (``values.dtype``) of a compressed n:m weight, at memory speed.

    For paths that hand the product to a dense library (exact fp32 past decode).
    """
    _check_launch(values, values, indices, "nm_decompress")
    N = values.shape[0]
    w = _output(out, (N, K), values, "nm_decompress")
    if N == 0 or K == 0:
        return w
    BN, BK = 32, 128
    with on_device(values):
        _nm_decompress_kernel[(_cdiv(N, BN), _cdiv(K, BK))](
            values, indices, w, N, K, _cdiv(K, m), values.stride(0), indices.stride(0), K,
            BN=BN, BK=BK, NN=n, MM=m, BITS=index_bits(m), num_warps=4)
    return w


# --------------------------------------------------------------------------------------------------
# ahead-of-time compile check (tests/compile_sm90.py)

_PATTERNS = ((2, 4), (1, 4), (2, 8), (4, 8), (3, 8), (8, 16), (1, 2))
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def _config_dtypes(cfg: NMMatmulConfig):
    if cfg in TF32_CONFIGS.values():
        return (torch.float32,)
    if cfg in DOT_CONFIGS.values():
        return (torch.float16, torch.bfloat16)
    return tuple(_PTR)  # broadcast-sum: every dtype; the interpreter config: what the CPU tier runs


def _space_variants():
    """Every tile of the tuning space (``config_space``), 2:4, aligned launch, both kernels: fp16 and
    bf16 for tensor-core tiles, TF32 tiles in fp32, broadcast-sum tiles in fp16 and exact fp32."""
    seen = set(CONFIGS)
    todo: list[tuple[NMMatmulConfig, torch.dtype, str]] = []
    for bucket in [*_GEMV_TILES, *(b or 4096 for b in _DOT_TILES)]:
        for cfg in _space_tiles(bucket, torch.float16, "tf32"):
            if cfg not in seen:
                seen.add(cfg)
                dts = (torch.float16, torch.bfloat16) if cfg.USE_DOT else (torch.float16, torch.float32)
                todo += [(cfg, dt, "ieee" if dt == torch.float32 else "tf32") for dt in dts]
    for bucket in (32, 4096):
        for cfg in _space_tiles(bucket, torch.float32, "tf32"):
            if cfg not in seen:
                seen.add(cfg)
                todo.append((cfg, torch.float32, "tf32"))
    for cfg, dtype, precision in todo:
        ptr = _PTR[dtype]
        for kname, kern in (("fwd", _nm_fwd_kernel), ("bwd_dx", _nm_bwd_dx_kernel)):
            if shared_memory_estimate(cfg, dtype, kname == "bwd_dx") > H100_SHARED_MEMORY:
                continue  # never a candidate on an H100
            if kname == "fwd":
                sig = {"p_x": ptr, "p_val": ptr, "p_idx": "*i32", "p_b": ptr, "p_y": ptr}
                names = ("M", "N", "K", "G", "SPLIT", "stride_xm", "stride_xk", "stride_vr", "stride_ir",
                         "stride_ym", "stride_ys")
                flags, unit = {"HAS_BIAS": True}, ("stride_xk", "SPLIT")
            else:
                sig = {"p_dy": ptr, "p_val": ptr, "p_idx": "*i32", "p_dx": ptr}
                names = ("M", "N", "K", "G", "SPLIT", "stride_dym", "stride_dyn", "stride_vr", "stride_ir",
                         "stride_dxm", "stride_dxs")
                flags, unit = {}, ("stride_dyn", "SPLIT")
            sig.update(dict.fromkeys(names, "i32"))
            if cfg.BM == 1:
                unit += ("M",)
            const = {**flags, "USE_WS": False, "USE_DOT": cfg.USE_DOT, "BM": cfg.BM, "BN": cfg.BN, "BK": cfg.BK,
                     "GROUP_M": cfg.GROUP_M, "NN": 2, "MM": 4, "BITS": index_bits(4), "PRECISION": precision}
            label = f"nm_matmul.{kname} space {config_label(cfg)} {str(dtype)[6:]} 2:4"
            *_, aligned = specializations(label, kern, sig, const,
                                          {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, unit)
            yield aligned


def compile_variants():
    """Yield ``(label, kernel, signature, constexprs, options, attrs)`` for every config x dtype x
    (plain store | split workspace), and every pattern on one dot and one broadcast-sum config, for both
    kernels, each as a ragged and an aligned launch (see ``_launch.specializations``)."""
    pattern_cfgs = (*GEMV_CONFIGS.values(), *DOT_CONFIGS.values())
    for kname, kern in (("fwd", _nm_fwd_kernel), ("bwd_dx", _nm_bwd_dx_kernel)):
        for cfg in (*CONFIGS, INTERPRET_CONFIG):
            # The interpreter config only runs on CPU; compiling it in fp16 catches code the
            # interpreter accepts and the GPU compiler rejects.
            for dtype in (torch.float16,) if cfg is INTERPRET_CONFIG else _config_dtypes(cfg):
                ptr = _PTR[dtype]
                precision = "ieee" if dtype == torch.float32 and not cfg.USE_DOT else "tf32"
                patterns = _PATTERNS if (cfg in pattern_cfgs and dtype == torch.float16) else ((2, 4),)
                for (n, m), use_ws in [(p, False) for p in patterns] + [((2, 4), True)]:
                    out_ptr = "*fp32" if use_ws else ptr
                    if kname == "fwd":
                        sig = {"p_x": ptr, "p_val": ptr, "p_idx": "*i32", "p_b": ptr, "p_y": out_ptr}
                        names = ("M", "N", "K", "G", "SPLIT", "stride_xm", "stride_xk", "stride_vr",
                                 "stride_ir", "stride_ym", "stride_ys")
                        flags = {"HAS_BIAS": not use_ws}
                        unit = ("stride_xk",)
                    else:
                        sig = {"p_dy": ptr, "p_val": ptr, "p_idx": "*i32", "p_dx": out_ptr}
                        names = ("M", "N", "K", "G", "SPLIT", "stride_dym", "stride_dyn", "stride_vr",
                                 "stride_ir", "stride_dxm", "stride_dxs")
                        flags = {}
                        unit = ("stride_dyn",)
                    sig.update(dict.fromkeys(names, "i32"))
                    if not use_ws:
                        unit += ("SPLIT",)
                    if cfg.BM == 1:
                        unit += ("M",)  # decode: Triton folds M == 1 into the code
                    const = {**flags, "USE_WS": use_ws, "USE_DOT": cfg.USE_DOT, "BM": cfg.BM, "BN": cfg.BN,
                             "BK": cfg.BK, "GROUP_M": cfg.GROUP_M, "NN": n, "MM": m, "BITS": index_bits(m),
                             "PRECISION": precision}
                    label = (f"nm_matmul.{kname} {config_label(cfg)} {str(dtype)[6:]} {n}:{m}"
                             f"{' ws' if use_ws else ''}")
                    yield from specializations(label, kern, sig, const,
                                               {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, unit)
    yield from _space_variants()
    for dtype, ptr in _PTR.items():
        for n, m in _PATTERNS if dtype == torch.float16 else ((2, 4),):
            sig = {"p_val": ptr, "p_idx": "*i32", "p_w": ptr}
            sig.update(dict.fromkeys(("N", "K", "G", "stride_vr", "stride_ir", "stride_wr"), "i32"))
            yield from specializations(f"nm_matmul.decompress {str(dtype)[6:]} {n}:{m}", _nm_decompress_kernel,
                                       sig, {"BN": 32, "BK": 128, "NN": n, "MM": m, "BITS": index_bits(m)},
                                       {"num_warps": 4})
        for has_bias in (False, True):
            sig = {"p_ws": "*fp32", "p_b": ptr, "p_y": ptr, "MN": "i32", "N": "i32", "SPLIT": "i32"}
            yield from specializations(f"nm_matmul.split_reduce {str(dtype)[6:]} bias={has_bias}",
                                       _split_reduce_kernel, sig, {"HAS_BIAS": has_bias, "BLOCK": 1024},
                                       {"num_warps": 4})
