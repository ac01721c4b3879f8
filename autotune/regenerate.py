"""Regenerate the shipped tuning table of the GPU this runs on: ``sparse_triton/tuning/tuned/<gpu-slug>.json``.

    PYTHONPATH=. python -m autotune.regenerate                        # every key of TARGETS, into the package
    PYTHONPATH=. python -m autotune.regenerate --quick --budget-s 300 --out /tmp/t.json
    PYTHONPATH=. python -m autotune.regenerate --resume /tmp/t.json --budget-s 500   # go on where it stopped
    PYTHONPATH=. python -m autotune.regenerate --dry-run [--quick] [--resume T]      # list the keys (no GPU)

What is tuned (:data:`TARGETS`, the shape sets of ``autotune/shapes.py``), for patterns 2:4, 1:4, 2:8,
4:8 in fp16 and bf16:

* ``nm_linear_fwd``: every layer of Llama-3-8B and Llama-3-70B at the LLM token counts, and the ViT-L MLP
  (with bias) at 16384 tokens;
* ``nm_linear_bwd_dx``: the same layers at the token counts of prefill and training only
  (M >= :data:`TRAINING_MIN_TOKENS`): decode is inference, it has no backward, and a fine-tune with fewer
  tokens per step finds the 256 entry through the nearest-bucket fallback;
* ``nm_prune_compress`` (compressing a weight: ``nm_compress``, ``from_dense``, the sparse optimizer's
  recompress) and ``nm_gather`` (the weight gradient's gather): once per weight shape, they have no token
  count.

``--quick`` is what ``python -m perf.suites.nm_linear --quick`` runs: Llama-3-8B, fp16, M <= 4096, the
forward and the compression of its weights.

Order: device time is scarce, so the most useful keys come first (:func:`plan`): pattern 2:4 before
1:4, 2:8, 4:8; within a pattern the forward, then dX, compression, the gather; fp16 before bf16;
Llama-3-8B, then 70B, then ViT-L; token counts ascending (decode first); layers in model order. The
first key is 2:4 fp16 Llama-3-8B q/o at M = 1.

Each key is timed by :meth:`sparse_triton.tuning.Tuner.tune` (every candidate checked against the fp64
reference, then timed with CUDA events and an L2 flush), with a user cache in a temporary directory: the
campaign never reads or writes the user's own cache. The table is rewritten atomically after every key
(temporary file + ``os.replace``), so a run that is killed keeps every key it finished; ``--budget-s``
stops starting keys in time to exit cleanly. ``--resume`` loads a table and tunes only the keys it lacks,
so several calls (each limited in device time) build one table. Without a CUDA GPU it exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.shapes import LLAMA3_8B, LLAMA3_70B, LLM_TOKENS, NM_PATTERNS, VIT_L_MLP, VIT_TOKENS, LinearShape
from sparse_triton.tuning.cache import FORMAT  # a shipped table has the user cache's file format

REPO_ROOT = Path(__file__).resolve().parents[1]
TUNED_DIR = REPO_ROOT / "sparse_triton" / "tuning" / "tuned"  # the source tree's, not an installed copy's
COMMIT_ENV_VAR = "SPARSE_TRITON_GIT_COMMIT"  # the commit, where the checkout has no .git (as perf/ does)

FWD, BWD_DX, PRUNE, GATHER = "nm_linear_fwd", "nm_linear_bwd_dx", "nm_prune_compress", "nm_gather"
OPS = (FWD, BWD_DX, PRUNE, GATHER)  # priority order within a pattern
QUICK_OPS = (FWD, PRUNE)  # what the perf suite's quick run calls
DTYPES = ("fp16", "bf16")  # priority order
TRAINING_MIN_TOKENS = 256  # dX is tuned from here up: prefill and training, not decode
QUICK_MAX_TOKENS = 4096  # --quick: the perf suite's quick token counts
ACT_FWD, ACT_GATE_UP = "act_sparse_linear_fwd", "act_sparse_gate_up"
ACT_OPS = (ACT_FWD, ACT_GATE_UP, "act_sparse_nm_linear_fwd")
ACT_TOKENS = (1, 2, 4, 8, 16, 32, 64)  # decode batches: the union rule's range (past it the op is dense)


@dataclass(frozen=True)
class ShapeSet:
    """Layers of one model and the token counts they run at."""

    name: str
    shapes: tuple[LinearShape, ...]
    tokens: tuple[int, ...]


TARGETS = (
    ShapeSet("llama3-8b", LLAMA3_8B, LLM_TOKENS),
    ShapeSet("llama3-70b", LLAMA3_70B, LLM_TOKENS),
    ShapeSet("vit-l", VIT_L_MLP, VIT_TOKENS),
)


@dataclass(frozen=True)
class Job:
    """One key to tune: the op, its key (as ``sparse_triton.ops.nm_tuning`` builds it) and the layers it
    serves (a key shared by two layers, e.g. a 1024x4096 dX of Llama-3-8B k/v and ViT-L fc2, is tuned once)."""

    op: str
    key: tuple
    layers: tuple[str, ...]

    @property
    def key_str(self) -> str:
        return _tunable()[self.op].key_str(self.key)

    @property
    def label(self) -> str:
        if self.op in ACT_OPS:
            return f"{self.op:<17} {self.key_str}"
        tag, nm, N, K = self.key[:4]
        if self.op not in (FWD, BWD_DX):
            return f"{self.op:<17} {tag} {nm} {N}x{K}"
        bias = " +bias" if self.op == FWD and self.key[5] else ""
        return f"{self.op:<17} {tag} {nm} {N}x{K} M={self.key[4]}{bias}"


def _tunable() -> dict:
    """Every op the tables hold, by name."""
    from sparse_triton.ops import act_sparse_tuning, nm_tuning

    return {**nm_tuning.TUNABLE, **act_sparse_tuning.TUNABLE}


def plan(quick: bool = False, targets: Sequence[ShapeSet] = TARGETS) -> list[Job]:
    """Every key of the campaign (or of ``--quick``), most important first (see the module docstring)."""
    from sparse_triton.tuning import bucket

    ranked: dict[tuple[str, tuple], tuple[tuple, list[str]]] = {}
    for set_rank, sset in enumerate(targets):
        if quick and sset.name != "llama3-8b":
            continue
        tokens = [t for t in sset.tokens if not quick or t <= QUICK_MAX_TOKENS]
        for layer_rank, shape in enumerate(sset.shapes):
            for pattern_rank, (n, m) in enumerate(NM_PATTERNS):
                for dtype_rank, tag in enumerate(DTYPES[:1] if quick else DTYPES):
                    for op_rank, op in enumerate(OPS):
                        if quick and op not in QUICK_OPS:
                            continue
                        for M in _token_buckets(op, tokens, bucket):
                            key = (tag, f"{n}:{m}", shape.N, shape.K)
                            if op in (FWD, BWD_DX):  # (the weight's R rows x K for prune and gather)
                                key += (M, int(shape.bias)) if op == FWD else (M,)
                            rank = (pattern_rank, op_rank, dtype_rank, set_rank, M, layer_rank)
                            old = ranked.get((op, key))
                            if old is None:
                                ranked[(op, key)] = (rank, [shape.name])
                            else:
                                ranked[(op, key)] = (min(old[0], rank), old[1] + [shape.name])
    order = sorted(ranked.items(), key=lambda item: item[1][0])
    jobs = [Job(op, key, tuple(layers)) for (op, key), (_, layers) in order]
    return jobs + _act_jobs(quick, targets)


def _act_jobs(quick: bool, targets: Sequence[ShapeSet]) -> list[Job]:
    """The activation-sparse keys of the LLM sets: every linear at decode batches (scalar thresholds), and
    the fused gate/up of each MLP (its gate_up shape), after the N:M keys."""
    jobs: dict[tuple, list[str]] = {}
    for sset in targets:
        if not sset.name.startswith("llama") or (quick and sset.name != "llama3-8b"):
            continue
        for tag in DTYPES[:1] if quick else DTYPES:
            for M in ACT_TOKENS[:1] if quick else ACT_TOKENS:
                for shape in sset.shapes:
                    keys = [(ACT_FWD, (tag, shape.N, shape.K, M, int(shape.bias), "scalar"))]
                    if shape.name.endswith("gate_up"):
                        keys.append((ACT_GATE_UP, (tag, shape.N, shape.K, M, "silu", "scalar")))
                    for k in keys:
                        jobs.setdefault(k, []).append(shape.name)
    return [Job(op, key, tuple(layers)) for (op, key), layers in jobs.items()]


def _token_buckets(op: str, tokens: Sequence[int], bucket: Callable[[int], int]) -> list[int]:
    """The M buckets ``op`` is tuned at: every one for the forward, training's for dX, none (a single
    key, ranked as M = 0) for the per-weight prune and gather."""
    if op == FWD:
        return sorted({bucket(t) for t in tokens})
    if op == BWD_DX:
        return sorted({bucket(t) for t in tokens if t >= TRAINING_MIN_TOKENS})
    return [0]


# ------------------------------------------------------------------------------------------------- the table


class TableError(ValueError):
    """A table file that cannot be resumed from."""


def load_table(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, dict]]]:
    """``(meta, entries)`` of a table file; ``({}, {})`` when it does not exist; TableError when it is
    not a format-1 table."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, {}
    except (OSError, ValueError) as e:
        raise TableError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TableError(f"{path}: not a format-{FORMAT} tuning table")
    entries = data.get("entries")
    if not isinstance(entries, dict) or not all(
            isinstance(v, dict) and all(isinstance(e, dict) for e in v.values()) for v in entries.values()):
        raise TableError(f"{path}: malformed 'entries'")
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    return meta, entries


