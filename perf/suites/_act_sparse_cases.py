"""The pure side of the activation-sparse perf suite (``perf/suites/act_sparse.py``): no GPU, no timing.

What runs (the command line, ``Settings``, the ordered case list and its memory estimate), how a case's inputs
are made sparse (the |x|-quantile threshold, the measured per-row and union activity), the counting behind the
row fields (bytes read, the ideal speedup), and what is derived from rows (text tables, the plot spec). The
conventions are in the suite's docstring. Tested on CPU by ``tests/test_perf_act_sparse.py``; the leading
underscore keeps ``perf/gpu_check.sh`` from running it as a suite.
"""

from __future__ import annotations

import argparse
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from autotune.shapes import LLAMA3_8B, LLAMA3_70B, LinearShape
from perf.harness import CurvesPlot, add_common_args, format_table

SUITE = "act_sparse"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SPARSITIES = (0, 40, 50, 70, 90)  # % of each row's inputs at or under the threshold; 25 60 80 on request
BATCHES = (1, 2, 4, 8, 16, 64)
QUICK_BATCHES = (1, 4, 16, 64)
NM_SPARSITIES = (0, 50, 70)
DECODE_LAYERS, QUICK_DECODE_LAYERS = 32, 2
PARTS = ("linear", "ffn", "nm", "decode")
REL_TOL = 1e-2
IMPL_DENSE, IMPL_OP, IMPL_KERNEL = "dense", "op", "kernel"
BAD = ("wrong", "error", "skipped")
# Row fields that hold a case's measured activity (copied onto every row of the case).
ACTIVITY_FIELDS = ("threshold", "row_sparsity", "union_count", "union_density", "sparsity_union")

# The presets have no Llama-3-70B attention projections (q/o 8192x8192, k/v 1024x8192 with GQA): added here.
LLAMA3_70B_ATTN = (LinearShape("llama3-70b.q_o", 8192, 8192), LinearShape("llama3-70b.k_v", 1024, 8192))
SHAPES_8B = LLAMA3_8B
SHAPES_70B = LLAMA3_70B_ATTN + LLAMA3_70B
SHAPES = {s.name: s for s in SHAPES_8B + SHAPES_70B}
SHAPE_GROUPS = {"llama3-8b": SHAPES_8B, "llama3-70b": SHAPES_70B, "all": SHAPES_8B + SHAPES_70B}


@dataclass(frozen=True)
class FFNShape:
    """A gated (SwiGLU) MLP: hidden size ``H``, intermediate size ``I`` (gate/up ``[I, H]``, down ``[H, I]``)."""

    name: str
    H: int
    I: int  # noqa: E741 - the usual name of the intermediate size

    @property
    def dims(self) -> str:
        return f"{self.H}x{self.I}"


def _ffn_of(shapes: Sequence[LinearShape], name: str) -> FFNShape:
    gate_up = next(s for s in shapes if s.name.endswith(".gate_up"))
    return FFNShape(name, gate_up.K, gate_up.N)


FFN_8B = _ffn_of(LLAMA3_8B, "llama3-8b")
FFN_70B = _ffn_of(LLAMA3_70B, "llama3-70b")
FFN_MODELS = {m.name: m for m in (FFN_8B, FFN_70B)}


@dataclass(frozen=True)
class DecodeDims:
    """One decoder layer's linears: q/o ``[Hq, H]`` / ``[H, Hq]`` (Hq = H here), k/v ``[KV, H]``, the MLP."""

    name: str
    H: int
    KV: int
    I: int  # noqa: E741

    def linears(self) -> tuple[tuple[str, int, int], ...]:
        """(name, N, K) of the four attention projections."""
        return (("q", self.H, self.H), ("k", self.KV, self.H), ("v", self.KV, self.H), ("o", self.H, self.H))

    def weight_elems(self) -> int:
        return sum(N * K for _, N, K in self.linears()) + 3 * self.H * self.I


