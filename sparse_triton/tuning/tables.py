"""Tuning keys and the shipped per-GPU tables (``sparse_triton/tuning/tuned/<gpu-slug>.json``).

A key is an op name plus ordered fields, written ``"dtype=float16|nm=2:4|N=4096|K=4096|M=16|..."``. One
field (``M``, the token count) is bucketed to powers of two, so one entry serves every M in
``(bucket / 2, bucket]``; every other field is exact.

A shipped table has the cache file's layout (``tuning.cache``) and is package data, installed with the
wheel. It is matched to a GPU by its file name (the GPU's slug). Its ``meta`` records the versions it
was measured with; unlike the user cache it stays valid across Triton and torch upgrades, because a
winning config is still a correct config, and a table for the right GPU beats a guess. It is read and
checked like the user cache (``tuning.cache.read_file``): a bad file, or a bad entry in it, warns once
and is left out, never an exception. A key missing from the table falls back to the entry of the
nearest M bucket (in log2 distance, the larger on a tie) with every other field equal.
"""

from __future__ import annotations

import bisect
import math
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from .cache import read_file

MAX_BUCKET = 1 << 24


def bucket(tokens: int) -> int:
    """The power-of-two bucket of a token count: the smallest power of two >= ``tokens`` (at least 1).

    >>> [bucket(m) for m in (0, 1, 3, 4, 17, 4096, 5000)]
    [1, 1, 4, 4, 32, 4096, 8192]
    """
    if tokens <= 1:
        return 1
    return min(1 << (tokens - 1).bit_length(), MAX_BUCKET)


def key_str(fields: tuple[str, ...], values: tuple) -> str:
    """``"f1=v1|f2=v2|..."`` of a key's fields and values (the JSON form)."""
    return "|".join(f"{f}={v}" for f, v in zip(fields, values))


def parse_key(text: str) -> dict[str, str]:
    """The fields of a key string, values as strings; ValueError on a malformed key."""
    out: dict[str, str] = {}
    for part in text.split("|"):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise ValueError(f"malformed tuning key {text!r}")
        out[name] = value
    return out


def _split_bucket(text: str, bucket_field: str) -> tuple[str, int] | None:
    """``(key without the bucket field, bucket)``, or None if the key has no valid bucket field."""
    try:
        fields = parse_key(text)
        value = int(fields.pop(bucket_field))
    except (ValueError, KeyError):
        return None
    return key_str(tuple(fields), tuple(fields.values())), value


class ShippedTable:
    """A shipped table's entries plus a per-op index for the nearest-bucket fallback."""

    def __init__(self, path: Path | None, entries: dict[str, dict[str, Any]], meta: dict | None = None):
        self.path = path
        self.meta = meta or {}
        self.entries = entries
        self._index: dict[tuple[str, str, str], tuple[list[int], list[str]]] = {}
        self._indexed: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def get(self, op: str, key: str) -> dict[str, Any] | None:
        return self.entries.get(op, {}).get(key)

    def nearest(self, op: str, key: str, bucket_field: str = "M") -> tuple[str, dict[str, Any]] | None:
        """``(key, entry)`` of the entry nearest to ``key`` in the bucket field, every other field equal."""
        split = _split_bucket(key, bucket_field)
        if split is None:
            return None
        rest, want = split
        with self._lock:
            if (op, bucket_field) not in self._indexed:
                self._build_index(op, bucket_field)
            found = self._index.get((op, bucket_field, rest))
        if not found:
            return None
        buckets, keys = found
        i = bisect.bisect_left(buckets, want)
        options = [j for j in (i - 1, i) if 0 <= j < len(buckets)]
        # log2 distance; on a tie the larger bucket (its tiles cover the smaller M as well)
        best = min(options, key=lambda j: (abs(math.log2(max(buckets[j], 1)) - math.log2(max(want, 1))),
                                           -buckets[j]))
        return keys[best], self.entries[op][keys[best]]

    def _build_index(self, op: str, bucket_field: str) -> None:
        groups: dict[str, list[tuple[int, str]]] = {}
        for key in self.entries.get(op, {}):
            split = _split_bucket(key, bucket_field)
            if split is not None:
                groups.setdefault(split[0], []).append((split[1], key))
        for rest, items in groups.items():
            items.sort()
            self._index[(op, bucket_field, rest)] = ([b for b, _ in items], [k for _, k in items])
        self._indexed.add((op, bucket_field))


def shipped_dir() -> Path:
    """The directory of the shipped tables inside the installed package."""
    return Path(str(resources.files("sparse_triton.tuning") / "tuned"))


def shipped_slugs(directory: Path | None = None) -> list[str]:
    """GPU slugs that have a shipped table."""
    directory = directory or shipped_dir()
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.json"))


def load_shipped(slug: str, directory: Path | None = None) -> ShippedTable:
    """The shipped table for GPU ``slug``; an empty table when there is none, or (with one warning)
    when the file is unreadable, corrupt, in another format or malformed (``tuning.cache.read_file``:
    malformed entries are left out, the rest is used)."""
    path = (directory or shipped_dir()) / f"{slug}.json"
    found = read_file(path)
    if found is None:
        return ShippedTable(None, {})
    meta, entries = found
    return ShippedTable(path, entries, meta)
