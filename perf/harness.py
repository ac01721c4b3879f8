"""Shared benchmark harness: environment capture, GPU timing, hardware units, result files.

Every suite under ``perf/suites/`` uses this module, so its pieces are general:

* :func:`environment` records what a number depends on (GPU, versions, commit, date).
* :func:`bench` times a callable on the GPU and returns a :class:`Timing` (median, p20, p80 in ms).
* :func:`tflops`, :func:`gbps`, :func:`tensor_bytes` turn a time into hardware units.
* :class:`ResultWriter` writes ``<out>/<gpu-slug>/<suite>.json`` = ``{"suite", "env", "rows", ...}``;
  ``perf/plot.py`` reads these files, so measuring and plotting stay two separate steps.
* :func:`require_gpu` stops a suite with a clear message on a machine without a CUDA GPU.

Timing method (see perf/README.md): CUDA events around each call with the L2 cache flushed before it
(``triton.testing.do_bench``), or, for microsecond kernels, replays of a CUDA graph that unrolls many
calls (``triton.testing.do_bench_cudagraph``) so that launch gaps do not dominate. A graph replay does
not flush L2 between calls, so callers pass several copies of the inputs (see :func:`rotation_count`)
and consecutive calls read different memory. Inputs must be random data, never zeros: zeros hide
indexing bugs and can run faster than real data (lower switching power keeps clocks higher).

Run ``python -m perf.harness env`` to print :func:`environment` as JSON, ``python -m perf.harness slug``
to print the result-directory name of the current GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "Budget",
    "PlotSpec",
    "ResultWriter",
    "Timing",
    "add_common_args",
    "bench",
    "environment",
    "format_table",
    "gbps",
    "gpu_slug",
    "l2_cache_bytes",
    "relative_error",
    "require_gpu",
    "results_path",
    "rotation_count",
    "tensor_bytes",
    "tflops",
    "write_results",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "perf" / "results"

# Environment variable consulted for the commit when the checkout has no git metadata (e.g. a copy of
# the working tree on a GPU machine): set it to the short sha the tree was copied from.
COMMIT_ENV_VAR = "SPARSE_TRITON_GIT_COMMIT"


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


def _run_quiet(cmd: Sequence[str], cwd: Path | None = None) -> str | None:
    """Stdout of ``cmd`` stripped, or None when it cannot run or fails."""
    try:
        # GIT_OPTIONAL_LOCKS=0: `git status` must not take index.lock (another process may be committing).
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
        out = subprocess.run(
            list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _git_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    """Short commit sha and whether tracked files differ from it; tolerates a checkout without git."""
    sha = _run_quiet(["git", "rev-parse", "--short", "HEAD"], cwd=root)
    if sha is None:
        commit = os.environ.get(COMMIT_ENV_VAR) or None
        return {"commit": commit, "dirty": None, "source": COMMIT_ENV_VAR if commit else None}
    status = _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return {"commit": sha, "dirty": None if status is None else bool(status), "source": "git"}


def _nvidia_driver() -> str | None:
    out = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def _gpu_info() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    return {
        "name": props.name,
        "index": idx,
        "count": torch.cuda.device_count(),
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 2),
        "l2_cache_mib": (round(props.L2_cache_size / 2**20, 2) if getattr(props, "L2_cache_size", None)
                         else None),
        "driver": _nvidia_driver(),
    }


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _package_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return version("sparse-triton")
    except PackageNotFoundError:
        pass
    try:  # not installed: running from the source tree with PYTHONPATH=.
        import sparse_triton
    except Exception:  # an unimportable package is reported by the suite that needs it
        return None
    return getattr(sparse_triton, "__version__", None)


def environment() -> dict[str, Any]:
    """Everything a measurement depends on, as a JSON-serializable dict.

    Keys: ``gpu`` (name, capability, SM count, memory, L2, driver; None without CUDA), ``versions``
    (python, torch, triton, cuda, cudnn, cusparselt, sparse_triton), ``git`` (short commit, dirty flag),
    ``host`` (platform, hostname), ``date_utc`` (ISO 8601), ``triton_interpret`` (the env var, which must
    be unset for meaningful timings).
    """
    cusparselt = None
    backend = getattr(torch.backends, "cusparselt", None)
    if backend is not None:
        try:
            cusparselt = backend.version() if backend.is_available() else None
        except (RuntimeError, AttributeError):
            cusparselt = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "gpu": _gpu_info(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "cuda": torch.version.cuda,
            "cudnn": cudnn,
            "cusparselt": cusparselt,
            "sparse_triton": _package_version(),
        },
        "git": _git_info(),
        "host": {"platform": platform.platform(), "hostname": platform.node()},
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }


def gpu_slug(name: str | None) -> str:
    """Directory name for a GPU: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    if not name:
        return "no-gpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-gpu"


