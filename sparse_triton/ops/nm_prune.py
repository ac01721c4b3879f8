"""``sparse_triton::nm_prune_compress``: dense rows -> N:M (values, packed indices).

``sparse_triton.nm_compress`` calls it; the Triton kernel runs on CUDA (and interpreted on CPU),
the pure-torch twin everywhere else (float64, CPU).
"""

from __future__ import annotations

import torch

from ..formats.nm import NMTensor, indices_per_word
from ..kernels import nm_prune as kernel
from ..reference import nm_prune as reference
from ..tuning.tuner import default_tuner
from . import nm_tuning as tuned
from ._dispatch import use_kernels


@torch.library.custom_op("sparse_triton::nm_prune_compress", mutates_args=())
def nm_prune_compress(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress ``w[R, K]`` along its last dim: ``(values[R, S], indices[R, Wd])``."""
    if use_kernels(w):
        cand = default_tuner().choose(tuned.PRUNE, tuned.mem_key(w, n, m), w.device)
        return kernel.nm_prune_compress(w, n, m, config=cand.config)
    return reference.nm_prune_compress(w, n, m)


@nm_prune_compress.register_fake
def _(w, n, m):
    S = NMTensor.slots_for(w.shape[1], n, m)
    Wd = -(-S // indices_per_word(m))
    return w.new_empty(w.shape[0], S), w.new_empty(w.shape[0], Wd, dtype=torch.int32)
