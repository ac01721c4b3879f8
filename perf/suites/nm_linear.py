"""N:M weight-sparse linear (``st.nm_linear``) against dense cuBLAS and PyTorch's 2:4 semi-structured.

Run from the repository root on a GPU machine::

    PYTHONPATH=. python -m perf.suites.nm_linear --quick            # Llama-3-8B shapes, fp16, < 4 min
    PYTHONPATH=. python -m perf.suites.nm_linear                    # + Llama-3-70B shapes, bf16, M=16384
    PYTHONPATH=. python -m perf.suites.nm_linear --shapes 4096x4096 --tokens 1 16 --patterns 2:4

For every case (shape, tokens M, pattern N:M, dtype) one random weight is pruned and compressed with
``st.nm_compress``; its dense form (``to_dense()``, the pruned weight) is the dense baseline's weight, so
all implementations compute the same function. Each implementation is checked against an fp32
reference (relative error recorded; sparse_triton or its heuristic default above 1e-2 fails the suite), then timed:

* ``dense``: ``F.linear(x, w_pruned_dense)`` -- cuBLAS, the layer a user would otherwise run;
* ``sparse_triton``: ``st.nm_linear(x, w_nm)`` on the compressed weight, the public op: the runtime tuner
  (``sparse_triton.tuning``) picks its implementation (our kernel and config, cuSPARSELt, or dense cuBLAS)
  from the user cache, the shipped table or by tuning on first use; the row records the choice
  (``config``, ``backend``, ``choice_source``) and the heuristic default's time (``heuristic_ms``);
* ``sparse_triton_heuristic``: the op's heuristic default (its first tuning candidate, what runs where
  nothing was measured) called directly through ``ops.nm_tuning.run_fwd``: what tuning gains;
* ``torch_semi_structured`` (2:4 only): ``F.linear(x, to_sparse_semi_structured(w))`` -- cuSPARSELt or
  CUTLASS; recorded as ``unsupported``/``unavailable`` with the reason where PyTorch refuses it.

Small M (``--graph-max-m``, default 64) is timed with CUDA graphs over rotated weight copies; larger M
with CUDA events and an L2 flush per call (see perf/harness.py). Results:
``<out>/<gpu-slug>/nm_linear.json``; ``python perf/plot.py`` draws speedup against M.
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from autotune.shapes import LLAMA3_8B, LLAMA3_70B, LLM_TOKENS, NM_PATTERNS, LinearShape
from perf.harness import (
    Budget,
    PlotSpec,
    ResultWriter,
    Timing,
    add_common_args,
    bench,
    format_table,
    gbps,
    relative_error,
    require_gpu,
    rotation_count,
    tensor_bytes,
    tflops,
)

SUITE = "nm_linear"
REL_TOL = 1e-2

IMPL_DENSE = "dense"
IMPL_OURS = "sparse_triton"
IMPL_SEMI = "torch_semi_structured"
IMPL_HEUR = "sparse_triton_heuristic"
# Fields of the sparse_triton row that say what the tuner chose (see tuner_choice).
CHOICE_FIELDS = ("config", "backend", "choice_source", "choice_key", "choice_s", "tuned_ms")


SHAPES = {s.name: s for s in LLAMA3_8B + LLAMA3_70B}
SHAPE_GROUPS = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B, "all": LLAMA3_8B + LLAMA3_70B}

TOKENS_QUICK = tuple(t for t in LLM_TOKENS if t <= 4096)
TOKENS_FULL = LLM_TOKENS
PATTERNS = NM_PATTERNS
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

PLOT = PlotSpec(
    x="M",
    y="speedup",
    panel=("shape", "dims", "dtype"),
    color="pattern",
    style="impl",
    exclude={"impl": (IMPL_DENSE, IMPL_HEUR), "status": ("wrong", "error", "unsupported", "unavailable")},
    xscale="log2",
    hline=1.0,
    xlabel="tokens M",
    ylabel="speedup over dense cuBLAS (x)",
    title="N:M linear: speedup over dense F.linear on the same pruned weight",
)


@dataclass(frozen=True)
class Case:
    shape: LinearShape
    M: int
    n: int
    m: int
    dtype: str

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def label(self) -> str:
        return f"{self.shape.name} {self.dtype} M={self.M} {self.pattern}"

    @property
    def flops(self) -> int:
        """Dense-equivalent work, the same for every implementation."""
        return 2 * self.M * self.shape.N * self.shape.K

    def seed(self, base: int) -> int:
        return (base + zlib.crc32(self.label.encode())) % 2**31


@dataclass
class Operand:
    """One implementation's weight and how to apply it: ``apply(x, weight) -> y``."""

    impl: str
    weight: Any
    weight_bytes: int
    apply: Callable[[torch.Tensor, Any], torch.Tensor]
    clone: Callable[[], Any]
    backend: str | None = None
    config: str | None = None  # the candidate's name (implementation and launch config), for ours