DECODE_8B = DecodeDims("llama3-8b", SHAPES["llama3-8b.q_o"].K, SHAPES["llama3-8b.k_v"].N, FFN_8B.I)


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    shape: LinearShape
    batch: int
    sparsity: int
    dtype: str
    kind: ClassVar[str] = "linear"

    @property
    def label(self) -> str:
        return f"linear {self.shape.name} b{self.batch} s{self.sparsity}% {self.dtype}"

    @property
    def model(self) -> str:
        return self.shape.name.split(".")[0]


@dataclass(frozen=True)
class NM:
    shape: LinearShape
    batch: int
    sparsity: int
    dtype: str
    n: int = 2
    m: int = 4
    kind: ClassVar[str] = "nm"

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def label(self) -> str:
        return f"nm {self.pattern} {self.shape.name} b{self.batch} s{self.sparsity}% {self.dtype}"

    @property
    def model(self) -> str:
        return self.shape.name.split(".")[0]


@dataclass(frozen=True)
class FFN:
    ffn: FFNShape
    batch: int
    sparsity: int
    dtype: str
    kind: ClassVar[str] = "ffn"

    @property
    def label(self) -> str:
        return f"ffn {self.ffn.name} b{self.batch} s{self.sparsity}% {self.dtype}"

    @property
    def model(self) -> str:
        return self.ffn.name


@dataclass(frozen=True)
class Decode:
    layers: int
    sparsity: int
    dtype: str
    dims: DecodeDims = DECODE_8B
    batch: int = 1
    kind: ClassVar[str] = "decode"

    @property
    def label(self) -> str:
        return f"decode {self.dims.name} L{self.layers} s{self.sparsity}% {self.dtype}"

    @property
    def model(self) -> str:
        return self.dims.name


Case = Linear | NM | FFN | Decode


def case_seed(base: int, text: str) -> int:
    return (base + zlib.crc32(text.encode())) % 2**31


@dataclass(frozen=True)
class Settings:
    parts: tuple[str, ...]
    shapes: tuple[LinearShape, ...]  # linear shapes, every sparsity at batch 1
    sweep_shapes: tuple[LinearShape, ...]  # linear shapes of the batch sweep
    sparsities: tuple[int, ...]
    sweep_sparsities: tuple[int, ...]  # sparsities at batch > 1 (linear and FFN)
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    ffn_models: tuple[FFNShape, ...]
    ffn_batches: tuple[int, ...]
    nm_patterns: tuple[tuple[int, int], ...]
    nm_sparsities: tuple[int, ...]
    nm_batches: tuple[int, ...]
    decode_layers: int
    warmup_ms: float
    rep_ms: float
    budget_s: float | None
    mem_gb: float
    rotate_gb: float
    hbm_gbps: float | None
    autotune: bool
    seed: int
    quick: bool

    def cases(self) -> list[Case]:
        """Most important first, so that a budget cut drops the least: per model (Llama-3-8B and custom shapes
        before 70B), batch 1 (linear, FFN, N:M), the decode stack, then the batch sweeps."""
        out: list[tuple[tuple[int, int], Case]] = []

        def add(phase: int, c: Case) -> None:
            out.append(((0 if "70b" not in c.model else 1, phase), c))

        if "linear" in self.parts:
            for sh in self.shapes:
                for dt in self.dtypes:
                    for s in self.sparsities:
                        add(0, Linear(sh, 1, s, dt))
            for sh in self.sweep_shapes:
                for dt in self.dtypes:
                    for b in self.batches:
                        for s in self.sweep_sparsities if b != 1 else ():
                            add(4, Linear(sh, b, s, dt))
        if "ffn" in self.parts:
            for f in self.ffn_models:
                for dt in self.dtypes:
                    for b in self.ffn_batches:
                        for s in self.sparsities if b == 1 else self.sweep_sparsities:
                            add(1 if b == 1 else 5, FFN(f, b, s, dt))
        if "nm" in self.parts:
            for sh in self.shapes:
                for dt in self.dtypes:
                    for b in self.nm_batches:
                        for n, m in self.nm_patterns:
                            for s in self.nm_sparsities:
                                add(2 if b == 1 else 6, NM(sh, b, s, dt, n, m))
        if "decode" in self.parts and self.decode_layers > 0:
            for dt in self.dtypes:
                for s in self.sparsities:
                    add(3, Decode(self.decode_layers, s, dt))
        out.sort(key=lambda pc: pc[0])  # stable: the order within a phase is kept
        return [c for _, c in out]

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["shapes"] = [{"name": s.name, "N": s.N, "K": s.K} for s in self.shapes]
        d["sweep_shapes"] = [s.name for s in self.sweep_shapes]
        d["ffn_models"] = [{"name": f.name, "H": f.H, "I": f.I} for f in self.ffn_models]
        d["nm_patterns"] = [f"{n}:{m}" for n, m in self.nm_patterns]
        d["decode"] = {"layers": self.decode_layers, "model": DECODE_8B.name, "H": DECODE_8B.H, "KV": DECODE_8B.KV,
                       "I": DECODE_8B.I, "batch": 1}
        d["rel_tol"] = REL_TOL
        return d


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[LinearShape, ...]:
    """A shape name, a group (``llama3-8b``, ``llama3-70b``, ``all``), ``NxK`` or ``name=NxK``."""
    if text in SHAPE_GROUPS:
        return SHAPE_GROUPS[text]
    if text in SHAPES:
        return (SHAPES[text],)
    match = re.fullmatch(r"(?:([\w.-]+)=)?(\d+)x(\d+)", text)
    if match is None or int(match.group(2)) <= 0 or int(match.group(3)) <= 0:
        raise argparse.ArgumentTypeError(f"unknown shape {text!r}: use NxK (out x in), name=NxK, or one of "
                                         + ", ".join([*SHAPE_GROUPS, *SHAPES]))
    n, k = int(match.group(2)), int(match.group(3))
    return (LinearShape(match.group(1) or f"{n}x{k}", n, k),)


