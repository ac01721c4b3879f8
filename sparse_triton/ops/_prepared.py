"""Prepared forms of a compressed weight, for implementations that need another layout: the dense weight
(for cuBLAS, when the tuner measured dense fastest for a shape) and cuSPARSELt's packed 2:4 form.

A form is built on first use and reused while the host can tell that its weight is unchanged. The host
cannot read a weight's bytes without a host sync (or a pass over the whole weight on every call: the
bytes the sparse kernel exists to save, plus a launch), so "unchanged" is decided from what it sees:

* the same ``values`` tensor object, with the same data pointer, shape and dtype as at the build, and the
  same for ``indices``;
* the tensors' version counters, which every in-place op on a tensor or on a view of it bumps: for-loop
  and for-each optimizer steps, in-place ops under ``torch.no_grad()``, ``load_state_dict`` (its copies;
  ``assign=True`` installs new tensors);
* for ``values`` that require grad, the count of optimizer steps taken by any ``torch.optim.Optimizer``
  (a hook common to all optimizers, registered the first time such a form is kept): fused optimizers
  (``Adam(fused=True)``, ...) write parameters without bumping their version counters, so a form of a
  trainable weight lives until the next optimizer step at most.

**The rule.** A write that none of these sees leaves a form stale: writes through ``.data``
(``w.data.copy_(v)``: ``.data`` is an alias with a version counter of its own), ``.numpy()``,
``untyped_storage()`` or DLPack, kernels outside PyTorch's dispatcher, and optimizers that are not a
``torch.optim.Optimizer``. After such a write, call :func:`clear_weight_cache` with the module or tensor
(``st.ops.clear_weight_cache(model)``). ``SparseLinear`` drops its own forms in ``load_state_dict``
and in ``.to()`` / ``.half()`` / ``to_empty``.

Never kept: forms of tensors without a version counter (made under ``torch.inference_mode``), and forms
built during CUDA-graph capture; nothing cached is read during a capture either, so a captured graph
rebuilds the form from the weight on every replay and always sees its current values.

Facts (:func:`weight_fact`) follow the same rule: a host-side fact about a weight, such as "every value
is finite" (:func:`known_finite`, which lets the activation-sparse paths skip their exact handling of
non-finite weights), computed with one host sync per weight version.

Memory: a dense form costs the dense weight's bytes. It exists only for weights whose tuned winner at
some token count is the dense implementation (large-M prefill or training shapes, exact fp32); an entry
goes away with its ``values`` tensor, and :func:`clear_weight_cache` drops forms on demand.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch

from ..formats.nm import NMTensor

_lock = threading.Lock()
# id(values) -> (weakref to values, stamp, {kind: form}, storages of values and indices)
_forms: dict[int, tuple[weakref.ref, tuple, dict[str, torch.Tensor], frozenset]] = {}
# the same for host-side facts about a weight (weight_fact): id(values) -> (ref, stamp, {kind: bool}, storages)
_facts: dict[int, tuple[weakref.ref, tuple, dict[str, bool], frozenset]] = {}
_optimizer_steps = 0
_step_hook = None


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _watch_optimizer_steps() -> None:
    global _step_hook
    with _lock:
        if _step_hook is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            _step_hook = register_optimizer_step_post_hook(_count_step)


def _stamp(t: torch.Tensor) -> tuple | None:
    try:
        return (t.data_ptr(), t._version, tuple(t.shape), t.dtype)
    except RuntimeError:  # inference tensors carry no version counter
        return None


def _storage(t: torch.Tensor) -> tuple | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (t.device, ptr) if ptr else None


def _drop(ident: int, table: dict | None = None) -> Callable[[weakref.ref], None]:
    table = _forms if table is None else table

    def callback(_ref: weakref.ref) -> None:
        with _lock:
            entry = table.get(ident)
            if entry is not None and entry[0]() is None:
                del table[ident]
    return callback


def prepared(values: torch.Tensor, indices: torch.Tensor | None, kind: str,
             build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The ``kind`` form of the weight ``(values, indices)`` (``indices`` None for a dense weight), from
    the cache or ``build()`` (see the module docstring for when a kept form is reused)."""
    sv, si = _stamp(values), (() if indices is None else _stamp(indices))
    if sv is None or si is None or (values.is_cuda and torch.cuda.is_current_stream_capturing()):
        return build()
    trainable = values.requires_grad
    if trainable and _step_hook is None:
        _watch_optimizer_steps()  # before the stamp reads the count
    stamp = (sv, si, _optimizer_steps if trainable else None)
    ident = id(values)
    with _lock:
        entry = _forms.get(ident)
        if entry is not None and entry[0]() is values and entry[1] == stamp:
            form = entry[2].get(kind)
            if form is not None:
                return form
    form = build()
    storages = frozenset(s for s in (_storage(values), None if indices is None else _storage(indices)) if s)
    with _lock:
        entry = _forms.get(ident)
        if entry is None or entry[0]() is not values or entry[1] != stamp:
            entry = (weakref.ref(values, _drop(ident)), stamp, {}, storages)
            _forms[ident] = entry
        entry[2][kind] = form
    return form


