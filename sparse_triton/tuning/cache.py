"""On-disk tuning cache: one JSON file per GPU, safe under concurrent writers and bad files.

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
* A corrupt, truncated, wrong-format or stale file (another GPU, Triton, torch or package version) is
  ignored with one warning per file and process, never an exception; the next write replaces it.
"""

from __future__ import annotations

import contextlib
import json
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

_warned: set[str] = set()  # files already warned about in this process (one warning per file)
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


def _warn_once(path: Path, why: str) -> None:
    with _warned_lock:
        if str(path) in _warned:
            return
        _warned.add(str(path))
    warnings.warn(f"sparse_triton: ignoring tuning cache {path}: {why}", RuntimeWarning, stacklevel=3)


def _read(path: Path, info: DeviceInfo) -> dict[str, dict[str, Any]]:
    """The entries of a valid cache file for ``info``; ``{}`` (with one warning) for anything else."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        _warn_once(path, f"unreadable ({e})")
        return {}
    try:
        data = json.loads(text)
    except ValueError as e:
        _warn_once(path, f"not valid JSON, corrupt or truncated ({e})")
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        _warn_once(path, f"format {found!r}, expected {FORMAT}")
        return {}
    if data.get("meta") != info.to_json():
        _warn_once(path, f"written for {data.get('meta')}, stale for {info.to_json()}")
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        _warn_once(path, "malformed 'entries'")
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
    >>> cache.put("nm_linear_fwd", "fp16|2:4|N4096|K4096|M1", {"config": "sum1x16x128w4s2", "ms": 0.01})
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

    def put(self, op: str, key: str, entry: dict[str, Any]) -> None:
        """Store ``entry`` (JSON-serialisable) for ``(op, key)`` and write it through to disk."""
        json.dumps(entry)  # fail here, not halfway through a write
        with self._lock:
            self._entries.setdefault(op, {})[key] = entry
            self._write({op: {key: entry}})

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
