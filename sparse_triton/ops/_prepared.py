"""Prepared forms of a weight for implementations that need another layout: the dense weight of a
compressed one (for cuBLAS), cuSPARSELt's packed 2:4 form, the input-major copy of a dense weight (for
the activation-sparse kernels).

A form is built once per weight and reused while the weight is unchanged: entries are keyed by the
``values`` tensor's identity and hold its data pointer and version counter (and those of the indices),
so an in-place update (an optimizer step, ``load_state_dict``) rebuilds the form on its next use, and
an entry goes away with its tensor. Tensors without a version counter (created under
``torch.inference_mode``) and builds during CUDA-graph capture are never cached: the form is rebuilt
per call, which is correct, only slower.

Memory: a dense form costs the dense weight's bytes. It exists only for weights whose tuned winner at
some token count is the dense implementation (large-M prefill or training shapes, exact fp32);
:func:`clear_weight_cache` drops every form.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch

_lock = threading.Lock()
_forms: dict[int, tuple[weakref.ref, tuple, dict[str, torch.Tensor]]] = {}


def _stamp(t: torch.Tensor) -> tuple | None:
    try:
        return (t.data_ptr(), t._version, tuple(t.shape), t.dtype)
    except RuntimeError:  # inference tensors carry no version counter
        return None


def _drop(ident: int) -> Callable[[weakref.ref], None]:
    def callback(_ref: weakref.ref) -> None:
        with _lock:
            entry = _forms.get(ident)
            if entry is not None and entry[0]() is None:
                del _forms[ident]
    return callback


def prepared(values: torch.Tensor, indices: torch.Tensor | None, kind: str,
             build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The ``kind`` form of the weight ``(values, indices)`` (``indices`` None for a dense weight), from
    the cache or ``build()``."""
    sv, si = _stamp(values), (() if indices is None else _stamp(indices))
    if sv is None or si is None or (values.is_cuda and torch.cuda.is_current_stream_capturing()):
        return build()
    stamp = (sv, si)
    ident = id(values)
    with _lock:
        entry = _forms.get(ident)
        if entry is not None and entry[0]() is values and entry[1] == stamp:
            form = entry[2].get(kind)
            if form is not None:
                return form
    form = build()
    with _lock:
        entry = _forms.get(ident)
        if entry is None or entry[0]() is not values or entry[1] != stamp:
            entry = (weakref.ref(values, _drop(ident)), stamp, {})
            _forms[ident] = entry
        entry[2][kind] = form
    return form


def clear_weight_cache() -> None:
    """Drop every prepared weight form (dense copies, cuSPARSELt packings); they rebuild on demand."""
    with _lock:
        _forms.clear()


def cached_forms() -> int:
    """How many prepared forms are held (for tests and ``python -m sparse_triton info``)."""
    with _lock:
        return sum(len(e[2]) for e in _forms.values() if e[0]() is not None)
