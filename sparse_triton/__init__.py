"""sparse_triton: neural-network sparsity that is fast on GPUs.

N:M weight-sparse matmul and block-sparse attention as Triton kernels wrapped in differentiable PyTorch
ops, drop-in modules and a one-call ``sparsify``. Importing the package never touches CUDA.
"""

from . import nn, ops, tuning
from .formats.block_mask import BlockMask
from .formats.nm import NMSparsity, NMTensor, nm_compress, nm_mask, nm_prune
from .ops.attention import BlockSparseAttentionFunction, block_sparse_attention
from .ops.nm_linear import NMLinearFunction, nm_linear
from .sparsify import sparsify

__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "BlockSparseAttentionFunction",
    "NMLinearFunction",
    "NMSparsity",
    "NMTensor",
    "__version__",
    "block_sparse_attention",
    "nm_compress",
    "nm_linear",
    "nm_mask",
    "nm_prune",
    "nn",
    "ops",
    "sparsify",
    "tuning",
]