def require_gpu(what: str = "this benchmark") -> None:
    """Exit with a clear message unless a CUDA GPU is usable and Triton is not being interpreted."""
    if not torch.cuda.is_available():
        raise SystemExit(
            f"perf: {what} needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). "
            "Run it on a GPU machine, e.g. `bash perf/gpu_check.sh`."
        )
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit(
            f"perf: TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} is set; {what} times compiled "
            "kernels only. Unset it (`env -u TRITON_INTERPRET ...`)."
        )


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Result of :func:`bench`. Times in milliseconds per call.

    ``mode`` is ``"events"`` (CUDA events around each call, L2 flushed before it) or ``"cudagraph"``
    (each sample is the mean call time over one replay of a graph of many unrolled calls).
    ``samples`` is how many samples the median is over; ``rotation`` how many input copies were cycled.
    ``note`` says why a requested CUDA graph was not used, if it was not.
    """

    median_ms: float
    p20_ms: float
    p80_ms: float
    mode: str
    samples: int
    rotation: int = 1
    note: str | None = None

    def as_row(self) -> dict[str, Any]:
        """The fields a result row carries (``ms`` is the median)."""
        return {
            "ms": self.median_ms,
            "p20_ms": self.p20_ms,
            "p80_ms": self.p80_ms,
            "timing": self.mode,
            "samples": self.samples,
            "rotation": self.rotation,
            "timing_note": self.note,
        }


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default method)."""
    if not sorted_values:
        raise ValueError("_quantile: no values")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _summarize(times: Iterable[float], mode: str, rotation: int, note: str | None = None) -> Timing:
    values = sorted(float(t) for t in times)
    if not values:
        raise RuntimeError("bench: the timer returned no samples")
    return Timing(
        median_ms=statistics.median(values),
        p20_ms=_quantile(values, 0.2),
        p80_ms=_quantile(values, 0.8),
        mode=mode,
        samples=len(values),
        rotation=rotation,
        note=note,
    )


def _warm(step: Callable[[], object], warmup_ms: float) -> None:
    """Call ``step`` for about ``warmup_ms`` of wall time (clocks up, allocator and caches primed)."""
    deadline = time.perf_counter() + warmup_ms / 1e3
    calls = 0
    while True:
        step()
        calls += 1
        if calls % 8 == 0:
            torch.cuda.synchronize()
            if time.perf_counter() >= deadline:
                break
    torch.cuda.synchronize()


def bench(
    fn: Callable[[], object] | Sequence[Callable[[], object]],
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cuda_graph: bool = False,
) -> Timing:
    """Time ``fn`` on the current CUDA device; return median, p20 and p80 milliseconds per call.

    ``fn`` is a zero-argument callable, or a sequence of them that compute the same thing on different
    copies of the inputs; successive calls cycle through the sequence. Every callable is called once
    first, outside any timing, so that compilation, autotuning and allocation are not measured.

    * ``cuda_graph=False``: ``triton.testing.do_bench`` -- a CUDA event pair around every call and the
      L2 cache flushed before it; about ``rep_ms`` of calls after ``warmup_ms`` of warm-up.
    * ``cuda_graph=True``: ``triton.testing.do_bench_cudagraph`` -- many calls unrolled into one CUDA
      graph, replayed 10 times; each sample is a replay's time over its call count, so launch overhead
      is gone (use it for microsecond kernels). ``rep_ms`` is the total replay time (10 replays of
      ``rep_ms / 10``). Nothing flushes L2 between calls inside a graph: pass enough input copies
      (:func:`rotation_count`) that one cycle moves more bytes than L2 holds. If capture fails (the
      callable syncs the host, or is not capturable), this falls back to events and says why in
      :attr:`Timing.note`.

    The inputs ``fn`` reads must be random data, never zeros (see the module docstring).
    """
    import triton.testing as tt

    fns = [fn] if callable(fn) else list(fn)
    if not fns:
        raise ValueError("bench: fn is an empty sequence")
    if rep_ms <= 0 or warmup_ms < 0:
        raise ValueError(f"bench: need rep_ms > 0 and warmup_ms >= 0, got {rep_ms=} {warmup_ms=}")
    counter = itertools.count()

    def step() -> object:
        return fns[next(counter) % len(fns)]()

    for f in fns:
        f()
    torch.cuda.synchronize()

    note = None
    if cuda_graph:
        try:
            _warm(step, warmup_ms)
            times = tt.do_bench_cudagraph(step, rep=rep_ms / 10, return_mode="all")
            return _summarize(times, "cudagraph", len(fns))
        except Exception as exc:  # any capture failure means: time it without a graph
            torch.cuda.synchronize()
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            note = f"cuda graph capture failed ({type(exc).__name__}: {first_line[:200]}); timed with events"
    times = tt.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    return _summarize(times, "events", len(fns), note)


