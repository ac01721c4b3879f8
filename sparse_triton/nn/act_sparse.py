"""Activation-sparse modules: ``ActSparseLinear`` (a drop-in ``nn.Linear``) and ``ActSparseMLP`` (a drop-in
Llama / Mistral-style gated MLP).

Both compute the dense layer on a thresholded input, ``F.linear(x * (|x| > t), W, b)``: an input channel
whose magnitude is at most ``t`` is skipped, and its weight row is never read (see
:func:`sparse_triton.ops.act_sparse.act_sparse_linear`). The threshold is a persistent float32 buffer
(``[]`` for one value per layer, ``[in_features]`` for one per input channel), so it travels with the
``state_dict``; thresholds come from :func:`sparse_triton.calibration.calibrate_thresholds`.

Weights are stored input-major: ``weight`` has shape ``[out_features, in_features]`` like
``nn.Linear``'s, but is a view of a contiguous ``[in_features, out_features]`` tensor
(``weight.t().is_contiguous()``), the layout the kernels read without a copy. Loading a state dict,
``.to()``, ``.half()`` and ``load_state_dict(..., assign=True)`` keep (or restore) that layout. Nothing
is derived from the weight and kept beside it, so no write to it (``.data`` included) can leave a stale
copy; a weight put in another layout through ``.data`` still computes correctly, on the dense product.

``load_state_dict`` checks every entry of the module (shapes, dtypes, thresholds; for ``ActSparseMLP``
all three projections and the shared input threshold) before it copies anything, so a load that raises
leaves the module unchanged. The modules build, print and ``to_empty`` on the meta device, pickle, and
``copy.deepcopy``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..formats._checks import check_bool
from ..ops.act_sparse import act_sparse_linear, act_sparse_mlp, check_threshold, input_major
from ..reference.act_sparse import ACTIVATIONS, activate

__all__ = ["ActSparseLinear", "ActSparseMLP", "detect_activation"]


def _threshold_tensor(threshold, K: int, device, where: str, name: str = "threshold") -> torch.Tensor:
    """A validated float32 threshold (``[]`` or ``[K]``) on ``device`` (None: where a tensor threshold
    already is, the CPU for a float), in storage of its own. Values are checked where they are (on the
    meta device there are none to check), then copied."""
    src = threshold.device if isinstance(threshold, torch.Tensor) else torch.device("cpu")
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.detach()
    t = check_threshold(threshold, K, src, where, name)
    return t.to(device=src if device is None else device, dtype=torch.float32, copy=True)


def _same_threshold(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two thresholds (``[]`` or ``[K]``) select the same inputs; True where either is on meta."""
    if a.device.type == "meta" or b.device.type == "meta":
        return True
    return torch.equal(*torch.broadcast_tensors(a.cpu(), b.cpu()))


def _autocast(device_type: str, *tensors):
    """``tensors`` in the autocast dtype when autocast is on for ``device_type`` (else unchanged)."""
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in tensors)


