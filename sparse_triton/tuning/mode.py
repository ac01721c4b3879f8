"""Whether a missing tuning entry may be measured now ("tune now") or falls back without timing.

Precedence, first that applies:

1. the innermost ``with sparse_triton.tuning.autotune(flag):`` block of the calling thread (per call
   site);
2. ``sparse_triton.tuning.set_autotune(flag)`` (process-wide; ``None`` clears it);
3. the environment variable ``SPARSE_TRITON_AUTOTUNE`` (``1``/``0``, also ``true``/``false``,
   ``on``/``off``, ``yes``/``no``), read when a lookup misses;
4. the default: on.

Tuning only ever happens on a CUDA device, outside CUDA-graph capture and with the interpreter off;
with the mode off (or where tuning cannot happen) a miss resolves to the shipped table's nearest
bucket, else the heuristic default, and nothing is timed. Hits in memory, the user cache and the
shipped table are used whatever the mode.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from ..formats._checks import check_bool

ENV = "SPARSE_TRITON_AUTOTUNE"
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")

_scoped: contextvars.ContextVar[bool | None] = contextvars.ContextVar("sparse_triton_autotune", default=None)
_global: bool | None = None


def _check_flag(flag, where: str) -> None:
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"{where}: flag must be True, False or None, got {flag!r}")


def set_autotune(flag: bool | None) -> None:
    """Turn tuning-on-miss on or off for the whole process; ``None`` defers to the environment.

    >>> import sparse_triton as st
    >>> st.tuning.set_autotune(False); st.tuning.autotune_enabled()
    False
    >>> st.tuning.set_autotune(None)
    """
    global _global
    _check_flag(flag, "set_autotune")
    _global = flag


@contextlib.contextmanager
def autotune(flag: bool) -> Iterator[None]:
    """Within the block (this thread or task only), tune on a miss iff ``flag``.

    >>> import sparse_triton as st
    >>> with st.tuning.autotune(False):
    ...     st.tuning.autotune_enabled()
    False
    """
    check_bool(flag, "flag", "autotune")
    token = _scoped.set(flag)
    try:
        yield
    finally:
        _scoped.reset(token)


def _from_env() -> bool | None:
    raw = os.environ.get(ENV)
    if raw is None or raw.strip() == "":
        return None
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{ENV}={raw!r}: expected 1 or 0 (also true/false, on/off, yes/no)")


def autotune_enabled() -> bool:
    """Whether a lookup that misses every table may tune now (see the module docstring)."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _global is not None:
        return _global
    env = _from_env()
    return True if env is None else env