def parse_ffn(text: str) -> FFNShape:
    """``llama3-8b``, ``llama3-70b`` or ``HxI`` (hidden x intermediate)."""
    if text in FFN_MODELS:
        return FFN_MODELS[text]
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if match is None or int(match.group(1)) <= 0 or int(match.group(2)) <= 0:
        raise argparse.ArgumentTypeError(f"unknown FFN {text!r}: use HxI or one of {', '.join(FFN_MODELS)}")
    return FFNShape(text, int(match.group(1)), int(match.group(2)))


def parse_pattern(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if match is None or not 1 <= int(match.group(1)) < int(match.group(2)) <= 16:
        raise argparse.ArgumentTypeError(f"pattern {text!r}: expected N:M with 1 <= N < M <= 16, e.g. 2:4")
    return int(match.group(1)), int(match.group(2))


def _sparsity(text: str) -> int:
    v = int(text)
    if not 0 <= v < 100:
        raise argparse.ArgumentTypeError(f"sparsity {text!r}: expected a percentage in [0, 100)")
    return v


def _batch(text: str) -> int:
    v = int(text)
    if not 1 <= v <= 64:
        raise argparse.ArgumentTypeError(f"batch {text!r}: expected 1..64 (past 64 rows the op is dense)")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perf.suites.act_sparse",
                                description="Time activation-sparse linear / FFN / N:M / decode stack against dense "
                                            "cuBLAS.")
    add_common_args(p)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=None, help="what to run (default: all)")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                   help="linear (and N:M) shapes: names, groups llama3-8b / llama3-70b / all, or NxK (out x in); "
                        "default: llama3-8b gate_up and down with --quick, else all")
    p.add_argument("--sparsity", nargs="+", type=_sparsity, default=None,
                   help=f"per-row input sparsities in %% (default {' '.join(map(str, SPARSITIES))}; 25 60 80 are "
                        "the optional extra points)")
    p.add_argument("--sweep-sparsity", nargs="+", type=_sparsity, default=None,
                   help="sparsities of the batch sweeps (default 50 with --quick, else --sparsity)")
    p.add_argument("--batches", nargs="+", type=_batch, default=None,
                   help=f"batch sweep (default {' '.join(map(str, QUICK_BATCHES))} with --quick, else "
                        f"{' '.join(map(str, BATCHES))}); batch 1 always runs every sparsity")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None, help="dtypes (default fp16)")
    p.add_argument("--ffn-models", nargs="+", type=parse_ffn, default=None,
                   help="fused FFN shapes: llama3-8b, llama3-70b or HxI (default llama3-8b with --quick, else both)")
    p.add_argument("--ffn-batches", nargs="+", type=_batch, default=None,
                   help="FFN batches (default 1 with --quick, else --batches)")
    p.add_argument("--nm-patterns", nargs="+", type=parse_pattern, default=None, help="N:M patterns (default 2:4)")
    p.add_argument("--nm-sparsity", nargs="+", type=_sparsity, default=None,
                   help=f"activation sparsities with N:M (default 50 with --quick, else "
                        f"{' '.join(map(str, NM_SPARSITIES))})")
    p.add_argument("--nm-batches", nargs="+", type=_batch, default=None, help="N:M batches (default 1)")
    p.add_argument("--layers", type=int, default=None,
                   help=f"decode stack depth (default {QUICK_DECODE_LAYERS} with --quick, else {DECODE_LAYERS})")
    p.add_argument("--no-autotune", action="store_true",
                   help="the op does not tune on a miss (shipped table / user cache / heuristic only)")
    p.add_argument("--mem-gb", type=float, default=70.0, help="skip cases that would need more GPU memory (GB)")
    p.add_argument("--rotate-gb", type=float, default=16.0,
                   help="most GPU memory for the weight copies a CUDA-graph timing cycles through (GB)")
    p.add_argument("--hbm-gbps", type=float, default=None, help="HBM peak for pct_hbm (default: by GPU name)")
    p.add_argument("--seed", type=int, default=0, help="base seed of weights and inputs")
    p.add_argument("--dry-run", action="store_true", help="print the cases and exit (no GPU needed)")
    return p


