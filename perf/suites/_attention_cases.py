"""The pure side of the attention perf suite (``perf/suites/attention.py``): no GPU, no timing.

What runs (the command line, ``Settings``, the ordered case list and its memory estimate), the masks it runs
on (random block masks, document ids, the ``BlockMask`` of each kind), the counting behind the row fields
(allowed (q, k) pairs, flops, listed blocks, decode bytes; the conventions are in the suite's docstring), the
slice decoder (rows of a ``BlockMask``'s element mask from its index lists), the fp32 reference and the dense
SDPA / FlexAttention peers' callables, and what is derived from rows (speedups, text tables, the plot spec).
Tested on CPU by ``tests/test_perf_attention.py``; the leading underscore keeps ``perf/gpu_check.sh`` from
running it as a suite.
"""

from __future__ import annotations

import argparse
import inspect
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from perf.harness import CurvesPlot, add_common_args, format_table

HQ, HKV, BLOCK = 32, 8, 128
WINDOW, N_DOCS = 4096, 8
SPARSITIES = (0, 50, 75, 90, 95)
STRUCTURED = ("sliding_window", "document")
DIRECTIONS = ("fwd", "bwd", "fwdbwd")
BWD_FLOP_FACTOR = 2.5
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
QUICK_SHAPES = ((1, 32768), (1, 8192))
FULL_SHAPES = ((1, 32768), (1, 65536), (2, 16384), (4, 8192), (8, 4096))
DECODE_SEQS, DECODE_QUERIES, DECODE_KEEP = (32768, 65536), (1, 4), 0.10
FWD_TOL, BWD_TOL = 1e-2, 2e-2
CHECK_S, CHECK_HQ, CHECK_HKV = 2048, 8, 2  # reduced size of the backward check
# HBM peak in GB/s by GPU name (first match wins); --hbm-gbps overrides.
HBM_PEAK_GBPS = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0), ("GH200", 4000.0),
                 ("H200", 4800.0), ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0),
                 ("B200", 8000.0), ("L40S", 864.0))

IMPL_OURS, IMPL_FLEX = "sparse_triton", "flex"
SDPA_BACKENDS = ("flash", "cudnn")
BAD = ("wrong", "error", "unavailable", "skipped")


# --------------------------------------------------------------------------------------------------
# Cases: what runs (the command line, the settings, the case list)
# --------------------------------------------------------------------------------------------------


