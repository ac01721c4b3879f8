"""Drop-in sparse modules."""

from .linear import SparseLinear

__all__ = ["SparseLinear"]