def _uniq(values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(values))


def settings_from_args(a: argparse.Namespace) -> Settings:
    q = a.quick
    if a.shapes:
        shapes = _uniq(s for group in a.shapes for s in group)
    else:
        shapes = (SHAPES["llama3-8b.gate_up"], SHAPES["llama3-8b.down"]) if q else SHAPE_GROUPS["all"]
    sparsities = _uniq(a.sparsity) if a.sparsity else SPARSITIES
    batches = _uniq([1, *a.batches]) if a.batches else (QUICK_BATCHES if q else BATCHES)
    return Settings(
        parts=tuple(p for p in PARTS if p in (a.parts or PARTS)),
        shapes=shapes,
        sweep_shapes=shapes[:1] if q else shapes,
        sparsities=sparsities,
        sweep_sparsities=_uniq(a.sweep_sparsity) if a.sweep_sparsity else ((50,) if q else sparsities),
        batches=batches,
        dtypes=_uniq(a.dtype) if a.dtype else ("fp16",),
        ffn_models=_uniq(a.ffn_models) if a.ffn_models else ((FFN_8B,) if q else (FFN_8B, FFN_70B)),
        ffn_batches=_uniq(a.ffn_batches) if a.ffn_batches else ((1,) if q else batches),
        nm_patterns=_uniq(a.nm_patterns) if a.nm_patterns else ((2, 4),),
        nm_sparsities=_uniq(a.nm_sparsity) if a.nm_sparsity else ((50,) if q else NM_SPARSITIES),
        nm_batches=_uniq(a.nm_batches) if a.nm_batches else (1,),
        decode_layers=a.layers if a.layers is not None else (QUICK_DECODE_LAYERS if q else DECODE_LAYERS),
        warmup_ms=a.warmup_ms if a.warmup_ms is not None else (10.0 if q else 25.0),
        rep_ms=a.rep_ms if a.rep_ms is not None else (50.0 if q else 100.0),
        budget_s=a.budget_s if a.budget_s is not None else (230.0 if q else None),
        mem_gb=a.mem_gb,
        rotate_gb=a.rotate_gb,
        hbm_gbps=a.hbm_gbps,
        autotune=not a.no_autotune,
        seed=a.seed,
        quick=q,
    )


