"""Activation-threshold calibration for activation-sparse inference (TEAL / CHESS style).

The rule
--------
An activation-sparse linear computes ``F.linear(x * (x.abs() > t), W, b)``: an input channel whose
magnitude is at most the threshold ``t`` is skipped and its weight row is never read. ``t`` is a
float32 tensor, either a scalar ``[]`` per layer or one value per input channel ``[K]``. Calibration
runs a model on sample data and picks, for each layer, the ``t`` that makes a target fraction
``sparsity`` of the layer's input satisfy ``|x| <= t``:

* ``method="magnitude"`` (TEAL): one scalar per layer, the ``sparsity`` quantile of ``|x|`` over all
  the elements of the layer's input.
* ``method="per_channel"`` (CHESS-style): a ``[K]`` threshold, channel ``k`` gets the ``sparsity``
  quantile of ``|x[:, k]|`` over the rows (tokens); channels of different scales get the same sparsity.

``sparsity == 0`` gives thresholds of exactly 0 (only exact zeros are skipped). NaN inputs are ignored
by the statistics, +-inf count as larger than any threshold; thresholds are finite and never negative.

Memory bound
------------
The statistics are streaming histograms of ``|x|``, so memory does not grow with the amount of
calibration data. Bins come from the float32 bit pattern (for ``v >= 0`` the bits, read as an
integer, are ordered like ``v``): ``key = bits >> (23 - b)`` splits each power-of-two octave into
``2**b`` equal bins, i.e. a relative bin width of at most ``2**-b``. Besides those bins there are four
more: exact zeros, below the window, +inf, NaN (ignored). The quantile is interpolated linearly inside
its bin, so on smooth data the error is far below one bin's mass.

* magnitude: ``b = 8`` over the whole float32 range (65,284 int64 bins): **0.5 MB per layer**.
* per_channel: ``b = 4`` over a window of 32 octaves below the largest finite ``|x|`` seen in the
  layer (516 int32 bins per channel, int64 past 2**31 rows): **about 2 KB per input channel**, e.g.
  8 MB for K = 4096. A channel whose values all lie more than 2**32 below the layer's maximum gets a
  threshold interpolated between 0 and the window's bottom edge (it is negligible next to the layer).

On a few thousand rows of Gaussian-like data the calibrated sparsity on the calibration data itself is
within ~0.1 % (magnitude) and ~0.5 % per channel of the target; what remains on held-out data is the
sampling error of the data, not of the histogram. The statistics live on the activations' device.

File format (``Thresholds.save`` / ``Thresholds.load``)
--------------------------------------------------------
JSON, one layer per line; each float32 is written as the decimal of its exact float64 value (e.g.
``0.10000000149011612``), so a save/load round trip is bit-exact::

    {
     "format": "sparse_triton.thresholds",
     "version": 1,
     "sparsity": 0.5,
     "method": "per_channel",
     "layers": {
      "model.layers.0.mlp.gate_proj": [0.0123, 0.0871, ...],
      "model.layers.0.mlp.down_proj": [0.0042, ...]
     }
    }

(``"magnitude"`` files hold one number per layer instead of a list.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ActivationSparsity", "Thresholds", "activation_sparsity_report", "calibrate_thresholds"]

logger = logging.getLogger("sparse_triton")

METHODS = ("magnitude", "per_channel")
FORMAT, VERSION = "sparse_triton.thresholds", 1
_FLT_MAX = torch.finfo(torch.float32).max


def _check_sparsity(sparsity, where: str) -> None:
    ok = isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool) and 0 <= sparsity < 1
    if not ok:
        raise ValueError(f"{where}: sparsity must be in [0, 1), got {sparsity!r}")


def _check_method(method, where: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{where}: method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")


def _fp32_threshold(t, fqn: str) -> torch.Tensor:
    """``t`` (a number, list or tensor) as a new float32 CPU tensor, rounded to nearest, checked."""
    # Python numbers are read in float64 first, so that a value beyond float32 range is reported as such.
    src = t.detach().cpu() if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=torch.float64)
    if src.dim() > 1:
        raise ValueError(f"Thresholds: {fqn!r} must be a scalar or a [K] tensor, got shape {list(src.shape)}")
    if src.dtype == torch.bool or src.is_complex():
        raise TypeError(f"Thresholds: the threshold of {fqn!r} must be real numbers, got dtype={src.dtype}")
    t32 = src.to(torch.float32) + 0.0  # a copy; -0.0 -> 0.0
    bad = ~torch.isfinite(t32) | (src < 0)
    if bool(bad.any()):
        v = src[bad][0].item()
        why = (", which is beyond float32 range (it rounds to inf; thresholds are compared in float32)"
               if math.isfinite(v) and v >= 0 else "")
        raise ValueError(f"Thresholds: threshold of {fqn!r} must be finite and non-negative, got {v}{why}")
    return t32


class Thresholds(Mapping):
    """Calibrated thresholds: layer fqn -> float32 tensor (``[]`` for magnitude, ``[K]`` per channel).

    Also carries the ``sparsity`` and ``method`` they were calibrated for. Read-only mapping. Values are
    rounded to the nearest float32 (the precision the comparison ``|x| > t`` is made in everywhere) and
    must be >= 0 and finite after the rounding: a value beyond float32 range (e.g. ``1e39``, or an fp64
    ``1e300``) raises ``ValueError``. See the module docstring for the JSON format.

    >>> th = Thresholds({"mlp.up_proj": 0.25, "mlp.down_proj": [0.5, 0.125]}, sparsity=0.5, method="per_channel")
    >>> th.subset("mlp")["down_proj"]
    tensor([0.5000, 0.1250])
    """

    def __init__(self, thresholds: Mapping[str, torch.Tensor | float | list], sparsity: float, method: str):
        _check_sparsity(sparsity, "Thresholds")
        _check_method(method, "Thresholds")
        if not isinstance(thresholds, Mapping):
            raise TypeError(f"Thresholds: thresholds must be a mapping fqn -> tensor, got {type(thresholds).__name__}")
        values = {}
        for fqn, t in thresholds.items():
            if not isinstance(fqn, str):
                raise TypeError(f"Thresholds: layer names must be str, got {fqn!r}")
            values[fqn] = _fp32_threshold(t, fqn)
        self._init(values, float(sparsity), method)

    def _init(self, values: dict[str, torch.Tensor], sparsity: float, method: str) -> None:
        self._values, self.sparsity, self.method = values, sparsity, method

    @classmethod
    def _unchecked(cls, values: dict[str, torch.Tensor], sparsity: float, method: str) -> Thresholds:
        out = cls.__new__(cls)
        out._init(values, sparsity, method)
        return out

    def __getitem__(self, fqn: str) -> torch.Tensor:
        return self._values[fqn]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Thresholds):
            return NotImplemented
        return (self.sparsity, self.method, list(self)) == (other.sparsity, other.method, list(other)) and all(
            self[k].shape == other[k].shape and torch.equal(self[k].cpu(), other[k].cpu()) for k in self)

    __hash__ = None

    def __repr__(self) -> str:
        return f"Thresholds({len(self)} layers, method={self.method!r}, sparsity={self.sparsity})"

    def subset(self, prefix: str) -> Thresholds:
        """The thresholds under ``prefix + "."``, keyed relative to it (``""`` gives everything)."""
        if not prefix:
            return self._unchecked(dict(self._values), self.sparsity, self.method)
        head = prefix + "."
        sub = {k[len(head):]: v for k, v in self._values.items() if k.startswith(head)}
        return self._unchecked(sub, self.sparsity, self.method)

    def to(self, device: torch.device | str) -> Thresholds:
        """A copy with every threshold on ``device`` (still float32)."""
        return self._unchecked({k: v.to(device) for k, v in self._values.items()}, self.sparsity, self.method)

    def save(self, path: str | os.PathLike) -> None:
        """Write the thresholds as JSON to ``path``, atomically (temp file in the same folder + replace)."""
        lines = [f" {json.dumps(k)}: {json.dumps(v.cpu().tolist())}" for k, v in self._values.items()]
        text = "{\n" + "".join(f" {json.dumps(k)}: {json.dumps(v)},\n" for k, v in (
            ("format", FORMAT), ("version", VERSION), ("sparsity", self.sparsity), ("method", self.method)))
        text += ' "layers": {\n' + ",\n".join(" " + line for line in lines) + ("\n" if lines else "") + " }\n}\n"
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(prefix=".thresholds-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; this is a data file, not a secret
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Thresholds:
        """Read a file written by :meth:`save`; a malformed file raises ``ValueError`` naming the problem."""
        where = f"Thresholds.load({os.fspath(path)!r})"
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: not a valid JSON file ({e})") from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where}: expected \"format\": {FORMAT!r}, got {got!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"{where}: unsupported version {data.get('version')!r} (this release reads {VERSION})")
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise ValueError(f"{where}: \"layers\" must be an object fqn -> threshold")

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for fqn, v in layers.items():
            if not (number(v) or (isinstance(v, list) and all(number(e) for e in v))):
                raise ValueError(f"{where}: layer {fqn!r} must be a number or a list of numbers, got {v!r:.80}")
        try:
            return cls(layers, data.get("sparsity"), data.get("method"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e


class _Histogram:
    """Streaming histogram of ``v >= 0`` for ``C`` channels (see "Memory bound" in the module docstring).

    Bins per channel: ``0`` exact zeros, ``1`` below the window, ``2 .. 2+W-1`` the window of float32
    keys ``base .. base+W-1`` (``key = bits >> shift``), ``2+W`` +inf, ``3+W`` NaN (never counted).
    """

    def __init__(self, channels: int, sub_bits: int, window: int, dtype: torch.dtype):
        self.channels, self.shift, self.window, self.dtype = channels, 23 - sub_bits, window, dtype
        self.counts: torch.Tensor | None = None  # [C, window + 4]
        self.base = 0
        self.rows = 0

    def update(self, v: torch.Tensor) -> None:
        """Add ``v[R, C]`` (float32, non-negative or NaN/inf, any strides) to the counts."""
        C, W = self.channels, self.window
        if v.numel() == 0:
            return
        keys = v.view(torch.int32) >> self.shift
        finite = torch.isfinite(v)
        top = int(torch.where(finite, keys, 0).max())  # one host sync per layer and batch
        if self.counts is None:
            self.base = max(0, top - W + 1)
            self.counts = torch.zeros(C, W + 4, dtype=self.dtype, device=v.device)
        elif top - W + 1 > self.base:
            self._slide(top - W + 1)
        if self.counts.dtype == torch.int32 and self.rows + v.shape[0] >= 2**31:
            self.counts = self.counts.long()
        self.rows += v.shape[0]
        idx = (keys.long() - self.base + 2).clamp_(min=1)
        idx = torch.where(v == 0, 0, torch.where(finite, idx, torch.where(torch.isnan(v), W + 3, W + 2)))
        if C > 1:
            idx += torch.arange(C, device=v.device) * (W + 4)
        hist = torch.bincount(idx.reshape(-1), minlength=C * (W + 4))
        self.counts += hist.view(C, W + 4).to(self.counts.dtype)

    def _slide(self, base: int) -> None:
        """Move the window up to start at key ``base``; what falls off its bottom joins bin 1."""
        d, W = base - self.base, self.window
        win = self.counts[:, 2:2 + W]
        self.counts[:, 1] += win[:, :d].sum(1).to(self.counts.dtype)
        kept = win[:, d:].clone() if d < W else None
        win.zero_()
        if kept is not None:
            win[:, :W - d] = kept
        self.base = base

    def _edge(self, key: torch.Tensor) -> torch.Tensor:
        """float64 value of the lower edge of ``key``'s bin (the largest finite float32 past the top)."""
        bits = (key << self.shift).clamp(max=0x7F7FFFFF)
        return bits.to(torch.int32).view(torch.float32).double()

    def quantile(self, p: float) -> torch.Tensor:
        """Per channel, the ``t`` with a fraction ``p`` of the non-NaN values ``<= t``: float32 ``[C]``."""
        W = self.window
        if self.counts is None or p == 0:
            return torch.zeros(self.channels)
        counts = self.counts[:, :W + 3].double().cpu()  # NaN bin dropped
        cum = counts.cumsum(1)
        q = p * cum[:, -1:]  # [C, 1]
        j = torch.searchsorted(cum, q).clamp_(max=W + 2)  # first bin holding the q-th value
        prev = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)), 0.0)
        frac = ((q - prev) / counts.gather(1, j)).nan_to_num_(0.0).clamp_(0, 1)
        key = (j - 2 + self.base).clamp(min=self.base)
        lo = torch.where(j <= 1, 0.0, self._edge(key))
        hi = self._edge(key + (j > 1).long())
        t = lo + frac * (hi - lo)
        t = torch.where(j == 0, 0.0, torch.where(j == W + 2, _FLT_MAX, t))
        t = torch.where(q == 0, 0.0, t)  # empty channel (only NaN) or nothing to skip
        return t.squeeze(1).float().clamp_(0, _FLT_MAX)


