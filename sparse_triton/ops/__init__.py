"""torch.library custom ops, their autograd and the kernel / vendor / dense / reference dispatch."""

from . import nm_prune  # noqa: F401  (registers sparse_triton::nm_prune_compress)
from ._prepared import clear_weight_cache
from .attention import BlockSparseAttentionFunction, block_sparse_attention
from .nm_linear import NMLinearFunction, nm_linear

__all__ = ["BlockSparseAttentionFunction", "NMLinearFunction", "block_sparse_attention", "clear_weight_cache",
           "nm_linear"]
