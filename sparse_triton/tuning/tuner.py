"""The runtime tuner: which implementation and config an op runs for a key, on this GPU.

Lookup order for ``(op, key)`` on a CUDA device:

1. memory (what this process already resolved);
2. the user cache ``<cache dir>/<gpu-slug>/tuning.json`` (exact key);
3. the shipped table ``sparse_triton/tuning/tuned/<gpu-slug>.json``: the exact key, else the nearest
   M bucket with every other field equal (a shape we ship never pauses to tune);
4. tune now, when the mode allows it (``tuning.mode``) and the stream is not capturing a CUDA graph:
   every candidate runs once on random inputs and is checked against the reference, the survivors
   are timed (``tuning.timer``), the fastest wins and is written to the user cache;
5. with tuning off: the user cache's nearest M bucket;
6. the op's heuristic default (its first candidate).

Steps 5 and 6 are provisional: they are looked up again once tuning is allowed. On CPU (the reference
path, or kernels under Triton's interpreter) nothing is looked up or timed and the first candidate runs.

An op plugs in through a :class:`TunableOp`: its key fields, its candidates (the heuristic default
first; for ops with a dense equivalent, the dense implementation is always among them), how to rebuild a
candidate from a stored entry, random inputs for a key, how to run a candidate, and its reference.

Stored entries reach an op already checked for their JSON types (``tuning.cache.read_file``); an op's
``from_entry`` must still answer None, never raise, for any entry, and a ``from_entry`` that raises
anyway is treated as None with one warning: a bad cache never stops an op, it only costs a lookup step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..formats._checks import check_bool
from .cache import DeviceInfo, TuningCache, _warn_once
from .mode import autotune_enabled
from .tables import ShippedTable, key_str, load_shipped

log = logging.getLogger("sparse_triton.tuning")


@dataclass(frozen=True)
class Candidate:
    """One way to run an op: an implementation (``"triton"``, ``"dense"``, a vendor kernel, ...) and,
    for tunable kernels, a launch config (a frozen dataclass)."""

    name: str
    impl: str
    config: Any = None

    def to_entry(self) -> dict[str, Any]:
        config = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else None
        return {"name": self.name, "impl": self.impl, "config": config}


@dataclass(frozen=True)
class DeviceLimits:
    """What a device can hold and how wide it is: prunes candidates before anything is timed."""

    shared_memory: int  # bytes per block, opt-in maximum
    sms: int
    capability: tuple[int, int]

    @staticmethod
    def of(index: int) -> DeviceLimits:
        return _cuda_limits(index)


# Opt-in shared memory per block by compute capability, for torch builds whose device properties
# lack ``shared_memory_per_block_optin``.
_SMEM_BY_CC = {(9, 0): 232448, (8, 0): 166912, (8, 7): 166912, (8, 6): 101376, (8, 9): 101376,
               (10, 0): 232448, (12, 0): 101376}


@functools.lru_cache(maxsize=16)
def _cuda_limits(index: int) -> DeviceLimits:
    props = torch.cuda.get_device_properties(index)
    cc = (props.major, props.minor)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or _SMEM_BY_CC.get(cc, 49152)
    return DeviceLimits(int(smem), int(props.multi_processor_count), cc)


# A stand-in for an H100 when the tuner is exercised on CPU (tests with a fake timer).
H100_LIMITS = DeviceLimits(232448, 132, (9, 0))


class TunableOp:
    """What an op tells the tuner. Subclasses set ``name`` and ``fields`` and implement the methods.

    ``fields`` name the key's parts in order; ``bucket_field`` is the one bucketed to powers of two.
    ``dense_impl`` names the implementation that is the op's dense equivalent (its time is recorded
    beside the winner's as the speedup baseline), or None.
    """

    name: str = ""
    fields: tuple[str, ...] = ()
    bucket_field: str = "M"
    dense_impl: str | None = None

    def key_str(self, key: tuple) -> str:
        return key_str(self.fields, key)

    def candidates(self, key: tuple, limits: DeviceLimits, device: torch.device) -> list[Candidate]:
        """Every candidate for ``key`` that fits ``limits``, the heuristic default first."""
        raise NotImplementedError

    def from_entry(self, entry: Any, key: tuple, limits: DeviceLimits, device: torch.device) -> Candidate | None:
        """The candidate a stored entry names, or None if it is not valid here (unknown implementation,
        a config that does not fit, a vendor kernel that is missing). ``entry`` may be any JSON value:
        answer None for anything malformed, never raise (see :func:`stored_config`)."""
        raise NotImplementedError

    def make_inputs(self, key: tuple, device: torch.device, generator: torch.Generator) -> dict[str, Any]:
        """Random, never-zero inputs of the key's shape (M at the bucket's upper end)."""
        raise NotImplementedError

    def run(self, candidate: Candidate, inputs: dict[str, Any]) -> torch.Tensor:
        """Run ``candidate``, writing ``inputs["out"]`` (pre-filled with NaN for the check)."""
        raise NotImplementedError

    def reference(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The exact result (fp64 or better than the candidates' precision)."""
        raise NotImplementedError

    def tolerance(self, key: tuple) -> float:
        """Largest accepted ``error(out, ref)``."""
        raise NotImplementedError

    def reset(self, inputs: dict[str, Any]) -> None:
        """Poison the output buffer before a check run, so a tile a candidate forgets to write fails."""
        inputs["out"].fill_(math.nan)

    def error(self, out: Any, ref: Any) -> float:
        """How far a candidate's output is from the reference: ``max|out - ref| / max|ref|``."""
        return _max_rel_error(out, ref)


