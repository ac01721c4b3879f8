"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is stored N:M-compressed."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..formats._checks import check_bool
from ..formats.nm import NMSparsity, NMTensor, indices_per_word, nm_compress
from ..ops._prepared import clear_weight_cache
from ..ops.nm_linear import _check_input, linear_compressed

TWO_FOUR = NMSparsity(2, 4)


class SparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W[out_features, in_features]`` N:M sparse along ``in_features``.

    The kept weights are the trainable parameter ``values`` ``[out_features, ceil(in/m) * n]``; the
    mask is the int32 buffer ``indices`` (bit-packed positions, see ``sparse_triton.formats.nm``), so
    fine-tuning keeps the sparsity pattern fixed. Forward and backward run the Triton kernels on CUDA.

    Where the tuner picks dense cuBLAS for a shape, a dense copy of the weight is kept while the weight is
    seen to be unchanged (``sparse_triton.ops._prepared``): after writing ``values`` or ``indices`` through
    ``.data`` (or anything else that bypasses PyTorch's version counter) call
    ``st.ops.clear_weight_cache(module)``. ``load_state_dict`` and ``.to()`` drop the copy themselves.
    ``load_state_dict`` checks every entry of this module (shapes, dtypes, the packed positions; ``values``
    and ``indices`` only together) before it copies anything, so a load that raises leaves it unchanged.

    >>> import sparse_triton as st
    >>> lin = torch.nn.Linear(64, 32)
    >>> sp = st.nn.SparseLinear.from_dense(lin, st.NMSparsity(2, 4))
    >>> sp(torch.randn(8, 64)).shape
    torch.Size([8, 32])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 sparsity: NMSparsity = TWO_FOUR, device=None, dtype=None):
        super().__init__()
        check_bool(bias, "bias", "SparseLinear")
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
        if (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
                and input.is_floating_point()):
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

    # ----------------------------------------------------------------------------- loading and moving

    def _check_state_dict(self, state_dict, prefix: str, assign: bool) -> None:
        """Validate this module's entries of ``state_dict`` (those present), before anything is copied."""
        where = "SparseLinear"
        n, m = self.sparsity.n, self.sparsity.m
        S = NMTensor.slots_for(self.in_features, n, m)
        expected = {"values": (self.out_features, S), "indices": (self.out_features, -(-S // indices_per_word(m)))}
        if self.bias is not None:
            expected["bias"] = (self.out_features,)
        got = {}
        for name, shape in expected.items():
            key = f"state_dict['{prefix}{name}']"
            t = state_dict.get(prefix + name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {key} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, expected {shape} "
                                 f"for a {self.out_features}x{self.in_features} weight at {n}:{m}")
            if name == "indices":
                if t.dtype != torch.int32:
                    raise ValueError(f"{where}: {key} must be int32, got {t.dtype}")
            elif not t.is_floating_point():
                raise ValueError(f"{where}: {key} must be floating point, got {t.dtype}")
            got[name] = t
        if ("values" in got) != ("indices" in got):
            have, lack = ("values", "indices") if "values" in got else ("indices", "values")
            raise ValueError(f"{where}: state_dict has '{prefix}{have}' but no '{prefix}{lack}'; the two describe "
                             "one N:M weight (kept elements and their positions) and load together")
        idx = got.get("indices")
        if idx is not None and idx.device.type != "meta":
            # Positions out of range or out of order would make the kernels and to_dense() disagree.
            proto = NMTensor(idx.new_zeros(expected["values"], dtype=torch.float32), idx,
                             (self.out_features, self.in_features), n, m, dim=1)
            try:
                proto.validate()
            except ValueError as e:
                raise ValueError(f"{where}: state_dict['{prefix}indices'] is corrupted: {e}") from None
        if assign:
            # The tensors become the module's own: one floating dtype and one device for all of them.
            final = {name: got.get(name, getattr(self, name)) for name in expected}
            dtypes = {name: t.dtype for name, t in final.items() if name != "indices"}
            devices = {name: t.device for name, t in final.items()}
            if len(set(dtypes.values())) > 1 or len(set(devices.values())) > 1:
                desc = ", ".join(f"{name}: {dtypes.get(name, torch.int32)} on {devices[name]}" for name in final)
                raise ValueError(f"{where}: load_state_dict(assign=True) would leave {desc}; values and bias need one "
                                 "dtype, and all of them one device")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A corrupted or foreign checkpoint must fail loudly, naming what is wrong, before any copy.
        self._check_state_dict(state_dict, prefix, bool(local_metadata.get("assign_to_params_buffers", False)))
        old = (self.values, self.indices)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        clear_weight_cache(*old, self.values, self.indices)  # a dense copy of the old weight: drop it now

    def _apply(self, fn, recurse=True):
        old = (self.values, self.indices)
        super()._apply(fn, recurse)
        clear_weight_cache(*old, self.values, self.indices)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, sparsity={self.sparsity}")