def _first_input(args: tuple, kwargs: dict):
    if args:
        return args[0]
    return kwargs.get("input", next(iter(kwargs.values()), None))


def _run(model: nn.Module, batches: Iterable, hooks: list[tuple[nn.Module, Callable]], where: str) -> None:
    """Run ``model`` on every batch in eval mode without grad, with forward pre-hooks; undo it all after."""
    if batches is None:
        raise ValueError(f"{where}: batches is None; pass an iterable of batches, e.g. [x]")
    if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(f"{where}: batches must be an iterable of batches (e.g. [x] or a DataLoader), "
                        f"got {type(batches).__name__}")
    flags = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        model.eval()
        n = 0
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                n += 1
        if n == 0:
            raise ValueError(f"{where}: batches is empty; pass at least one batch")
    finally:
        for h in handles:
            h.remove()
        for m, training in flags:
            m.training = training


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return fqn.rsplit(".", 1)[-1] != "lm_head"


def calibrate_thresholds(model: nn.Module, batches: Iterable, sparsity: float = 0.5, method: str = "magnitude",
                         filter_fn: Callable[[nn.Module, str], bool] | None = None,
                         max_samples: int | None = None) -> Thresholds:
    """Calibrate activation-sparsity thresholds for the ``nn.Linear`` layers of ``model``.

    Runs ``model`` on every batch (``model(batch)`` for a tensor, ``model(**batch)`` for a mapping,
    ``model(*batch)`` for a tuple/list) without grad and in eval mode, recording ``|x|`` of each selected
    layer's input ``x[..., K]`` (as ``[rows, K]``, in float32) in a fixed-size histogram. Training flags
    and hooks are restored even if the model raises.

    sparsity: the target fraction of each layer's input with ``|x| <= t``, in ``[0, 1)``.
    method: ``"magnitude"`` (a scalar ``t`` per layer) or ``"per_channel"`` (``t[K]``, one per input channel).
    filter_fn: ``filter_fn(module, fqn) -> bool`` picks among the ``nn.Linear`` modules (subclasses
        included); default: all but those named ``lm_head``.
    max_samples: if set, use at most this many rows (tokens) per layer, the first ones seen; this bounds
        the time on a huge data set. Memory is bounded regardless (see the module docstring).
    Returns a :class:`Thresholds`. Layers never called are left out, with one warning.

    >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.SiLU(), torch.nn.Linear(64, 16))
    >>> th = calibrate_thresholds(mlp, [torch.randn(512, 16) for _ in range(4)], sparsity=0.5)
    >>> sorted(th), th["2"].shape
    (['0', '2'], torch.Size([]))
    """
    where = "calibrate_thresholds"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    _check_sparsity(sparsity, where)
    _check_method(method, where)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{where}: filter_fn must be callable or None, got {type(filter_fn).__name__}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"{where}: max_samples must be a positive int or None, got {max_samples!r}")
    select = filter_fn or _default_filter
    layers = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and select(m, fqn)]
    if not layers:
        raise ValueError(f"{where}: no layer selected (model has no nn.Linear, or filter_fn rejected them all)")

    stats: dict[str, _Histogram] = {}
    rows: dict[str, int] = {}  # rows (tokens) seen per layer, for max_samples

    def make_hook(fqn: str):
        def hook(module, args, kwargs):
            x = _first_input(args, kwargs)
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
                raise TypeError(f"{where}: {fqn} was called with {type(x).__name__} input; expected a "
                                "floating-point tensor [..., K]")
            K = x.shape[-1]
            if fqn not in stats:
                stats[fqn] = _Histogram(K, 4, 32 << 4, torch.int32) if method == "per_channel" else \
                    _Histogram(1, 8, 255 << 8, torch.int64)
            hist = stats[fqn]
            if method == "per_channel" and K != hist.channels:
                raise ValueError(f"{where}: {fqn} got inputs with K={K} after K={hist.channels}")
            v = x.detach().reshape(-1, K)
            if max_samples is not None:
                v = v[:max(0, max_samples - rows.get(fqn, 0))]
            rows[fqn] = rows.get(fqn, 0) + v.shape[0]
            # Any layout reaches a hook (a transposed or sliced activation): the histogram reads rows of a
            # contiguous float32 copy. abs() makes the tensor new, so viewing its bits as int32 is safe.
            v = v.to(torch.float32, memory_format=torch.contiguous_format).abs()
            hist.update(v if method == "per_channel" else v.reshape(-1, 1))

        return hook

    _run(model, batches, [(m, make_hook(fqn)) for fqn, m in layers], where)
    missing = [fqn for fqn, _ in layers if fqn not in stats]
    if len(missing) == len(layers):
        raise ValueError(f"{where}: none of the {len(layers)} selected layers was called by the model")
    if missing:
        logger.warning("%s: %d selected layer(s) never called during calibration, left out: %s",
                       where, len(missing), ", ".join(missing))
    values = {fqn: stats[fqn].quantile(float(sparsity)) for fqn, _ in layers if fqn in stats}
    if method == "magnitude":
        values = {fqn: t.reshape(()) for fqn, t in values.items()}
    return Thresholds._unchecked(values, float(sparsity), method)