def estimate_gb(c: Case) -> float:
    """Rough peak GPU memory of a case without rotation copies (GB): the dense and the input-major weights,
    the fp32 copies the reference makes one weight at a time, the L2-flush buffer."""
    e = DTYPES[c.dtype].itemsize
    if isinstance(c, Linear):
        total = c.shape.N * c.shape.K * (2 * e + 4)
    elif isinstance(c, NM):
        total = c.shape.N * c.shape.K * (2 * e + 4)  # pruned dense + (values, indices) + the dense W^T it came from
    elif isinstance(c, FFN):
        total = c.ffn.H * c.ffn.I * (3 * 2 * e + 4)
    else:
        total = c.layers * c.dims.weight_elems() * 2 * e + c.dims.H * c.dims.I * 4
    return (total + 2**28) / 1e9


# --------------------------------------------------------------------------------------------------
# Sparse inputs: the threshold and the measured activity (pure torch; tested on CPU)
# --------------------------------------------------------------------------------------------------


def quantile_threshold(values: torch.Tensor, sparsity: float) -> float:
    """The scalar threshold ``t`` at which the fraction of entries with ``|v| <= t`` (inactive, the ops' rule) is
    as close to ``sparsity`` (a fraction in [0, 1)) as the values allow.

    ``t`` lies midway between the k-th and (k+1)-th smallest ``|v|`` (k = round(sparsity * numel)), so rounding
    differences of one ulp between two computations of ``v`` do not flip entries; where ``|v|`` ties across
    that boundary, the side nearer to k is taken. ``sparsity == 0`` gives ``t = 0``. The result is exactly
    representable in float32 (the ops compare in float32).
    """
    a = values.detach().float().abs().flatten().cpu()
    n = a.numel()
    k = min(n, round(sparsity * n))
    if k <= 0:
        return 0.0
    v = torch.sort(a).values
    if k >= n:
        return float(v[-1])

    def mid(lo: torch.Tensor, hi: torch.Tensor) -> float:
        return float(((lo + hi) / 2).to(torch.float32))

    lo, hi = v[k - 1], v[k]
    if lo < hi:
        return mid(lo, hi)
    n_le = int(torch.searchsorted(v, lo, right=True))  # inactive counts if the cut is just above lo
    n_lt = int(torch.searchsorted(v, lo, right=False))  # ... or just below it
    above = v[n_le] if n_le < n else None
    below = v[n_lt - 1] if n_lt > 0 else torch.zeros((), dtype=v.dtype)
    if (n_le - k <= k - n_lt) or float(lo) == 0.0:  # a threshold cannot go below 0
        return mid(lo, above) if above is not None else float(lo)
    return mid(below, lo)


def activity(x: torch.Tensor, threshold: float) -> dict[str, Any]:
    """What a threshold leaves of ``x [rows, K]`` (the ops' rule: active unless ``|x| <= t``, in float32, NaN active).

    ``row_sparsity``: % of entries inactive (the mean per-row sparsity); ``union_count``: channels active in any
    row (the weight rows a batched call must read); ``union_density`` = union_count / K; ``sparsity_union`` =
    100 * (1 - union_density).
    """
    on = ~(x.detach().float().abs() <= threshold)
    K = x.shape[-1]
    union = int(on.reshape(-1, K).any(0).sum())
    return {"threshold": threshold, "row_sparsity": 100.0 * (1.0 - float(on.float().mean())) if on.numel() else 0.0,
            "union_count": union, "union_density": union / K if K else 0.0,
            "sparsity_union": 100.0 * (1.0 - union / K) if K else 0.0}


def expected_union_density(row_density: float, batch: int) -> float:
    """Union density of ``batch`` independent rows each active with probability ``row_density``."""
    return 1.0 - (1.0 - row_density) ** batch


# --------------------------------------------------------------------------------------------------
# Bytes and the ideal speedup
# --------------------------------------------------------------------------------------------------


def linear_bytes(M: int, N: int, K: int, elt: int, active_rows: int, row_bytes: int | None = None) -> int:
    """Bytes ``y[M, N] = x[M, K] @ W^T`` must move: the input-major weight rows of the ``active_rows`` channels
    (``row_bytes`` each, default ``N * elt``; for N:M the stored values plus index words), x and y. The dense
    product reads every row (``active_rows = K``). Split-K workspaces are not counted."""
    per_row = N * elt if row_bytes is None else row_bytes
    return active_rows * per_row + M * K * elt + M * N * elt


