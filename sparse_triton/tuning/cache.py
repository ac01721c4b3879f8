"""On-disk tuning cache: one JSON file per GPU, safe under concurrent writers, bad files and bad places.

Layout of ``<cache dir>/<gpu-slug>/tuning.json``::

    {"format": 1,
     "meta": {"gpu": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "triton": "3.6.0",
              "torch": "2.11.0", "sparse_triton": "0.1.0"},
     "entries": {"<op>": {"<key>": {...winner, times...}}}}

The cache directory is ``$SPARSE_TRITON_CACHE_DIR`` when set, else ``~/.cache/sparse_triton``.

* Writes are atomic: a temporary file in the same directory, flushed and fsynced, then renamed over
  the cache file, so a reader sees the old file or the new one, never half of one.
* Concurrent writers lose no entry: a writer takes an exclusive lock on ``tuning.json.lock``, re-reads
  the file, merges its own entries into what it finds, and writes the union (merge-on-write).
* Every file (the user cache and the shipped tables alike) is read by :func:`read_file`, which checks
  the whole structure: the format, ``meta`` an object, ``entries`` an object of objects, each entry's
  fields of the types the tuner writes (:func:`entry_problem`). A malformed entry is left out and the
  rest of the file used.
* A file that cannot be used (unreadable, not UTF-8, not JSON, nested too deeply to parse, another
  format, stale: another GPU, Triton, torch or package version) is ignored, and the next write
  replaces it. A write that fails (a read-only directory, a file where the directory should be, a
  directory where the file should be, a full disk) keeps the entry in memory for this process.
  Either way: one warning per file and process, never an exception.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMAT = 1
FILE_NAME = "tuning.json"

_warned: set[tuple[str, str]] = set()  # (file, what) already warned about in this process
_warned_lock = threading.Lock()

try:  # POSIX advisory locks; elsewhere writers fall back to rename-only atomicity
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def gpu_slug(name: str) -> str:
    """A file-name-safe slug of a GPU name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-gpu"