def has(entries: dict[str, dict[str, dict]], job: Job) -> bool:
    return job.key_str in entries.get(job.op, {})


def write_table(path: str | os.PathLike, meta: dict[str, Any], entries: dict[str, dict[str, dict]]) -> Path:
    """Write ``{"format", "meta", "entries"}`` to ``path`` atomically: a temporary file in the same
    directory, flushed and fsynced, renamed over ``path``. A failed write leaves the old file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "meta": meta, "entries": entries}, indent=1, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # package data, readable by all (mkstemp makes it owner-only)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the repository (``$SPARSE_TRITON_GIT_COMMIT`` where there is no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=20, check=True, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(COMMIT_ENV_VAR) or None


def campaign_meta(previous: dict[str, Any] | None, run: dict[str, Any], quick: bool) -> dict[str, Any]:
    """The ``meta["campaign"]`` field: what the campaign covers, the latest run's date and commit, and one
    record per run that added keys (a resumed table keeps the earlier runs)."""
    runs = list((previous or {}).get("runs") or [])
    runs.append(run)
    return {
        "date": run["date"],
        "commit": run["commit"],
        "quick": quick and all(r.get("quick") for r in runs),
        "shape_sets": [{"name": s.name, "tokens": list(s.tokens),
                        "layers": [{"name": x.name, "N": x.N, "K": x.K, "bias": x.bias} for x in s.shapes]}
                       for s in TARGETS],
        "patterns": [f"{n}:{m}" for n, m in NM_PATTERNS],
        "dtypes": list(DTYPES),
        "ops": {FWD: "every token count", BWD_DX: f"M >= {TRAINING_MIN_TOKENS}", PRUNE: "per weight shape",
                GATHER: "per weight shape"},
        "runs": runs,
    }


# --------------------------------------------------------------------------------------------------- tuning


@dataclass
class Report:
    """What one run did."""

    tuned: list[tuple[Job, dict[str, Any]]] = field(default_factory=list)
    failed: list[tuple[Job, str]] = field(default_factory=list)
    left: list[Job] = field(default_factory=list)  # not started: the budget ran out

    @property
    def tune_s(self) -> float:
        return sum(float(e.get("tune_s", 0.0)) for _, e in self.tuned)


class Budget:
    """Stops starting keys when the time left is under 1.5x the longest of the last four keys (at least
    ``min_key_s``); ``seconds=None`` is unlimited."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic, min_key_s: float = 5.0):
        self.seconds = seconds
        self.clock = clock
        self.start = clock()
        self.min_key_s = min_key_s
        self.recent: list[float] = []

    def elapsed(self) -> float:
        return self.clock() - self.start

    def record(self, seconds: float) -> None:
        self.recent = (self.recent + [seconds])[-4:]

    def fits(self) -> bool:
        if self.seconds is None:
            return True
        estimate = max(self.min_key_s, 1.5 * max(self.recent, default=0.0))
        return self.seconds - self.elapsed() > estimate


