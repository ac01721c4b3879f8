"""Argument checks shared by every layer.

formats/ is the lowest layer (DESIGN.md, "Layers"), so kernels/, ops/ and nn/ may all import from here.
Each check raises with the message convention of the package: ``"<where>: <name> must be ..., got ..."``.
"""

from __future__ import annotations

__all__ = ["check_block_size", "check_bool", "check_int"]


def _brief(value) -> str:
    """``type repr`` of ``value``, the repr cut short (a tensor's repr can be long)."""
    r = repr(value)
    return f"{type(value).__name__} {r if len(r) <= 40 else r[:37] + '...'}"


def check_bool(value, name: str, where: str) -> bool:
    """Return ``value`` if it is a Python ``bool``, else raise ``TypeError`` naming ``where`` and ``name``.

    Only ``True`` and ``False`` pass. Ints (``1``), strings (``"no"`` is truthy), numpy bools and torch
    tensors (even 0-d bool ones) are refused: truth-testing them would hide a wrong argument, and
    ``bool()`` of a CUDA tensor syncs the host.

    >>> check_bool(True, "causal", "f")
    True
    >>> check_bool(1, "causal", "f")
    Traceback (most recent call last):
    ...
    TypeError: f: causal must be a bool (True or False), got int 1
    """
    if value is True or value is False:  # bool cannot be subclassed: exactly the two Python bools
        return value
    raise TypeError(f"{where}: {name} must be a bool (True or False), got {_brief(value)}")


def check_int(value, name: str, where: str, lo: int = 0) -> int:
    """Return ``value`` if it is a Python ``int`` (not a bool) ``>= lo``, else raise ``TypeError`` /
    ``ValueError`` naming ``where`` and ``name``.

    >>> check_int(64, "block_size", "f", 1)
    64
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{where}: {name} must be >= {lo}, got {value}")
    return value


def check_block_size(block_size, where: str) -> tuple[int, int]:
    """``(BQ, BK)`` from an int or a pair of positive ints, else ``TypeError`` / ``ValueError``.

    >>> check_block_size(64, "f"), check_block_size((64, 128), "f")
    ((64, 64), (64, 128))
    """
    bs = block_size if isinstance(block_size, (tuple, list)) else (block_size, block_size)
    if len(bs) != 2:
        raise ValueError(f"{where}: block_size must be an int or a (BQ, BK) pair, got {block_size!r}")
    return check_int(bs[0], "block_size", where, 1), check_int(bs[1], "block_size", where, 1)