def short_len(n: int) -> str:
    """32768 -> '32k'; a length that is not a multiple of 1024 as it is."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


@dataclass(frozen=True)
class Prefill:
    B: int
    S: int
    D: int
    dtype: str
    causal: bool  # the group's dense function (SDPA is_causal, own dense reference) and the op's flag
    mask: str  # dense | causal | random | sliding_window | document
    sparsity: int | None = None  # requested %, random masks only
    Hq: int = HQ
    Hkv: int = HKV
    kind: ClassVar[str] = "prefill"

    @property
    def reference(self) -> bool:
        return self.mask in ("dense", "causal")

    @property
    def group(self) -> tuple[Any, ...]:
        return (self.B, self.S, self.D, self.dtype, self.causal)

    @property
    def family(self) -> str:
        return "random" if self.mask in ("dense", "causal", "random") else self.mask

    @property
    def label(self) -> str:
        s = f" {self.sparsity}%" if self.mask == "random" else ""
        attn = "causal" if self.causal else "non-causal"
        return f"B{self.B} S{short_len(self.S)} D{self.D} {self.dtype} {attn} {self.mask}{s}"


@dataclass(frozen=True)
class Decode:
    B: int
    S: int
    Sq: int
    D: int
    dtype: str
    BK: int
    keep: float = DECODE_KEEP
    Hq: int = HQ
    Hkv: int = HKV
    kind: ClassVar[str] = "decode"

    @property
    def label(self) -> str:
        return (f"decode B{self.B} S{short_len(self.S)} Sq{self.Sq} D{self.D} {self.dtype} BK{self.BK} "
                f"keep{self.keep:.0%}")


@dataclass(frozen=True)
class MaskBuild:
    S: int
    sparsity: int = 90
    Hq: int = HQ
    kind: ClassVar[str] = "mask_build"

    @property
    def label(self) -> str:
        return f"mask-build S{short_len(self.S)} {self.sparsity}% H{self.Hq}"


Case = Prefill | Decode | MaskBuild


def case_seed(base: int, label: str) -> int:
    return (base + zlib.crc32(label.encode())) % 2**31


@dataclass(frozen=True)
class Settings:
    shapes: tuple[tuple[int, int], ...]
    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]
    sparsities: tuple[int, ...]
    masks: tuple[str, ...]
    causal_modes: tuple[bool, ...]
    directions: tuple[str, ...]
    parts: tuple[str, ...]
    decode_batches: tuple[int, ...]
    decode_seqs: tuple[int, ...]
    decode_queries: tuple[int, ...]
    decode_blocks: tuple[int, ...]
    flex: str
    sdpa_backends: tuple[str, ...]
    warmup_ms: float
    rep_ms: float
    min_samples: int
    budget_s: float | None
    mem_gb: float
    hbm_gbps: float | None
    seed: int
    quick: bool

    def prefill_groups(self) -> list[list[Prefill]]:
        groups = []
        for B, S in self.shapes:
            for D in self.head_dims:
                for dtype in self.dtypes:
                    for causal in self.causal_modes:
                        g = [Prefill(B, S, D, dtype, causal, "causal" if causal else "dense", 0)]
                        if "random" in self.masks:  # 90 % first: the headline target
                            order = sorted((s for s in self.sparsities if s > 0), key=lambda s: (s != 90, s))
                            g += [Prefill(B, S, D, dtype, causal, "random", s) for s in order]
                        if "sliding_window" in self.masks and causal:
                            g.append(Prefill(B, S, D, dtype, True, "sliding_window"))
                        if "document" in self.masks and not causal:
                            g.append(Prefill(B, S, D, dtype, False, "document"))
                        groups.append(g)
        return groups

    def cases(self) -> list[Case]:
        """Most important first, so a budget cut drops the least: the first prefill group (32k, not causal,
        by default), the mask builds, the decode cases at the smallest S, the second group, the rest of
        decode, the other groups."""
        groups = self.prefill_groups() if "prefill" in self.parts else []
        builds: list[Case] = []
        if "build" in self.parts:
            seqs = sorted({S for _, S in self.shapes if S >= 32768}) or [max((S for _, S in self.shapes),
                                                                              default=32768)]
            builds = [MaskBuild(S) for S in seqs]
        decodes: list[Decode] = []
        if "decode" in self.parts:
            decodes = [Decode(B, S, Sq, D, dtype, BK) for S in self.decode_seqs for B in self.decode_batches
                       for D in self.head_dims for dtype in self.dtypes for BK in self.decode_blocks
                       for Sq in self.decode_queries]
        first_s = min(self.decode_seqs, default=0)
        dec_first = [c for c in decodes if c.S == first_s]
        dec_rest = [c for c in decodes if c.S != first_s]
        out: list[Case] = []
        out += groups[0] if groups else []
        out += builds + dec_first
        out += groups[1] if len(groups) > 1 else []
        out += dec_rest
        for g in groups[2:]:
            out += g
        return out

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["shapes"] = [{"B": B, "S": S} for B, S in self.shapes]
        d.update(Hq=HQ, Hkv=HKV, block=BLOCK, window=WINDOW, n_docs=N_DOCS, decode_keep=DECODE_KEEP,
                 fwd_tol=FWD_TOL, bwd_tol=BWD_TOL, bwd_check={"S": CHECK_S, "Hq": CHECK_HQ, "Hkv": CHECK_HKV, "B": 1})
        return d


def parse_len(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kK]?)", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"length {text!r}: expected an integer, optionally with k (x1024)")
    n = int(m.group(1)) * (1024 if m.group(2) else 1)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"length {text!r} must be positive")
    return n


def parse_shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+[kK]?)", text.strip())
    if m is None or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected BxS, e.g. 1x32k or 8x4096")
    return int(m.group(1)), parse_len(m.group(2))


def _sparsity(text: str) -> int:
    v = int(text)
    if not 0 <= v < 100:
        raise argparse.ArgumentTypeError(f"sparsity {text!r}: expected a percentage in [0, 100)")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perf.suites.attention",
                                description="Time st.block_sparse_attention against dense SDPA and FlexAttention.")
    add_common_args(p)
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                   help="prefill B x S, e.g. 1x32k 8x4096 (default: 1x32k 1x8k with --quick, else "
                        "1x32k 1x64k 2x16k 4x8k 8x4k)")
    p.add_argument("--head-dims", nargs="+", type=int, choices=(64, 128), default=None,
                   help="D (default 128 with --quick, else 128 64)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                   help="dtypes (default bf16 with --quick, else bf16 fp16)")
    p.add_argument("--sparsity", nargs="+", type=_sparsity, default=None,
                   help=f"random-mask block sparsities in %% (default {' '.join(map(str, SPARSITIES))}); "
                        "0 (the dense reference) always runs")
    p.add_argument("--masks", nargs="+", choices=("random", *STRUCTURED), default=None,
                   help="mask kinds besides the dense reference (default: all)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both", help="prefill groups to run")
    p.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=None, help="default: all")
    p.add_argument("--parts", nargs="+", choices=("prefill", "decode", "build"), default=None,
                   help="which kinds of case to run (default: all)")
    p.add_argument("--decode-batch", nargs="+", type=int, default=None, help="decode B (default 1; full 1 8)")
    p.add_argument("--decode-seqs", nargs="+", type=parse_len, default=None, help="decode kv lengths (32k 64k)")
    p.add_argument("--decode-queries", nargs="+", type=int, default=None, help="decode Sq (default 1 4)")
    p.add_argument("--decode-block", nargs="+", type=int, choices=(64, 128), default=None,
                   help="decode kv block size BK (default 64 with --quick, else 64 128)")
    p.add_argument("--flex", choices=("all", "key", "none"), default=None,
                   help="FlexAttention: every mask, the key ones (random 90 %% at S >= 32k), or none "
                        "(default: key with --quick, else all)")
    p.add_argument("--sdpa-backends", nargs="+", choices=("flash", "cudnn", "efficient"), default=None,
                   help="dense SDPA backends to time (default flash cudnn)")
    p.add_argument("--min-samples", type=int, default=5, help="at least this many timed calls per median")
    p.add_argument("--mem-gb", type=float, default=70.0, help="skip what would need more GPU memory (GB)")
    p.add_argument("--hbm-gbps", type=float, default=None, help="HBM peak for pct_hbm (default: by GPU name)")
    p.add_argument("--seed", type=int, default=0, help="base seed of inputs and masks")
    p.add_argument("--dry-run", action="store_true", help="print the cases and exit (no GPU needed)")
    return p


def settings_from_args(a: argparse.Namespace) -> Settings:
    q = a.quick
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[a.causal]
    return Settings(
        shapes=tuple(dict.fromkeys(a.shapes)) if a.shapes else (QUICK_SHAPES if q else FULL_SHAPES),
        head_dims=tuple(dict.fromkeys(a.head_dims)) if a.head_dims else ((128,) if q else (128, 64)),
        dtypes=tuple(dict.fromkeys(a.dtype)) if a.dtype else (("bf16",) if q else ("bf16", "fp16")),
        sparsities=tuple(dict.fromkeys(a.sparsity)) if a.sparsity else SPARSITIES,
        masks=tuple(a.masks) if a.masks else ("random", *STRUCTURED),
        causal_modes=causal,
        directions=tuple(d for d in DIRECTIONS if d in (a.directions or DIRECTIONS)),
        parts=tuple(a.parts) if a.parts else ("prefill", "decode", "build"),
        decode_batches=tuple(a.decode_batch) if a.decode_batch else ((1,) if q else (1, 8)),
        decode_seqs=tuple(a.decode_seqs) if a.decode_seqs else DECODE_SEQS,
        decode_queries=tuple(a.decode_queries) if a.decode_queries else DECODE_QUERIES,
        decode_blocks=tuple(a.decode_block) if a.decode_block else ((64,) if q else (64, 128)),
        flex=a.flex or ("key" if q else "all"),
        sdpa_backends=tuple(a.sdpa_backends) if a.sdpa_backends else SDPA_BACKENDS,
        warmup_ms=a.warmup_ms if a.warmup_ms is not None else (10.0 if q else 25.0),
        rep_ms=a.rep_ms if a.rep_ms is not None else (50.0 if q else 100.0),
        min_samples=max(1, a.min_samples),
        budget_s=a.budget_s if a.budget_s is not None else (230.0 if q else None),
        mem_gb=a.mem_gb,
        hbm_gbps=a.hbm_gbps,
        seed=a.seed,
        quick=q,
    )


def estimate_gb(c: Case, *, repeat_kv: bool = False) -> float:
    """Rough peak GPU memory of a case in GB (inputs, outputs, gradients, fp32 workspaces, mask)."""
    if isinstance(c, MaskBuild):
        n = c.S // BLOCK
        return c.Hq * n * n * 4 * 10 / 1e9 + 0.5
    elt = DTYPES[c.dtype].itemsize
    if isinstance(c, Decode):
        return 2 * c.B * c.Hkv * c.S * c.D * elt / 1e9 + 1.0
    qb = c.B * c.Hq * c.S * c.D * elt
    kvb = c.B * c.Hkv * c.S * c.D * elt
    n = -(-c.S // BLOCK)
    mask = c.Hq * n * n * 4 * 10
    total = 2 * qb + 2 * kvb + 8 * qb + 4 * kvb + mask + 2**28  # q, do, k, v; o, dq, fp32 dq, GQA dk/dv; flush
    if repeat_kv:
        total += 4 * qb
    return total / 1e9


def hbm_peak_gbps(gpu_name: str | None) -> float | None:
    for key, peak in HBM_PEAK_GBPS:
        if gpu_name and key.lower() in gpu_name.lower():
            return peak
    return None


# --------------------------------------------------------------------------------------------------
# Masks, pairs, flops, bytes (pure torch; tested on CPU)
# --------------------------------------------------------------------------------------------------


def random_block_mask(H: int, NQ: int, NKV: int, sparsity: float, *, causal: bool, seed: int,
                      BQ: int = BLOCK, BK: int = BLOCK) -> torch.Tensor:
    """Bool [1, H, NQ, NKV]: per (head, query block) round((1-s) * candidates) kv blocks, the diagonal always.

    Candidates are all kv blocks, or with ``causal`` those touching the lower triangle (k <= q somewhere).
    Drawn on the CPU from ``seed``, so the mask does not depend on the device.
    """
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(H, NQ, NKV, generator=gen)
    i = torch.arange(NQ)[:, None]
    j = torch.arange(NKV)[None, :]
    diag = (j >= i * BQ // BK) & (j <= ((i + 1) * BQ - 1) // BK)
    cand = (j * BK <= (i + 1) * BQ - 1) if causal else torch.ones(NQ, NKV, dtype=torch.bool)
    n = cand.sum(-1)
    keep = torch.round((1.0 - sparsity) * n.double()).long()
    keep = torch.maximum(keep, (diag & cand).sum(-1)).clamp(max=n)
    score = torch.where(diag & cand, 2.0, torch.where(cand, scores, -1.0))
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(NKV).expand_as(order).contiguous())
    return (rank < keep[None, :, None]).unsqueeze(0)


def document_ids(S: int, n_docs: int, seed: int) -> torch.Tensor:
    """Int32 [S]: ``n_docs`` documents of random lengths (cut points drawn from ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(S - 1, generator=gen)[: max(0, n_docs - 1)] + 1
    ids = torch.zeros(S, dtype=torch.int32)
    ids[cuts] = 1
    return torch.cumsum(ids, 0, dtype=torch.int32)


def _call_builder(fn: Callable[..., Any], *args: Any, device: torch.device, **kw: Any) -> Any:
    """Call a BlockMask builder, passing ``device=`` when it takes one (``st.BlockMask``'s do; a test double's
    may not)."""
    if "device" in inspect.signature(fn).parameters:
        return fn(*args, device=device, **kw)
    return fn(*args, **kw)


def build_mask(BM: Any, mask: str, S: int, H: int, sparsity: int | None, causal: bool, seed: int,
               device: torch.device, window: int = WINDOW) -> Any:
    """The ``BM`` (``st.BlockMask``) of kind ``mask`` for a [*, H, S, S] problem (128 x 128 blocks)."""
    n = -(-S // BLOCK)
    if mask == "dense":
        return BM.from_dense(torch.ones(1, 1, n, n, dtype=torch.bool, device=device), block_size=BLOCK)
    if mask == "causal":
        return _call_builder(BM.causal, S, block_size=BLOCK, device=device)
    if mask == "random":
        blk = random_block_mask(H, n, n, (sparsity or 0) / 100.0, causal=causal, seed=seed).to(device)
        return BM.from_dense(blk, block_size=BLOCK)
    if mask == "sliding_window":
        return _call_builder(BM.sliding_window, S, window, block_size=BLOCK, causal=True, device=device)
    if mask == "document":
        return BM.document(document_ids(S, N_DOCS, seed).to(device), block_size=BLOCK, causal=False)
    raise ValueError(f"unknown mask kind {mask!r}")


def blocks_from_lists(num: torch.Tensor | None, idx: torch.Tensor | None, nkv: int) -> torch.Tensor | None:
    """Dense bool [..., nkv] from a (count [...], indices [..., T]) pair of BlockMask lists."""
    if num is None or idx is None:
        return None
    valid = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1).long()
    out = torch.zeros(*idx.shape[:-1], nkv + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(-1, torch.where(valid, idx.long(), nkv), True)
    return out[..., :nkv]


def unpack_bits(words: torch.Tensor, BK: int) -> torch.Tensor:
    """[..., BQ, W] int32 words -> bool [..., BQ, BK]; bit t of word w = key 32*w + t (LSB first)."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :BK].bool()


def as_pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _geometry(bm: Any) -> tuple[int, int, int, int, int, int]:
    """(BQ, BK, Sq, Skv, NQ, NKV) of a BlockMask."""
    (BQ, BK), (Sq, Skv) = as_pair(bm.block_size), as_pair(bm.seq_lens)
    return BQ, BK, Sq, Skv, -(-Sq // BQ), -(-Skv // BK)


def listed_blocks(bm: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) dense bool [Bm, Hm, NQ, NKV] block maps of a BlockMask."""
    *_, NKV = _geometry(bm)
    part = blocks_from_lists(bm.kv_num_blocks, bm.kv_indices, NKV)
    full = blocks_from_lists(bm.full_kv_num_blocks, bm.full_kv_indices, NKV)
    return part, (torch.zeros_like(part) if full is None else full)


def block_pair_table(NQ: int, NKV: int, BQ: int, BK: int, Sq: int, Skv: int, causal: bool,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Int64 [NQ, NKV]: allowed (q, k) pairs of each whole block under bounds (and k <= q when causal)."""
    k0 = torch.arange(NKV, device=device) * BK
    k1 = torch.clamp(k0 + BK, max=Skv)
    table = torch.zeros(NQ, NKV, dtype=torch.int64, device=device)
    for r in range(BQ):
        q = torch.arange(NQ, device=device) * BQ + r
        hi = torch.minimum(q[:, None] + 1, k1[None, :]) if causal else k1[None, :].expand(NQ, NKV)
        table += (hi - k0[None, :]).clamp(min=0) * (q < Sq)[:, None]
    return table


def _bit_entries(bm: Any) -> tuple[torch.Tensor, ...] | None:
    """(b, h, i, j, slot) of every partial entry that has a bitmask, or None when the mask has none."""
    if bm.partial_bits is None or bm.kv_bits_slot is None:
        return None
    num, idx, slots = bm.kv_num_blocks, bm.kv_indices, bm.kv_bits_slot
    valid = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1).long()
    b, h, i, t = torch.nonzero(valid & (slots >= 0), as_tuple=True)
    return b, h, i, idx[b, h, i, t].long(), slots[b, h, i, t].long()


def allowed_pairs(bm: Any, B: int, Hq: int, causal: bool = False, chunk: int = 2048) -> int:
    """Allowed (q, k) element pairs summed over batch and query heads (broadcast dims multiplied out),
    per the contract: listed block AND bounds AND (causal: k <= q) AND (partial with slot: its bit)."""
    BQ, BK, Sq, Skv, NQ, NKV = _geometry(bm)
    causal = bool(causal or bm.causal)
    part, full = listed_blocks(bm)
    mult = (B // part.shape[0]) * (Hq // part.shape[1])
    plain = part | full
    entries = _bit_entries(bm)
    bit_pairs = 0
    if entries is not None and entries[0].numel():
        b, h, i, j, s = entries
        plain = plain.clone()
        plain[b, h, i, j] = full[b, h, i, j]  # the bitmask decides for these (never both full and partial)
        r = torch.arange(BQ, device=i.device)
        c = torch.arange(BK, device=i.device)
        for lo in range(0, i.numel(), chunk):
            ii, jj, ss = i[lo:lo + chunk], j[lo:lo + chunk], s[lo:lo + chunk]
            q = ii[:, None] * BQ + r  # [P, BQ]
            k = jj[:, None] * BK + c  # [P, BK]
            ok = (q < Sq)[:, :, None] & (k < Skv)[:, None, :]
            if causal:
                ok &= k[:, None, :] <= q[:, :, None]
            bit_pairs += int((unpack_bits(bm.partial_bits[ss], BK) & ok).sum())
    table = block_pair_table(NQ, NKV, BQ, BK, Sq, Skv, causal, plain.device)
    return (int((plain.long() * table).sum()) + bit_pairs) * mult


def dense_pairs(B: int, Hq: int, Sq: int, Skv: int, causal: bool) -> int:
    """Pairs of dense attention: Sq * Skv, or with causal (top-left aligned) sum over q of min(q + 1, Skv)."""
    m = min(Sq, Skv)
    per = m * (m + 1) // 2 + max(0, Sq - Skv) * Skv if causal else Sq * Skv
    return B * Hq * per


def flops_for(pairs: int, D: int, direction: str) -> float:
    """fwd = 4 * D * pairs; bwd = 2.5 x fwd; fwdbwd = 3.5 x fwd."""
    fwd = 4.0 * D * pairs
    return {"fwd": fwd, "bwd": BWD_FLOP_FACTOR * fwd, "fwdbwd": (1.0 + BWD_FLOP_FACTOR) * fwd}[direction]


def block_counts(bm: Any, B: int, Hq: int, causal: bool) -> tuple[int, int]:
    """(listed blocks, blocks of the dense reference) summed over batch and query heads."""
    BQ, BK, Sq, Skv, NQ, NKV = _geometry(bm)
    part, full = listed_blocks(bm)
    mult = (B // part.shape[0]) * (Hq // part.shape[1])
    listed = int((part | full).sum()) * mult
    if causal:
        i = torch.arange(NQ)[:, None]
        j = torch.arange(NKV)[None, :]
        ref = int((j * BK <= torch.clamp((i + 1) * BQ, max=Sq) - 1).sum())
    else:
        ref = NQ * NKV
    return listed, ref * B * Hq


def ideal_speedup(block_sparsity_pct: float) -> float:
    return 1.0 / (1.0 - block_sparsity_pct / 100.0)


def pct_of_ideal(own_dense_ms: float | None, ms: float | None, block_sparsity_pct: float | None) -> float | None:
    """100 * (own dense ms / ms) / (1 / (1 - s))."""
    if not own_dense_ms or not ms or block_sparsity_pct is None or block_sparsity_pct >= 100:
        return None
    return 100.0 * (own_dense_ms / ms) / ideal_speedup(block_sparsity_pct)


def decode_bytes(bm: Any, B: int, Hq: int, Hkv: int, D: int, Sq: int, elt: int) -> int:
    """K/V bytes of the selected kv blocks, each (batch, kv head, block) once, + q + o."""
    BQ, BK, _, Skv, NQ, NKV = _geometry(bm)
    part, full = listed_blocks(bm)
    sel = (part | full).expand(B, Hq, NQ, NKV).reshape(B, Hkv, Hq // Hkv, NQ, NKV).any(3).any(2)
    cols = torch.clamp(Skv - torch.arange(NKV, device=sel.device) * BK, max=BK)
    return int((sel.long() * cols).sum()) * D * 2 * elt + 2 * B * Hq * Sq * D * elt


# --------------------------------------------------------------------------------------------------
# The slice decoder and the references
# --------------------------------------------------------------------------------------------------


def element_mask_rows(bm: Any, b: int, heads: Sequence[int], q_blocks: Sequence[int],
                      causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed bool [len(heads), rows, Skv], query positions [rows]) for the rows of ``q_blocks``.

    Decoded from the index lists per the contract (the same definition as ``element_mask()``), so a slice
    of a 64k x 64k mask costs only its rows.
    """
    BQ, BK, Sq, Skv, NQ, NKV = _geometry(bm)
    causal = bool(causal or bm.causal)
    dev = bm.kv_num_blocks.device
    bi = b if bm.kv_num_blocks.shape[0] > 1 else 0
    hs = torch.tensor([h if bm.kv_num_blocks.shape[1] > 1 else 0 for h in heads], device=dev)
    qb = torch.tensor(list(q_blocks), device=dev)

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[bi][hs][:, qb]

    num, idx = pick(bm.kv_num_blocks), pick(bm.kv_indices)
    part = blocks_from_lists(num, idx, NKV)
    full = blocks_from_lists(pick(bm.full_kv_num_blocks), pick(bm.full_kv_indices), NKV)
    slots = pick(bm.kv_bits_slot) if bm.partial_bits is not None else None
    outs, positions = [], []
    for n, i in enumerate(q_blocks):
        rows = min(BQ, Sq - i * BQ)
        blk = part[:, n] if full is None else part[:, n] | full[:, n]
        E = blk[:, None, :, None].expand(len(heads), rows, NKV, BK).clone()
        if slots is not None:
            sel = (torch.arange(idx.shape[-1], device=dev) < num[:, n, None].long()) & (slots[:, n] >= 0)
            hh, t = torch.nonzero(sel, as_tuple=True)
            if hh.numel():
                j = idx[:, n][hh, t].long()
                bits = unpack_bits(bm.partial_bits[slots[:, n][hh, t].long()], BK)[:, :rows]
                E[hh, :, j, :] = E[hh, :, j, :] & bits
        E = E.reshape(len(heads), rows, NKV * BK)[:, :, :Skv]
        q = i * BQ + torch.arange(rows, device=dev)
        if causal:
            E = E & (torch.arange(Skv, device=dev)[None, :] <= q[:, None])
        outs.append(E)
        positions.append(q)
    return torch.cat(outs, 1), torch.cat(positions)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """fp32 masked attention; q [..., Hq, n, D], k/v [..., Hkv, Skv, D], allowed broadcastable to the scores.
    A row with no allowed key gives 0 (never NaN); differentiable."""
    g = q.shape[-3] // k.shape[-3]
    k = k.float().repeat_interleave(g, dim=-3)
    v = v.float().repeat_interleave(g, dim=-3)
    s = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    return torch.matmul(e, v) / torch.where(den > 0, den, torch.ones_like(den))


def sdpa_fn(backend: str, causal: bool, scale: float, gqa: bool) -> Callable[..., torch.Tensor]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    kw = {"enable_gqa": True} if gqa else {}

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **kw)

    return f


def flex_add_causal(fbm: Any) -> Any:
    """The same FlexAttention BlockMask with k <= q ANDed in: blocks straddling the diagonal made partial."""
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    from torch.nn.attention.flex_attention import and_masks

    BQ, BK = fbm.BLOCK_SIZE
    Sq, Skv = fbm.seq_lengths
    nkv = fbm.kv_indices.shape[-1]
    part = blocks_from_lists(fbm.kv_num_blocks, fbm.kv_indices, nkv)
    full = blocks_from_lists(fbm.full_kv_num_blocks, fbm.full_kv_indices, nkv)
    full = torch.zeros_like(part) if full is None else full
    dev = part.device
    i = torch.arange(part.shape[-2], device=dev)[:, None]
    j = torch.arange(nkv, device=dev)[None, :]
    above = j * BK > torch.clamp((i + 1) * BQ, max=Sq) - 1
    straddle = ((j + 1) * BK - 1 > i * BQ) & ~above
    part = (part | (full & straddle)) & ~above
    full = full & ~straddle & ~above

    def lists(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort((~d).to(torch.int32), dim=-1, stable=True)
        return d.sum(-1, dtype=torch.int32), order.to(torch.int32)

    def causal_mod(b: Any, h: Any, q: Any, k: Any) -> Any:
        return q >= k

    mod = and_masks(fbm.mask_mod, causal_mod) if fbm.mask_mod is not None else causal_mod
    return FlexBlockMask.from_kv_blocks(*lists(part), *lists(full), BLOCK_SIZE=(BQ, BK), mask_mod=mod,
                                        seq_lengths=(Sq, Skv))


# --------------------------------------------------------------------------------------------------
# Rows: derived fields, text tables, the plot spec
# --------------------------------------------------------------------------------------------------


def vs_sdpa(sdpa: dict[str, float], ms: float | None) -> dict[str, Any]:
    """Row fields against dense SDPA: each backend's ms and speedup, and the best backend's."""
    if not sdpa:
        return {"sdpa_ms": None, "sdpa_best": None, "speedup_vs_sdpa": None}
    best = min(sdpa, key=sdpa.get)
    out: dict[str, Any] = {"sdpa_ms": sdpa[best], "sdpa_best": best,
                           "speedup_vs_sdpa": sdpa[best] / ms if ms else None}
    for name, val in sdpa.items():
        out[f"sdpa_{name}_ms"] = val
        out[f"speedup_vs_sdpa_{name}"] = val / ms if ms else None
    return out


def link_builds(rows: list[dict[str, Any]]) -> None:
    """Beside each mask build, one forward call of ours on a random mask of the same sparsity and S (not causal):
    ``attention_ms`` and ``pct_of_attention`` (TARGETS: <= 5 %)."""
    for r in rows:
        if r.get("kind") != "mask_build" or r.get("status") != "ok":
            continue
        att = next((a for a in rows if a.get("kind") == "prefill" and a.get("impl") == IMPL_OURS
                    and a.get("status") == "ok" and a.get("direction") == "fwd" and a.get("mask") == "random"
                    and a.get("sparsity") == r["sparsity"] and a.get("causal") is False and a.get("S") == r["S"]),
                   None)
        if att is not None:
            r.update(attention_case=att["case"], attention_ms=att["ms"], pct_of_attention=100.0 * r["ms"] / att["ms"])


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def progress_line(rows: Sequence[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        name = r["impl"] if r.get("direction") in (None, "fwd", "build") else f"{r['impl']}/{r['direction']}"
        if r["status"] != "ok":
            parts.append(f"{name} {r['status']}")
        elif r["impl"] == IMPL_OURS and r.get("kind") == "prefill":
            parts.append(f"{name} {r['ms']:.3f}ms x{_f(r.get('speedup_vs_own_dense'), '.2f')} dense "
                         f"x{_f(r.get('speedup_vs_sdpa'), '.2f')} sdpa")
        elif r["impl"] == IMPL_OURS and r.get("kind") == "decode":
            parts.append(f"{name} {r['ms'] * 1e3:.1f}us {_f(r.get('gbps'), '.0f')}GB/s "
                         f"x{_f(r.get('speedup_vs_sdpa'), '.2f')} sdpa")
        else:
            parts.append(f"{name} {r['ms']:.3f}ms")
    return " | ".join(parts)


def summary(rows: Sequence[dict[str, Any]]) -> str:
    """Text tables: our prefill rows (one per case and direction), decode rows, mask builds."""

    def table(sel: list[dict[str, Any]], cols: Sequence[tuple[str, str, str]]) -> str:
        short = [{name: r.get(key) for name, key, _ in cols} for r in sel]
        return format_table(short, [name for name, _, _ in cols], {name: fmt for name, _, fmt in cols if fmt})

    ours = [r for r in rows if r.get("impl") == IMPL_OURS]
    out = []
    pre = [r for r in ours if r.get("kind") == "prefill"]
    if pre:
        out.append(table(pre, [("case", "case", ""), ("dir", "direction", ""), ("status", "status", ""),
                               ("s%", "block_sparsity", ".1f"), ("ms", "ms", ".3f"), ("TFLOP/s", "tflops", ".0f"),
                               ("x_dense", "speedup_vs_own_dense", ".2f"), ("%ideal", "pct_ideal", ".0f"),
                               ("x_sdpa", "speedup_vs_sdpa", ".2f"), ("x_flex", "speedup_vs_flex", ".2f"),
                               ("err", "rel_err", ".1e")]))
    dec = [{**r, "us": r["ms"] * 1e3 if r.get("ms") else None} for r in ours if r.get("kind") == "decode"]
    if dec:
        out.append(table(dec, [("case", "case", ""), ("status", "status", ""), ("us", "us", ".1f"),
                               ("GB/s", "gbps", ".0f"), ("%HBM", "pct_hbm", ".0f"),
                               ("x_sdpa", "speedup_vs_sdpa", ".2f"), ("err", "rel_err", ".1e")]))
    bld = [r for r in rows if r.get("kind") == "mask_build"]
    if bld:
        out.append(table(bld, [("case", "case", ""), ("status", "status", ""), ("ms", "ms", ".3f"),
                               ("attention_ms", "attention_ms", ".3f"), ("%attention", "pct_of_attention", ".2f")]))
    return "\n\n".join(out)


AttentionPlot = CurvesPlot  # reference curves + further plots (perf.harness)


_PEERS = ("flex", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
_PREFILL_OURS = {"impl": _PEERS, "kind": ("decode", "mask_build"), "direction": ("fwdbwd",), "status": BAD}
IDEAL_CURVE = ("ideal 1/(1-s)", tuple((float(s), 1.0 / (1.0 - s / 100.0)) for s in range(0, 97)))
PLOT = AttentionPlot(
    x="block_sparsity", y="speedup_vs_own_dense", panel=("direction", "shape"), color="family", style="attn",
    exclude=_PREFILL_OURS, yscale="log", hline=1.0, curves=(IDEAL_CURVE,),
    xlabel="block sparsity (%)", ylabel="speedup over own dense mode (x)",
    title="block-sparse attention: speedup over our dense mode, against the ideal 1/(1-s)",
    also=(
        AttentionPlot(x="block_sparsity", y="speedup_vs_sdpa", panel=("direction", "shape"), color="family",
                      style="attn", exclude=_PREFILL_OURS, yscale="log", hline=1.0, name="vs-sdpa",
                      xlabel="block sparsity (%)", ylabel="speedup over dense SDPA, best backend (x)",
                      title="block-sparse attention: speedup over dense SDPA (SDPA computes dense attention)"),
        AttentionPlot(x="S", y="speedup_vs_sdpa", panel=("shape",), color="queries", style="kv_block",
                      exclude={"impl": _PEERS, "kind": ("prefill", "mask_build"), "status": BAD},
                      xscale="log2", hline=1.0, name="decode", xlabel="kv length S",
                      ylabel="speedup over dense SDPA decode (x)",
                      title="sparse decode (10 % of kv blocks) vs dense SDPA"),
    ),
)