def run_jobs(jobs: Sequence[Job], tune: Callable[[Job], dict[str, Any] | None],
             entries: dict[str, dict[str, dict]], budget: Budget,
             checkpoint: Callable[[], object] = lambda: None, log: Callable[[str], object] = print) -> Report:
    """Tune ``jobs`` in order into ``entries`` (``tune(job)`` returns the entry, or None when every
    candidate failed); call ``checkpoint()`` after every new entry. Keys already in ``entries`` are skipped."""
    report = Report()
    todo = [j for j in jobs if not has(entries, j)]
    for i, job in enumerate(todo):
        if not budget.fits():
            report.left = list(todo[i:])
            log(f"budget: {budget.seconds:g}s reached after {budget.elapsed():.0f}s; "
                f"{len(report.left)} keys not started")
            break
        t0 = budget.clock()
        try:
            entry = tune(job)
            why = "every candidate failed its check" if entry is None else ""
        except Exception as e:  # noqa: BLE001 - one bad key (out of memory, ...) must not lose the others
            entry, why = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        budget.record(budget.clock() - t0)
        head = f"[{i + 1:>3}/{len(todo)} {budget.elapsed():6.1f}s] {job.label}"
        if entry is None:
            report.failed.append((job, why))
            log(f"{head}: FAILED ({why})")
            continue
        entries.setdefault(job.op, {})[job.key_str] = entry
        report.tuned.append((job, entry))
        checkpoint()
        log(f"{head}: {describe(entry)}")
    return report


