"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is stored N:M-compressed."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..formats.nm import NMSparsity, NMTensor, indices_per_word, nm_compress
from ..ops.nm_linear import _check_input, linear_compressed

TWO_FOUR = NMSparsity(2, 4)


class SparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W[out_features, in_features]`` N:M sparse along ``in_features``.

    The kept weights are the trainable parameter ``values`` ``[out_features, ceil(in/m) * n]``; the
    mask is the int32 buffer ``indices`` (bit-packed positions, see ``sparse_triton.formats.nm``), so
    fine-tuning keeps the sparsity pattern fixed. Forward and backward run the Triton kernels on CUDA.

    >>> import sparse_triton as st
    >>> lin = torch.nn.Linear(64, 32)
    >>> sp = st.nn.SparseLinear.from_dense(lin, st.NMSparsity(2, 4))
    >>> sp(torch.randn(8, 64)).shape
    torch.Size([8, 32])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 sparsity: NMSparsity = TWO_FOUR, device=None, dtype=None):
        super().__init__()
        if not isinstance(sparsity, NMSparsity):
            raise TypeError(f"SparseLinear: sparsity must be an NMSparsity, got {type(sparsity).__name__}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"SparseLinear: {name} must be an int, got {type(v).__name__}")
            if v < 0:
                raise ValueError(f"SparseLinear: {name} must be non-negative, got {v}")
        self.in_features, self.out_features, self.sparsity = in_features, out_features, sparsity
        # Same initialisation as nn.Linear, then pruned: a freshly built layer is usable as is.
        dense = torch.empty(out_features, in_features, device=device, dtype=dtype)
        if dense.numel():
            nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        w = nm_compress(dense, sparsity.n, sparsity.m)
        self.values = nn.Parameter(w.values)
        self.register_buffer("indices", w.indices)
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, linear: nn.Linear, sparsity: NMSparsity = TWO_FOUR) -> SparseLinear:
        """Prune ``linear.weight`` to N:M by magnitude and compress it; the bias is copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: expected an nn.Linear, got {type(linear).__name__}")
        if not isinstance(sparsity, NMSparsity):
            raise TypeError(
                f"SparseLinear.from_dense: sparsity must be an NMSparsity, got {type(sparsity).__name__}")
        w = linear.weight.detach()
        if not w.is_floating_point():
            raise TypeError(f"SparseLinear.from_dense: the weight must be floating point, got {w.dtype}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.sparsity = linear.in_features, linear.out_features, sparsity
        wc = nm_compress(w, sparsity.n, sparsity.m)
        self.values = nn.Parameter(wc.values, requires_grad=linear.weight.requires_grad)
        self.register_buffer("indices", wc.indices)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        else:
            self.register_parameter("bias", None)
        return self

    def weight_nm(self) -> NMTensor:
        """The weight as an :class:`NMTensor` sharing this module's storage (validates the shapes)."""
        return NMTensor(self.values, self.indices, (self.out_features, self.in_features),
                        self.sparsity.n, self.sparsity.m, dim=1)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]``, rebuilt on every access (differentiable)."""
        return self.weight_nm().to_dense()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        values, bias = self.values, self.bias
        device_type = values.device.type
        if torch.is_autocast_enabled(device_type) and input.is_floating_point():
            # Mixed precision like nn.Linear under autocast: compute in the autocast dtype.
            dtype = torch.get_autocast_dtype(device_type)
            input, values = input.to(dtype), values.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        _check_input(input, self.in_features, values.dtype, values.device, "SparseLinear", "input")
        return linear_compressed(input, values, self.indices, bias,
                                 self.sparsity.n, self.sparsity.m, self.in_features)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` holding the (pruned) dense weight and the bias."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A corrupted or foreign checkpoint must fail loudly, naming what is wrong, before any copy.
        n, m = self.sparsity.n, self.sparsity.m
        S = NMTensor.slots_for(self.in_features, n, m)
        expected = {"values": (self.out_features, S),
                    "indices": (self.out_features, -(-S // indices_per_word(m)))}
        for name, shape in expected.items():
            t = state_dict.get(prefix + name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(
                    f"SparseLinear: state_dict['{prefix}{name}'] has shape {tuple(t.shape)}, expected {shape} "
                    f"for a {self.out_features}x{self.in_features} weight at {n}:{m}")
        idx = state_dict.get(prefix + "indices")
        if idx is not None:
            if idx.dtype != torch.int32:
                raise ValueError(f"SparseLinear: state_dict['{prefix}indices'] must be int32, got {idx.dtype}")
            # Positions out of range or out of order would make the kernels and to_dense() disagree.
            proto = NMTensor(idx.new_zeros(expected["values"], dtype=torch.float32), idx,
                             (self.out_features, self.in_features), n, m, dim=1)
            try:
                proto.validate()
            except ValueError as e:
                raise ValueError(f"SparseLinear: state_dict['{prefix}indices'] is corrupted: {e}") from None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, sparsity={self.sparsity}")
