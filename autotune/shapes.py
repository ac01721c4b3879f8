"""The campaign's shape sets: the package's presets (``sparse_triton.tuning.presets``), re-exported so
the perf suites and ``autotune/regenerate.py`` measure and tune the same shapes."""

from sparse_triton.tuning.presets import (  # noqa: F401
    LINEAR_SETS,
    LLAMA3_8B,
    LLAMA3_70B,
    LLM_TOKENS,
    NM_PATTERNS,
    VIT_L_MLP,
    VIT_TOKENS,
    LinearShape,
)