def describe(entry: dict[str, Any]) -> str:
    """``winner ms (vs dense), heuristic, candidates, tune s`` of an entry, for the progress lines."""
    ms, dense, heur = entry.get("ms"), entry.get("dense_ms"), entry.get("heuristic_ms")
    parts = [f"{entry.get('name')} {_ms(ms)} ms"]
    if dense:
        parts.append(f"dense {_ms(dense)} ms ({dense / ms:.2f}x)" if ms else f"dense {_ms(dense)} ms")
    if heur and entry.get("heuristic") != entry.get("name"):
        parts.append(f"heuristic {_ms(heur)} ms")
    parts.append(f"{entry.get('candidates', '?')} candidates, {entry.get('tune_s', 0):.1f}s")
    return ", ".join(parts)


def _ms(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def tune_entry(tuner, device, job: Job) -> dict[str, Any] | None:
    """Time every candidate of ``job`` with ``tuner`` (nothing stored in its cache) and return the entry:
    the tuner's (winner, ``ms``, runner-up, ``dense_ms``, ``tune_s``, ...) plus the heuristic default's name
    and time and the best time of each implementation (``impl_ms``)."""
    import torch

    op = _tunable()[job.op]
    cands = op.candidates(job.key, tuner.limits(device), device)
    try:
        result = tuner.tune(op, job.key, device, candidates=cands, store=False)
    finally:
        torch.cuda.empty_cache()  # the 70B fp64 references are GBs; do not let them fragment the pool
    if result is None:
        return None
    entry = dict(result.entry)
    entry["heuristic"] = cands[0].name
    if cands[0].name in result.times:
        entry["heuristic_ms"] = result.times[cands[0].name]
    impl_ms: dict[str, float] = {}
    for c in cands:
        if c.name in result.times:
            impl_ms[c.impl] = min(impl_ms.get(c.impl, math.inf), result.times[c.name])
    entry["impl_ms"] = impl_ms
    return entry


def cuda_problem() -> str | None:
    """Why this process cannot tune (no CUDA GPU, or Triton's interpreter on), or None."""
    import torch

    if not torch.cuda.is_available():
        return (f"regenerate: needs a CUDA GPU, but torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}). Run it on the GPU the table is for; --dry-run lists the keys anywhere.")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "regenerate: TRITON_INTERPRET is set; tuning times compiled kernels. Unset it."
    return None


# ----------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m autotune.regenerate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="table to write (default: the --resume file, else "
                             "sparse_triton/tuning/tuned/<gpu-slug>.json in this checkout)")
    parser.add_argument("--resume", type=Path, default=None,
                        help="load this table (if it exists) and tune only the keys it lacks; its entries are "
                             "kept in the output")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting keys in time to exit before this many seconds; what is done is written")
    parser.add_argument("--quick", action="store_true",
                        help=f"only what perf's --quick runs: llama3-8b, fp16, M <= {QUICK_MAX_TOKENS}, the forward "
                             "and weight compression")
    parser.add_argument("--dry-run", action="store_true", help="list the keys in order and exit (no GPU needed)")
    return parser


