"""Drop-in sparse modules."""

from .attention import BlockSparseAttention, pooled_block_scores
from .linear import SparseLinear

__all__ = ["BlockSparseAttention", "SparseLinear", "pooled_block_scores"]