def stored_config(cls: type, entry: Any) -> Any | None:
    """``cls(**entry["config"])`` for a launch-config dataclass ``cls`` whose fields are ints and bools,
    or None unless ``entry`` is a dict whose ``config`` is a dict naming only ``cls``'s fields, each of
    its declared type: a bool field a ``bool``, an int field an ``int`` (not a bool) in ``[1, 2**20]``.
    Whether the config is one that can run is the caller's next check.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Cfg:
    ...     BM: int
    ...     USE_DOT: bool = False
    >>> stored_config(Cfg, {"config": {"BM": 16}}), stored_config(Cfg, {"config": {"BM": "16"}})
    (Cfg(BM=16, USE_DOT=False), None)
    """
    d = entry.get("config") if isinstance(entry, dict) else None
    if not isinstance(d, dict):
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in d.items():
        f = fields.get(name)
        if f is None:
            return None
        if f.type in (bool, "bool"):
            if not isinstance(value, bool):
                return None
        elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
            return None
    try:
        return cls(**d)
    except (TypeError, ValueError):  # a required field missing, or the class's own check
        return None


@dataclass
class Choice:
    """What a lookup resolved to, and where from: ``memory`` is never a source (memory holds choices)."""

    candidate: Candidate
    source: str  # first | cache | shipped | shipped-nearest | tuned | cache-nearest | heuristic
    key: str
    entry: dict[str, Any] | None = None

    @property
    def provisional(self) -> bool:
        return self.source in ("cache-nearest", "heuristic")


@dataclass
class TuneResult:
    """The outcome of timing every candidate of one key."""

    key: str
    winner: Candidate
    entry: dict[str, Any]
    times: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


def _max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return math.inf
    if out.numel() == 0:
        return 0.0
    diff = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    err = diff / max(scale, 1e-30)
    return math.inf if math.isnan(err) else err