# --------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[LinearShape, ...]:
    """A shape name, a group (``llama3-8b``, ``llama3-70b``, ``all``), ``NxK`` or ``name=NxK``."""
    if text in SHAPE_GROUPS:
        return SHAPE_GROUPS[text]
    if text in SHAPES:
        return (SHAPES[text],)
    match = re.fullmatch(r"(?:([\w.-]+)=)?(\d+)x(\d+)", text)
    if match is None:
        known = ", ".join([*SHAPE_GROUPS, *SHAPES])
        raise argparse.ArgumentTypeError(f"unknown shape {text!r}: use NxK (out x in), name=NxK, or one of {known}")
    name, n, k = match.group(1), int(match.group(2)), int(match.group(3))
    if n <= 0 or k <= 0:
        raise argparse.ArgumentTypeError(f"shape {text!r}: N and K must be positive")
    return (LinearShape(name or f"{n}x{k}", n, k),)


def parse_pattern(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"pattern {text!r}: expected N:M, e.g. 2:4")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m <= 16:
        raise argparse.ArgumentTypeError(f"pattern {text!r}: need 1 <= N < M <= 16")
    return n, m


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m perf.suites.nm_linear",
        description="Time st.nm_linear against dense cuBLAS and PyTorch semi-structured 2:4.",
    )
    add_common_args(parser)
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                        help="dtypes (default: fp16 with --quick, else fp16 bf16)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                        help="names, groups (llama3-8b, llama3-70b, all) or NxK; "
                             "default: llama3-8b with --quick, else all")
    parser.add_argument("--tokens", nargs="+", type=_positive_int, default=None,
                        help=f"token counts M (default {TOKENS_QUICK} with --quick, else {TOKENS_FULL})")
    parser.add_argument("--patterns", nargs="+", type=parse_pattern, default=None,
                        help="N:M patterns (default 2:4 1:4 2:8 4:8)")
    parser.add_argument("--graph-max-m", type=int, default=64,
                        help="time cases with M <= this with CUDA graphs (default 64; -1 disables)")
    parser.add_argument("--seed", type=int, default=0, help="base seed for the random inputs")
    return parser


