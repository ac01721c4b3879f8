"""``python -m sparse_triton {info, tune}``: what this machine has, and pre-tuning shapes for it.

    python -m sparse_triton info
    python -m sparse_triton tune --preset llama3-8b [--dtype fp16 bf16] [--pattern 2:4 1:4]
    python -m sparse_triton tune --model mypkg.models:build_model [--training]
    python -m sparse_triton tune --shapes 4096x4096 14336x4096 --tokens 1 16 256 --dry-run
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch

from . import __version__
from .tuning import presets

DTYPES = ("fp16", "bf16", "tf32", "fp32")


@dataclass(frozen=True)
class Job:
    """One key to tune: an op and its key fields."""

    op: str
    key: tuple

    def label(self) -> str:
        tag, nm, N, K, M = self.key[:5]
        bias = " +bias" if self.op == "nm_linear_fwd" and self.key[5] else ""
        return f"{self.op:<17} {tag:<4} {nm:<5} {N}x{K} M={M}{bias}"


# ---------------------------------------------------------------------------------------------------- info


def _device_line() -> tuple[str, str | None]:
    if not torch.cuda.is_available():
        return "none (CPU only: ops run the pure-torch reference, or the kernels under TRITON_INTERPRET=1)", None
    from .tuning.cache import gpu_slug
    from .tuning.tuner import DeviceLimits

    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    lim = DeviceLimits.of(index)
    line = (f"cuda:{index} {props.name} (sm_{props.major}{props.minor}, {lim.sms} SMs, "
            f"{lim.shared_memory // 1024} KB shared memory per block, {props.total_memory / 2**30:.0f} GiB)")
    return line, gpu_slug(props.name)


def cmd_info(args: argparse.Namespace) -> int:
    import triton

    from ._env import TRITON_INTERPRET
    from .tuning import cache_dir, load_shipped, shipped_dir, shipped_slugs
    from .tuning.cache import FILE_NAME
    from .tuning.mode import ENV, autotune_enabled

    device, slug = _device_line()
    print(f"sparse_triton {__version__}  torch {torch.__version__}  triton {triton.__version__}  "
          f"python {platform.python_version()}")
    print(f"device:          {device}")
    print(f"interpreter:     {'on (TRITON_INTERPRET=1)' if TRITON_INTERPRET else 'off'}")
    try:
        mode = "on" if autotune_enabled() else "off"
    except ValueError as e:
        mode = f"invalid: {e}"
    print(f"autotune:        {mode} ({ENV}={os.environ.get(ENV, '<unset>')}; tuning only happens on a GPU)")
    root = cache_dir()
    if slug is not None:
        path = root / slug / FILE_NAME
        from .tuning.cache import DeviceInfo, TuningCache

        with _quiet_warnings():
            cache = TuningCache(DeviceInfo.current(), root=root)
        count = sum(len(cache.entries(op)) for op in _ops())
        print(f"user cache:      {path} ({count} entries{'' if path.exists() else ', no file yet'})")
    else:
        print(f"user cache:      {root}/<gpu-slug>/{FILE_NAME} (SPARSE_TRITON_CACHE_DIR overrides the root)")
    slugs = shipped_slugs()
    if slugs:
        tables = ", ".join(f"{s} ({len(load_shipped(s))} keys)" for s in slugs)
    else:
        tables = "none"
    print(f"shipped tables:  {tables}  [{shipped_dir()}]")
    if slug is None:
        print("applies here:    none (no GPU)")
    elif slug in slugs:
        print(f"applies here:    {slug}.json ({len(load_shipped(slug))} keys)")
    else:
        print(f"applies here:    none for {slug}: shapes are tuned on first use "
              "(or ahead with `python -m sparse_triton tune`)")
    return 0


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _ops():
    from .ops import act_sparse_tuning, nm_tuning

    return {**nm_tuning.TUNABLE, **act_sparse_tuning.TUNABLE}


# ---------------------------------------------------------------------------------------------------- tune


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected OUTxIN, e.g. 4096x14336, got {text!r}") from None
    if n <= 0 or k <= 0:
        raise argparse.ArgumentTypeError(f"shape dims must be positive, got {text!r}")
    return n, k


def _parse_pattern(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:M, e.g. 2:4, got {text!r}") from None
    if m not in (2, 4, 8, 16) or not 1 <= n < m:
        raise argparse.ArgumentTypeError(f"pattern {text!r}: tuned kernels take 1 <= N < M with M in 2, 4, 8, 16")
    return n, m


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class ModelSpecError(Exception):
    """A ``--model`` the CLI cannot use: ``main`` prints one line naming the spec and the reason, exit status 2."""

    def __init__(self, spec: str, reason: str):
        super().__init__(f"--model {spec}: {reason}")


def _one_line(e: BaseException) -> str:
    """``TypeName: first line of the message`` of an exception raised by user code."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _load_model(spec: str) -> torch.nn.Module:
    """Build the ``--model MODULE:ATTR``: ``ATTR`` (dotted) is an ``nn.Module`` or a zero-argument factory of
    one. Raises :class:`ModelSpecError` for anything that goes wrong, the user code's own errors included."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelSpecError(spec, "expected MODULE:ATTR, e.g. mypkg.models:build")
    if os.getcwd() not in sys.path:  # like `python -m`, let the model live in the working directory
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module's own code raises while importing
        raise ModelSpecError(spec, f"cannot import {module_name!r} ({_one_line(e)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(spec, f"{module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, torch.nn.Module) and callable(obj):
        try:
            obj = obj()
        except Exception as e:
            raise ModelSpecError(spec, f"calling {attr}() raised {_one_line(e)}") from None
    if not isinstance(obj, torch.nn.Module):
        raise ModelSpecError(spec, f"{attr} gave type {type(obj).__name__}, expected an nn.Module or a "
                                   "zero-argument factory of one")
    return obj


def _model_layers(model: torch.nn.Module, spec: str) -> list[tuple[int, int, int, int, str, bool]]:
    """(N, K, n, m, dtype tag, has_bias) of every SparseLinear in ``model``, deduplicated."""
    from .nn import SparseLinear
    from .ops.nm_tuning import dtype_tag

    found = {}
    for mod in model.modules():
        if isinstance(mod, SparseLinear):
            w = mod.weight_nm()
            found[(mod.out_features, mod.in_features, w.n, w.m, dtype_tag(w.dtype), mod.bias is not None)] = None
    if not found:
        raise ModelSpecError(spec, "has no sparse_triton.nn.SparseLinear layers (sparsify it first: "
                                   "sparse_triton.sparsify(model, NMSparsity(2, 4)))")
    return list(found)


def _jobs(args: argparse.Namespace) -> list[Job]:
    from .ops.nm_tuning import bwd_dx_key  # noqa: F401 - the key layout below mirrors fwd_key/bwd_dx_key
    from .tuning import bucket

    layers: list[tuple[int, int, int, int, str, bool]] = []
    patterns = args.pattern or [(2, 4)]
    dtypes = args.dtype or ["fp16"]
    if args.model:
        for N, K, n, m, tag, bias in _model_layers(_load_model(args.model), args.model):
            for t in (args.dtype or [tag]):
                layers.append((N, K, n, m, t, bias))
    shapes = [(s.N, s.K, s.bias) for p in args.preset or () for s in presets.LINEAR_SETS[p]]
    shapes += [(N, K, False) for N, K in args.shapes or ()]
    for N, K, bias in shapes:
        for n, m in patterns:
            for tag in dtypes:
                layers.append((N, K, n, m, tag, bias))
    if args.tokens:
        tokens = args.tokens
    elif args.preset and not (args.model or args.shapes):
        tokens = sorted({t for p in args.preset for t in presets.PRESET_TOKENS[p]})
    else:
        tokens = list(presets.LLM_TOKENS)
    buckets = sorted({bucket(t) for t in tokens})
    jobs: dict[Job, None] = {}
    for N, K, n, m, tag, bias in dict.fromkeys(layers):
        for M in buckets:
            jobs[Job("nm_linear_fwd", (tag, f"{n}:{m}", N, K, M, int(bias)))] = None
            if args.training:
                jobs[Job("nm_linear_bwd_dx", (tag, f"{n}:{m}", N, K, M))] = None
    return list(jobs)


@contextlib.contextmanager
def _tf32(enabled: bool):
    """Run with PyTorch's TF32 matmul setting forced (the key's dtype ``tf32`` vs ``fp32``)."""
    matmul = torch.backends.cuda.matmul
    if getattr(matmul, "fp32_precision", None) is not None:
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old = matmul.allow_tf32
        matmul.allow_tf32 = enabled
        try:
            yield
        finally:
            matmul.allow_tf32 = old


class _Progress:
    def __init__(self, total: int, stream=sys.stderr):
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, done: int, label: str) -> None:
        width = 24
        filled = width * done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {done}/{self.total} {time.perf_counter() - self.t0:6.1f}s  {label}"
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
            if done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _fmt_ms(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def cmd_tune(args: argparse.Namespace) -> int:
    if not (args.preset or args.model or args.shapes):
        print("tune: give --preset, --model or --shapes (see --help)", file=sys.stderr)
        return 2
    jobs = _jobs(args)
    if args.dry_run:
        for job in jobs:
            print(job.label())
        print(f"{len(jobs)} keys")
        return 0
    if not torch.cuda.is_available():
        print("tune: needs a CUDA GPU (none found); --dry-run lists the keys that would be tuned", file=sys.stderr)
        return 2
    from .tuning import default_tuner

    tuner = default_tuner()
    ops = _ops()
    device = torch.device("cuda", torch.cuda.current_device())
    info = tuner.device_info(device)
    print(f"tuning {len(jobs)} keys on {info.gpu} into {tuner.cache(info).path}", file=sys.stderr)
    progress = _Progress(len(jobs))
    rows = []
    for i, job in enumerate(jobs):
        progress.update(i, job.label())
        op = ops[job.op]
        kstr = op.key_str(job.key)
        entry, source = None, "tuned"
        if not args.force:
            entry = tuner.cache(info).get(op.name, kstr)
            source = "cache"
            if entry is None:
                entry, source = tuner.shipped(info.slug).get(op.name, kstr), "shipped"
        if entry is None:
            with _tf32(job.key[0] == "tf32") if job.key[0] in ("tf32", "fp32") else contextlib.nullcontext():
                result = tuner.tune(op, job.key, device)
            entry, source = (result.entry if result else {"name": "(every candidate failed)"}), "tuned"
        rows.append((job, source, entry))
    progress.update(len(jobs), "done")
    _summary(rows)
    if args.json:
        data = [{"op": j.op, "key": ops[j.op].key_str(j.key), "source": s, **e} for j, s, e in rows]
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return 0


def _summary(rows) -> None:
    head = f"{'key':<52} {'source':<7} {'winner':<22} {'ms':>9} {'dense ms':>9} {'vs dense':>8} " \
           f"{'runner-up':<22} {'tune s':>6}"
    print(head)
    print("-" * len(head))
    for job, source, e in rows:
        ms, dense = e.get("ms"), e.get("dense_ms")
        speed = f"{dense / ms:.2f}x" if isinstance(ms, (int, float)) and isinstance(dense, (int, float)) and ms else "-"
        print(f"{job.label():<52} {source:<7} {str(e.get('name', '-')):<22} {_fmt_ms(ms):>9} {_fmt_ms(dense):>9} "
              f"{speed:>8} {str(e.get('runner_up', '-')):<22} {e.get('tune_s', '-')!s:>6}")


# ---------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparse_triton", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="device, versions, cache directory, which shipped table applies")
    tune = sub.add_parser("tune", help="tune shapes now and store the winners in the user cache",
                          description="Time every candidate (our kernels, cuSPARSELt, dense cuBLAS) for each "
                                      "shape and token bucket, and store the winners in the user cache. Keys "
                                      "already in the user cache or the shipped table are reported, not re-timed "
                                      "(--force re-times them).")
    tune.add_argument("--preset", nargs="+", choices=sorted(presets.LINEAR_SETS), help="shape sets of real models")
    tune.add_argument("--model", metavar="MODULE:ATTR",
                      help="an nn.Module (or a zero-argument factory of one) whose SparseLinear layers to tune")
    tune.add_argument("--shapes", nargs="+", type=_parse_shape, metavar="OUTxIN", help="extra weight shapes")
    tune.add_argument("--dtype", nargs="+", choices=DTYPES,
                      help="fp16, bf16, tf32 (fp32 with TF32 matmuls), fp32 (exact). Default: fp16, or each "
                           "--model layer's own dtype")
    tune.add_argument("--pattern", nargs="+", type=_parse_pattern, metavar="N:M", help="default 2:4")
    tune.add_argument("--tokens", nargs="+", type=_positive, metavar="M",
                      help=f"token counts (bucketed to powers of two); default {list(presets.LLM_TOKENS)}")
    tune.add_argument("--training", action="store_true", help="also tune the input gradient (dX = dY W)")
    tune.add_argument("--force", action="store_true", help="re-time keys the cache or shipped table already has")
    tune.add_argument("--dry-run", action="store_true", help="list the keys and exit (no GPU needed)")
    tune.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for usage errors, a ``--model`` that cannot be built included)."""
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    try:
        return cmd_tune(args)
    except ModelSpecError as e:
        print(f"python -m sparse_triton tune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
