"""Pure-torch twins of the kernel launchers: same signatures, obviously-right code.

They are the test oracle and the CPU path (``ops/`` falls back to them where no kernel can run).
"""

from .attention import attention_bwd, attention_decode, attention_fwd, dense_attention
from .nm_matmul import nm_decompress, nm_matmul_bwd_dx, nm_matmul_fwd
from .nm_prune import nm_gather, nm_prune_compress

__all__ = ["attention_bwd", "attention_decode", "attention_fwd", "dense_attention", "nm_decompress",
           "nm_gather", "nm_matmul_bwd_dx", "nm_matmul_fwd", "nm_prune_compress"]