@dataclass(frozen=True)
class Settings:
    shapes: tuple[LinearShape, ...]
    tokens: tuple[int, ...]
    patterns: tuple[tuple[int, int], ...]
    dtypes: tuple[str, ...]
    warmup_ms: float
    rep_ms: float
    graph_max_m: int
    budget_s: float | None
    seed: int
    quick: bool

    def cases(self) -> list[Case]:
        """Tokens-major, so a budget cut drops the largest M first (the decode cases matter most)."""
        return [
            Case(shape, M, n, m, dtype)
            for M in self.tokens
            for shape in self.shapes
            for dtype in self.dtypes
            for n, m in self.patterns
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "shapes": [{"name": s.name, "N": s.N, "K": s.K} for s in self.shapes],
            "tokens": list(self.tokens),
            "patterns": [f"{n}:{m}" for n, m in self.patterns],
            "dtypes": list(self.dtypes),
            "warmup_ms": self.warmup_ms,
            "rep_ms": self.rep_ms,
            "graph_max_m": self.graph_max_m,
            "budget_s": self.budget_s,
            "seed": self.seed,
            "quick": self.quick,
            "rel_tol": REL_TOL,
        }


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Resolve defaults that depend on ``--quick``."""
    if args.shapes is None:
        shapes: tuple[LinearShape, ...] = LLAMA3_8B if args.quick else SHAPE_GROUPS["all"]
    else:
        seen: dict[tuple[int, int], LinearShape] = {}
        for group in args.shapes:
            for s in group:
                seen.setdefault((s.N, s.K), s)
        shapes = tuple(seen.values())
    tokens = tuple(dict.fromkeys(args.tokens)) if args.tokens else (TOKENS_QUICK if args.quick else TOKENS_FULL)
    patterns = tuple(dict.fromkeys(args.patterns)) if args.patterns else PATTERNS
    dtypes = tuple(dict.fromkeys(args.dtype)) if args.dtype else (("fp16",) if args.quick else ("fp16", "bf16"))
    return Settings(
        shapes=shapes,
        tokens=tokens,
        patterns=patterns,
        dtypes=dtypes,
        warmup_ms=args.warmup_ms if args.warmup_ms is not None else (10.0 if args.quick else 25.0),
        rep_ms=args.rep_ms if args.rep_ms is not None else (50.0 if args.quick else 100.0),
        graph_max_m=args.graph_max_m,
        budget_s=args.budget_s if args.budget_s is not None else (230.0 if args.quick else None),
        seed=args.seed,
        quick=args.quick,
    )


# --------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------


def _dense_operand(w_dense: torch.Tensor) -> Operand:
    return Operand(
        impl=IMPL_DENSE,
        weight=w_dense,
        weight_bytes=tensor_bytes(w_dense),
        apply=lambda x, w: F.linear(x, w),
        clone=w_dense.clone,
        backend="cublas",
    )


def tuner_choice(x: torch.Tensor, w_nm: Any) -> dict[str, Any]:
    """What ``st.nm_linear(x, w_nm)`` will run here, and where that came from, as row fields.

    ``default_tuner().resolve`` walks the op's own lookup order (memory, user cache, shipped table, tune
    now, heuristic), so this is the choice the public op makes; resolving first also keeps any tuning
    out of the timings (``choice_s`` is how long the lookup, tuning included, took).
    """
    from sparse_triton.ops import nm_tuning as nt
    from sparse_triton.tuning import default_tuner

    N, K = w_nm.shape
    key = nt.fwd_key(x, N, K, w_nm.n, w_nm.m, False)
    t0 = time.perf_counter()
    choice = default_tuner().resolve(nt.FWD, key, x.device)
    entry = choice.entry or {}
    return {
        "config": choice.candidate.name,
        "backend": choice.candidate.impl,
        "choice_source": choice.source,
        "choice_key": choice.key,
        "choice_s": round(time.perf_counter() - t0, 3),
        "tuned_ms": entry.get("ms"),  # the tuner's own time for the entry's key (another M if nearest)
    }


def tuning_state(device: torch.device) -> dict[str, Any]:
    """Where the tuner's choices can come from in this run: the mode, the user cache, the shipped table."""
    from sparse_triton.tuning import autotune_enabled, default_tuner

    tuner = default_tuner()
    info = tuner.device_info(device)
    cache = tuner.cache(info)
    table = tuner.shipped(info.slug)
    campaign = table.meta.get("campaign") if isinstance(table.meta.get("campaign"), dict) else {}
    return {
        "autotune": autotune_enabled(),
        "user_cache": str(cache.path),
        "user_cache_keys": sum(len(cache.entries(op)) for op in ("nm_linear_fwd", "nm_linear_bwd_dx")),
        "shipped_table": str(table.path) if table.path else None,
        "shipped_keys": len(table),
        "shipped_campaign": {k: campaign.get(k) for k in ("date", "commit", "quick")} if campaign else None,
    }