def cache_dir() -> Path:
    """The user cache root: ``$SPARSE_TRITON_CACHE_DIR`` or ``~/.cache/sparse_triton``."""
    env = os.environ.get("SPARSE_TRITON_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparse_triton"


@dataclass(frozen=True)
class DeviceInfo:
    """What a cache file is valid for: the GPU and the software that produced its timings."""

    gpu: str
    capability: tuple[int, int]
    triton: str
    torch: str
    sparse_triton: str

    @classmethod
    def current(cls, device_index: int | None = None) -> DeviceInfo:
        """The CUDA device ``device_index`` (default: current) with the installed versions."""
        import torch
        import triton

        from .. import __version__

        index = torch.cuda.current_device() if device_index is None else device_index
        props = torch.cuda.get_device_properties(index)
        return cls(props.name, (props.major, props.minor), triton.__version__, torch.__version__, __version__)

    @property
    def slug(self) -> str:
        return gpu_slug(self.gpu)

    def to_json(self) -> dict[str, Any]:
        meta = asdict(self)
        meta["capability"] = list(self.capability)
        return meta


def _warn_once(path: Path | str, why: str, what: str = "") -> None:
    """One ``RuntimeWarning`` per ``(path, what)`` and process. A file's own faults (reading it, writing
    it) share ``what=""``: one fault such as a bad cache location fails both and warns once."""
    ident = (str(path), what)
    with _warned_lock:
        if ident in _warned:
            return
        _warned.add(ident)
    warnings.warn(f"sparse_triton: ignoring tuning cache {path}: {why}", RuntimeWarning, stacklevel=3)


# -------------------------------------------------------------------------------------------------- schema

# Bound of the integers in a stored launch config (tile sizes, warps, stages, splits).
MAX_CONFIG_INT = 1 << 20
_STR_FIELDS = ("name", "impl", "runner_up", "heuristic")
_DEPTH = 8  # fields this version does not know may nest this deep (they are carried along on writes)


def _time_ok(v: Any) -> bool:
    """A stored time (ms or s): a finite number >= 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v) and v >= 0
    except OverflowError:  # an integer too large for a float
        return False


def _shallow(v: Any, depth: int = _DEPTH) -> bool:
    if isinstance(v, (list, dict)):
        if depth == 0:
            return False
        return all(_shallow(x, depth - 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def entry_problem(entry: Any) -> str | None:
    """Why ``entry`` (any JSON value) is not a well-formed tuning entry, or None if it is one.

    The fields the tuner writes: ``name``, ``impl``, ``runner_up``, ``heuristic`` strings; ``config``
    null or an object of ints and bools (``|int| <= MAX_CONFIG_INT``); ``ms``, ``*_ms``, ``*_s``
    finite times >= 0; ``impl_ms`` an object of such times; ``candidates`` an int >= 0; ``rejected`` a
    list of strings. Other fields may hold any JSON nested at most 8 deep. Whether a well-formed entry
    names a candidate that can run here is the op's question (``TunableOp.from_entry``).

    >>> entry_problem({"name": "dense", "impl": "dense", "ms": 0.5}) is None
    True
    >>> entry_problem({"impl": "triton", "config": {"BM": "16"}})
    "config field 'BM' is a str, expected an int or a bool"
    """
    if not isinstance(entry, dict):
        return f"the entry is a {type(entry).__name__}, expected an object"
    for k, v in entry.items():
        if k in _STR_FIELDS:
            if not isinstance(v, str):
                return f"{k!r} is a {type(v).__name__}, expected a string"
        elif k == "config":
            if v is None:
                continue
            if not isinstance(v, dict):
                return f"'config' is a {type(v).__name__}, expected an object or null"
            for name, x in v.items():
                if not isinstance(x, int):  # bools are ints
                    return f"config field {name!r} is a {type(x).__name__}, expected an int or a bool"
                if abs(x) > MAX_CONFIG_INT:
                    return f"config field {name!r} is out of range (|value| > {MAX_CONFIG_INT})"
        elif k == "candidates":
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CONFIG_INT:
                return "'candidates' is not a count"
        elif k == "rejected":
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                return "'rejected' is not a list of strings"
        elif k == "impl_ms":
            if not isinstance(v, dict) or not all(_time_ok(x) for x in v.values()):
                return "'impl_ms' does not map implementations to finite times >= 0"
        elif k == "ms" or k.endswith(("_ms", "_s")):
            if not _time_ok(v):
                return f"{k!r} is not a finite time >= 0"
        elif not _shallow(v):
            return f"{k!r} nests deeper than {_DEPTH} levels"
    return None


def read_file(path: Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]] | None:
    """``(meta, entries)`` of the tuning file at ``path`` (a user cache or a shipped table), or None.

    None when there is no file (silently) or when the file cannot be used: unreadable, not UTF-8 text,
    not JSON (corrupt, truncated, nested too deeply), another format, ``meta`` (when present) or
    ``entries`` not an object. Malformed entries (:func:`entry_problem`) are left out and the rest
    returned. Each bad file warns once per process; nothing here raises.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # a directory, a file as a parent, no permission, a NUL in the path
        _warn_once(path, f"cannot read it ({e})")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _warn_once(path, f"not UTF-8 text, corrupt ({e})")
        return None
    try:
        data = json.loads(text)
    except RecursionError:
        _warn_once(path, "JSON nested too deeply to parse, corrupt")
        return None
    except ValueError as e:  # includes integers too long to convert
        _warn_once(path, f"not valid JSON, corrupt or truncated ({e})")
        return None
    found = data.get("format") if isinstance(data, dict) else type(data).__name__
    if not isinstance(data, dict) or type(found) is not int or found != FORMAT:
        _warn_once(path, f"format {str(found)[:40]!r}, expected {FORMAT}")
        return None
    meta = data.get("meta")
    if meta is not None and not isinstance(meta, dict):
        _warn_once(path, f"malformed 'meta': a {type(meta).__name__}, expected an object")
        return None
    entries = data.get("entries")
    if not isinstance(entries, dict):
        _warn_once(path, f"malformed 'entries': a {type(entries).__name__}, expected an object")
        return None
    clean: dict[str, dict[str, Any]] = {}
    left_out: list[str] = []
    for op, keyed in entries.items():
        if not isinstance(keyed, dict):
            left_out.append(f"entries[{op!r}] is a {type(keyed).__name__}, expected an object")
            continue
        for key, entry in keyed.items():
            why = entry_problem(entry)
            if why is None:
                clean.setdefault(op, {})[key] = entry
            else:
                left_out.append(f"{op} [{key[:80]}]: {why}")
    if left_out:
        more = f" and {len(left_out) - 3} more" if len(left_out) > 3 else ""
        _warn_once(path, f"{len(left_out)} malformed entries left out: {'; '.join(left_out[:3])}{more}")
    return meta, clean


def _read(path: Path, info: DeviceInfo) -> dict[str, dict[str, Any]]:
    """The entries of a valid cache file for ``info``; ``{}`` (with one warning) for anything else."""
    found = read_file(path)
    if found is None:
        return {}
    meta, entries = found
    if meta != info.to_json():
        _warn_once(path, f"written for {meta}, stale for {info.to_json()}")
        return {}
    return entries


@contextlib.contextmanager
def _locked(path: Path):
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class TuningCache:
    """Tuning results of one GPU: in memory, backed by ``<root>/<gpu-slug>/tuning.json``.

    >>> info = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), "3.6.0", "2.11.0", "0.1.0")
    >>> import tempfile; cache = TuningCache(info, root=tempfile.mkdtemp())
    >>> cache.put("nm_linear_fwd", "fp16|2:4|N4096|K4096|M1", {"name": "dense", "impl": "dense", "ms": 0.01})
    True
    >>> TuningCache(info, root=cache.path.parent.parent).get("nm_linear_fwd", "fp16|2:4|N4096|K4096|M1")["ms"]
    0.01
    """

    def __init__(self, info: DeviceInfo, root: str | os.PathLike | None = None):
        self.info = info
        self.path = Path(root if root is not None else cache_dir()) / info.slug / FILE_NAME
        self._lock = threading.Lock()
        self._entries = _read(self.path, info)

    def get(self, op: str, key: str) -> dict[str, Any] | None:
        """The stored entry for ``(op, key)``, or None."""
        with self._lock:
            return self._entries.get(op, {}).get(key)

    def entries(self, op: str) -> dict[str, dict[str, Any]]:
        """A copy of every stored entry of ``op``."""
        with self._lock:
            return dict(self._entries.get(op, {}))

    def put(self, op: str, key: str, entry: dict[str, Any]) -> bool:
        """Store ``entry`` for ``(op, key)`` and write it through to disk; whether the write succeeded.

        A malformed entry (not JSON-serialisable, or failing :func:`entry_problem`) raises here, before
        anything is written. A write that fails keeps the entry in memory and warns once.
        """
        json.dumps(entry)  # fail here, not halfway through a write
        why = entry_problem(entry)
        if why is not None:
            raise ValueError(f"TuningCache.put: malformed entry for {op} [{key}]: {why}")
        with self._lock:
            self._entries.setdefault(op, {})[key] = entry
            try:
                self._write({op: {key: entry}})
            except (OSError, ValueError) as e:  # ValueError: a NUL in $SPARSE_TRITON_CACHE_DIR
                _warn_once(self.path, f"cannot write it ({type(e).__name__}: {e}); tuning results are kept in "
                                      "memory for this process only")
                return False
            return True

    def _write(self, new: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            # Merge on write: whatever other processes stored since we read, plus our new entries.
            merged = _read(self.path, self.info)
            for op, entries in self._entries.items():  # ours that the file lost; the file's are newer
                for key, entry in entries.items():
                    merged.setdefault(op, {}).setdefault(key, entry)
            for op, entries in new.items():
                merged.setdefault(op, {}).update(entries)
            self._entries = merged
            data = {"format": FORMAT, "meta": self.info.to_json(), "entries": merged}
            fd, tmp = tempfile.mkstemp(prefix=FILE_NAME + ".", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