def activation_sparsity_report(model: nn.Module, batches: Iterable,
                               thresholds: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Measure, per layer, the fraction of input elements an activation-sparse layer would skip.

    Hooks the modules named by ``thresholds`` (any module type; the input is its first positional
    argument ``x[..., K]``), runs ``model`` on ``batches`` like :func:`calibrate_thresholds` and returns
    ``{fqn: fraction of x with |x| <= t}`` (NaN inputs count as not skipped). Layers never called are
    left out with a warning; an fqn the model lacks raises ``ValueError``.

    >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.SiLU(), torch.nn.Linear(64, 16))
    >>> th = calibrate_thresholds(mlp, [torch.randn(4096, 16)], sparsity=0.5)
    >>> report = activation_sparsity_report(mlp, [torch.randn(4096, 16)], th)
    >>> all(abs(s - 0.5) < 0.02 for s in report.values())
    True
    """
    where = "activation_sparsity_report"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(thresholds, Mapping) or not thresholds:
        raise ValueError(f"{where}: thresholds must be a non-empty mapping fqn -> tensor")
    modules = dict(model.named_modules(remove_duplicate=False))
    for fqn in thresholds:
        if fqn not in modules:
            raise ValueError(f"{where}: model has no module {fqn!r} (named in thresholds)")
    skipped: dict[str, torch.Tensor] = {}
    total: dict[str, int] = {}

    def make_hook(fqn: str, t: torch.Tensor):
        def hook(module, args, kwargs):
            x = _first_input(args, kwargs)
            if not isinstance(x, torch.Tensor) or x.dim() == 0:
                raise TypeError(f"{where}: {fqn} was called with {type(x).__name__} input; expected a tensor [..., K]")
            if t.dim() == 1 and t.numel() != x.shape[-1]:
                raise ValueError(f"{where}: {fqn} has a [{t.numel()}] threshold but its input has K={x.shape[-1]}")
            n = (x.detach().float().abs() <= t.to(x.device)).sum()
            skipped[fqn] = skipped[fqn] + n if fqn in skipped else n
            total[fqn] = total.get(fqn, 0) + x.numel()

        return hook

    hooks = [(modules[fqn], make_hook(fqn, torch.as_tensor(t, dtype=torch.float32))) for fqn, t in thresholds.items()]
    _run(model, batches, hooks, where)
    missing = [fqn for fqn in thresholds if fqn not in total]
    if missing:
        logger.warning("%s: %d layer(s) never called, left out: %s", where, len(missing), ", ".join(missing))
    return {fqn: int(skipped[fqn]) / total[fqn] if total[fqn] else math.nan for fqn in thresholds if fqn in total}


@dataclass(frozen=True)
class ActivationSparsity:
    """Activation-sparsity config for ``sparsify``: skip input channels with ``|x| <= t``.

    sparsity: target fraction of each layer's input to skip, in ``[0, 1)``.
    method: ``"magnitude"`` (one threshold per layer, TEAL) or ``"per_channel"`` (one per input channel).
    thresholds: precomputed :class:`Thresholds` (then no calibration data is needed); their sparsity and
        method must match the fields (:meth:`from_thresholds` copies them).

    >>> str(ActivationSparsity(0.5))
    'ActivationSparsity(0.5, magnitude)'
    """

    sparsity: float = 0.5
    method: str = "magnitude"
    thresholds: Thresholds | None = field(default=None, hash=False)

    def __post_init__(self):
        _check_sparsity(self.sparsity, "ActivationSparsity")
        _check_method(self.method, "ActivationSparsity")
        object.__setattr__(self, "sparsity", float(self.sparsity))
        th = self.thresholds
        if th is not None:
            if not isinstance(th, Thresholds):
                raise TypeError(f"ActivationSparsity: thresholds must be a Thresholds or None, got {type(th).__name__}")
            if (th.sparsity, th.method) != (self.sparsity, self.method):
                raise ValueError(f"ActivationSparsity: thresholds were calibrated for sparsity={th.sparsity}, "
                                 f"method={th.method!r} but the config says sparsity={self.sparsity}, "
                                 f"method={self.method!r}; use ActivationSparsity.from_thresholds(thresholds)")

    @classmethod
    def from_thresholds(cls, thresholds: Thresholds) -> ActivationSparsity:
        """The config for precomputed ``thresholds``, with their sparsity and method."""
        if not isinstance(thresholds, Thresholds):
            raise TypeError(f"ActivationSparsity: thresholds must be a Thresholds, got {type(thresholds).__name__}")
        return cls(thresholds.sparsity, thresholds.method, thresholds)

    def __str__(self) -> str:
        extra = "" if self.thresholds is None else f", {len(self.thresholds)} precomputed"
        return f"ActivationSparsity({self.sparsity}, {self.method}{extra})"
