"""Sparse data structures (pure torch, no kernels)."""

from .nm import NMSparsity, NMTensor, nm_compress, nm_mask, nm_prune

__all__ = ["NMSparsity", "NMTensor", "nm_compress", "nm_mask", "nm_prune"]
