"""N:M structured sparsity: the config, magnitude masks, and the compressed ``NMTensor``.

A tensor is *N:M sparse along a dim* when every group of ``m`` consecutive elements along that dim
holds at most ``n`` non-zeros. For a linear weight ``W[out, in]`` the dim is the last one (the
reduction dim of ``F.linear``). Any ``1 <= n < m <= 16`` is supported.

Compressed layout
-----------------
The grouped dim is moved last; the other dims (``lead``) are kept as they are. With ``K`` the size of
the grouped dim, ``G = ceil(K / m)`` groups (the last group is zero-padded when ``m`` does not divide
``K``) and ``S = G * n`` kept slots per row:

* ``values[*lead, S]``: the kept elements, group by group, each group's ``n`` elements in ascending
  position. A group with fewer than ``n`` non-zeros stores explicit zeros.
* ``indices[*lead, ceil(S / P)]`` (``int32``): the position (``0 .. m-1``) of every kept element inside
  its group, ``B`` bits each, ``P = 32 // B`` of them per 32-bit word, lowest bits first::

      B = 1 for m = 2,  B = 2 for m = 3..4,  B = 4 for m = 5..16      (B always divides 32)

      slot j = g * n + s  ->  word j // P, bits [(j % P) * B, (j % P) * B + B)

      2:4, one row, K = 16 (4 groups, 8 slots, P = 16: one word)
      dense    | a 0 b 0 | 0 0 c d | e 0 0 f | 0 g h 0 |
      values   [ a b       c d       e f       g h ]
      position [ 0 2       2 3       0 3       1 2 ]
      word 0   bits 1:0 = 0, 3:2 = 2, 5:4 = 2, 7:6 = 3, 9:8 = 0, 11:10 = 3, 13:12 = 1, 15:14 = 2

  A word's unused high bits are zero; a row's unused trailing slots (``S`` not a multiple of ``P``)
  are zero. Positions are read back with ``(word >> shift) & (2**B - 1)``, which is exact whatever
  the sign of the int32 word.

  A valid tensor's positions are ``< m`` and strictly ascending within each group, and its padding bits
  are zero. :meth:`NMTensor.validate` checks that; :func:`check_indices` does so once per version of an
  indices tensor (``to_dense``, ``nm_linear``), so a hand-built tensor with bad positions raises
  ``ValueError`` instead of computing garbage.

Which elements are kept: the ``n`` largest by magnitude in each group; ties go to the lower index;
NaN counts as larger than every number (so it is kept and stays visible); ``-0.0`` counts as zero.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import torch

from ._checks import check_bool

__all__ = [
    "NMSparsity",
    "NMTensor",
    "check_indices",
    "index_bits",
    "indices_per_word",
    "magnitude_key",
    "nm_compress",
    "nm_mask",
    "nm_prune",
    "pack_indices",
    "unpack_indices",
]

MAX_M = 16


def _check_nm(n, m, where: str) -> None:
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{where}: {name} must be an int, got {type(v).__name__}")
    if not (1 <= n < m <= MAX_M):
        raise ValueError(f"{where}: expected 1 <= n < m <= {MAX_M}, got n={n}, m={m}")


@dataclass(frozen=True)
class NMSparsity:
    """N:M sparsity config: at most ``n`` non-zeros in every group of ``m`` (``1 <= n < m <= 16``).

    >>> NMSparsity(2, 4)
    NMSparsity(n=2, m=4)
    """

    n: int = 2
    m: int = 4

    def __post_init__(self):
        _check_nm(self.n, self.m, "NMSparsity")

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def index_bits(m: int) -> int:
    """Bits per stored position for group size ``m`` (1, 2 or 4; always a divisor of 32)."""
    return 1 if m <= 2 else 2 if m <= 4 else 4


def indices_per_word(m: int) -> int:
    """Positions per int32 word of ``NMTensor.indices`` for group size ``m``."""
    return 32 // index_bits(m)


def _norm_dim(dim, ndim: int, where: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{where}: dim must be an int, got {type(dim).__name__}")
    if ndim == 0:
        raise ValueError(f"{where}: expected a tensor with at least 1 dim, got a 0-dim tensor")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{where}: dim={dim} is out of range for a tensor with {ndim} dims")
    return dim % ndim


def _check_float(t, name: str, where: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype={t.dtype}")


def magnitude_key(w: torch.Tensor) -> torch.Tensor:
    """An int64 tensor ordered like ``|w|`` with NaN above +inf and -0.0 equal to 0.0.

    For non-negative IEEE floats the bit pattern, read as an integer, is ordered like the value; the
    Triton prune kernel compares the same fp32 bit patterns, so both pick identical elements.
    """
    if w.dtype == torch.float64:
        return w.abs().view(torch.int64)
    return w.float().abs().view(torch.int32).to(torch.int64)


def _grouped(t: torch.Tensor, m: int, fill) -> torch.Tensor:
    """``t[..., K]`` -> ``[..., G, m]``, the tail group padded with ``fill``."""
    K = t.shape[-1]
    pad = -K % m
    if pad:
        t = torch.nn.functional.pad(t, (0, pad), value=fill)
    return t.reshape(*t.shape[:-1], (K + pad) // m, m)


def _mask_last(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask for ``w[..., K]`` grouped along the last dim, as ``[..., G, m]`` (padding never wins)."""
    key = _grouped(magnitude_key(w), m, -1)
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    keep = torch.zeros(key.shape, dtype=torch.bool, device=w.device)
    return keep.scatter_(-1, order[..., :n], True)


