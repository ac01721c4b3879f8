"""torch.library custom ops, their autograd and the kernel / vendor / dense / reference dispatch."""

from . import act_sparse, nm_prune  # noqa: F401  (nm_prune registers sparse_triton::nm_prune_compress)
from ._prepared import clear_weight_cache
from .act_sparse import ActSparseLinearFunction, act_sparse_linear, act_sparse_mlp, input_major, nm_input_major
from .attention import BlockSparseAttentionFunction, block_sparse_attention
from .nm_linear import NMLinearFunction, nm_linear

__all__ = ["ActSparseLinearFunction", "BlockSparseAttentionFunction", "NMLinearFunction", "act_sparse_linear",
           "act_sparse_mlp", "block_sparse_attention", "clear_weight_cache", "input_major", "nm_input_major",
           "nm_linear"]
