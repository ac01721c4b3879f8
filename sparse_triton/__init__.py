"""sparse_triton: neural-network sparsity that is fast on GPUs.

N:M weight-sparse matmul, block-sparse attention and activation-sparse linears and FFNs as Triton kernels
wrapped in differentiable PyTorch ops, drop-in modules and a one-call ``sparsify``. Importing the package
never touches CUDA.
"""

from . import nn, ops, tuning
from .calibration import ActivationSparsity, Thresholds, activation_sparsity_report, calibrate_thresholds
from .formats.block_mask import BlockMask
from .formats.nm import NMSparsity, NMTensor, nm_compress, nm_mask, nm_prune
from .ops.act_sparse import ActSparseLinearFunction, act_sparse_linear, act_sparse_mlp
from .ops.attention import BlockSparseAttentionFunction, block_sparse_attention
from .ops.nm_linear import NMLinearFunction, nm_linear
from .sparsify import sparsify

__version__ = "0.1.0"

__all__ = [
    "ActSparseLinearFunction",
    "ActivationSparsity",
    "BlockMask",
    "BlockSparseAttentionFunction",
    "NMLinearFunction",
    "NMSparsity",
    "NMTensor",
    "Thresholds",
    "__version__",
    "act_sparse_linear",
    "act_sparse_mlp",
    "activation_sparsity_report",
    "block_sparse_attention",
    "calibrate_thresholds",
    "nm_compress",
    "nm_linear",
    "nm_mask",
    "nm_prune",
    "nn",
    "ops",
    "sparsify",
    "tuning",
]
