"""Sparse data structures (pure torch, no kernels)."""

from .block_mask import BlockMask
from .nm import NMSparsity, NMTensor, nm_compress, nm_mask, nm_prune

__all__ = ["BlockMask", "NMSparsity", "NMTensor", "nm_compress", "nm_mask", "nm_prune"]
