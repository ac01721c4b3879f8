"""``sparsify(model, config, filter_fn)``: swap dense layers for sparse ones, in place.

Two configs: :class:`NMSparsity` (weights pruned N:M, ``SparseLinear``) and :class:`ActivationSparsity`
(inputs thresholded, ``ActSparseMLP`` / ``ActSparseLinear``, thresholds calibrated on sample data).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from .calibration import ActivationSparsity, calibrate_thresholds
from .formats.nm import NMSparsity
from .nn.act_sparse import ActSparseLinear, ActSparseMLP, detect_activation
from .nn.linear import SparseLinear

logger = logging.getLogger("sparse_triton")


def _skip_reason(module: nn.Linear, fqn: str, parent: nn.Module, shared: set[int]) -> str | None:
    if parent is not None and isinstance(parent, nn.MultiheadAttention):
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


def output_heads(model: nn.Module) -> dict[int, str]:
    """``id(module) -> why`` for the output layers of ``model`` that ``sparsify`` keeps dense by default:
    modules named ``lm_head``, what ``get_output_embeddings()`` returns (Hugging Face models, at any
    depth), and every ``nn.Linear`` whose weight is an ``nn.Embedding``'s weight (tied).

    >>> emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    >>> head.weight = emb.weight
    >>> list(output_heads(torch.nn.ModuleDict({"emb": emb, "head": head})).values())
    ['its weight is the input embedding emb.weight (tied)']
    """
    embeddings = {id(m.weight): fqn for fqn, m in model.named_modules() if isinstance(m, nn.Embedding)}
    heads = {id(m): f"its weight is the input embedding {embeddings[id(m.weight)]}.weight (tied)"
             for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in embeddings}
    for fqn, m in model.named_modules():
        if fqn.rsplit(".", 1)[-1] == "lm_head":
            heads.setdefault(id(m), "the output head (lm_head)")
        get = getattr(m, "get_output_embeddings", None)
        if callable(get):
            try:
                out = get()
            except (NotImplementedError, AttributeError):  # models without a head
                out = None
            if isinstance(out, nn.Module):
                heads.setdefault(id(out), "the model's output embeddings (get_output_embeddings())")
    return heads


def _default_filter(model: nn.Module):
    """The filter of ``filter_fn=None``: every layer but the untied output heads, each logged once (INFO).
    Heads tied to an embedding are left to the tied-weight rule, which skips them with a warning."""
    heads = {i: why for i, why in output_heads(model).items() if not why.endswith("(tied)")}
    for fqn, m in model.named_modules():
        if id(m) in heads and isinstance(m, nn.Linear):
            logger.info("sparsify: kept %s dense: %s; output layers stay dense by default (exact logits, "
                        "resize_token_embeddings keeps working), a filter_fn that returns True for it opts in",
                        _shown(fqn, m), heads[id(m)])

    def keep(module: nn.Module, fqn: str) -> bool:
        return id(module) not in heads

    return keep


def _join(fqn: str, name: str) -> str:
    return f"{fqn}.{name}" if fqn else name


def _shown(fqn: str, module: nn.Module) -> str:
    """How logs name a layer: its fqn, or the model itself."""
    return fqn or f"the model ({type(module).__name__})"


def _targets(model: nn.Module, filter_fn) -> list[tuple[nn.Module, str, nn.Linear, str]]:
    """``(parent, name, linear, fqn)`` for every ``nn.Linear`` child in ``model`` that ``filter_fn`` keeps
    (``model`` itself too if it is one: parent None)."""
    targets = []
    if isinstance(model, nn.Linear) and filter_fn(model, ""):
        targets.append((None, "", model, ""))
    for fqn, module in model.named_modules():
        for name, child in module.named_children():
            if not isinstance(child, nn.Linear):
                continue
            child_fqn = _join(fqn, name)
            if not filter_fn(child, child_fqn):
                continue
            targets.append((module, name, child, child_fqn))
    return targets


def sparsify(model: nn.Module, config: NMSparsity | ActivationSparsity,
             filter_fn: Callable[[nn.Module, str], bool] | None = None, *,
             calibration_data=None) -> nn.Module:
    """Swap the dense layers of ``model`` for sparse ones, in place; returns ``model``, or, when ``model``
    is itself the layer being replaced (a bare ``nn.Linear``, or a bare gated MLP with activation
    sparsity), the replacement (logged like every swap): always use the return value.

    config:

    * an :class:`NMSparsity` (e.g. ``NMSparsity(2, 4)``): every ``nn.Linear`` becomes a
      :class:`~sparse_triton.nn.SparseLinear`, its weight pruned N:M by magnitude.
    * an :class:`~sparse_triton.calibration.ActivationSparsity`: activation sparsity. The thresholds are
      ``config.thresholds`` or, if None, calibrated with
      :func:`~sparse_triton.calibration.calibrate_thresholds` on ``calibration_data`` (an iterable of
      batches, each passed as ``model(batch)``, ``model(**batch)`` or ``model(*batch)``) for
      ``config.sparsity`` and ``config.method`` (by default every ``nn.Linear`` but ``lm_head``). Then
      every Llama / Mistral-style MLP (``gate_proj``, ``up_proj``, ``down_proj`` ``nn.Linear`` without
      bias, a SiLU / ReLU / ReLU-squared ``act_fn``, ``forward = down(act_fn(gate(x)) * up(x))``) whose
      three projections all have thresholds becomes an :class:`~sparse_triton.nn.ActSparseMLP` (fused
      gate/up at inference), and every other ``nn.Linear`` with a threshold an
      :class:`~sparse_triton.nn.ActSparseLinear`. Module names (and state-dict keys) do not change.

    filter_fn: ``filter_fn(module, fqn) -> bool`` picks the ``nn.Linear`` layers (``fqn`` is ``""`` for
        ``model`` itself); for activation sparsity it also selects the layers to calibrate. An MLP is
        swapped whole only if all three projections are picked. Default (None): every ``nn.Linear``
        except the output layers (:func:`output_heads`: ``lm_head``, ``get_output_embeddings()``, a
        linear sharing its weight with an ``nn.Embedding``), which stay dense so the logits stay exact
        and ``resize_token_embeddings`` keeps working; each is logged (INFO) as kept dense. To sparsify
        an untied head anyway, pass a ``filter_fn`` that returns True for it, e.g.
        ``filter_fn=lambda module, fqn: True`` (a filter_fn replaces the default rule entirely).
    calibration_data: batches for calibration (activation sparsity without precomputed thresholds only).

    Layers that cannot be swapped safely are left dense and logged with the reason (WARNING): subclasses
    of ``nn.Linear``, the projections owned by ``nn.MultiheadAttention``, tied weights (a head tied to
    the embedding included, even when filter_fn picks it), non-float or meta weights. Swapped layers
    are logged at INFO level on the ``sparse_triton`` logger.

    >>> import sparse_triton as st
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    >>> mlp = st.sparsify(mlp, st.NMSparsity(2, 4))
    >>> type(mlp[0]).__name__
    'SparseLinear'
    >>> from sparse_triton.calibration import ActivationSparsity
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    >>> mlp = st.sparsify(mlp, ActivationSparsity(0.5), calibration_data=[torch.randn(256, 64)])
    >>> type(mlp[2]).__name__, mlp[2].threshold.shape
    ('ActSparseLinear', torch.Size([]))
    >>> type(st.sparsify(torch.nn.Linear(64, 32), st.NMSparsity(2, 4))).__name__  # a bare layer: the replacement
    'SparseLinear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, (NMSparsity, ActivationSparsity)):
        raise TypeError(f"sparsify: config must be an NMSparsity or an ActivationSparsity, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"sparsify: filter_fn must be callable or None, got {type(filter_fn).__name__}")
    if not isinstance(config, ActivationSparsity) and calibration_data is not None:
        raise ValueError("sparsify: calibration_data is only used with an ActivationSparsity config; "
                         f"{config} prunes weights and needs no data")
    if filter_fn is None:
        filter_fn = _default_filter(model)
    if isinstance(config, ActivationSparsity):
        return _sparsify_activation(model, config, filter_fn, calibration_data)

    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    shared = {pid for pid, c in counts.items() if c > 1}
    targets = _targets(model, filter_fn)

    swapped = 0
    for parent, name, child, fqn in targets:
        reason = _skip_reason(child, fqn, parent, shared)
        if reason is not None:
            logger.warning("sparsify: skipped %s: %s", _shown(fqn, child), reason)
            continue
        new = SparseLinear.from_dense(child, config)
        swapped += 1
        logger.info("sparsify: %s -> SparseLinear(%d, %d, %s)", _shown(fqn, child), child.in_features,
                    child.out_features, config)
        if parent is None:
            logger.info("sparsify: the model is itself an nn.Linear: returning its SparseLinear replacement")
            return new
        setattr(parent, name, new)
    logger.info("sparsify: %d of %d candidate layers swapped to %s", swapped, len(targets), config)
    return model


# ------------------------------------------------------------------------------------------------ activation


def _describe(t: torch.Tensor) -> str:
    return f"t={t.item():.4g}" if t.dim() == 0 else f"per-channel t[{t.numel()}]"


def _mlp_reason(mlp: nn.Module, fqn: str, thresholds, picked: set[str], shared: set[int]) -> str | None:
    """Why the gated MLP ``mlp`` (at ``fqn``) is not swapped whole; None if it is."""
    names = [_join(fqn, p) for p in ("gate_proj", "up_proj", "down_proj")]
    if any(n not in picked for n in names):
        return "filter_fn did not pick all of gate_proj, up_proj, down_proj"
    without = [n for n in names if n not in thresholds]
    if without:
        return f"no threshold for {', '.join(without)}"
    for n in names:
        proj = getattr(mlp, n.rsplit(".", 1)[-1])
        reason = _skip_reason(proj, n, mlp, shared)
        if reason is not None:
            return f"{n}: {reason}"
        if proj.bias is not None:
            return f"{n} has a bias"
    extra = [n for n, _ in mlp.named_children() if n not in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    extra += [n for n, _ in mlp.named_parameters(recurse=False)] + [n for n, _ in mlp.named_buffers(recurse=False)]
    if extra:
        return f"it has {', '.join(extra)} besides the projections and act_fn"
    g, u = thresholds[names[0]], thresholds[names[1]]
    if not torch.equal(*torch.broadcast_tensors(torch.as_tensor(g).cpu(), torch.as_tensor(u).cpu())):
        return "gate_proj and up_proj have different thresholds"
    try:
        detect_activation(mlp.act_fn)
    except ValueError as e:
        return str(e)
    return None


def _is_gated_mlp(module: nn.Module) -> bool:
    return hasattr(module, "act_fn") and all(
        isinstance(getattr(module, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))


def _sparsify_activation(model: nn.Module, config: ActivationSparsity, filter_fn, calibration_data) -> nn.Module:
    if config.thresholds is not None:
        thresholds = config.thresholds
        if calibration_data is not None:
            logger.warning("sparsify: %s carries precomputed thresholds; calibration_data is not used", config)
    else:
        if calibration_data is None:
            raise ValueError(f"sparsify: {config} needs calibration_data (an iterable of batches, e.g. [input_ids]) "
                             "to calibrate thresholds, or precomputed ones: "
                             "ActivationSparsity.from_thresholds(calibrate_thresholds(model, batches, ...))")
        thresholds = calibrate_thresholds(model, calibration_data, config.sparsity, config.method, filter_fn)

    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    shared = {pid for pid, c in counts.items() if c > 1}
    targets = _targets(model, filter_fn)
    picked = {fqn for *_, fqn in targets}

    # Gated MLPs first: their projections are then not swapped one by one.
    candidates = [(None, "", model, "")] + [(module, name, child, _join(fqn, name))
                                            for fqn, module in model.named_modules()
                                            for name, child in module.named_children()]
    mlps, claimed = [], set()
    for parent, name, child, child_fqn in candidates:
        if not _is_gated_mlp(child):
            continue
        reason = _mlp_reason(child, child_fqn, thresholds, picked, shared)
        if reason is not None:
            logger.info("sparsify: %s kept as separate layers: %s", _shown(child_fqn, child), reason)
            continue
        mlps.append((parent, name, child, child_fqn))
        claimed.update(_join(child_fqn, p) for p in ("gate_proj", "up_proj", "down_proj"))

    for parent, name, mlp, fqn in mlps:
        sub = {p: thresholds[_join(fqn, p)] for p in ("gate_proj", "up_proj", "down_proj")}
        new = ActSparseMLP.from_dense(mlp, sub)
        logger.info("sparsify: %s -> ActSparseMLP(%d, %d, %s, in %s, mid %s)", _shown(fqn, mlp), new.hidden_size,
                    new.intermediate_size, new.activation, _describe(new.gate_proj.threshold),
                    _describe(new.down_proj.threshold))
        if parent is None:
            logger.info("sparsify: the model is itself a gated MLP: returning its ActSparseMLP replacement")
            return new
        setattr(parent, name, new)

    swapped = considered = 0
    for parent, name, child, fqn in targets:
        if fqn in claimed or fqn not in thresholds:
            continue
        considered += 1
        reason = _skip_reason(child, fqn, parent, shared)
        if reason is not None:
            logger.warning("sparsify: skipped %s: %s", _shown(fqn, child), reason)
            continue
        new = ActSparseLinear.from_dense(child, thresholds[fqn])
        swapped += 1
        logger.info("sparsify: %s -> ActSparseLinear(%d, %d, %s)", _shown(fqn, child), child.in_features,
                    child.out_features, _describe(new.threshold))
        if parent is None:
            logger.info("sparsify: the model is itself an nn.Linear: returning its ActSparseLinear replacement")
            return new
        setattr(parent, name, new)
    logger.info("sparsify: %d MLPs and %d of %d other candidate layers swapped to %s", len(mlps), swapped,
                considered, config)
    return model
