"""Pure-torch twin of ``kernels.attention`` / ``kernels.attention_decode``: block-sparse attention.

The definition the kernels are tested against. Scores are dense ``[B, Hq, Sq, Skv]`` and masked with
``block_mask.element_mask()`` (see ``formats/block_mask.py`` for the element rule), so this is only
for small shapes, tests and the CPU path.

* Math in float32 (float64 when ``q`` is float64); ``o`` comes back in ``q.dtype``, ``lse`` in float32.
* GQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``; ``dk``/``dv`` sum over those query heads.
* Effective causal = ``causal or block_mask.causal``: the element rule ``k <= q`` (top-left aligned).
* A query row with no allowed key gives ``o = 0``, ``lse = -inf`` and zero gradients (never NaN).
* Non-finite values: a key a query cannot see is not in that query's sum at all, so a NaN or inf in its
  ``k`` or ``v`` reaches neither the query's ``o``/``lse`` nor its ``dq``, nor ``dk``/``dv`` of other keys
  (``softmax(S) @ V`` with the masked weights set to 0 would give ``0 * NaN = NaN``). A non-finite value
  at a key the query can see reaches it as the dense formula over the allowed keys says (NaN for NaN,
  inf where that formula gives inf). The products run through :func:`._masked.masked_matmul`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ._masked import masked_matmul

if TYPE_CHECKING:
    from ..formats.block_mask import BlockMask

__all__ = ["attention_bwd", "attention_decode", "attention_fwd", "dense_attention", "effective_element_mask"]


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{where}: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
    B, Hq, _, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{where}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{where}: k.shape={tuple(k.shape)} does not match q.shape={tuple(q.shape)} in B or D")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{where}: q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")


def effective_element_mask(block_mask: BlockMask | None, causal: bool, B: int, Hq: int, Sq: int, Skv: int,
                           device, where: str = "attention") -> torch.Tensor:
    """Bool ``[B|1, Hq|1, Sq, Skv]``: ``block_mask.element_mask()`` (all True when None) AND ``k <= q`` if causal."""
    if block_mask is None:
        allowed = torch.ones(1, 1, Sq, Skv, dtype=torch.bool, device=device)
    else:
        allowed = block_mask.element_mask().to(device)
        mb, mh, ms, mk = allowed.shape
        if (ms, mk) != (Sq, Skv) or mb not in (1, B) or mh not in (1, Hq):
            raise ValueError(
                f"{where}: block_mask is for B={mb}, H={mh}, seq_lens=({ms}, {mk}) but the inputs have "
                f"B={B}, Hq={Hq}, Sq={Sq}, Skv={Skv} (mask B/H must be 1 or equal)")
    if causal:
        qi = torch.arange(Sq, device=device)[:, None]
        ki = torch.arange(Skv, device=device)[None, :]
        allowed = allowed & (ki <= qi)
    return allowed


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, element_mask: torch.Tensor | None,
                    scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention in the compute dtype; returns ``(o, lse)`` *both* in that dtype.

    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]``, element_mask bool broadcastable to ``[B, Hq, Sq, Skv]``
    (None = all allowed). Rows with no allowed key: o = 0, lse = -inf. Differentiable, NaN-free gradients.
    Keys outside the mask never reach a row, even where k or v holds NaN or inf (module docstring).

    >>> q = k = v = torch.randn(1, 2, 4, 8)
    >>> o, lse = dense_attention(q, k, v, torch.ones(4, 4, dtype=torch.bool).tril())
    >>> o.shape, lse.shape
    (torch.Size([1, 2, 4, 8]), torch.Size([1, 2, 4]))
    """
    cd = _compute_dtype(q)
    Hq, Hkv = q.shape[1], k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    if Hq != Hkv:
        kc = kc.repeat_interleave(Hq // Hkv, dim=1)
        vc = vc.repeat_interleave(Hq // Hkv, dim=1)
    s = (qc @ kc.transpose(-1, -2)) * float(scale)  # [B, Hq, Sq, Skv]
    if element_mask is not None:
        s = s.masked_fill(~element_mask, float("-inf"))  # a NaN score of a masked key goes too
    # Empty rows (no allowed key) get a finite stand-in score 0 for the log-sum-exp and lse = -inf after,
    # so neither o, lse nor their gradients ever see exp(-inf + inf) = NaN.
    nonempty = (s != float("-inf")).any(-1)  # [B, Hq, Sq]
    lse = torch.logsumexp(torch.where(nonempty.unsqueeze(-1), s, torch.zeros_like(s)), dim=-1)
    lse_safe = torch.where(nonempty, lse, torch.zeros_like(lse))
    p = torch.exp(s - lse_safe.unsqueeze(-1))  # exactly 0 where s = -inf
    o = masked_matmul(p, vc, element_mask)  # not p @ v: 0 * (a NaN in v at a masked key) = NaN
    return o, torch.where(nonempty, lse, torch.full_like(lse, float("-inf")))


def _prepare(q, k, v, block_mask, scale, causal, where):
    _check_qkv(q, k, v, where)
    B, Hq, Sq, D = q.shape
    Skv = k.shape[2]
    causal = bool(causal) or bool(getattr(block_mask, "causal", False))
    allowed = effective_element_mask(block_mask, causal, B, Hq, Sq, Skv, q.device, where)
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D else 1.0
    return allowed, float(scale)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask | None,
                  scale: float | None, causal: bool = False, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward: ``(o [B, Hq, Sq, D] in q.dtype, lse [B, Hq, Sq] float32)``.

    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` (``Hq % Hkv == 0``). ``scale`` None means
    ``1/sqrt(D)``. ``config`` is accepted for signature parity with the kernel launcher and ignored.

    >>> q = k = v = torch.randn(1, 2, 6, 8)
    >>> o, lse = attention_fwd(q, k, v, None, None, causal=True)
    >>> o.shape, lse.dtype
    (torch.Size([1, 2, 6, 8]), torch.float32)
    """
    allowed, scale = _prepare(q, k, v, block_mask, scale, causal, "attention_fwd")
    o, lse = dense_attention(q, k, v, allowed, scale)
    return o.to(q.dtype), lse.float()


def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask | None,
                     scale: float | None, causal: bool = False, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode (few queries, ``Sq <= 16``): the same math as :func:`attention_fwd`."""
    allowed, scale = _prepare(q, k, v, block_mask, scale, causal, "attention_decode")
    o, lse = dense_attention(q, k, v, allowed, scale)
    return o.to(q.dtype), lse.float()


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, block_mask: BlockMask | None, scale: float | None, causal: bool = False,
                  config=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`attention_fwd`'s ``o`` for upstream ``do [B, Hq, Sq, D]``.

    Computed analytically in the compute dtype (the flash-attention backward):
    ``P = softmax(S)``, ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - rowsum(dO * O))``,
    ``dQ = scale * dS K``, ``dK = scale * dS^T Q``; dk/dv summed over the query heads of each kv head.
    ``o`` and ``lse`` are accepted for parity with the kernel launcher; the reference recomputes both in
    full precision so its gradient is exact for the forward's math (an fp32 ``lse`` would cost fp64
    tests seven digits). Returned in the dtypes of q, k, v.

    >>> q = k = v = torch.randn(1, 2, 6, 8)
    >>> o, lse = attention_fwd(q, k, v, None, None)
    >>> [g.shape for g in attention_bwd(torch.ones_like(o), q, k, v, o, lse, None, None)]
    [torch.Size([1, 2, 6, 8]), torch.Size([1, 2, 6, 8]), torch.Size([1, 2, 6, 8])]
    """
    allowed, scale = _prepare(q, k, v, block_mask, scale, causal, "attention_bwd")
    if do.shape != q.shape:
        raise ValueError(f"attention_bwd: do.shape={tuple(do.shape)} must equal q.shape={tuple(q.shape)}")
    cd = _compute_dtype(q)
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qc, kc, vc, doc = q.to(cd), k.to(cd), v.to(cd), do.to(cd)
    kr = kc.repeat_interleave(g, dim=1) if g > 1 else kc
    vr = vc.repeat_interleave(g, dim=1) if g > 1 else vc
    oc, lse_c = dense_attention(qc, kc, vc, allowed, scale)
    s = (qc @ kr.transpose(-1, -2)) * scale
    # The forward's p: against lse, or 0 for a row without keys (an lse of +inf or NaN, from a +inf or NaN
    # score at an allowed key, gives the forward's NaN and zeros as it did there)
    nonempty = lse_c != float("-inf")
    p = torch.exp(s - torch.where(nonempty, lse_c, torch.zeros_like(lse_c)).unsqueeze(-1))
    p = p.masked_fill(~allowed, 0.0)  # exact zeros outside the mask and on empty rows
    allowed_t = allowed.transpose(-1, -2)
    dv = masked_matmul(p.transpose(-1, -2), doc, allowed_t)  # [B, Hq, Skv, D]
    # A NaN or inf in v at a masked key makes dp NaN there: masked out before it meets p = 0.
    dp = (doc @ vr.transpose(-1, -2)).masked_fill(~allowed, 0.0)  # [B, Hq, Sq, Skv]
    delta = (doc * oc).sum(-1, keepdim=True)  # [B, Hq, Sq, 1]
    ds = p * (dp - delta)
    dq = masked_matmul(ds, kr, allowed) * scale  # a non-finite k at a masked key stays out of dq
    dk = masked_matmul(ds.transpose(-1, -2), qc, allowed_t) * scale  # [B, Hq, Skv, D]
    if g > 1:
        dk = dk.reshape(B, Hkv, g, Skv, D).sum(2)
        dv = dv.reshape(B, Hkv, g, Skv, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