def l2_cache_bytes(default: int = 64 * 2**20) -> int:
    """L2 size of the current CUDA device in bytes (``default`` where torch does not report it)."""
    if torch.cuda.is_available():
        size = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
        if size:
            return int(size)
    return default


def rotation_count(bytes_per_call: int, *, l2_bytes: int | None = None, factor: float = 3.0,
                   cap: int = 64) -> int:
    """How many input copies a CUDA-graph timing should cycle through so that L2 cannot serve them.

    One cycle over the copies moves at least ``factor`` times the L2 size (or ``cap`` copies at most,
    which bounds the memory for tiny operands). ``bytes_per_call`` counts what one call reads.
    """
    if bytes_per_call <= 0:
        raise ValueError(f"rotation_count: bytes_per_call must be > 0, got {bytes_per_call}")
    l2 = l2_cache_bytes() if l2_bytes is None else l2_bytes
    return max(1, min(cap, math.ceil(factor * l2 / bytes_per_call)))


# --------------------------------------------------------------------------------------------------
# Units and checks
# --------------------------------------------------------------------------------------------------


def tflops(flops: float, ms: float | None) -> float | None:
    """Rate in TFLOP/s for ``flops`` operations done in ``ms`` milliseconds (None if no time)."""
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float | None) -> float | None:
    """Bandwidth in GB/s (1e9 bytes per second) for ``nbytes`` moved in ``ms`` milliseconds."""
    if ms is None or ms <= 0:
        return None
    return nbytes / (ms * 1e-3) / 1e9


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Storage bytes of the given tensors' elements (None entries count zero)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (inf if ``out`` has a NaN/inf or the shapes differ)."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    o, r = out.double(), ref.double()
    if not bool(torch.isfinite(o).all()):
        return math.inf
    denom = torch.linalg.vector_norm(r).item()
    num = torch.linalg.vector_norm(o - r).item()
    if denom == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / denom


# --------------------------------------------------------------------------------------------------
# Budget and arguments
# --------------------------------------------------------------------------------------------------


class Budget:
    """Wall-clock budget for a suite: it stops starting cases that would not finish in time.

    ``fits()`` is True while the remaining time exceeds the longest case seen so far (times a margin);
    ``record(seconds)`` registers a finished case. ``seconds=None`` means unlimited.
    """

    def __init__(self, seconds: float | None, margin: float = 1.5) -> None:
        self.seconds = seconds
        self.margin = margin
        self.start = time.monotonic()
        self.longest = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def record(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)

    def fits(self) -> bool:
        return self.remaining() > self.longest * self.margin


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments every suite accepts (``perf/gpu_check.sh`` relies on them)."""
    parser.add_argument("--quick", action="store_true",
                        help="small case set that fits the GPU check (a few minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help=f"results root; the file goes to OUT/<gpu-slug>/<suite>.json (default {RESULTS_DIR})")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new cases after this many seconds (results stay valid)")
    parser.add_argument("--warmup-ms", type=float, default=None, help="warm-up per timing (ms)")
    parser.add_argument("--rep-ms", type=float, default=None, help="measured time per timing (ms)")
    return parser


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlotSpec:
    """How ``perf/plot.py`` draws a suite's rows; stored in the result file under ``"plot"``.

    One panel per distinct value of the ``panel`` fields; in it one line per distinct ``(color, style)``
    pair, ``y`` against ``x``. Rows whose field matches ``exclude`` (field -> values) are left out (the
    baseline itself), as are rows without a numeric ``y``. ``hline`` draws a reference line (1.0 for a
    speedup). ``xscale`` is ``"linear"``, ``"log2"`` or ``"log10"``.
    """

    x: str
    y: str
    panel: tuple[str, ...] = ()
    color: str | None = None
    style: str | None = None
    exclude: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    xscale: str = "linear"
    yscale: str = "linear"
    hline: float | None = None
    xlabel: str | None = None
    ylabel: str | None = None
    title: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["panel"] = list(self.panel)
        d["exclude"] = {k: list(v) for k, v in self.exclude.items()}
        return d


@dataclass(frozen=True)
class CurvesPlot(PlotSpec):
    """A PlotSpec with reference ``curves`` ([(label, ((x, y), ...))], e.g. the ideal 1/(1-s)) and ``also``:
    further plots drawn to ``<suite>-<name>.png`` (the keys perf/plot.py reads)."""

    name: str | None = None
    curves: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = ()
    also: tuple[PlotSpec, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        d["curves"] = [{"label": label, "points": [list(p) for p in pts]} for label, pts in self.curves]
        d["also"] = [s.to_json() for s in self.also]
        return d


def results_path(suite: str, out_dir: Path | str | None = None, env: Mapping[str, Any] | None = None) -> Path:
    """``<out_dir>/<gpu-slug>/<suite>.json`` (out_dir defaults to perf/results)."""
    env = environment() if env is None else env
    gpu = env.get("gpu") or {}
    root = Path(out_dir) if out_dir is not None else RESULTS_DIR
    return root / gpu_slug(gpu.get("name")) / f"{suite}.json"


def _jsonable(value: Any) -> Any:
    """Make ``value`` strict-JSON: non-finite floats become None, tuples lists, dtypes/paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


