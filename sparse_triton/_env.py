"""Process-wide facts read once at import (before any kernel module is imported)."""

import os

# @triton.jit picks the interpreter or the compiler when a kernel is defined, so the choice is fixed
# for the life of the process: read it once, with the kernels.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