def _mask(w: torch.Tensor, n: int, m: int, dim: int, where: str) -> torch.Tensor:
    _check_float(w, "w", where)
    _check_nm(n, m, where)
    d = _norm_dim(dim, w.dim(), where)
    wl = w.movedim(d, -1)
    K = wl.shape[-1]
    keep = _mask_last(wl, n, m).flatten(-2)[..., :K]
    return keep.movedim(-1, d)


def nm_mask(w: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Bool mask keeping the ``n`` largest ``|w|`` of every group of ``m`` along ``dim``.

    Ties go to the lower index; NaN counts as the largest magnitude. A group cut short by the end of
    the dim keeps all of its elements if it has ``n`` or fewer.

    >>> nm_mask(torch.tensor([[1., -3., 2., 0.5]]), 2, 4)
    tensor([[False,  True,  True, False]])
    """
    return _mask(w, n, m, dim, "nm_mask")


def nm_prune(w: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """``w`` with all but the ``n`` largest ``|w|`` of every group of ``m`` along ``dim`` set to zero.

    >>> nm_prune(torch.tensor([[1., -3., 2., 0.5]]), 2, 4)
    tensor([[ 0., -3.,  2.,  0.]])
    """
    mask = _mask(w, n, m, dim, "nm_prune")
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def pack_indices(pos: torch.Tensor, m: int) -> torch.Tensor:
    """Pack positions ``pos[..., S]`` (ints in ``[0, m)``) into ``int32[..., ceil(S / P)]``."""
    B, P = index_bits(m), indices_per_word(m)
    S = pos.shape[-1]
    W = -(-S // P)
    p = pos.to(torch.int64)
    if W * P != S:
        p = torch.nn.functional.pad(p, (0, W * P - S))
    shifts = torch.arange(P, device=pos.device, dtype=torch.int64) * B
    words = (p.reshape(*p.shape[:-1], W, P) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_indices(words: torch.Tensor, S: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: ``int32[..., W]`` -> ``int64[..., S]`` positions."""
    B, P = index_bits(m), indices_per_word(m)
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(P, device=words.device, dtype=torch.int64) * B
    pos = (w.unsqueeze(-1) >> shifts) & ((1 << B) - 1)
    return pos.flatten(-2)[..., :S]


# Faults of packed positions, as bits of one int32 computed on the indices' device (one host read).
_OUT_OF_RANGE, _NOT_ASCENDING, _PADDING = 1, 2, 4
_CHECK_BLOCK = 1 << 24  # positions unpacked at once by a check (int32: 64 MB)
_FAULTS = ((_OUT_OF_RANGE, "a stored position is >= m={m}"),
           (_NOT_ASCENDING, "stored positions are not strictly ascending within a group"),
           (_PADDING, "the padding after a row's last slot holds non-zero bits"))


def _fault_rows(indices: torch.Tensor, S: int, n: int, m: int) -> torch.Tensor:
    """Per row (``indices[*lead, W]`` flattened to ``[R, W]``), the fault bits of its packed positions.
    Runs on the indices' device in blocks of rows (``_CHECK_BLOCK`` positions each), so checking a large
    weight needs a bounded few hundred MB of temporaries, not several times the weight."""
    B, P = index_bits(m), indices_per_word(m)
    words = indices.reshape(-1, indices.shape[-1])
    shifts = torch.arange(P, device=indices.device, dtype=torch.int32) * B
    step = max(1, _CHECK_BLOCK // max(1, words.shape[1] * P))
    out = []
    for r0 in range(0, words.shape[0], step):
        # int32 arithmetic shift then mask: exact for negative words too, and half the memory of int64
        pos = ((words[r0:r0 + step].unsqueeze(-1) >> shifts) & ((1 << B) - 1)).flatten(1)  # [rows, W * P]
        kept, pad = pos[:, :S], pos[:, S:]
        faults = (kept >= m).any(1).to(torch.int32) * _OUT_OF_RANGE
        if n > 1:
            g = kept.reshape(kept.shape[0], -1, n)
            faults |= (g[..., 1:] <= g[..., :-1]).flatten(1).any(1).to(torch.int32) * _NOT_ASCENDING
        if pad.shape[1]:
            faults |= (pad != 0).any(1).to(torch.int32) * _PADDING
        out.append(faults)
    return torch.cat(out) if len(out) != 1 else out[0]


def _raise_faults(indices: torch.Tensor, S: int, n: int, m: int, where: str) -> None:
    """Raise ``ValueError`` (naming ``where``, the fault and its first row) if the positions are malformed.
    One host read of one int32 in the valid case."""
    if indices.numel() == 0:
        return
    rows = _fault_rows(indices, S, n, m)
    if rows.numel() == 0 or int(rows.max().item()) == 0:  # the one host read: any fault makes a row's code > 0
        return
    # The error path: find the first faulty row and every kind of fault (more host reads are fine here).
    first = int(torch.nonzero(rows)[0, 0])
    kinds = 0
    for v in rows.unique().tolist():
        kinds |= v
    what = "; ".join(text.format(m=m) for bit, text in _FAULTS if kinds & bit)
    raise ValueError(f"{where}: malformed N:M indices ({n}:{m}, {S} slots per row): {what} (first in row {first})")


_checked_lock = threading.Lock()
_checked: dict[int, tuple[weakref.ref, tuple]] = {}  # id(indices) -> (ref, stamp it was found valid at)


def _forget(ident: int):
    def callback(ref: weakref.ref) -> None:
        with _checked_lock:
            entry = _checked.get(ident)
            if entry is not None and entry[0] is ref:
                del _checked[ident]
    return callback


def _stamp(indices: torch.Tensor, S: int, n: int, m: int) -> tuple | None:
    """What a check of ``indices`` holds for: its storage and version (``resize_`` and every in-place op
    bump the version) and the pattern it was read as; None where its data cannot be read (tracing with
    fake or functional tensors, the meta device)."""
    if (type(indices) is not torch.Tensor and not isinstance(indices, torch.nn.Parameter)) or indices.is_meta:
        return None
    try:
        version = indices._version
    except RuntimeError:  # an inference tensor has no version counter: checked once per storage
        version = None
    return (indices.data_ptr(), version, S, n, m)


def _mark_valid(indices: torch.Tensor, S: int, n: int, m: int) -> None:
    """Record ``indices`` as valid at its current version (for tensors valid by construction)."""
    if torch.compiler.is_compiling():
        return
    stamp = _stamp(indices, S, n, m)
    if stamp is None:
        return
    ident = id(indices)
    with _checked_lock:
        _checked[ident] = (weakref.ref(indices, _forget(ident)), stamp)


def _is_marked(indices: torch.Tensor, S: int, n: int, m: int) -> bool:
    stamp = _stamp(indices, S, n, m)
    entry = _checked.get(id(indices))
    return stamp is not None and entry is not None and entry[0]() is indices and entry[1] == stamp


def check_indices(indices: torch.Tensor, S: int, n: int, m: int, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` if the packed positions ``indices[*lead, W]`` (``S`` slots per
    row, pattern ``n:m``) are malformed: a position >= m, positions not strictly ascending within a
    group, or non-zero padding bits.

    Checked once per version of the tensor (an in-place change bumps the version and is checked on the
    next call; a write through ``.data`` is not seen): the check runs on the tensor's device and reads one
    int32 back, a host sync, so it is skipped while tracing under ``torch.compile`` and during CUDA-graph
    capture (check before capturing: a first eager call does). After the first call it costs a
    dictionary lookup (~1 us). Tensors from :func:`nm_compress` are valid by construction and never read.
    """
    if torch.compiler.is_compiling():
        return
    stamp = _stamp(indices, S, n, m)
    if stamp is None:
        return
    ident = id(indices)
    entry = _checked.get(ident)
    if entry is not None and entry[1] == stamp and entry[0]() is indices:
        return
    if indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    _raise_faults(indices, S, n, m, where)
    with _checked_lock:
        _checked[ident] = (weakref.ref(indices, _forget(ident)), stamp)


class NMTensor:
    """An N:M-sparse tensor in compressed form (see the module docstring for the layout).

    Attributes: ``values``, ``indices`` (int32, bit-packed positions), ``shape`` (the dense shape),
    ``n``, ``m``, ``dim`` (the grouped dim, non-negative), ``dtype`` and ``device`` (of ``values``).
    Build one with :func:`nm_compress`; ``to_dense()`` gives the dense tensor back exactly.

    >>> w = nm_compress(torch.randn(8, 16), 2, 4)
    >>> w.values.shape, w.indices.shape, w.to_dense().shape
    (torch.Size([8, 8]), torch.Size([8, 1]), torch.Size([8, 16]))
    """

    __slots__ = ("values", "indices", "shape", "n", "m", "dim")

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, shape, n: int, m: int, dim: int = -1):
        where = "NMTensor"
        _check_nm(n, m, where)
        _check_float(values, "values", where)
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"{where}: indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dtype != torch.int32:
            raise TypeError(f"{where}: indices must be int32, got {indices.dtype}")
        if values.device != indices.device:
            raise ValueError(
                f"{where}: values are on {values.device} but indices are on {indices.device}"
            )
        shape = torch.Size(shape)
        d = _norm_dim(dim, len(shape), where)
        lead = shape[:d] + shape[d + 1:]
        S = self.slots_for(shape[d], n, m)
        exp_v = (*lead, S)
        exp_i = (*lead, -(-S // indices_per_word(m)))
        if tuple(values.shape) != exp_v:
            raise ValueError(
                f"{where}: values.shape={tuple(values.shape)} does not match dense shape {tuple(shape)} "
                f"at {n}:{m} along dim {d} (expected {exp_v})"
            )
        if tuple(indices.shape) != exp_i:
            raise ValueError(
                f"{where}: indices.shape={tuple(indices.shape)} does not match dense shape {tuple(shape)} "
                f"at {n}:{m} along dim {d} (expected {exp_i})"
            )
        self.values, self.indices = values, indices
        self.shape, self.n, self.m, self.dim = shape, n, m, d

    @staticmethod
    def slots_for(K: int, n: int, m: int) -> int:
        """Kept slots per row for a grouped dim of size ``K``: ``ceil(K / m) * n``."""
        return -(-K // m) * n

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def sparsity(self) -> NMSparsity:
        return NMSparsity(self.n, self.m)

    def positions(self) -> torch.Tensor:
        """Position of every kept element inside its group, ``int64[*lead, S]``."""
        return unpack_indices(self.indices, self.values.shape[-1], self.m)

    def _check(self, where: str) -> None:
        check_indices(self.indices, self.values.shape[-1], self.n, self.m, where)

    def _dense_columns(self) -> torch.Tensor:
        S = self.values.shape[-1]
        group = torch.arange(S, device=self.indices.device) // self.n
        return group * self.m + self.positions()

    def to_dense(self) -> torch.Tensor:
        """The dense tensor (differentiable with respect to ``values``).

        Raises ``ValueError`` if the packed positions are malformed (:func:`check_indices`)."""
        self._check("NMTensor.to_dense")
        K = self.shape[self.dim]
        G = -(-K // self.m)
        lead = self.values.shape[:-1]
        out = self.values.new_zeros(*lead, G * self.m)
        out = out.scatter(-1, self._dense_columns(), self.values)
        return out[..., :K].movedim(-1, self.dim)

    def mask(self) -> torch.Tensor:
        """Bool mask of the kept positions, in the dense shape."""
        self._check("NMTensor.mask")
        K = self.shape[self.dim]
        G = -(-K // self.m)
        lead = self.values.shape[:-1]
        out = torch.zeros(*lead, G * self.m, dtype=torch.bool, device=self.device)
        out.scatter_(-1, self._dense_columns(), True)
        return out[..., :K].movedim(-1, self.dim)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """Pick this tensor's kept positions out of ``dense`` (same shape as ``self.shape``).

        Returns a tensor shaped like ``values``; used for the gradient of the compressed values.
        """
        if tuple(dense.shape) != tuple(self.shape):
            raise ValueError(f"NMTensor.gather: dense.shape={tuple(dense.shape)}, expected {tuple(self.shape)}")
        self._check("NMTensor.gather")
        d = dense.movedim(self.dim, -1)
        K = d.shape[-1]
        pad = -K % self.m
        if pad:
            d = torch.nn.functional.pad(d, (0, pad))
        return d.gather(-1, self._dense_columns())

    def validate(self) -> None:
        """Check the stored positions: in range, strictly ascending in every group, zero padding bits.

        Raises ``ValueError`` naming the fault. Always checks (one host sync); the ops and ``to_dense``
        check once per version of ``indices`` instead (:func:`check_indices`).
        """
        _raise_faults(self.indices, self.values.shape[-1], self.n, self.m, "NMTensor")
        _mark_valid(self.indices, self.values.shape[-1], self.n, self.m)

    def to(self, *args, **kwargs) -> NMTensor:
        """Like ``Tensor.to``: a dtype applies to ``values`` only; a device applies to both."""
        values = self.values.to(*args, **kwargs)
        if not values.is_floating_point():
            raise TypeError(f"NMTensor.to: values must stay floating point, got {values.dtype}")
        indices = self.indices.to(device=values.device)
        S = values.shape[-1]
        if indices is not self.indices and _is_marked(self.indices, S, self.n, self.m):
            _mark_valid(indices, S, self.n, self.m)  # a copy of checked positions: no check on the new device
        return NMTensor(values, indices, self.shape, self.n, self.m, self.dim)

    def cuda(self, device=None) -> NMTensor:
        return self.to(torch.device("cuda") if device is None else device)

    def cpu(self) -> NMTensor:
        return self.to("cpu")

    def detach(self) -> NMTensor:
        return NMTensor(self.values.detach(), self.indices, self.shape, self.n, self.m, self.dim)

    def __repr__(self) -> str:
        return (
            f"NMTensor(shape={tuple(self.shape)}, {self.n}:{self.m} along dim {self.dim}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def nm_compress(w: torch.Tensor, n: int, m: int, dim: int = -1, strict: bool = False) -> NMTensor:
    """Prune ``w`` to N:M along ``dim`` by magnitude and compress it into an :class:`NMTensor`.

    With ``strict=True`` (a bool) the weight must already be N:M (at most ``n`` non-zeros per group,
    ``-0.0`` counting as zero) or ``ValueError`` is raised; nothing is pruned then. On CUDA tensors (and under
    ``TRITON_INTERPRET=1``) this runs the fused Triton prune+compress kernel for fp16/bf16/fp32.

    >>> wc = nm_compress(torch.randn(64, 96), 2, 4)
    >>> torch.equal(wc.to_dense(), nm_prune(wc.to_dense(), 2, 4))
    True
    """
    _check_float(w, "w", "nm_compress")
    _check_nm(n, m, "nm_compress")
    check_bool(strict, "strict", "nm_compress")
    d = _norm_dim(dim, w.dim(), "nm_compress")
    wl = w.detach().movedim(d, -1)
    if strict and wl.numel():
        nnz = _grouped((wl != 0).to(torch.int32), m, 0).sum(-1)
        worst = int(nnz.max())
        if worst > n:
            raise ValueError(
                f"nm_compress: w is not {n}:{m} sparse along dim {d} (a group has {worst} non-zeros); "
                "pass strict=False to prune it by magnitude"
            )
    lead, K = wl.shape[:-1], wl.shape[-1]
    rows = math.prod(lead)
    w2d = wl.reshape(rows, K)
    # Registered by sparse_triton.ops (imported with the package): Triton kernel or pure-torch twin.
    values, indices = torch.ops.sparse_triton.nm_prune_compress(w2d, n, m)
    out = NMTensor(values.reshape(*lead, values.shape[1]), indices.reshape(*lead, indices.shape[1]), w.shape, n, m, d)
    _mark_valid(out.indices, values.shape[1], n, m)  # valid by construction: never read back
    return out

