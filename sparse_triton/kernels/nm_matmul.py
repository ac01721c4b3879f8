"""N:M weight-sparse matmul: ``Y = X @ W^T (+ bias)`` and ``dX = dY @ W`` with ``W`` compressed.

``W[N, K]`` is N:M sparse along K and stored as ``values[N, S]`` + bit-packed ``indices[N, Wd]`` (layout
in ``sparse_triton.formats.nm``). Both kernels rebuild dense W tiles in registers from the compressed
form, so a weight tile costs ``n/m`` of its dense bytes plus the index bits: at small M (decode) the op
is bound by weight bandwidth and that ratio is the speedup.

Two inner products, chosen per config:

* ``USE_DOT``: ``tl.dot`` on tensor cores (M >= 16 per tile, prefill and training shapes);
* otherwise a broadcast multiply + ``tl.sum`` (GEMV style, M <= 8): the rebuilt tile never leaves
  registers and tiny M wastes no tensor-core padding.

Both split the reduction across ``SPLIT`` programs when the output alone gives too few programs to
fill the GPU; partial sums go to an fp32 workspace that ``_split_reduce_kernel`` folds (deterministic,
no atomics), adding the bias and casting on the way.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

from ..formats.nm import index_bits
from ._compile import specializations

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
def _nm_fwd_kernel(p_x, p_val, p_idx, p_b, p_y, M, N, K, G,
                   stride_xm, stride_xk, stride_vr, stride_ir, stride_ym, stride_ys,
                   HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, USE_DOT: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                   NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr, PRECISION: tl.constexpr):
    """``Y[M, N] = X[M, K] @ W[N, K]^T (+ bias)``, W rebuilt from its N:M compressed form.

    p_x: ``[M, K]`` any strides; p_val ``[N, S]`` / p_idx ``[N, Wd]``: the compressed weight, NN:MM along
    K; p_b: bias ``[N]`` (if HAS_BIAS); p_y: ``[M, N]`` with row stride ``stride_ym`` when SPLIT == 1,
    else the fp32 workspace ``[SPLIT, M, N]`` (split stride ``stride_ys``). Grid: (row tiles x column
    tiles, SPLIT).
    """
    BG: tl.constexpr = BK // MM
    i_m, i_n = _tile_ids(M, N, BM, BN, GROUP_M)
    i_s = tl.program_id(1)
    # int64 row offsets: M * N and M * K pass 2^31 at training sizes (131k tokens x 28672).
    o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N
    # Split-K: split i_s reduces a contiguous run of K tiles.
    n_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(n_tiles, SPLIT)
    t_lo = i_s * per_split
    t_hi = min(t_lo + per_split, n_tiles)
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
        b_x = tl.load(p_x + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk,
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
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(p_b + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        tl.store(p_y + o_m[:, None] * stride_ym + o_n[None, :], acc.to(p_y.dtype.element_ty), mask=m_y)
    else:
        tl.store(p_y + i_s.to(tl.int64) * stride_ys + o_m[:, None] * stride_ym + o_n[None, :], acc, mask=m_y)


@triton.jit
def _nm_bwd_dx_kernel(p_dy, p_val, p_idx, p_dx, M, N, K, G,
                      stride_dym, stride_dyn, stride_vr, stride_ir, stride_dxm, stride_dxs,
                      SPLIT: tl.constexpr, USE_DOT: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                      NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr, PRECISION: tl.constexpr):
    """``dX[M, K] = dY[M, N] @ W[N, K]``, W rebuilt from its N:M compressed form.

    p_dy: ``[M, N]`` any strides; p_val ``[N, S]`` / p_idx ``[N, Wd]``: the compressed weight; p_dx:
    ``[M, K]`` with row stride ``stride_dxm`` when SPLIT == 1, else the fp32 workspace ``[SPLIT, M, K]``.
    Each program owns BK output columns (BK / MM whole groups) and walks the reduction over N.
    """
    BG: tl.constexpr = BK // MM
    i_m, i_k = _tile_ids(M, K, BM, BK, GROUP_M)
    i_s = tl.program_id(1)
    o_m = i_m.to(tl.int64) * BM + tl.arange(0, BM)  # int64: M * K may pass 2^31
    o_k = i_k * BK + tl.arange(0, BK)
    m_m = o_m < M
    n_tiles = tl.cdiv(N, BN)
    per_split = tl.cdiv(n_tiles, SPLIT)
    t_lo = i_s * per_split
    t_hi = min(t_lo + per_split, n_tiles)
    if USE_DOT:
        acc = tl.zeros([BM, BK], dtype=tl.float32)
    elif BM == 1:
        acc2 = tl.zeros([BN, BK], dtype=tl.float32)
    else:
        acc3 = tl.zeros([BM, BN, BK], dtype=tl.float32)
    for t in range(t_lo, t_hi):
        o_n = t * BN + tl.arange(0, BN)
        m_n = o_n < N
        b_dy = tl.load(p_dy + o_m[:, None] * stride_dym + o_n[None, :] * stride_dyn,
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
    if SPLIT == 1:
        tl.store(p_dx + o_m[:, None] * stride_dxm + o_k[None, :], acc.to(p_dx.dtype.element_ty), mask=m_dx)
    else:
        tl.store(p_dx + i_s.to(tl.int64) * stride_dxs + o_m[:, None] * stride_dxm + o_k[None, :], acc, mask=m_dx)


@triton.jit
def _split_reduce_kernel(p_ws, p_b, p_y, MN, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``y[i] = sum_s ws[s, i] (+ bias[i % N])`` over the flat ``[M * N]`` output.

    p_ws: fp32 workspace ``[SPLIT, M * N]``; p_b: bias ``[N]``; p_y: contiguous output ``[M * N]``.
    """
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(p_ws + s * MN + o, mask=m, other=0.0)
    if HAS_BIAS:
        acc += tl.load(p_b + o % N, mask=m, other=0.0).to(tl.float32)
    tl.store(p_y + o, acc.to(p_y.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class NMMatmulConfig:
    """Launch config of ``_nm_fwd_kernel`` / ``_nm_bwd_dx_kernel``.

    BM x BN x BK tiles (BK: the reduction tile for the forward, the output-column tile for dX; always
    a multiple of m), SPLIT reduction splits, USE_DOT tensor cores vs broadcast-sum.
    """

    BM: int
    BN: int
    BK: int
    SPLIT: int = 1
    USE_DOT: bool = True
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 2

    def launch_kwargs(self) -> dict:
        kw = asdict(self)
        return kw


# Every config the heuristics below can return (the compile check builds each one for sm_90).
# SPLIT is a launch-size choice, not a code-shape one, except 1 vs > 1; both are listed.
CONFIGS: tuple[NMMatmulConfig, ...] = (
    # decode / GEMV (M <= 8)
    NMMatmulConfig(BM=1, BN=32, BK=256, SPLIT=4, USE_DOT=False, num_warps=4),
    NMMatmulConfig(BM=2, BN=32, BK=256, SPLIT=4, USE_DOT=False, num_warps=4),
    NMMatmulConfig(BM=4, BN=32, BK=128, SPLIT=4, USE_DOT=False, num_warps=4),
    NMMatmulConfig(BM=8, BN=32, BK=64, SPLIT=4, USE_DOT=False, num_warps=4),
    NMMatmulConfig(BM=1, BN=32, BK=256, SPLIT=1, USE_DOT=False, num_warps=4),
    # small M on tensor cores
    NMMatmulConfig(BM=16, BN=64, BK=128, SPLIT=4, num_warps=4),
    NMMatmulConfig(BM=32, BN=64, BK=128, SPLIT=2, num_warps=4),
    NMMatmulConfig(BM=64, BN=64, BK=64, SPLIT=1, num_warps=4, num_stages=3),
    # large M
    NMMatmulConfig(BM=128, BN=128, BK=64, SPLIT=1, num_warps=8, num_stages=3),
    NMMatmulConfig(BM=128, BN=64, BK=64, SPLIT=1, num_warps=4, num_stages=3),
)

# The single config used under TRITON_INTERPRET=1: large tiles keep the interpreter fast.
INTERPRET_CONFIG = NMMatmulConfig(BM=32, BN=64, BK=128, SPLIT=1, USE_DOT=True)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pick_split(out_tiles: int, red_tiles: int, sms: int) -> int:
    """Reduction splits so that about 4 programs per SM are in flight, capped by the work."""
    if out_tiles >= 2 * sms:
        return 1
    split = 1
    while split < 16 and out_tiles * split < 4 * sms and red_tiles >= 2 * split * 2:
        split *= 2
    return split


def heuristic_config(M: int, N_out: int, K_red: int, device: torch.device) -> NMMatmulConfig:
    """Config for an output ``[M, N_out]`` with reduction length ``K_red`` (no tuning yet)."""
    if _interpreting() or device.type != "cuda":
        return INTERPRET_CONFIG
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if M <= 8:
        base = next(c for c in CONFIGS if not c.USE_DOT and c.BM >= M and c.SPLIT > 1)
    elif M <= 16:
        base = CONFIGS[5]
    elif M <= 32:
        base = CONFIGS[6]
    elif M <= 256:
        base = CONFIGS[7]
    else:
        base = CONFIGS[8]
    out_tiles = triton.cdiv(M, base.BM) * triton.cdiv(N_out, base.BN)
    split = _pick_split(out_tiles, triton.cdiv(K_red, base.BK), sms)
    return NMMatmulConfig(**{**asdict(base), "SPLIT": split})


def _dx_config(M: int, K: int, N_red: int, device: torch.device) -> NMMatmulConfig:
    # dX tiles its output over K with BK columns and reduces over N with BN rows, so the roles of
    # BN and BK swap against the forward; the same table serves.
    return heuristic_config(M, K, N_red, device)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# --------------------------------------------------------------------------------------------------
# launchers


def _check_launch(a: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, where: str) -> None:
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{where}: kernels support float16, bfloat16 and float32, got {a.dtype}")
    if values.dtype != a.dtype:
        raise TypeError(f"{where}: dtype mismatch, input is {a.dtype} but values are {values.dtype}")
    if values.stride(-1) != 1 or indices.stride(-1) != 1:
        raise ValueError(f"{where}: values and indices must have a unit stride along their last dim")


def _output(out: torch.Tensor | None, shape: tuple[int, int], like: torch.Tensor, where: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"{where}: out must be a contiguous {like.dtype} tensor of shape {shape} on {like.device}")
    return out


def _finish_split(ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, N: int) -> None:
    MN = out.numel()
    BLOCK = 1024
    _split_reduce_kernel[(triton.cdiv(MN, BLOCK),)](
        ws, bias if bias is not None else ws, out, MN, N, ws.shape[0],
        HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=4)


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
    G = triton.cdiv(K, m)
    y = _output(out, (M, N), x, "nm_matmul_fwd")
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.copy_(bias.expand(M, N)) if bias is not None else y.zero_()
    cfg = config or heuristic_config(M, N, K, x.device)
    if cfg.BK % m:
        raise ValueError(f"nm_matmul_fwd: config BK={cfg.BK} is not a multiple of m={m}")
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN), cfg.SPLIT)
    out = y if cfg.SPLIT == 1 else torch.empty((cfg.SPLIT, M, N), dtype=torch.float32, device=x.device)
    _nm_fwd_kernel[grid](
        x, values, indices, bias if bias is not None else values, out, M, N, K, G,
        x.stride(0), x.stride(1), values.stride(0), indices.stride(0), N, M * N,
        HAS_BIAS=bias is not None, SPLIT=cfg.SPLIT, USE_DOT=cfg.USE_DOT,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
        NN=n, MM=m, BITS=index_bits(m), PRECISION=_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.SPLIT > 1:
        _finish_split(out, bias, y, N)
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
    G = triton.cdiv(K, m)
    dx = _output(out, (M, K), dy, "nm_matmul_bwd_dx")
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()
    cfg = config or _dx_config(M, K, N, dy.device)
    if cfg.BK % m:
        raise ValueError(f"nm_matmul_bwd_dx: config BK={cfg.BK} is not a multiple of m={m}")
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(K, cfg.BK), cfg.SPLIT)
    out = dx if cfg.SPLIT == 1 else torch.empty((cfg.SPLIT, M, K), dtype=torch.float32, device=dy.device)
    _nm_bwd_dx_kernel[grid](
        dy, values, indices, out, M, N, K, G,
        dy.stride(0), dy.stride(1), values.stride(0), indices.stride(0), K, M * K,
        SPLIT=cfg.SPLIT, USE_DOT=cfg.USE_DOT,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
        NN=n, MM=m, BITS=index_bits(m), PRECISION=_precision(dy.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.SPLIT > 1:
        _finish_split(out, None, dx, K)
    return dx


# --------------------------------------------------------------------------------------------------
# ahead-of-time compile check (tests/compile_sm90.py)

_PATTERNS = ((2, 4), (1, 4), (2, 8), (4, 8), (3, 8), (8, 16), (1, 2))
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def compile_variants():
    """Yield ``(label, kernel, signature, constexprs, options, attrs)`` for every config x dtype, and every
    pattern on one dot and one broadcast-sum config, for both kernels, each as a ragged and an aligned
    launch (see ``_compile.specializations``)."""
    pattern_cfgs = {CONFIGS[0], CONFIGS[7]}
    for kname, kern in (("fwd", _nm_fwd_kernel), ("bwd_dx", _nm_bwd_dx_kernel)):
        for cfg in (*CONFIGS, INTERPRET_CONFIG):
            for dtype, ptr in _PTR.items():
                patterns = _PATTERNS if (cfg in pattern_cfgs and dtype == torch.float16) else ((2, 4),)
                for n, m in patterns:
                    out_ptr = ptr if cfg.SPLIT == 1 else "*fp32"
                    if kname == "fwd":
                        sig = {"p_x": ptr, "p_val": ptr, "p_idx": "*i32", "p_b": ptr, "p_y": out_ptr}
                        names = ("M", "N", "K", "G", "stride_xm", "stride_xk", "stride_vr", "stride_ir",
                                 "stride_ym", "stride_ys")
                        flags = {"HAS_BIAS": True}
                    else:
                        sig = {"p_dy": ptr, "p_val": ptr, "p_idx": "*i32", "p_dx": out_ptr}
                        names = ("M", "N", "K", "G", "stride_dym", "stride_dyn", "stride_vr", "stride_ir",
                                 "stride_dxm", "stride_dxs")
                        flags = {}
                    sig.update(dict.fromkeys(names, "i32"))
                    const = {**flags, "SPLIT": cfg.SPLIT, "USE_DOT": cfg.USE_DOT, "BM": cfg.BM, "BN": cfg.BN,
                             "BK": cfg.BK, "GROUP_M": cfg.GROUP_M, "NN": n, "MM": m, "BITS": index_bits(m),
                             "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
                    label = f"nm_matmul.{kname} {cfg} {str(dtype)[6:]} {n}:{m}"
                    unit = ("stride_xk",) if kname == "fwd" else ("stride_dyn",)
                    yield from specializations(label, kern, sig, const,
                                               {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, unit)
    for dtype, ptr in _PTR.items():
        for has_bias in (False, True):
            sig = {"p_ws": "*fp32", "p_b": ptr, "p_y": ptr, "MN": "i32", "N": "i32", "SPLIT": "i32"}
            yield from specializations(f"nm_matmul.split_reduce {str(dtype)[6:]} bias={has_bias}",
                                       _split_reduce_kernel, sig, {"HAS_BIAS": has_bias, "BLOCK": 1024},
                                       {"num_warps": 4})
