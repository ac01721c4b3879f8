"""Drop-in sparse modules."""

from .act_sparse import ActSparseLinear, ActSparseMLP
from .attention import BlockSparseAttention, pooled_block_scores
from .linear import SparseLinear

__all__ = ["ActSparseLinear", "ActSparseMLP", "BlockSparseAttention", "SparseLinear", "pooled_block_scores"]