class Tuner:
    """Resolves ``(op, key, device)`` to a :class:`Candidate` in the documented order.

    ``timer(name, fn) -> ms`` times a candidate (default: :class:`~sparse_triton.tuning.timer.CudaTimer`).
    ``cache_root`` overrides the user cache directory (default: ``tuning.cache_dir()``, read when a
    device's cache is first opened). ``shipped_dir`` overrides the shipped tables' directory.
    ``device_info`` / ``limits`` fix the GPU identity and limits; with ``tune_on_cpu`` the whole order
    also runs for CPU tensors (the candidates then run on the interpreter): how the CPU test tier
    exercises the tuner with a fake timer.
    """

    def __init__(self, timer: Callable[[str, Callable[[], object]], float] | None = None,
                 cache_root: str | Path | None = None, shipped_dir: str | Path | None = None,
                 device_info: DeviceInfo | None = None, limits: DeviceLimits | None = None,
                 tune_on_cpu: bool = False):
        self._timer = timer
        self.tune_on_cpu = check_bool(tune_on_cpu, "tune_on_cpu", "Tuner")
        self.cache_root = cache_root
        self.shipped_dir = Path(shipped_dir) if shipped_dir is not None else None
        self._info = device_info
        self._limits = limits
        self._memo: dict[tuple, Choice] = {}
        self._caches: dict[str, TuningCache] = {}
        self._tables: dict[str, ShippedTable] = {}
        self._lock = threading.RLock()

    # ---------------------------------------------------------------------------------------- devices

    @property
    def timer(self):
        if self._timer is None:
            from .timer import CudaTimer

            self._timer = CudaTimer()
        return self._timer

    def device_info(self, device: torch.device) -> DeviceInfo:
        if self._info is not None:
            return self._info
        return _device_info(_index(device))

    def limits(self, device: torch.device) -> DeviceLimits:
        if self._limits is not None:
            return self._limits
        if device.type != "cuda":
            return H100_LIMITS
        return DeviceLimits.of(_index(device))

    def cache(self, info: DeviceInfo) -> TuningCache:
        with self._lock:
            cache = self._caches.get(info.slug)
            if cache is None:
                cache = self._caches[info.slug] = TuningCache(info, root=self.cache_root)
            return cache

    def shipped(self, slug: str) -> ShippedTable:
        with self._lock:
            table = self._tables.get(slug)
            if table is None:
                table = self._tables[slug] = load_shipped(slug, self.shipped_dir)
            return table

    def clear_memory(self) -> None:
        """Forget every in-memory choice and reload caches and tables on the next lookup."""
        with self._lock:
            self._memo.clear()
            self._caches.clear()
            self._tables.clear()

    # ----------------------------------------------------------------------------------------- lookup

    def _tunes(self, device: torch.device) -> bool:
        return device.type == "cuda" or self.tune_on_cpu

    def choose(self, op: TunableOp, key: tuple, device: torch.device) -> Candidate:
        """The candidate to run for ``key`` on ``device`` (the hot path: one dict lookup on a hit)."""
        choice = self._memo.get((op.name, device, key))
        if choice is not None and not (choice.provisional and self._may_tune(device)):
            return choice.candidate
        return self.resolve(op, key, device).candidate

    def resolve(self, op: TunableOp, key: tuple, device: torch.device) -> Choice:
        """Walk the lookup order for ``key`` (memory first) and remember the answer."""
        memo_key = (op.name, device, key)
        with self._lock:
            choice = self._memo.get(memo_key)
            if choice is not None and not (choice.provisional and self._may_tune(device)):
                return choice
            choice = self._resolve(op, key, device)
            self._memo[memo_key] = choice
            return choice

    def _may_tune(self, device: torch.device) -> bool:
        if not self._tunes(device) or not autotune_enabled():
            return False
        return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())

    def _resolve(self, op: TunableOp, key: tuple, device: torch.device) -> Choice:
        kstr = op.key_str(key)
        if not self._tunes(device):
            limits = self.limits(device)
            return Choice(op.candidates(key, limits, device)[0], "first", kstr)
        info = self.device_info(device)
        limits = self.limits(device)
        cache = self.cache(info)
        table = self.shipped(info.slug)
        for source, found, path in (("cache", (kstr, cache.get(op.name, kstr)), cache.path),
                                    ("shipped", (kstr, table.get(op.name, kstr)), table.path),
                                    ("shipped-nearest", table.nearest(op.name, kstr, op.bucket_field), table.path)):
            if found is None or found[1] is None:
                continue
            cand = _from_entry(op, found[1], key, limits, device, path)
            if cand is not None:
                return Choice(cand, source, found[0], found[1])
        if self._may_tune(device):
            result = self.tune(op, key, device)
            if result is not None:
                return Choice(result.winner, "tuned", kstr, result.entry)
        nearest = ShippedTable(None, {op.name: cache.entries(op.name)}).nearest(op.name, kstr, op.bucket_field)
        if nearest is not None:
            cand = _from_entry(op, nearest[1], key, limits, device, cache.path)
            if cand is not None:
                return Choice(cand, "cache-nearest", nearest[0], nearest[1])
        return Choice(op.candidates(key, limits, device)[0], "heuristic", kstr)

    # ----------------------------------------------------------------------------------------- tuning

    def tune(self, op: TunableOp, key: tuple, device: torch.device,
             candidates: Sequence[Candidate] | None = None, store: bool = True) -> TuneResult | None:
        """Time every candidate of ``key`` on random inputs and store the winner (user cache and memory).

        A candidate that raises, or whose output misses the reference by more than the op's tolerance,
        is rejected before it is timed. Returns None (with a warning) if every candidate is rejected.
        """
        check_bool(store, "store", "Tuner.tune")
        kstr = op.key_str(key)
        limits = self.limits(device)
        cands = list(candidates) if candidates is not None else op.candidates(key, limits, device)
        t0 = time.perf_counter()
        gen = torch.Generator(device=device)
        gen.manual_seed(0x5eed)  # own generator: tuning never moves the caller's random stream
        times: dict[str, float] = {}
        rejected: dict[str, str] = {}
        tol = op.tolerance(key)
        with torch.no_grad(), _on(device):
            inputs = op.make_inputs(key, device, gen)
            ref = op.reference(inputs)
            for cand in cands:
                try:
                    op.reset(inputs)
                    result = op.run(cand, inputs)
                    err = op.error(result, ref)
                    if not err <= tol:
                        rejected[cand.name] = f"error {err:.3g} > tolerance {tol:.3g}"
                        continue
                    ms = float(self.timer(cand.name, functools.partial(op.run, cand, inputs)))
                    if not (math.isfinite(ms) and ms >= 0):  # never stored: the cache holds real times only
                        rejected[cand.name] = f"timer returned {ms} ms"
                        continue
                    times[cand.name] = ms
                except Exception as e:  # noqa: BLE001 - a candidate that cannot run is simply not chosen
                    rejected[cand.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            del inputs, ref
            release = getattr(self.timer, "release", None)
            if release is not None:
                release()  # the L2-flush buffer is not kept past tuning
        if not times:
            import warnings

            warnings.warn(f"sparse_triton: every candidate of {op.name} [{kstr}] failed its check; using the "
                          f"heuristic default. Rejected: {rejected}", RuntimeWarning, stacklevel=2)
            return None
        ranked = sorted(times.items(), key=lambda kv: kv[1])
        by_name = {c.name: c for c in cands}
        winner = by_name[ranked[0][0]]
        entry = winner.to_entry()
        entry.update(ms=ranked[0][1], candidates=len(cands), tune_s=round(time.perf_counter() - t0, 3))
        if len(ranked) > 1:
            entry.update(runner_up=ranked[1][0], runner_up_ms=ranked[1][1])
        if op.dense_impl is not None:
            dense = [t for name, t in times.items() if by_name[name].impl == op.dense_impl]
            if dense:
                entry["dense_ms"] = min(dense)
        if rejected:
            entry["rejected"] = sorted(rejected)
        result = TuneResult(kstr, winner, entry, times, rejected)
        if store:
            if self._tunes(device):
                self.cache(self.device_info(device)).put(op.name, kstr, entry)
            with self._lock:
                self._memo[(op.name, device, key)] = Choice(winner, "tuned", kstr, entry)
        log.info("tuned %s [%s]: %s %.4f ms (%d candidates, %.2f s)", op.name, kstr, winner.name,
                 ranked[0][1], len(cands), entry["tune_s"])
        return result


def _from_entry(op: TunableOp, entry: Any, key: tuple, limits: DeviceLimits, device: torch.device,
                path: Path | None) -> Candidate | None:
    """``op.from_entry(...)``, with an op that raises on a stored entry taken as None (one warning)."""
    try:
        return op.from_entry(entry, key, limits, device)
    except Exception as e:  # noqa: BLE001 - a stored entry must never stop the op
        _warn_once(path or "<memory>", f"{op.name}: from_entry raised {type(e).__name__}: {e} on entry {entry!r:.200}",
                   what=f"from_entry:{op.name}")
        return None


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=16)
def _device_info(index: int) -> DeviceInfo:
    return DeviceInfo.current(index)


def _on(device: torch.device):
    import contextlib

    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_default: Tuner | None = None
_default_lock = threading.Lock()


def default_tuner() -> Tuner:
    """The process-wide tuner the ops use (created on first use: importing touches no GPU)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Tuner()
    return _default


def set_default_tuner(tuner: Tuner | None) -> Tuner | None:
    """Replace the process-wide tuner (None: a fresh default on next use); returns the previous one."""
    global _default
    with _default_lock:
        previous, _default = _default, tuner
    return previous