class ActSparseLinear(nn.Module):
    """``y = (x * (|x| > threshold)) @ W^T + b``: ``nn.Linear`` that skips small input channels.

    Same parameters (``weight [out, in]``, stored input-major, and ``bias``) and state-dict keys as
    ``nn.Linear``, plus the float32 buffer ``threshold`` (``[]`` or ``[in_features]``). A state dict
    without ``threshold`` (an ``nn.Linear``'s) loads even with ``strict=True`` and keeps the current
    threshold; a ``threshold`` of the other kind (scalar vs per channel) replaces the buffer's shape.
    Gradients are those of the masked dense layer (for x, weight and bias; none for the threshold).

    >>> import sparse_triton as st
    >>> lin = torch.nn.Linear(64, 32)
    >>> sp = st.nn.ActSparseLinear.from_dense(lin, threshold=0.5)
    >>> x = torch.randn(4, 64)
    >>> torch.allclose(sp(x), lin(x * (x.abs() > 0.5)), atol=1e-5)
    True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold=0.0,
                 device=None, dtype=None):
        super().__init__()
        check_bool(bias, "bias", "ActSparseLinear")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"ActSparseLinear: {name} must be an int, got {type(v).__name__}")
            if v < 0:
                raise ValueError(f"ActSparseLinear: {name} must be non-negative, got {v}")
        self.in_features, self.out_features = in_features, out_features
        # Input-major storage; the same initialisation as nn.Linear.
        self.weight = nn.Parameter(torch.empty(in_features, out_features, device=device, dtype=dtype).t())
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        t = _threshold_tensor(threshold, in_features, self.weight.device, "ActSparseLinear")
        self.register_buffer("threshold", t)

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation (Kaiming-uniform weight, uniform bias)."""
        if self.weight.numel():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_dense(cls, linear: nn.Linear, threshold=0.0) -> ActSparseLinear:
        """An ``ActSparseLinear`` with ``linear``'s weight (copied input-major), bias, dtype and device.

        threshold: a float or a float tensor ``[]`` / ``[in_features]`` (finite, >= 0, within float32
        range); stored as float32 (rounded to nearest) on the weight's device.
        """
        where = "ActSparseLinear.from_dense"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{where}: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if not w.is_floating_point():
            raise TypeError(f"{where}: the weight must be floating point, got {w.dtype}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("threshold", _threshold_tensor(threshold, self.in_features, w.device, where))
        return self

    def set_threshold(self, threshold) -> None:
        """Replace the threshold (float or float tensor ``[]`` / ``[in_features]``, finite, >= 0, within
        float32 range; stored as float32, rounded to nearest).

        A threshold of the current shape is copied in place, so a captured CUDA graph sees the new value.
        """
        t = _threshold_tensor(threshold, self.in_features, self.threshold.device, "ActSparseLinear.set_threshold")
        if t.shape == self.threshold.shape:
            with torch.no_grad():
                self.threshold.copy_(t)
        else:
            self.threshold = t

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input, weight, bias = _autocast(self.weight.device.type, input, self.weight, self.bias)
        return act_sparse_linear(input, weight, self.threshold, bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with this layer's weight and bias (the threshold is dropped)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            lin.bias.requires_grad_(self.bias.requires_grad)
        return lin

    # -------------------------------------------------------------------------------- layout and dtype

    def _restore_layout(self) -> None:
        w = self.weight
        if isinstance(w, torch.Tensor) and w.dim() == 2 and not w.t().is_contiguous():
            w.data = input_major(w.data)  # same Parameter object: optimizers keep their reference

    def _apply(self, fn, recurse=True):
        # The threshold stays float32 (a cast to fp16 would move the mask boundary) and the weight
        # input-major, whatever fn does; the device follows fn.
        threshold = self.threshold
        super()._apply(fn, recurse)
        new = self.threshold
        if isinstance(new, torch.Tensor) and new.dtype != torch.float32:
            self._buffers["threshold"] = threshold.to(new.device)
        self._restore_layout()
        return self

    def _check_state_dict(self, state_dict, prefix: str, assign: bool) -> torch.Tensor | None:
        """Validate this module's entries of ``state_dict`` (those present) before anything is copied;
        returns the checkpoint's threshold (None if absent)."""
        where = "ActSparseLinear"
        expected = {"weight": (self.out_features, self.in_features)}
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
                raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, expected {shape}")
            if not t.is_floating_point():
                raise ValueError(f"{where}: {key} must be floating point, got {t.dtype}")
            got[name] = t
        key = prefix + "threshold"
        t = state_dict.get(key)
        if t is not None:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: state_dict['{key}'] must be a tensor, got {type(t).__name__}")
            # Values and kind; a scalar <-> per-channel change resizes the buffer (after every check).
            _threshold_tensor(t, self.in_features, None, f"{where}: state_dict['{key}']")
        if assign:
            final = {name: got.get(name, getattr(self, name)) for name in expected}
            if len({w.dtype for w in final.values()}) > 1 or len({w.device for w in final.values()}) > 1:
                desc = ", ".join(f"{name}: {w.dtype} on {w.device}" for name, w in final.items())
                raise ValueError(f"{where}: load_state_dict(assign=True) would leave {desc}; weight and bias need "
                                 "one dtype and one device")
        return t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "threshold"
        t = self._check_state_dict(state_dict, prefix, bool(local_metadata.get("assign_to_params_buffers", False)))
        if t is not None and t.shape != self.threshold.shape:
            self._buffers["threshold"] = torch.empty(t.shape, dtype=torch.float32, device=self.threshold.device)
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key in missing_keys[n_missing:]:
            missing_keys.remove(key)  # an nn.Linear checkpoint: keep the current threshold
        th = self.threshold
        if th.dtype != torch.float32 or th.device != self.weight.device:  # load_state_dict(assign=True)
            self._buffers["threshold"] = th.to(self.weight.device, torch.float32)
        self._restore_layout()

    def extra_repr(self) -> str:
        t = self.threshold
        if t.device.type == "meta":
            th = "threshold=meta" if t.dim() == 0 else f"threshold=per_channel[{t.numel()}] (meta)"
        elif t.dim() == 0:
            th = f"threshold={t.item():.4g}"
        elif t.numel():
            th = f"threshold=per_channel[{t.numel()}] (mean={t.mean().item():.4g}, max={t.max().item():.4g})"
        else:
            th = "threshold=per_channel[0]"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {th}"


# ------------------------------------------------------------------------------------------------ MLP


class _ReLUSquared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


_ACT_MODULES = {"silu": nn.SiLU, "relu": nn.ReLU, "relu2": _ReLUSquared}
# Hugging Face's activation classes, matched by name (transformers is not a dependency).
_HF_ACTIVATIONS = {"SiLUActivation": "silu", "ReLUSquaredActivation": "relu2"}
_PROJ = ("gate_proj", "up_proj", "down_proj")


def detect_activation(act_fn) -> str:
    """``"silu"``, ``"relu"`` or ``"relu2"`` for a gated MLP's ``act_fn``: ``nn.SiLU`` / HF ``SiLUActivation``
    / ``F.silu``, ``nn.ReLU`` / ``F.relu``, HF ``ReLUSquaredActivation``. Anything else: ``ValueError``."""
    kind = type(act_fn)
    if kind is nn.SiLU or act_fn is F.silu:
        return "silu"
    if kind is nn.ReLU or act_fn is F.relu or act_fn is torch.relu:
        return "relu"
    if kind is _ReLUSquared:
        return "relu2"
    if kind.__name__ in _HF_ACTIVATIONS and kind.__module__.startswith("transformers"):
        return _HF_ACTIVATIONS[kind.__name__]
    name = getattr(act_fn, "__name__", None) or f"{kind.__module__}.{kind.__qualname__}"
    raise ValueError(f"unsupported activation {name}: act_fn must be SiLU, ReLU or ReLU squared "
                     f"(pass activation= one of {ACTIVATIONS} if it computes one of them)")


class _GatedMLP(nn.Module):
    """The dense ``down(act(gate(x)) * up(x))`` that ``ActSparseMLP.to_dense`` returns for an MLP it built."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ActSparseMLP(nn.Module):
    """A Llama / Mistral-style gated MLP, ``down(act(gate(xs)) * up(xs))``, with sparse inputs.

    ``xs = x * (|x| > t_in)`` (``t_in`` is ``gate_proj.threshold``; gate and up share one active set) and
    the down projection's input is thresholded with ``t_mid`` (``down_proj.threshold``). ``gate_proj``,
    ``up_proj`` and ``down_proj`` are :class:`ActSparseLinear` submodules (no bias), so the state dict has
    the original MLP's keys plus one ``threshold`` per projection. ``up_proj.threshold`` mirrors
    ``gate_proj.threshold``: change both with :meth:`set_thresholds`.

    Without gradients (``torch.no_grad()``, or nothing requires grad) ``forward`` runs the fused op
    :func:`~sparse_triton.ops.act_sparse.act_sparse_mlp` (two launches on a GPU); otherwise the three
    differentiable :class:`ActSparseLinear` layers with the activation in torch, the same function.

    >>> import sparse_triton as st
    >>> mlp = st.nn.ActSparseMLP(64, 128, activation="silu", threshold_in=0.5, threshold_mid=0.01)
    >>> with torch.no_grad():
    ...     mlp(torch.randn(2, 64)).shape
    torch.Size([2, 64])
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", threshold_in=0.0,
                 threshold_mid=0.0, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"ActSparseMLP: activation must be one of {ACTIVATIONS}, got {activation!r}")
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = ActSparseLinear(hidden_size, intermediate_size, threshold=threshold_in, **kw)
        self.up_proj = ActSparseLinear(hidden_size, intermediate_size, threshold=threshold_in, **kw)
        self.down_proj = ActSparseLinear(intermediate_size, hidden_size, threshold=threshold_mid, **kw)
        self.act_fn = _ACT_MODULES[activation]()
        self.hidden_size, self.intermediate_size, self.activation = hidden_size, intermediate_size, activation
        self._dense_cls, self._dense_attrs = None, {}

    @classmethod
    def from_dense(cls, mlp: nn.Module, thresholds: Mapping, activation: str | None = None) -> ActSparseMLP:
        """Swap a Hugging Face Llama / Mistral-style MLP (``gate_proj``, ``up_proj``, ``down_proj``
        ``nn.Linear`` without bias, ``act_fn``; ``forward(x) = down(act_fn(gate(x)) * up(x))``).

        thresholds: a mapping with ``"gate_proj"`` (the input threshold, float or tensor ``[]`` /
        ``[hidden]``), ``"down_proj"`` (the intermediate threshold, ``[]`` / ``[intermediate]``) and
        optionally ``"up_proj"``, which must equal ``"gate_proj"``; e.g.
        ``calibrate_thresholds(model, ...).subset("model.layers.0.mlp")``.
        activation: ``"silu"``, ``"relu"`` or ``"relu2"``; by default detected from ``act_fn``. Given, it
        declares what ``act_fn`` computes (``act_fn`` itself is kept for :meth:`to_dense`).
        Weights are copied into input-major storage; dtype and device are kept.
        """
        where = "ActSparseMLP.from_dense"
        if not isinstance(mlp, nn.Module):
            raise TypeError(f"{where}: mlp must be an nn.Module, got {type(mlp).__name__}")
        kind = type(mlp).__name__
        bad = [p for p in _PROJ if not isinstance(getattr(mlp, p, None), nn.Linear)]
        if bad:
            raise ValueError(f"{where}: {kind} has no nn.Linear {', '.join(bad)}; expected a gated MLP with "
                             "gate_proj, up_proj, down_proj (nn.Linear) and act_fn")
        if activation is None:
            if not hasattr(mlp, "act_fn"):
                raise ValueError(f"{where}: {kind} has no act_fn; pass activation= one of {ACTIVATIONS}")
            try:
                activation = detect_activation(mlp.act_fn)
            except ValueError as e:
                raise ValueError(f"{where}: {kind}.act_fn: {e}") from None
        elif activation not in ACTIVATIONS:
            raise ValueError(f"{where}: activation must be one of {ACTIVATIONS}, got {activation!r}")
        extra = [n for n, _ in mlp.named_children() if n not in (*_PROJ, "act_fn")]
        extra += [n for n, _ in mlp.named_parameters(recurse=False)] + [n for n, _ in mlp.named_buffers(recurse=False)]
        if extra:
            raise ValueError(f"{where}: {kind} has {', '.join(extra)} besides gate_proj, up_proj, down_proj and "
                             "act_fn; its forward is not the plain gated MLP")
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        biased = [p for p in _PROJ if getattr(mlp, p).bias is not None]
        if biased:
            raise ValueError(f"{where}: {', '.join(biased)} of {kind} have a bias; ActSparseMLP takes bias-free "
                             "projections (use ActSparseLinear per projection)")
        H, I = gate.in_features, gate.out_features  # noqa: E741 (hidden, intermediate)
        shapes = [tuple(p.weight.shape) for p in (gate, up, down)]
        if shapes != [(I, H), (I, H), (H, I)]:
            raise ValueError(f"{where}: expected gate_proj and up_proj [I, H] and down_proj [H, I], got {shapes}")

        if not isinstance(thresholds, Mapping):
            raise TypeError(f"{where}: thresholds must be a mapping with keys 'gate_proj', 'down_proj' "
                            f"(and optionally 'up_proj'), got {type(thresholds).__name__}")
        missing = [k for k in ("gate_proj", "down_proj") if k not in thresholds]
        if missing:
            raise ValueError(f"{where}: thresholds has no {' or '.join(map(repr, missing))} "
                             f"(keys: {sorted(thresholds)})")
        # Checked where they are (a meta model can take real thresholds); each projection copies its own.
        t_in = _threshold_tensor(thresholds["gate_proj"], H, None, where, "thresholds['gate_proj']")
        if "up_proj" in thresholds:
            t_up = _threshold_tensor(thresholds["up_proj"], H, None, where, "thresholds['up_proj']")
            if not _same_threshold(t_in, t_up):
                raise ValueError(f"{where}: thresholds['up_proj'] differs from thresholds['gate_proj']; gate_proj "
                                 "and up_proj read the same input and share one active set, so they need one threshold")
        t_mid = _threshold_tensor(thresholds["down_proj"], I, None, where, "thresholds['down_proj']")

        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.gate_proj = ActSparseLinear.from_dense(gate, t_in)
        self.up_proj = ActSparseLinear.from_dense(up, t_in)
        self.down_proj = ActSparseLinear.from_dense(down, t_mid)
        self.act_fn = mlp.act_fn if hasattr(mlp, "act_fn") else _ACT_MODULES[activation]()
        self.hidden_size, self.intermediate_size, self.activation = H, I, activation
        # Enough to rebuild an instance of the original class in to_dense() (config, sizes, ...).
        self._dense_cls = type(mlp)
        self._dense_attrs = {k: v for k, v in vars(mlp).items() if not k.startswith("_") and k != "training"}
        self.train(mlp.training)
        return self

    def set_thresholds(self, threshold_in=None, threshold_mid=None) -> None:
        """Set the input threshold (gate and up) and/or the intermediate threshold (down); ``None`` keeps it.
        Both are checked before either is set."""
        where = "ActSparseMLP.set_thresholds"
        if threshold_in is not None:
            threshold_in = _threshold_tensor(threshold_in, self.hidden_size, None, where, "threshold_in")
        if threshold_mid is not None:
            threshold_mid = _threshold_tensor(threshold_mid, self.intermediate_size, None, where, "threshold_mid")
        if threshold_in is not None:
            self.gate_proj.set_threshold(threshold_in)
            self.up_proj.set_threshold(threshold_in)
        if threshold_mid is not None:
            self.down_proj.set_threshold(threshold_mid)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Runs before the projections load theirs: check all three (and the shared input threshold) first,
        # so that a bad down_proj entry cannot leave gate_proj and up_proj loaded.
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        loaded = {}
        for name in _PROJ:
            proj = getattr(self, name)
            t = proj._check_state_dict(state_dict, f"{prefix}{name}.", assign)
            loaded[name] = proj.threshold if t is None else t
        if not _same_threshold(loaded["gate_proj"].detach().float(), loaded["up_proj"].detach().float()):
            raise ValueError(f"ActSparseMLP: the loaded up_proj.threshold differs from gate_proj.threshold (state_dict "
                             f"keys '{prefix}gate_proj.threshold', '{prefix}up_proj.threshold'); gate_proj and up_proj "
                             "share one active set, so they need one threshold")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if needs_grad:
            return down(activate(gate(x), self.activation) * up(x))
        x, wg, wu, wd = _autocast(gate.weight.device.type, x, gate.weight, up.weight, down.weight)
        return act_sparse_mlp(x, wg, wu, wd, gate.threshold, down.threshold, self.activation)

    def to_dense(self) -> nn.Module:
        """The equivalent dense MLP (thresholds dropped): an instance of the original class when built by
        :meth:`from_dense` (made without calling its ``__init__``), else a plain gated MLP module; both with
        ``nn.Linear`` ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn``."""
        projs = [m.to_dense() for m in (self.gate_proj, self.up_proj, self.down_proj)]
        act_fn = copy.deepcopy(self.act_fn) if isinstance(self.act_fn, nn.Module) else self.act_fn
        if self._dense_cls is None:
            mlp = _GatedMLP(*projs, act_fn)
        else:
            mlp = self._dense_cls.__new__(self._dense_cls)
            nn.Module.__init__(mlp)
            vars(mlp).update(self._dense_attrs)
            for name, proj in zip(_PROJ, projs):
                setattr(mlp, name, proj)
            mlp.act_fn = act_fn
        return mlp.train(self.training)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"activation={self.activation!r}")