def print_plan(jobs: Sequence[Job], entries: dict[str, dict[str, dict]], resume: Path | None) -> None:
    for i, job in enumerate(jobs, 1):
        mark = "have" if has(entries, job) else "tune"
        print(f"{i:>4} {mark} {job.label:<50} {', '.join(job.layers)}")
    by_op = {op: sum(j.op == op for j in jobs) for op in OPS + ACT_OPS}
    done = sum(has(entries, j) for j in jobs)
    counts = ", ".join(f"{op} {n}" for op, n in by_op.items() if n)
    print(f"{len(jobs)} keys ({counts}); {done} already in {resume}, {len(jobs) - done} to tune" if resume
          else f"{len(jobs)} keys ({counts})")


def summary(report: Report, table_keys: int, skipped: int, out: Path, wall_s: float) -> None:
    if report.tuned:
        print()
        print(f"{'key':<50} {'winner':<28} {'ms':>8} {'dense ms':>9} {'vs dense':>8} {'tune s':>7}")
        for job, e in report.tuned:
            ms, dense = e.get("ms"), e.get("dense_ms")
            speed = f"{dense / ms:.2f}x" if ms and dense else "-"
            print(f"{job.label:<50} {str(e.get('name')):<28} {_ms(ms):>8} {_ms(dense):>9} {speed:>8} "
                  f"{e.get('tune_s', 0):>7.1f}")
    print()
    print(f"regenerate: tuned {len(report.tuned)} keys in {report.tune_s:.1f}s of tuning ({wall_s:.0f}s wall); "
          f"{skipped} already in the resumed table; {len(report.failed)} failed; {len(report.left)} left by the "
          f"budget; the table has {table_keys} keys -> {out}")
    for job, why in report.failed:
        print(f"regenerate: FAILED {job.label}: {why}")
    if report.left:
        print(f"regenerate: INCOMPLETE: go on with --resume {out}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.monotonic()
    jobs = plan(quick=args.quick)
    try:
        old_meta, entries = load_table(args.resume) if args.resume else ({}, {})
    except TableError as e:
        print(f"regenerate: --resume {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(jobs, entries, args.resume)
        return 0
    problem = cuda_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 2

    import torch

    from sparse_triton.tuning import DeviceInfo, Tuner

    device = torch.device("cuda", torch.cuda.current_device())
    info = DeviceInfo.current(device.index)
    if old_meta.get("gpu") not in (None, info.gpu):
        print(f"regenerate: --resume {args.resume} was measured on {old_meta['gpu']!r}, this is {info.gpu!r}",
              file=sys.stderr)
        return 2
    out = args.out or args.resume or TUNED_DIR / f"{info.slug}.json"
    skipped = sum(has(entries, j) for j in jobs)
    run = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
           "quick": args.quick, "budget_s": args.budget_s, "triton": info.triton, "torch": info.torch,
           "sparse_triton": info.sparse_triton, "keys_tuned": 0, "tune_s": 0.0, "complete": False}
    meta = {**info.to_json(), "campaign": campaign_meta(old_meta.get("campaign"), run, args.quick)}

    print(f"regenerate: {len(jobs)} keys{' (--quick)' if args.quick else ''}, {skipped} already in "
          f"{args.resume}, on {info.gpu} (sm_{info.capability[0]}{info.capability[1]}, triton {info.triton}, "
          f"torch {info.torch}) -> {out}" + (f"; budget {args.budget_s:g}s" if args.budget_s else ""), flush=True)
    with tempfile.TemporaryDirectory(prefix="sparse_triton_regenerate_") as scratch:
        # The tuner's user cache and shipped tables point at an empty scratch directory: the campaign
        # neither reads nor writes the user's cache (and tune(store=False) stores nothing anyway).
        tuner = Tuner(cache_root=scratch, shipped_dir=scratch)

        def tune(job: Job) -> dict[str, Any] | None:
            entry = tune_entry(tuner, device, job)
            if entry is not None:  # the run record is part of every checkpoint
                run["keys_tuned"] += 1
                run["tune_s"] = round(run["tune_s"] + float(entry.get("tune_s", 0.0)), 3)
            return entry

        report = run_jobs(jobs, tune, entries, Budget(args.budget_s), lambda: write_table(out, meta, entries),
                          log=lambda s: print(s, flush=True))
    run["keys_tuned"], run["tune_s"] = len(report.tuned), round(report.tune_s, 3)
    run["complete"] = not report.left and not report.failed
    write_table(out, meta, entries)
    summary(report, sum(len(v) for v in entries.values()), skipped, Path(out), time.monotonic() - t_start)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
