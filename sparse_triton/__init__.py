"""sparse_triton: neural-network sparsity that is fast on GPUs.

N:M weight-sparse matmul as Triton kernels wrapped in differentiable PyTorch ops, drop-in modules and
a one-call ``sparsify``. Importing the package never touches CUDA.
"""

from . import nn, ops, tuning
from .formats.nm import NMSparsity, NMTensor, nm_compress, nm_mask, nm_prune
from .ops.nm_linear import NMLinearFunction, nm_linear
from .sparsify import sparsify

__version__ = "0.1.0"

__all__ = [
    "NMLinearFunction",
    "NMSparsity",
    "NMTensor",
    "__version__",
    "nm_compress",
    "nm_linear",
    "nm_mask",
    "nm_prune",
    "nn",
    "ops",
    "sparsify",
    "tuning",
]
