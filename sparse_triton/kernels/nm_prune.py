"""Fused N:M prune + compress: dense ``W[R, K]`` -> ``values[R, S]`` + bit-packed ``indices[R, Wd]``;
and its fixed-mask sibling, the gather of a dense tensor at given kept positions.

One read of the dense weight and one write of the compressed form (layout and selection rule in
``sparse_triton.formats.nm``: the ``n`` largest magnitudes per group, ties to the lower index, NaN
above everything). It runs every training step for dynamic-mask methods, so it stays a single pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._env import TRITON_INTERPRET as INTERPRET
from ..formats.nm import index_bits, indices_per_word
from ._launch import on_device, specializations


@triton.jit
def _nm_prune_groups_kernel(p_w, p_val, p_idx, R, K, G, Wd,
                            stride_wr, stride_wk, stride_vr, stride_ir,
                            NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr,
                            BR: tl.constexpr, BG: tl.constexpr):
    """Compress rows ``[i_r * BR, +BR)`` x groups ``[i_g * BG, +BG)`` with each group in one thread.

    For patterns whose ``n`` divides the positions per word (every power-of-two n: 2:4, 1:4, 2:8, 4:8,
    8:16, ...), so a group's positions never straddle two words. The group's ``MM`` members are held as
    separate ``[BR, BG]`` tensors: ranking, slot assignment and packing are plain per-thread
    arithmetic. Pointers and layouts as in ``_nm_prune_kernel``; BG is a multiple of the groups per word.
    """
    PER: tl.constexpr = 32 // BITS
    GPW: tl.constexpr = PER // NN  # groups per index word (NN divides PER)
    i_r = tl.program_id(0)
    i_g = tl.program_id(1)
    o_r = i_r.to(tl.int64) * BR + tl.arange(0, BR)
    o_g = i_g * BG + tl.arange(0, BG)
    m_r = o_r < R
    m_g = m_r[:, None] & (o_g < G)[None, :]  # [BR, BG]
    p_row = p_w + o_r[:, None] * stride_wr
    xs = ()
    keys = ()
    for e in tl.static_range(MM):
        o_k = o_g * MM + e
        m_e = m_g & (o_k < K)[None, :]
        b_x = tl.load(p_row + o_k.to(tl.int64)[None, :] * stride_wk, mask=m_e, other=0.0)
        xs = xs + (b_x,)
        keys = keys + (tl.where(m_e, tl.abs(b_x.to(tl.float32)).to(tl.int32, bitcast=True), -1),)
    # rank of each member: how many members beat it (larger key, or equal key at a lower position)
    kept = ()
    for e in tl.static_range(MM):
        rank = tl.zeros([BR, BG], dtype=tl.int32)
        for e2 in tl.static_range(MM):
            if e2 < e:
                rank += (keys[e2] >= keys[e]).to(tl.int32)
            elif e2 > e:
                rank += (keys[e2] > keys[e]).to(tl.int32)
        kept = kept + ((rank < NN) & m_g,)
    # kept members in position order fill the slots
    o_s = tl.zeros([BR, BG], dtype=tl.int32)
    code = tl.zeros([BR, BG], dtype=tl.int32)
    p_vrow = p_val + o_r[:, None] * stride_vr + (o_g * NN)[None, :]
    for e in tl.static_range(MM):
        tl.store(p_vrow + o_s, xs[e], mask=kept[e])
        code += tl.where(kept[e], e << (o_s * BITS), 0)
        o_s += kept[e].to(tl.int32)
    # a group's slots are NN * BITS contiguous bits of one word; GPW groups share a word
    o_gw = (tl.arange(0, BG) % GPW) * (NN * BITS)
    words = tl.sum(tl.reshape(code << o_gw[None, :], [BR, BG // GPW, GPW]), axis=2)  # [BR, BG // GPW]
    o_w = i_g * (BG // GPW) + tl.arange(0, BG // GPW)
    tl.store(p_idx + o_r[:, None] * stride_ir + o_w[None, :], words, mask=m_r[:, None] & (o_w < Wd)[None, :])


@triton.jit
def _nm_prune_kernel(p_w, p_val, p_idx, R, K, G, Wd,
                     stride_wr, stride_wk, stride_vr, stride_ir,
                     NN: tl.constexpr, MM: tl.constexpr, MP: tl.constexpr, BITS: tl.constexpr,
                     BR: tl.constexpr, BG: tl.constexpr, BWP: tl.constexpr):
    """Compress rows ``[i_r * BR, +BR)`` x groups ``[i_g * BG, +BG)``, any pattern (the general path,
    used when ``n`` does not divide the positions per word, e.g. 3:4, 3:8, 15:16).

    p_w: dense ``[R, K]`` (any strides); p_val: values ``[R, G * NN]`` (row stride ``stride_vr``);
    p_idx: int32 words ``[R, Wd]`` (row stride ``stride_ir``). ``BG * NN`` is a multiple of the
    positions per word, so every program writes whole words and no two programs share one.
    MP is MM rounded up to a power of two; BWP the words per program rounded up likewise.
    """
    PER: tl.constexpr = 32 // BITS
    BW: tl.constexpr = BG * NN // PER
    i_r = tl.program_id(0)
    i_g = tl.program_id(1)
    o_r = i_r.to(tl.int64) * BR + tl.arange(0, BR)  # int64: R * K may pass 2^31
    o_g = i_g * BG + tl.arange(0, BG)
    o_e = tl.arange(0, MP)
    m_r = o_r < R
    o_k = (o_g[:, None] * MM + o_e[None, :]).to(tl.int64)  # [BG, MP]
    m_k = (o_e < MM)[None, :] & (o_k < K)
    m_w = m_r[:, None, None] & m_k[None, :, :]
    b_w = tl.load(p_w + o_r[:, None, None] * stride_wr + o_k[None, :, :] * stride_wk,
                  mask=m_w, other=0.0)  # [BR, BG, MP]
    # Magnitudes as fp32 bit patterns: integer order == magnitude order, NaN above inf, -0 == 0.
    # Padding (past K, or past MM inside a rounded-up group) gets -1 and loses to every real element.
    b_key = tl.where(m_w, tl.abs(b_w.to(tl.float32)).to(tl.int32, bitcast=True), -1)
    # rank = how many group members beat this one (larger key, or equal key at a lower position).
    k_me = b_key[:, :, :, None]
    k_other = b_key[:, :, None, :]
    lower = (o_e[None, :] < o_e[:, None])[None, None, :, :]  # other position < my position
    beats = (k_other > k_me) | ((k_other == k_me) & lower)  # [BR, BG, MP, MP]
    rank = tl.sum(beats.to(tl.int32), axis=3)  # [BR, BG, MP]
    kept = (rank < NN) & (o_e < MM)[None, None, :] & (o_g < G)[None, :, None]
    b_kept = kept.to(tl.int32)
    slot = tl.cumsum(b_kept, axis=2) - b_kept  # kept elements before this one in its group
    o_j = o_g[None, :, None] * NN + slot  # slot in the row
    tl.store(p_val + o_r[:, None, None] * stride_vr + o_j, b_w, mask=kept & m_r[:, None, None])
    # Pack positions: slot j goes to word j // PER at bit (j % PER) * BITS. Contributions to one
    # word are disjoint bit fields, so their sum is their bitwise or (int32 wrap-around included).
    o_jl = o_j - i_g * BG * NN  # slot within this program's whole words
    b_part = tl.where(kept, o_e[None, None, :] << ((o_jl % PER) * BITS), 0)
    b_wl = tl.where(kept, o_jl // PER, -1)
    b_part = tl.reshape(b_part, [BR, BG * MP])
    b_wl = tl.reshape(b_wl, [BR, BG * MP])
    o_w = tl.arange(0, BWP)
    b_words = tl.sum(tl.where(b_wl[:, None, :] == o_w[None, :, None], b_part[:, None, :], 0), axis=2)
    o_wg = i_g * BW + o_w
    tl.store(p_idx + o_r[:, None] * stride_ir + o_wg[None, :], b_words,
             mask=m_r[:, None] & ((o_w < BW) & (o_wg < Wd))[None, :])


@triton.jit
def _nm_gather_kernel(p_d, p_idx, p_val, R, K, S,
                      stride_dr, stride_dk, stride_ir, stride_vr,
                      NN: tl.constexpr, MM: tl.constexpr, BITS: tl.constexpr,
                      BR: tl.constexpr, BS: tl.constexpr):
    """``values[r, j] = dense[r, (j // NN) * MM + position_j]`` for rows ``[i_r * BR, +BR)`` and slots
    ``[i_s * BS, +BS)``: a dense tensor read at a compressed tensor's kept positions.

    p_d: dense ``[R, K]`` (any strides); p_idx: int32 words ``[R, Wd]`` (row stride ``stride_ir``);
    p_val: ``[R, S]`` (row stride ``stride_vr``). BS is a multiple of the positions per word, so each
    program unpacks whole words it loads once. Positions past K (padding) read 0.
    """
    PER: tl.constexpr = 32 // BITS
    BW: tl.constexpr = BS // PER
    i_r = tl.program_id(0)
    i_s = tl.program_id(1)
    o_r = i_r.to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < R
    o_w = i_s * BW + tl.arange(0, BW)
    b_word = tl.load(p_idx + o_r[:, None] * stride_ir + o_w[None, :],
                     mask=m_r[:, None] & (o_w * PER < S)[None, :], other=0)  # [BR, BW]
    o_sh = tl.arange(0, PER) * BITS
    b_pos = tl.reshape((b_word[:, :, None] >> o_sh[None, None, :]) & ((1 << BITS) - 1), [BR, BS])
    o_s = i_s * BS + tl.arange(0, BS)
    o_k = (o_s // NN * MM)[None, :] + b_pos  # [BR, BS] dense column of each slot
    m_s = m_r[:, None] & (o_s < S)[None, :]
    b_v = tl.load(p_d + o_r[:, None] * stride_dr + o_k.to(tl.int64) * stride_dk, mask=m_s & (o_k < K), other=0.0)
    tl.store(p_val + o_r[:, None] * stride_vr + o_s[None, :], b_v, mask=m_s)


@dataclass(frozen=True)
class NMPruneConfig:
    """Rows x groups per program, and which kernel: GROUPS (one group per thread, n divides the
    positions per word) or the general one (a [BR, BG, MP, MP] rank tile; BG is one word's groups)."""

    BR: int
    BG: int
    GROUPS: bool
    num_warps: int = 4


def heuristic_config(n: int, m: int) -> NMPruneConfig:
    """A config per pattern: about 2k elements per program in-thread, a ~4k-element rank tile otherwise."""
    if indices_per_word(m) % n == 0:
        if INTERPRET:  # the interpreter pays per program, not per element: few, large programs
            return NMPruneConfig(BR=32, BG=128, GROUPS=True)
        return NMPruneConfig(BR=16 if m <= 4 else 4, BG=32, GROUPS=True)
    MP = triton.next_power_of_2(m)
    BG = indices_per_word(m)  # whole words whatever n is
    fit = max(1, min(32, 4096 // (BG * MP * MP)))
    return NMPruneConfig(BR=1 << (fit.bit_length() - 1), BG=BG, GROUPS=False)  # largest power of two <= fit


def prune_space(n: int, m: int) -> list[NMPruneConfig]:
    """Prune configs worth timing for an n:m pattern (the heuristic's first): for the in-thread kernel,
    1k to 2k elements per program at 4 warps, 2k to 8k at 8; for the rank-tile kernel, one to four
    times the heuristic's rows."""
    first = heuristic_config(n, m)
    out = [first]
    if first.GROUPS:
        for br in (2, 4, 8, 16, 32):
            for bg in (32, 64, 128):
                for warps in (4, 8):
                    elems = br * bg * m
                    # (4k elements on 4 warps spills for 1:4 on sm_90)
                    if (warps == 4 and 1024 <= elems <= 2048) or (warps == 8 and 2048 <= elems <= 8192):
                        out.append(NMPruneConfig(BR=br, BG=bg, GROUPS=True, num_warps=warps))
    else:
        for scale, warps in ((2, 4), (4, 8), (1, 8)):
            out.append(NMPruneConfig(BR=first.BR * scale, BG=first.BG, GROUPS=False, num_warps=warps))
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class NMGatherConfig:
    """Rows x slots per program of the gather kernel."""

    BR: int = 16
    BS: int = 128
    num_warps: int = 4


GATHER_SPACE = (NMGatherConfig(), NMGatherConfig(8, 256), NMGatherConfig(32, 64), NMGatherConfig(16, 256, 8),
                NMGatherConfig(4, 512, 4), NMGatherConfig(32, 128, 8))


def nm_prune_compress(w: torch.Tensor, n: int, m: int,
                      config: NMPruneConfig | None = None,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress ``w[R, K]`` along its last dim: ``values[R, S]`` (``w.dtype``), ``indices[R, Wd]`` (int32).

    ``S = ceil(K / m) * n``, ``Wd = ceil(S / P)``. ``w`` may have any strides; fp16, bf16, fp32.
    ``out=(values, indices)`` writes into existing contiguous tensors (e.g. a module's own storage).
    """
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"nm_prune_compress: kernels support float16, bfloat16 and float32, got {w.dtype}")
    R, K = w.shape
    G = triton.cdiv(K, m)
    S = G * n
    Wd = triton.cdiv(S, indices_per_word(m))
    if out is None:
        values = torch.empty((R, S), dtype=w.dtype, device=w.device)
        indices = torch.empty((R, Wd), dtype=torch.int32, device=w.device)
    else:
        values, indices = out
        for name, t, shape, dt in (("values", values, (R, S), w.dtype), ("indices", indices, (R, Wd), torch.int32)):
            if tuple(t.shape) != shape or t.dtype != dt or t.device != w.device or not t.is_contiguous():
                raise ValueError(f"nm_prune_compress: out {name} must be a contiguous {dt} tensor of shape "
                                 f"{shape} on {w.device}")
    if R == 0 or K == 0:
        return values, indices
    cfg = config or heuristic_config(n, m)
    grid = (triton.cdiv(R, cfg.BR), triton.cdiv(G, cfg.BG))
    args = (w, values, indices, R, K, G, Wd, w.stride(0), w.stride(1), values.stride(0), indices.stride(0))
    with on_device(w):
        if cfg.GROUPS:
            _nm_prune_groups_kernel[grid](*args, NN=n, MM=m, BITS=index_bits(m), BR=cfg.BR, BG=cfg.BG,
                                          num_warps=cfg.num_warps)
        else:
            BW = cfg.BG * n // indices_per_word(m)
            _nm_prune_kernel[grid](*args, NN=n, MM=m, MP=triton.next_power_of_2(m), BITS=index_bits(m),
                                   BR=cfg.BR, BG=cfg.BG, BWP=triton.next_power_of_2(BW), num_warps=cfg.num_warps)
    return values, indices


def nm_gather(dense: torch.Tensor, indices: torch.Tensor, n: int, m: int,
              out: torch.Tensor | None = None, config: NMGatherConfig | None = None) -> torch.Tensor:
    """Read ``dense[R, K]`` at the kept positions of an n:m compressed tensor with packed ``indices``.

    Returns ``values[R, S]`` (``dense.dtype``, ``S = ceil(K / m) * n``), the layout of
    ``NMTensor.values``: the gradient of compressed values is the dense gradient gathered this way.
    """
    if dense.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"nm_gather: kernels support float16, bfloat16 and float32, got {dense.dtype}")
    R, K = dense.shape
    S = triton.cdiv(K, m) * n
    if out is None:
        out = torch.empty((R, S), dtype=dense.dtype, device=dense.device)
    elif (tuple(out.shape) != (R, S) or out.dtype != dense.dtype or out.device != dense.device
          or not out.is_contiguous()):
        raise ValueError(
            f"nm_gather: out must be a contiguous {dense.dtype} tensor of shape {(R, S)} on {dense.device}")
    if R == 0 or S == 0:
        return out
    cfg = config or NMGatherConfig()
    grid = (triton.cdiv(R, cfg.BR), triton.cdiv(S, cfg.BS))
    with on_device(dense):
        _nm_gather_kernel[grid](
            dense, indices, out, R, K, S, dense.stride(0), dense.stride(1), indices.stride(0), out.stride(0),
            NN=n, MM=m, BITS=index_bits(m), BR=cfg.BR, BS=cfg.BS, num_warps=cfg.num_warps)
    return out


def compile_variants():
    """Yield ``(label, kernel, signature, constexprs, options, attrs)`` for the prune and the gather
    kernel: every m in 2..16 at n = 1, m // 2 and m - 1 in fp16, and 2:4, 2:8, 8:16 in bf16 and fp32,
    each as a ragged and an aligned launch."""
    ptrs = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    cases = [(torch.float16, n, m) for m in range(2, 17) for n in sorted({1, m // 2, m - 1})]
    cases += [(dt, n, m) for dt in (torch.bfloat16, torch.float32) for n, m in ((2, 4), (2, 8), (8, 16))]
    for dtype, n, m in cases:
        ptr = ptrs[dtype]
        sig = {"p_w": ptr, "p_val": ptr, "p_idx": "*i32"}
        sig.update(dict.fromkeys(("R", "K", "G", "Wd", "stride_wr", "stride_wk", "stride_vr", "stride_ir"), "i32"))
        cfg = heuristic_config(n, m)
        const = {"NN": n, "MM": m, "BITS": index_bits(m), "BR": cfg.BR, "BG": cfg.BG}
        if cfg.GROUPS:
            kern = _nm_prune_groups_kernel
        else:
            kern = _nm_prune_kernel
            const.update(MP=triton.next_power_of_2(m), BWP=triton.next_power_of_2(cfg.BG * n // indices_per_word(m)))
        label = f"nm_prune{'.groups' if cfg.GROUPS else ''} {str(dtype)[6:]} {n}:{m} BR={cfg.BR}"
        yield from specializations(label, kern, sig, const, {"num_warps": cfg.num_warps}, unit=("stride_wk",))
    for n, m in ((2, 4), (1, 4), (2, 8), (8, 16), (3, 8), (3, 4)):
        sig = {"p_w": "*fp16", "p_val": "*fp16", "p_idx": "*i32"}
        sig.update(dict.fromkeys(("R", "K", "G", "Wd", "stride_wr", "stride_wk", "stride_vr", "stride_ir"), "i32"))
        for cfg in prune_space(n, m)[1:]:
            const = {"NN": n, "MM": m, "BITS": index_bits(m), "BR": cfg.BR, "BG": cfg.BG}
            if cfg.GROUPS:
                kern = _nm_prune_groups_kernel
            else:
                kern = _nm_prune_kernel
                const.update(MP=triton.next_power_of_2(m),
                             BWP=triton.next_power_of_2(cfg.BG * n // indices_per_word(m)))
            label = f"nm_prune space {n}:{m} BR={cfg.BR} BG={cfg.BG} w{cfg.num_warps}"
            *_, aligned = specializations(label, kern, sig, const, {"num_warps": cfg.num_warps}, unit=("stride_wk",))
            yield aligned
    for cfg in GATHER_SPACE[1:]:
        sig = {"p_d": "*fp16", "p_idx": "*i32", "p_val": "*fp16"}
        sig.update(dict.fromkeys(("R", "K", "S", "stride_dr", "stride_dk", "stride_ir", "stride_vr"), "i32"))
        const = {"NN": 2, "MM": 4, "BITS": index_bits(4), "BR": cfg.BR, "BS": cfg.BS}
        *_, aligned = specializations(f"nm_gather space BR={cfg.BR} BS={cfg.BS} w{cfg.num_warps}", _nm_gather_kernel,
                                      sig, const, {"num_warps": cfg.num_warps}, unit=("stride_dk",))
        yield aligned
    for dtype, n, m in cases:
        sig = {"p_d": ptrs[dtype], "p_idx": "*i32", "p_val": ptrs[dtype]}
        sig.update(dict.fromkeys(("R", "K", "S", "stride_dr", "stride_dk", "stride_ir", "stride_vr"), "i32"))
        const = {"NN": n, "MM": m, "BITS": index_bits(m), "BR": 16, "BS": 128}
        yield from specializations(f"nm_gather {str(dtype)[6:]} {n}:{m}", _nm_gather_kernel, sig, const,
                                   {"num_warps": 4}, unit=("stride_dk",))