def _ours_operand(st: Any, w_nm: Any, w_dense: torch.Tensor, n: int, m: int,
                  choice: dict[str, Any] | None) -> Operand:
    def clone() -> Any:
        # A deep copy keeps the exact stored values and indices in fresh buffers; if the type cannot be
        # deep-copied, compressing the (already N:M) dense weight again gives the same dense weight.
        try:
            dup = copy.deepcopy(w_nm)
            if dup.values.data_ptr() != w_nm.values.data_ptr():
                return dup
        except (TypeError, AttributeError, RuntimeError, copy.Error):
            pass
        return st.nm_compress(w_dense, n, m)

    return Operand(
        impl=IMPL_OURS,
        weight=w_nm,
        weight_bytes=tensor_bytes(w_nm.values, w_nm.indices),
        apply=lambda x, w: st.nm_linear(x, w),
        clone=clone,
        backend=(choice or {}).get("backend"),
        config=(choice or {}).get("config"),
    )


def _heuristic_operand(ours: Operand, x: torch.Tensor, n: int, m: int) -> Operand:
    """The op's heuristic default (first candidate) for this key, run directly, on ours' weights."""
    from sparse_triton.ops import nm_tuning as nt
    from sparse_triton.tuning import default_tuner

    w_nm = ours.weight
    N, K = w_nm.shape
    key = nt.fwd_key(x, N, K, n, m, False)
    cand = nt.FWD.candidates(key, default_tuner().limits(x.device), x.device)[0]

    def apply(xi: torch.Tensor, w: Any) -> torch.Tensor:
        return nt.run_fwd(cand, xi, w.values, w.indices, None, n, m, K)

    return Operand(impl=IMPL_HEUR, weight=w_nm, weight_bytes=ours.weight_bytes, apply=apply, clone=ours.clone,
                   backend=cand.impl, config=cand.name)


def _semi_structured_operand(w_dense: torch.Tensor) -> Operand | str:
    """PyTorch's 2:4 semi-structured weight, or a string saying why it cannot be built here."""
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError as exc:
        return f"unavailable: torch.sparse.to_sparse_semi_structured missing ({exc})"
    try:
        w_s = to_sparse_semi_structured(w_dense)
    except Exception as exc:  # PyTorch raises assorted types for shape/dtype/arch limits
        return f"unsupported: {type(exc).__name__}: {_first_line(exc)}"
    stored = [getattr(w_s, name, None) for name in ("packed", "meta")]
    return Operand(
        impl=IMPL_SEMI,
        weight=w_s,
        weight_bytes=tensor_bytes(*[t for t in stored if isinstance(t, torch.Tensor)]),
        apply=lambda x, w: F.linear(x, w),
        clone=lambda: to_sparse_semi_structured(w_dense),
        backend=getattr(w_s, "BACKEND", type(w_s).__name__),
    )


def _first_line(exc: BaseException, limit: int = 240) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:limit]


# --------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------


def _time_operand(op: Operand, x: torch.Tensor, y_bytes: int, s: Settings, cuda_graph: bool) -> Timing:
    # Graph replays do not flush L2, so cycle through enough weight/input copies to defeat it.
    copies = rotation_count(op.weight_bytes + tensor_bytes(x) + y_bytes) if cuda_graph else 1
    weights = [op.weight] + [op.clone() for _ in range(copies - 1)]
    xs = [x] + [x.clone() for _ in range(copies - 1)]
    fns = [functools.partial(op.apply, xi, wi) for xi, wi in zip(xs, weights)]
    return bench(fns, warmup_ms=s.warmup_ms, rep_ms=s.rep_ms, cuda_graph=cuda_graph)


