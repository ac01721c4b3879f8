"""Per-GPU tuning: which implementation and launch config each op runs, for each shape, on this GPU.

Lookup order (``tuning.tuner``): memory -> user cache ``~/.cache/sparse_triton/<gpu-slug>/tuning.json``
(``$SPARSE_TRITON_CACHE_DIR`` overrides the root) -> the shipped table
``sparse_triton/tuning/tuned/<gpu-slug>.json`` (nearest token bucket when the exact key is missing) ->
tune now (``SPARSE_TRITON_AUTOTUNE=0|1``, default on; :func:`autotune` / :func:`set_autotune` from
Python) -> the heuristic default. For ops with a dense equivalent the dense implementation is always a
candidate, so a tuned shape is never slower than dense. ``python -m sparse_triton tune`` pre-tunes a
preset's or a model's shapes.

>>> import sparse_triton as st
>>> st.tuning.bucket(300)
512
"""

from .cache import DeviceInfo, TuningCache, cache_dir, gpu_slug
from .mode import autotune, autotune_enabled, set_autotune
from .tables import bucket, load_shipped, shipped_dir, shipped_slugs
from .timer import CudaTimer
from .tuner import Candidate, Choice, DeviceLimits, TunableOp, Tuner, TuneResult, default_tuner, set_default_tuner

__all__ = [
    "Candidate",
    "Choice",
    "CudaTimer",
    "DeviceInfo",
    "DeviceLimits",
    "TunableOp",
    "TuneResult",
    "Tuner",
    "TuningCache",
    "autotune",
    "autotune_enabled",
    "bucket",
    "cache_dir",
    "default_tuner",
    "gpu_slug",
    "load_shipped",
    "set_autotune",
    "set_default_tuner",
    "shipped_dir",
    "shipped_slugs",
]
