"""Shape sets from real models: what ``python -m sparse_triton tune --preset`` tunes, what the shipped
tables cover (``autotune/regenerate.py``) and what the perf suites measure."""

from __future__ import annotations

from dataclasses import dataclass

from ..formats._checks import check_bool


@dataclass(frozen=True)
class LinearShape:
    """A linear layer's weight: ``N`` output features (rows) by ``K`` input features (reduction)."""

    name: str
    N: int
    K: int
    bias: bool = False

    def __post_init__(self):
        check_bool(self.bias, "bias", "LinearShape")

    @property
    def dims(self) -> str:
        return f"{self.N}x{self.K}"


LLAMA3_8B = (
    LinearShape("llama3-8b.q_o", 4096, 4096),
    LinearShape("llama3-8b.k_v", 1024, 4096),
    LinearShape("llama3-8b.gate_up", 14336, 4096),
    LinearShape("llama3-8b.down", 4096, 14336),
)
LLAMA3_70B = (
    LinearShape("llama3-70b.gate_up", 28672, 8192),
    LinearShape("llama3-70b.down", 8192, 28672),
)
VIT_L_MLP = (
    LinearShape("vit-l.fc1", 4096, 1024, bias=True),
    LinearShape("vit-l.fc2", 1024, 4096, bias=True),
)

# Tokens per call: decode (1..64), prefill and training (256..16384). ViT-L trains at M = 16384.
LLM_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
VIT_TOKENS = (16384,)

# N:M patterns with a bandwidth target in TARGETS.md.
NM_PATTERNS = ((2, 4), (1, 4), (2, 8), (4, 8))

LINEAR_SETS = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B, "vit-l": VIT_L_MLP}

# Tokens per preset: LLMs from decode to training; ViT-L trains at M = 16384.
PRESET_TOKENS = {"llama3-8b": LLM_TOKENS, "llama3-70b": LLM_TOKENS, "vit-l": VIT_TOKENS}