class ResultWriter:
    """Collects a suite's rows and writes them to ``<out>/<gpu-slug>/<suite>.json``.

    The file is rewritten atomically after every :meth:`add` (with ``flush_every=1``), so a suite that
    is killed by a timeout still leaves the rows it finished. Layout::

        {"suite": str, "env": environment(), "config": {...}, "plot": PlotSpec | null,
         "complete": bool, "notes": [str], "rows": [{...}, ...]}
    """

    def __init__(
        self,
        suite: str,
        out_dir: Path | str | None = None,
        *,
        env: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        plot: PlotSpec | None = None,
        flush_every: int = 1,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", suite):
            raise ValueError(f"ResultWriter: suite must be a plain file name, got {suite!r}")
        self.suite = suite
        self.env = dict(environment() if env is None else env)
        self.path = results_path(suite, out_dir, self.env)
        self.config = dict(config or {})
        self.plot = plot
        self.flush_every = max(1, flush_every)
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.complete = False

    def add(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        if len(self.rows) % self.flush_every == 0:
            self.flush()

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.rows.append(dict(row))
        self.flush()

    def note(self, text: str) -> None:
        self.notes.append(text)

    def document(self) -> dict[str, Any]:
        return _jsonable({
            "suite": self.suite,
            "env": self.env,
            "config": self.config,
            "plot": self.plot.to_json() if self.plot is not None else None,
            "complete": self.complete,
            "notes": self.notes,
            "rows": self.rows,
        })

    def flush(self) -> Path:
        """Write the file now (atomically: a temporary file renamed over the old one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.document(), indent=1, allow_nan=False) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{self.suite}.", suffix=".json.tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path

    def close(self, complete: bool = True) -> Path:
        """Mark the run complete (or not, when a budget cut it short) and write the final file."""
        self.complete = complete
        return self.flush()


def write_results(
    suite: str,
    rows: Iterable[Mapping[str, Any]],
    out_dir: Path | str | None = None,
    *,
    env: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    plot: PlotSpec | None = None,
    complete: bool = True,
) -> Path:
    """Write all ``rows`` of ``suite`` at once; returns the file path (see :class:`ResultWriter`)."""
    writer = ResultWriter(suite, out_dir, env=env, config=config, plot=plot)
    writer.rows.extend(dict(r) for r in rows)
    return writer.close(complete)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                 formats: Mapping[str, str] | None = None) -> str:
    """Fixed-width text table of ``columns`` (missing or None values print as ``-``)."""
    formats = formats or {}

    def cell(row: Mapping[str, Any], col: str) -> str:
        v = row.get(col)
        if v is None:
            return "-"
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        fmt = formats.get(col)
        return format(v, fmt) if fmt else str(v)

    body = [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.harness", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["env", "slug"],
                        help="env: print environment() as JSON; slug: print the GPU's result directory name")
    args = parser.parse_args(argv)
    env = environment()
    if args.what == "env":
        print(json.dumps(_jsonable(env), indent=1))
    else:
        print(gpu_slug((env.get("gpu") or {}).get("name")))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