def ffn_bytes(M: int, H: int, I: int, elt: int, active_in: int, active_mid: int) -> int:  # noqa: E741
    """Bytes of a gated MLP: gate and up rows of the active inputs, down rows of the active intermediates, x, the
    intermediate h written and read once, y. Dense: ``active_in = H``, ``active_mid = I``."""
    return 2 * active_in * I * elt + active_mid * H * elt + M * H * elt + 2 * M * I * elt + M * H * elt


def ideal_speedup(dense_weight_elems: float, read_weight_elems: float) -> float | None:
    """Weight elements of the dense layer over those the sparse one must read (index bytes not counted): for one
    linear ``1 / union_density``, with N:M ``1 / (union_density * n / m)``, for the FFN ``3 / (2 d_in + d_mid)``."""
    return dense_weight_elems / read_weight_elems if read_weight_elems > 0 else None


def pct_of_ideal(speedup: float | None, ideal: float | None) -> float | None:
    return 100.0 * speedup / ideal if speedup and ideal else None


# --------------------------------------------------------------------------------------------------
# Rows: text tables and the plot spec
# --------------------------------------------------------------------------------------------------


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def progress_line(rows: Sequence[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        if r["status"] != "ok":
            parts.append(f"{r['impl']} {r['status']}")
            continue
        text = f"{r['impl']} {r['ms'] * 1e3:.1f}us"
        if r["impl"] != IMPL_DENSE:
            text += f" x{_f(r.get('speedup'), '.2f')} ({_f(r.get('pct_ideal'), '.0f')}% ideal)"
        if r["impl"] == IMPL_OP:
            text += f" [{r.get('backend') or '?'}, {r.get('choice_source') or '?'}]"
        parts.append(text)
    head = next((r for r in rows if r.get("union_density") is not None), None)
    union = f"union {100 * head['union_density']:.0f}% | " if head else ""
    return union + " | ".join(parts)


def summary(rows: Sequence[dict[str, Any]]) -> str:
    """One line per case: dense time, the op's and the forced kernel's speedups, % of ideal, bandwidth, choice."""
    cases: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        us = r["ms"] * 1e3 if r.get("ms") else None
        cases.setdefault(r["case"], {})[r["impl"]] = {**r, "us": us}
    lines, dec = [], []
    for label, by in cases.items():
        d, op, k = by.get(IMPL_DENSE, {}), by.get(IMPL_OP, {}), by.get(IMPL_KERNEL, {})
        head = op or d or k

        def cell(r: dict[str, Any], key: str, fmt: str) -> str:
            if not r:
                return "-"
            return r["status"] if r.get("status") != "ok" else _f(r.get(key), fmt)

        line = {"case": label, "s_union%": _f(head.get("sparsity_union"), ".0f"),
                "dense_us": cell(d, "us", ".1f"), "op_us": cell(op, "us", ".1f"), "x_op": cell(op, "speedup", ".2f"),
                "%ideal": cell(op, "pct_ideal", ".0f"), "GB/s": cell(op, "gbps", ".0f"),
                "%HBM": cell(op, "pct_hbm", ".0f"), "x_kernel": cell(k, "speedup", ".2f"),
                "choice": f"{op.get('backend') or '-'}/{op.get('choice_source') or '-'}" if op else "-",
                "err": _f(max((r["rel_err"] for r in by.values() if r.get("rel_err") is not None), default=None),
                          ".1e")}
        if head.get("kind") == "decode":
            line.update(dense_tok_s=cell(d, "tokens_per_s", ".0f"), op_tok_s=cell(op, "tokens_per_s", ".0f"))
            dec.append(line)
        else:
            lines.append(line)
    out = []
    cols = ["case", "s_union%", "dense_us", "op_us", "x_op", "%ideal", "GB/s", "%HBM", "x_kernel", "choice", "err"]
    if lines:
        out.append(format_table(lines, cols))
    if dec:
        out.append(format_table(dec, ["case", "s_union%", "dense_us", "op_us", "dense_tok_s", "op_tok_s", "x_op",
                                      "%ideal", "GB/s", "%HBM", "err"]))
    return "\n\n".join(out)


ActSparsePlot = CurvesPlot  # reference curves + further plots (perf.harness)


def _ideal_curve(top: float, factor: float = 1.0, label: str = "ideal 1/(1-s)"
                 ) -> tuple[str, tuple[tuple[float, float], ...]]:
    return label, tuple((float(v), factor / (1.0 - v / 100.0)) for v in range(0, int(top) + 1))


def plot_spec(s: Settings) -> ActSparsePlot:
    """Speedup over dense against union sparsity at batch 1 (``act_sparse.png``, with the ideal 1/(1-s)); speedup
    against batch at the sweep sparsity (``-batch``, ideal 1/(1-s^b)); the fused FFN against sparsity per batch
    (``-ffn``); N:M + activation (``-nm``, ideal m/(n(1-s))); the decode stack (``-decode``)."""
    kinds = ("linear", "ffn", "nm", "decode")
    others = {k: tuple(v for v in kinds if v != k) for k in kinds}
    sparsities = _uniq([*s.sparsities, *s.sweep_sparsities, *s.nm_sparsities, *SPARSITIES])
    top = max(90, *sparsities)
    sweep = 50 if 50 in s.sweep_sparsities else (s.sweep_sparsities or (50,))[0]
    batches = _uniq([*s.batches, *s.ffn_batches, *s.nm_batches, *BATCHES])
    drop = {"impl": (IMPL_DENSE,), "status": BAD}
    n, m = (s.nm_patterns or ((2, 4),))[0]
    top_nm = max(s.nm_sparsities, default=70)
    sb = sweep / 100.0
    batch_curve = ((f"ideal 1/(1-{sb:g}^b)", tuple((float(b), 1.0 / (1.0 - sb ** b)) for b in range(1, 65))),)
    return ActSparsePlot(
        x="sparsity_union", y="speedup", panel=("shape", "dtype"), color="impl",
        exclude={**drop, "kind": others["linear"], "batch": tuple(b for b in batches if b != 1)},
        hline=1.0, curves=(_ideal_curve(top),), xlabel="union sparsity (%)", ylabel="speedup over dense cuBLAS (x)",
        title="act-sparse linear, batch 1",
        also=(
            ActSparsePlot(x="batch", y="speedup", panel=("shape", "dtype"), color="impl", name="batch",
                          exclude={**drop, "kind": others["linear"],
                                   "sparsity": tuple(v for v in sparsities if v != sweep)},
                          xscale="log2", hline=1.0, curves=batch_curve if sweep > 0 else (),
                          xlabel="batch (rows of x)", ylabel="speedup over dense cuBLAS (x)",
                          title=f"act-sparse linear, {sweep} % per row, by batch"),
            ActSparsePlot(x="sparsity", y="speedup", panel=("shape", "dtype"), color="batch_label", style="impl",
                          name="ffn", exclude={**drop, "kind": others["ffn"]}, hline=1.0,
                          curves=(_ideal_curve(top, label="ideal 1/(1-s), batch 1"),),
                          xlabel="per-row sparsity of both inputs (%)", ylabel="speedup over dense FFN (x)",
                          title="fused SwiGLU FFN vs dense FFN"),
            ActSparsePlot(x="sparsity_union", y="speedup", panel=("shape", "dtype"), color="pattern", style="impl",
                          name="nm", exclude={**drop, "kind": others["nm"]}, hline=1.0,
                          curves=(_ideal_curve(top_nm, m / n, f"ideal {n}:{m}: {m / n:g}/(1-s)"),),
                          xlabel="union sparsity of the activations (%)",
                          ylabel="speedup over dense, pruned weight (x)", title="N:M weights + sparse activations"),
            ActSparsePlot(x="sparsity", y="speedup", panel=("shape", "dtype"), color="impl", name="decode",
                          exclude={**drop, "kind": others["decode"]}, hline=1.0, curves=(_ideal_curve(top),),
                          xlabel="per-row sparsity of every input (%)", ylabel="tokens/s over dense (x)",
                          title="decode, linear layers only (batch 1)"),
        ),
    )