def weight_fact(values: torch.Tensor, kind: str, compute: Callable[[], bool]) -> bool | None:
    """A host-side fact about a weight (``compute()``, e.g. "every value is finite"), kept like a form:
    computed once per version (``compute`` may sync the host) and dropped by :func:`clear_weight_cache`.

    Unlike a form, a kept fact is also read during CUDA-graph capture: the graph freezes the decision
    taken from it (warm up before capturing, as for tuning). ``None`` where nothing is known and nothing
    may be computed: while tracing under ``torch.compile``, during a capture with nothing kept, and for
    tensors without a version counter (made under ``torch.inference_mode``). Callers then take the path
    that is right whatever the fact.
    """
    if torch.compiler.is_compiling():
        return None
    sv = _stamp(values)
    if sv is None:
        return None
    trainable = values.requires_grad
    if trainable and _step_hook is None:
        _watch_optimizer_steps()
    stamp = (sv, _optimizer_steps if trainable else None)
    ident = id(values)
    with _lock:
        entry = _facts.get(ident)
        if entry is not None and entry[0]() is values and entry[1] == stamp and kind in entry[2]:
            return entry[2][kind]
    if values.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    fact = bool(compute())
    storages = frozenset(s for s in (_storage(values),) if s)
    with _lock:
        entry = _facts.get(ident)
        if entry is None or entry[0]() is not values or entry[1] != stamp:
            entry = (weakref.ref(values, _drop(ident, _facts)), stamp, {}, storages)
            _facts[ident] = entry
        entry[2][kind] = fact
    return fact


def known_finite(*weights: torch.Tensor) -> bool:
    """Whether every weight is known to hold only finite values (:func:`weight_fact`; one host sync per
    weight version). False when unknown: the caller takes its exact path for non-finite weights."""
    return all(weight_fact(w, "finite", lambda w=w: torch.isfinite(w).all()) is True for w in weights)


def _storages_of(obj, where: str) -> set:
    if isinstance(obj, torch.Tensor):
        tensors = [obj]
    elif isinstance(obj, NMTensor):
        tensors = [obj.values, obj.indices]
    elif isinstance(obj, torch.nn.Module):
        tensors = [*obj.parameters(), *obj.buffers()]
    else:
        raise TypeError(f"{where}: expected tensors, NMTensors or nn.Modules, got {type(obj).__name__}")
    return {s for s in map(_storage, tensors) if s}


def clear_weight_cache(*weights) -> None:
    """Drop prepared weight forms (dense copies, cuSPARSELt packings) and kept facts (finiteness); they
    rebuild on their next use.

    weights: nothing, to drop every form; or tensors, :class:`~sparse_triton.NMTensor` s and modules, to
    drop the forms built from them (every parameter and buffer of a module; a tensor matches any form whose
    ``values`` or ``indices`` share its storage, so ``w.data`` names ``w``). Call it after writing a
    weight where PyTorch's version counter cannot see it (the rule in ``sparse_triton.ops._prepared``):

    >>> import sparse_triton as st
    >>> lin = st.nn.SparseLinear(64, 32)
    >>> _ = lin.values.data.mul_(2)  # not seen by the version counter
    >>> st.ops.clear_weight_cache(lin)
    """
    if not weights:
        with _lock:
            _forms.clear()
            _facts.clear()
        return
    storages: set = set()
    for w in weights:
        storages |= _storages_of(w, "clear_weight_cache")
    with _lock:
        for table in (_forms, _facts):
            for ident in [i for i, e in table.items() if e[3] & storages]:
                del table[ident]


def cached_forms() -> int:
    """How many prepared forms are held (for tests and ``python -m sparse_triton info``)."""
    with _lock:
        return sum(len(e[2]) for e in _forms.values() if e[0]() is not None)
