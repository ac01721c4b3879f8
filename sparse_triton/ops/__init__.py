"""torch.library custom ops, their autograd and the kernel / reference dispatch."""

from . import nm_prune  # noqa: F401  (registers sparse_triton::nm_prune_compress)
from .nm_linear import NMLinearFunction, nm_linear

__all__ = ["NMLinearFunction", "nm_linear"]
