"""Block-sparse attention: custom ops for forward and backward, their autograd, and the public op.

``sparse_triton::block_sparse_attention_fwd``  (o, lse)      prefill kernel / decode kernel / reference
``sparse_triton::block_sparse_attention_bwd``  (dq, dk, dv)  backward kernels / reference

The mask travels through the ops as its tensors (``BlockMask._parts``) plus its block sizes, sequence
lengths and causal flag, so ``torch.compile(fullgraph=True)`` traces the op and ``opcheck`` passes.
``BlockSparseAttentionFunction`` composes the two ops; ``block_sparse_attention`` validates and calls it.
"""

from __future__ import annotations

import torch

from ..formats._checks import check_bool
from ..formats.block_mask import BlockMask, check_block_mask
from ..kernels import attention as kernel
from ..kernels import attention_decode as decode_kernel
from ..reference import attention as reference
from ._dispatch import use_kernels

DECODE_BLOCK_SIZES = (16, 32, 64, 128)  # mask blocks the decode kernel takes (BQ >= Sq, one query block)


def _mask(parts: list[torch.Tensor], BQ: int, BK: int, Sq: int, Skv: int, mask_causal: bool) -> BlockMask:
    has_bits = parts[BlockMask._TENSORS.index("partial_bits")].numel() > 0
    return BlockMask._from_parts(parts, (BQ, BK), (Sq, Skv), mask_causal, has_bits)


def _path(q: torch.Tensor, k: torch.Tensor, bm: BlockMask) -> str:
    """``decode``, ``prefill`` or ``reference``: where the forward runs."""
    if not use_kernels(q):
        return "reference"
    if q.shape[2] <= decode_kernel.DECODE_MAX_Q and decode_kernel.supported(q, k, bm) is None:
        return "decode"
    return "prefill" if kernel.unsupported(q, bm) is None else "reference"


@torch.library.custom_op("sparse_triton::block_sparse_attention_fwd", mutates_args=())
def block_sparse_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_parts: list[torch.Tensor],
                               BQ: int, BK: int, mask_causal: bool, scale: float,
                               causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)`` of block-sparse attention; the mask given as ``BlockMask._parts()``."""
    bm = _mask(mask_parts, BQ, BK, q.shape[2], k.shape[2], mask_causal)
    path = _path(q, k, bm)
    if path == "decode":
        return decode_kernel.attention_decode(q, k, v, bm, scale, causal)
    if path == "prefill":
        return kernel.attention_fwd(q, k, v, bm, scale, causal)
    o, lse = reference.attention_fwd(q, k, v, bm, scale, causal)
    return o.to(q.dtype).contiguous(), lse.float().contiguous()


@block_sparse_attention_fwd.register_fake
def _(q, k, v, mask_parts, BQ, BK, mask_causal, scale, causal):
    B, Hq, Sq, D = q.shape
    return q.new_empty(B, Hq, Sq, D), q.new_empty(B, Hq, Sq, dtype=torch.float32)


@torch.library.custom_op("sparse_triton::block_sparse_attention_bwd", mutates_args=())
def block_sparse_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                               lse: torch.Tensor, mask_parts: list[torch.Tensor], BQ: int, BK: int,
                               mask_causal: bool, scale: float,
                               causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`block_sparse_attention_fwd` given ``do`` and the forward's ``o``, ``lse``."""
    bm = _mask(mask_parts, BQ, BK, q.shape[2], k.shape[2], mask_causal)
    if use_kernels(q) and kernel.unsupported(q, bm) is None:
        return kernel.attention_bwd(do, q, k, v, o, lse, bm, scale, causal)
    dq, dk, dv = reference.attention_bwd(do, q, k, v, o, lse, bm, scale, causal)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


