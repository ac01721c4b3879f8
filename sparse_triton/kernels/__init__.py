"""Triton kernels and their typed launchers (no autograd, no nn).

Every launcher validates its inputs, allocates its outputs, picks a config and launches; each has a
pure-torch twin with the same signature in ``sparse_triton.reference``.
"""
