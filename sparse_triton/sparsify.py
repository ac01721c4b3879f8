"""``sparsify(model, config, filter_fn)``: swap dense layers for sparse ones, in place."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from torch import nn

from .formats.nm import NMSparsity
from .nn.linear import SparseLinear

logger = logging.getLogger("sparse_triton")


def _skip_reason(module: nn.Linear, fqn: str, parent: nn.Module, shared: set[int]) -> str | None:
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its projection weights directly, not through forward()"
    if type(module) is not nn.Linear:
        return f"{type(module).__name__} is a subclass of nn.Linear with behaviour of its own"
    w = module.weight
    if not w.is_floating_point():
        return f"weight dtype {w.dtype} is not floating point"
    if w.is_meta:
        return "weight is on the meta device (no data to prune)"
    if id(w) in shared:
        return "weight is shared with another module (tied); replacing it would untie it"
    return None


def sparsify(model: nn.Module, config: NMSparsity,
             filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` with a :class:`~sparse_triton.nn.SparseLinear`, in place.

    config: an :class:`NMSparsity` (e.g. ``NMSparsity(2, 4)``); the weights are pruned by magnitude.
    filter_fn: ``filter_fn(module, fqn) -> bool`` picks the layers (default: every ``nn.Linear``).
    Layers that cannot be swapped safely are left dense and logged with the reason: subclasses of
    ``nn.Linear``, the projections owned by ``nn.MultiheadAttention``, tied weights, non-float or meta
    weights. Swapped layers are logged at INFO level on the ``sparse_triton`` logger. Returns ``model``.

    >>> import sparse_triton as st
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    >>> mlp = st.sparsify(mlp, st.NMSparsity(2, 4))
    >>> type(mlp[0]).__name__
    'SparseLinear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, NMSparsity):
        raise TypeError(f"sparsify: config must be an NMSparsity, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"sparsify: filter_fn must be callable or None, got {type(filter_fn).__name__}")

    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    shared = {pid for pid, c in counts.items() if c > 1}
    targets = []
    for fqn, module in model.named_modules():
        for name, child in module.named_children():
            if not isinstance(child, nn.Linear):
                continue
            child_fqn = f"{fqn}.{name}" if fqn else name
            if filter_fn is not None and not filter_fn(child, child_fqn):
                continue
            targets.append((module, name, child, child_fqn))

    swapped = 0
    for parent, name, child, fqn in targets:
        reason = _skip_reason(child, fqn, parent, shared)
        if reason is not None:
            logger.warning("sparsify: skipped %s: %s", fqn, reason)
            continue
        setattr(parent, name, SparseLinear.from_dense(child, config))
        swapped += 1
        logger.info("sparsify: %s -> SparseLinear(%d, %d, %s)", fqn, child.in_features,
                    child.out_features, config)
    logger.info("sparsify: %d of %d candidate layers swapped to %s", swapped, len(targets), config)
    return model