@block_sparse_attention_bwd.register_fake
def _(do, q, k, v, o, lse, mask_parts, BQ, BK, mask_causal, scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class BlockSparseAttentionFunction(torch.autograd.Function):
    """Differentiable ``(q, k, v) -> (o, lse)`` under a block mask; ``lse`` is not differentiable."""

    @staticmethod
    def forward(q, k, v, mask_parts, BQ, BK, mask_causal, scale, causal):
        return torch.ops.sparse_triton.block_sparse_attention_fwd(q, k, v, mask_parts, BQ, BK, mask_causal, scale,
                                                                  causal)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask_parts, BQ, BK, mask_causal, scale, causal = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse, *mask_parts)
        ctx.args = (BQ, BK, mask_causal, scale, causal)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *mask_parts = ctx.saved_tensors
        dq, dk, dv = torch.ops.sparse_triton.block_sparse_attention_bwd(do.contiguous(), q, k, v, o, lse, mask_parts,
                                                                        *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def _check(q, k, v, block_mask, scale, causal, where: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{where}: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{where}: {name} must be floating point, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{where}: dtype mismatch, q is {q.dtype}, k is {k.dtype}, v is {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{where}: device mismatch, q is on {q.device}, k on {k.device}, v on {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{where}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"{where}: batch mismatch, q has B={B} but k/v have B={k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"{where}: head dim mismatch, q has D={D} but k/v have D={k.shape[3]}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{where}: q has {Hq} heads, not a multiple of k/v's {Hkv} heads (GQA needs Hq % Hkv == 0)")
    check_block_mask(block_mask, "block_mask", where)
    block_mask.check_compatible(where, B, Hq, Sq, k.shape[2])
    if block_mask.device != q.device:
        raise ValueError(f"{where}: device mismatch, block_mask is on {block_mask.device} but q is on {q.device}")
    BQ, BK = block_mask.block_size
    if BQ not in DECODE_BLOCK_SIZES or BK not in DECODE_BLOCK_SIZES:
        raise ValueError(f"{where}: block_mask.block_size={(BQ, BK)} is not supported: BQ and BK must be in "
                         f"{kernel.BLOCK_SIZES} (or, for decode, in {DECODE_BLOCK_SIZES})")
    if BQ not in kernel.BLOCK_SIZES or BK not in kernel.BLOCK_SIZES:
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if Sq > decode_kernel.DECODE_MAX_Q or needs_grad:
            raise ValueError(f"{where}: block_mask.block_size={(BQ, BK)} is decode-only (at most "
                             f"{decode_kernel.DECODE_MAX_Q} queries, no gradient); prefill and training take BQ "
                             f"and BK in {kernel.BLOCK_SIZES}, got Sq={Sq}"
                             f"{' with q/k/v requiring grad' if needs_grad else ''}")
    if D not in kernel.HEAD_DIMS:
        raise ValueError(f"{where}: head dim D={D} is not supported (supported: {kernel.HEAD_DIMS})")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"{where}: scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not -float("inf") < scale < float("inf"):  # NaN fails both comparisons
        raise ValueError(f"{where}: scale must be finite, got {scale}")
    check_bool(causal, "causal", where)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, *,
                           scale: float | None = None, causal: bool = False, return_lse: bool = False):
    """Attention over the blocks a :class:`~sparse_triton.BlockMask` keeps; differentiable in q, k, v.

    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` with ``Hq`` a multiple of ``Hkv`` (GQA/MQA: query head
    ``h`` attends with kv head ``h // (Hq // Hkv)``); ``block_mask`` built for ``(Sq, Skv)`` with B and H
    equal to the inputs' or 1. ``scale=None`` means ``D ** -0.5``; ``causal=True`` also masks keys after
    the query position (top-left aligned: key ``j`` is visible to query ``i`` iff ``j <= i``).

    The result equals dense softmax attention with the element mask the BlockMask implies (and
    ``causal``); a query with no allowed key returns 0 (and lse ``-inf``), never NaN. Returns ``o``
    (like q), or ``(o, lse)`` with ``return_lse=True`` (lse fp32 ``[B, Hq, Sq]``, natural log, not
    differentiable). CUDA tensors (fp16, bf16, fp32; D in 32/64/96/128/256) run the Triton kernels: only
    kept blocks are read, and few queries (``Sq <= 16``) take a split-kv decode kernel; CPU tensors run
    the pure-torch reference. Mask blocks (BQ, BK) are 64 or 128; decode (``Sq <= 16``, no gradient) also
    takes 16 and 32.

    ``block_mask`` must be a ``sparse_triton.BlockMask``: a FlexAttention ``BlockMask`` raises ``TypeError``
    naming ``st.BlockMask.from_flex(block_mask)``, the conversion to run once outside the call (it
    evaluates the ``mask_mod`` and syncs the host, which an op must not do per call). ``causal`` and
    ``return_lse`` take Python bools only (``TypeError`` otherwise).

    >>> import sparse_triton as st
    >>> q = k = v = torch.randn(1, 2, 256, 64)
    >>> mask = st.BlockMask.sliding_window(256, window=64, block_size=64)
    >>> st.block_sparse_attention(q, k, v, mask).shape
    torch.Size([1, 2, 256, 64])
    """
    where = "block_sparse_attention"
    _check(q, k, v, block_mask, scale, causal, where)
    check_bool(return_lse, "return_lse", where)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    BQ, BK = block_mask.block_size
    args = (block_mask._parts(), BQ, BK, block_mask.causal, scale, causal)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        o, lse = BlockSparseAttentionFunction.apply(q, k, v, *args)
    else:
        o, lse = torch.ops.sparse_triton.block_sparse_attention_fwd(q, k, v, *args)
    return (o, lse) if return_lse else o