def run_case(st: Any, case: Case, s: Settings, device: str = "cuda") -> tuple[list[dict[str, Any]], list[str]]:
    """Check and time every implementation of ``case``; returns rows and sparse_triton failures."""
    N, K, M = case.shape.N, case.shape.K, case.M
    dtype = DTYPES[case.dtype]
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(case.seed(s.seed))
    # Random data only: zeros would hide indexing bugs and can time faster than real weights.
    w = torch.randn(N, K, device=dev, dtype=torch.float32, generator=gen).mul_(K ** -0.5).to(dtype)
    x = torch.randn(M, K, device=dev, dtype=torch.float32, generator=gen).to(dtype)
    cuda_graph = M <= s.graph_max_m
    y_bytes = M * N * x.element_size()
    base = {
        "shape": case.shape.name, "dims": case.shape.dims, "N": N, "K": K, "M": M,
        "pattern": case.pattern, "n": case.n, "m": case.m, "dtype": case.dtype,
        "flops": case.flops,
    }
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    choice: dict[str, Any] = {}

    def row(impl: str, status: str, **fields: Any) -> dict[str, Any]:
        r = {**base, "impl": impl, "status": status, "backend": None, "config": None, "ms": None, "tflops": None,
             "gbps": None, "bytes": None, "speedup": None, "rel_err": None, "note": None}
        if impl == IMPL_OURS:  # what the tuner chose, and the heuristic default's time (filled in below)
            r.update({k: choice.get(k) for k in CHOICE_FIELDS}, heuristic=None, heuristic_ms=None,
                     vs_heuristic=None)
            r["note"] = choice.get("note")
        r.update(fields)
        rows.append(r)
        return r

    try:
        w_nm = st.nm_compress(w, case.n, case.m)
        w_dense = w_nm.to_dense().contiguous()
        if tuple(w_dense.shape) != (N, K):
            raise ValueError(f"NMTensor.to_dense() has shape {tuple(w_dense.shape)}, expected {(N, K)}")
    except Exception as exc:  # report it and move on to the next case
        row(IMPL_OURS, "error", note=f"nm_compress failed: {type(exc).__name__}: {_first_line(exc)}")
        failures.append(f"{case.label}: nm_compress raised {type(exc).__name__}: {_first_line(exc)}")
        return rows, failures
    del w
    ref = F.linear(x.float(), w_dense.float())

    try:
        choice.update(tuner_choice(x, w_nm))
    except Exception as exc:  # the op call below raises too and is recorded there; keep the reason
        choice.update(choice_source="error", note=f"tuner: {type(exc).__name__}: {_first_line(exc)}")
    ours_op = _ours_operand(st, w_nm, w_dense, case.n, case.m, choice)
    operands: list[Operand] = [_dense_operand(w_dense), ours_op]
    try:
        operands.append(_heuristic_operand(ours_op, x, case.n, case.m))
    except Exception as exc:  # recorded as an error row of the heuristic, not a suite failure
        row(IMPL_HEUR, "error", note=f"no heuristic candidate: {type(exc).__name__}: {_first_line(exc)}")
    semi_refused: str | None = None
    if (case.n, case.m) == (2, 4):
        semi = _semi_structured_operand(w_dense)
        if isinstance(semi, Operand):
            operands.append(semi)
        else:
            semi_refused = semi

    dense_ms: float | None = None
    for op in operands:
        ours = op.impl in (IMPL_OURS, IMPL_HEUR)  # the heuristic default is what runs with tuning off
        who = "nm_linear" if op.impl == IMPL_OURS else "the heuristic default"
        try:
            err = relative_error(op.apply(x, op.weight), ref)
        except Exception as exc:  # any failure becomes a row, never a crash
            status = "error" if op.impl != IMPL_SEMI else "unsupported"
            row(op.impl, status, backend=op.backend, config=op.config,
                note=f"{type(exc).__name__}: {_first_line(exc)}")
            if ours:
                failures.append(f"{case.label}: {who} raised {type(exc).__name__}: {_first_line(exc)}")
            continue
        if not err <= REL_TOL:
            row(op.impl, "wrong", backend=op.backend, config=op.config, rel_err=err,
                note=f"relative error {err:.3g} > {REL_TOL:g} against the fp32 reference; not timed")
            if ours:
                failures.append(f"{case.label}: {who}: relative error {err:.3g} > {REL_TOL:g}")
            continue
        try:
            timing = _time_operand(op, x, y_bytes, s, cuda_graph)
        except Exception as exc:  # any failure becomes a row, never a crash
            row(op.impl, "error", backend=op.backend, config=op.config, rel_err=err,
                note=f"timing failed: {type(exc).__name__}: {_first_line(exc)}")
            if ours:
                failures.append(f"{case.label}: timing {who} raised {type(exc).__name__}: {_first_line(exc)}")
            continue
        moved = op.weight_bytes + tensor_bytes(x) + y_bytes
        if op.impl == IMPL_DENSE:
            dense_ms = timing.median_ms
        row(
            op.impl, "ok", backend=op.backend, config=op.config, rel_err=err, bytes=moved,
            tflops=tflops(case.flops, timing.median_ms), gbps=gbps(moved, timing.median_ms),
            speedup=(dense_ms / timing.median_ms) if dense_ms else None,
            **timing.as_row(),
        )
    if semi_refused is not None:
        status, _, why = semi_refused.partition(": ")
        row(IMPL_SEMI, status, note=why)
    _link_heuristic(rows)
    return rows, failures


