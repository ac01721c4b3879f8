"""Per-GPU tuning: the on-disk cache of measured winners (``cache``)."""

from .cache import DeviceInfo, TuningCache, cache_dir, gpu_slug

__all__ = ["DeviceInfo", "TuningCache", "cache_dir", "gpu_slug"]