def _link_heuristic(rows: list[dict[str, Any]]) -> None:
    """Copy the heuristic default's name and time onto the sparse_triton row (``vs_heuristic`` = how
    much faster the tuned choice is than the heuristic default, measured in the same case)."""
    ours = next((r for r in rows if r["impl"] == IMPL_OURS), None)
    heur = next((r for r in rows if r["impl"] == IMPL_HEUR), None)
    if ours is None or heur is None:
        return
    ours["heuristic"] = heur.get("config")
    if heur["status"] == "ok":
        ours["heuristic_ms"] = heur["ms"]
        if ours["status"] == "ok" and ours.get("ms"):
            ours["vs_heuristic"] = heur["ms"] / ours["ms"]


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


# Marks after a sparse_triton speedup in the summary table: the implementation the tuner chose.
IMPL_MARK = {"dense": " D", "cusparselt": " C"}


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return {"unsupported": "unsup", "unavailable": "n/a"}.get(r["status"], r["status"])
    if r.get("speedup") is None:
        return "-"
    return f"{r['speedup']:.2f}x" + (IMPL_MARK.get(r.get("backend"), "") if r["impl"] == IMPL_OURS else "")


def progress_line(rows: Sequence[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        name = "heuristic" if r["impl"] == IMPL_HEUR else r["impl"]
        if r["status"] == "ok":
            sp = f" {r['speedup']:.2f}x" if r["impl"] != IMPL_DENSE and r.get("speedup") else ""
            parts.append(f"{name} {r['ms'] * 1e3:.1f}us{sp}")
        else:
            parts.append(f"{name} {r['status']}")
        if r["impl"] == IMPL_OURS:
            parts[-1] += f" ({r.get('backend') or '?'}, {r.get('choice_source') or '?'})"
    mode = next((r["timing"] for r in rows if r.get("timing")), "-")
    return " | ".join(parts) + f" [{mode}]"


def summary_table(rows: Sequence[dict[str, Any]], patterns: Sequence[tuple[int, int]]) -> str:
    """One line per (shape, dtype, M): sparse_triton speedup per pattern (marked with the implementation
    the tuner chose when it is not our kernel), PyTorch 2:4's, the range of tuned-over-heuristic speedups
    and where the choices came from."""
    index = {(r["shape"], r["dtype"], r["M"], r["pattern"], r["impl"]): r for r in rows}
    shape_order = list(dict.fromkeys(r["shape"] for r in rows))
    dtype_order = list(dict.fromkeys(r["dtype"] for r in rows))
    keys = list(dict.fromkeys((r["shape"], r["dtype"], r["M"]) for r in rows))
    keys.sort(key=lambda k: (shape_order.index(k[0]), dtype_order.index(k[1]), k[2]))
    labels = [f"{n}:{m}" for n, m in patterns]
    table_rows = []
    for shape, dtype, M in keys:
        line: dict[str, Any] = {"shape": shape, "dtype": dtype, "M": M}
        errs, modes, vs_heur, sources = [], set(), [], set()
        for p in labels:
            ours = index.get((shape, dtype, M, p, IMPL_OURS))
            line[p] = _cell(ours)
            if ours is not None and ours.get("rel_err") is not None:
                errs.append(ours["rel_err"])
            if ours is not None and ours.get("vs_heuristic") is not None:
                vs_heur.append(ours["vs_heuristic"])
            if ours is not None and ours.get("choice_source"):
                sources.add(ours["choice_source"])
            dense = index.get((shape, dtype, M, p, IMPL_DENSE))
            if dense is not None and dense.get("timing"):
                modes.add(dense["timing"])
            if p == "2:4":
                line["2:4 torch"] = _cell(index.get((shape, dtype, M, p, IMPL_SEMI)))
        line["vs_heur"] = f"{min(vs_heur):.2f}-{max(vs_heur):.2f}" if vs_heur else "-"
        line["source"] = "/".join(sorted(sources)) or "-"
        line["max_err"] = f"{max(errs):.1e}" if errs else "-"
        line["timing"] = "/".join(sorted(modes)) or "-"
        table_rows.append(line)
    columns = ["shape", "dtype", "M", *labels]
    if "2:4" in labels:
        columns.insert(columns.index("2:4") + 1, "2:4 torch")
    return format_table(table_rows, [*columns, "vs_heur", "source", "max_err", "timing"])


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = settings_from_args(args)
    require_gpu("perf.suites.nm_linear")
    try:
        import sparse_triton as st
    except ImportError as exc:
        raise SystemExit(
            f"perf: cannot import sparse_triton ({exc}); run from the repo root with PYTHONPATH=."
        ) from exc
    # The fp32 reference must be true fp32 (TF32 would add ~1e-3 error of its own).
    torch.backends.cuda.matmul.allow_tf32 = False

    cases = s.cases()
    config = {
        **s.to_json(),
        # cuBLAS settings that change the dense baseline's speed and rounding; recorded, left as found.
        "cublas_allow_fp16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "cublas_allow_bf16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "tuning": tuning_state(torch.device("cuda", torch.cuda.current_device())),
    }
    writer = ResultWriter(SUITE, args.out, config=config, plot=PLOT)
    budget = Budget(s.budget_s)
    gpu_name = (writer.env.get("gpu") or {}).get("name")
    print(f"{SUITE}: {len(cases)} cases on {gpu_name}, torch {torch.__version__}, "
          f"results -> {writer.path}", flush=True)
    failures: list[str] = []
    skipped: list[Case] = []
    for i, case in enumerate(cases, 1):
        if not budget.fits():
            skipped.append(case)
            continue
        t0 = time.monotonic()
        rows, bad = run_case(st, case, s)
        budget.record(time.monotonic() - t0)
        failures += bad
        writer.extend(rows)
        print(f"[{i:>3}/{len(cases)} {budget.elapsed():5.0f}s] {case.label:<34} {progress_line(rows)}", flush=True)
    if skipped:
        writer.note(f"budget of {s.budget_s:g}s reached: {len(skipped)} of {len(cases)} cases not run: "
                    + ", ".join(c.label for c in skipped))
    path = writer.close(complete=not skipped)

    print()
    print(summary_table(writer.rows, s.patterns))
    print(f"{SUITE}: sparse_triton speedup over dense cuBLAS F.linear on the same pruned weight "
          f"(median; 'wrong' = rel err > {REL_TOL:g}, not timed; D / C = the tuner chose dense cuBLAS / "
          f"cuSPARSELt); vs_heur = heuristic default ms / tuned choice ms; source = where the choice came from")
    if skipped:
        print(f"{SUITE}: INCOMPLETE: budget {s.budget_s:g}s reached, {len(skipped)}/{len(cases)} cases not run")
    for f in failures:
        print(f"{SUITE}: FAIL {f}")
    ran = len(cases) - len(skipped)
    print(f"{SUITE}: {ran}/{len(cases)} cases in {budget.elapsed():.0f}s, {len(failures)} failures -> {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
