"""The N:M linear ops' implementations and what the tuner may choose among for them.

Implementations of ``y = x @ W^T (+ bias)`` (``nm_linear_fwd``) and ``dx = dy @ W`` (``nm_linear_bwd_dx``):

* ``triton``: our kernels (``kernels.nm_matmul``), one candidate per launch config;
* ``dense``: cuBLAS on the dense weight (built once per weight by the decompress kernel and kept while
  the weight is unchanged, see ``ops._prepared``), the op a dense layer would run;
* ``cusparselt``: ``torch._cslt_sparse_mm`` on cuSPARSELt's packing of the weight, for 2:4 in fp16 and
  bf16 where torch ships cuSPARSELt and the GPU has sparse tensor cores (compute capability 8.0 and up;
  forward only: dX would need W^T to be 2:4 along N).

**The dispatch rule.** The dense implementation is a candidate for every key, and the tuner keeps the
fastest candidate that passes the correctness check, so on a tuned shape (the user cache, a shipped
table, or tuning on first use, the default on a GPU) the sparse op is never slower than the dense
layer beyond timing noise. It cannot hold where nothing was measured: with tuning off
(``SPARSE_TRITON_AUTOTUNE=0``, ``tuning.autotune(False)``) or during CUDA-graph capture, a shape
missing from the tables runs the heuristic default (our kernel; dense for exact fp32 past 8 rows),
which is not measured against dense. A nearest-bucket entry is measured for another token count.

Keys: ``dtype`` (``fp16``, ``bf16``, ``tf32`` = fp32 with TF32 matmuls allowed, ``fp32`` = exact),
``nm`` (pattern), exact ``N`` (output features) and ``K`` (input features), ``M`` (tokens, bucketed to
a power of two) and, for the forward, ``bias`` (0/1: the bias rides in the epilogue).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from ..formats.nm import NMTensor, indices_per_word
from ..kernels import nm_matmul as kernel
from ..kernels import nm_prune as prune_kernel
from ..kernels._launch import tf32_enabled
from ..reference import nm_matmul as reference
from ..reference import nm_prune as prune_reference
from ..tuning.tables import bucket
from ..tuning.tuner import Candidate, DeviceLimits, TunableOp, stored_config
from ._prepared import prepared

DTYPE_TAG = {torch.float16: "fp16", torch.bfloat16: "bf16"}
TAG_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "tf32": torch.float32, "fp32": torch.float32}
# Accepted max|out - ref| / max|ref| against the fp64 reference: an order of magnitude above the
# rounding of the output dtype, far below what a wrong tile or index gives (order 1).
TOLERANCE = {"fp16": 1e-2, "bf16": 3e-2, "tf32": 1e-2, "fp32": 1e-4}

DENSE = Candidate("dense", "dense")
CUSPARSELT = Candidate("cusparselt", "cusparselt")


def dtype_tag(dtype: torch.dtype) -> str:
    """The key's dtype field: fp16, bf16, or for fp32 ``tf32`` / ``fp32`` per PyTorch's TF32 setting."""
    tag = DTYPE_TAG.get(dtype)
    if tag is not None:
        return tag
    return "tf32" if tf32_enabled() else "fp32"


def _precision(tag: str) -> str:
    return "ieee" if tag == "fp32" else "tf32"


def cusparselt_available() -> bool:
    """Whether cuSPARSELt can run here at all: this torch build ships it (``torch._cslt_sparse_mm``) and a
    CUDA device exists. A CUDA build of torch reports cuSPARSELt available on a machine without a GPU,
    so the build alone does not decide."""
    cslt = getattr(torch.backends, "cusparselt", None)
    try:
        return bool(cslt is not None and cslt.is_available() and hasattr(torch, "_cslt_sparse_mm")
                    and torch.cuda.is_available())
    except (RuntimeError, AttributeError):  # a broken CUDA install: no cuSPARSELt
        return False


# cuSPARSELt's sparse tensor-core MMA exists from Ampere on.
CUSPARSELT_MIN_CAPABILITY = (8, 0)


def cusparselt_supported(tag: str, n: int, m: int, N: int, K: int, device: torch.device,
                         capability: tuple[int, int] | None = None) -> bool:
    """Whether cuSPARSELt can run this forward: 2:4, fp16/bf16, N and K multiples of 16, on a CUDA device
    (of compute ``capability`` >= 8.0 when given) with :func:`cusparselt_available`."""
    if device.type != "cuda" or (n, m) != (2, 4) or tag not in ("fp16", "bf16") or N % 16 or K % 16:
        return False
    if capability is not None and tuple(capability) < CUSPARSELT_MIN_CAPABILITY:
        return False
    return cusparselt_available()


# ------------------------------------------------------------------------------------------ implementations


def dense_weight(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, K: int) -> torch.Tensor:
    """The dense ``W[N, K]``, built by the decompress kernel (reference off the kernel path), cached."""
    def build() -> torch.Tensor:
        if values.is_cuda or (values.device.type == "cpu" and kernel.INTERPRET and values.dtype != torch.bfloat16):
            return kernel.nm_decompress(values, indices, n, m, K)
        return reference.nm_decompress(values, indices, n, m, K)
    return prepared(values, indices, "dense", build)


def _cusparselt_weight(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, K: int) -> torch.Tensor:
    return prepared(values, indices, "cusparselt",
                    lambda: torch._cslt_compress(kernel.nm_decompress(values, indices, n, m, K)))


def run_fwd(cand: Candidate, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
            bias: torch.Tensor | None, n: int, m: int, K: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y[M, N] = x @ W^T (+ bias)`` with implementation ``cand`` (values and indices contiguous)."""
    if cand.impl == "triton":
        return kernel.nm_matmul_fwd(x, values, indices, bias, n, m, K, config=cand.config, out=out)
    if cand.impl == "dense":
        w = dense_weight(values, indices, n, m, K)
        if out is None:
            return F.linear(x, w, bias)
        if bias is None:
            return torch.mm(x, w.t(), out=out)
        return torch.addmm(bias, x, w.t(), out=out)
    if cand.impl == "cusparselt":
        packed = _cusparselt_weight(values, indices, n, m, K)
        M = x.shape[0]
        pad = (-M) % 8  # cuSPARSELt wants the dense operand's columns (our rows) in multiples of 8
        xp = F.pad(x, (0, 0, 0, pad)) if pad else x.contiguous()
        # (W @ xp^T)^T = xp @ W^T, with the transpose fused into the epilogue
        y = torch._cslt_sparse_mm(packed, xp.t(), bias=bias, transpose_result=True)
        y = y[:M] if pad else y
        return y.contiguous() if out is None else out.copy_(y)
    raise ValueError(f"nm_linear_fwd: unknown implementation {cand.impl!r}")


def run_bwd_dx(cand: Candidate, dy: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
               n: int, m: int, K: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``dx[M, K] = dy @ W`` with implementation ``cand`` (values and indices contiguous)."""
    if cand.impl == "triton":
        return kernel.nm_matmul_bwd_dx(dy, values, indices, n, m, K, config=cand.config, out=out)
    if cand.impl == "dense":
        w = dense_weight(values, indices, n, m, K)
        return torch.mm(dy, w) if out is None else torch.mm(dy, w, out=out)
    raise ValueError(f"nm_linear_bwd_dx: unknown implementation {cand.impl!r}")


# --------------------------------------------------------------------------------------------- tunable ops


def _parse_nm(text: str) -> tuple[int, int]:
    n, m = text.split(":")
    return int(n), int(m)


def _triton(cfg: kernel.NMMatmulConfig) -> Candidate:
    return Candidate(kernel.config_name(cfg), "triton", cfg)


class _NMLinearTunable(TunableOp):
    dense_impl = "dense"
    for_dx = False

    def _dims(self, key: tuple) -> tuple[str, int, int, int, int, int]:
        """(tag, n, m, N, K, M)"""
        tag, nm, N, K, M = key[:5]
        n, m = _parse_nm(nm)
        return tag, n, m, N, K, M

    def candidates(self, key: tuple, limits: DeviceLimits, device: torch.device) -> list[Candidate]:
        tag, n, m, N, K, M = self._dims(key)
        dtype, precision = TAG_DTYPE[tag], _precision(tag)
        out_cols, red_len = (K, N) if self.for_dx else (N, K)
        S = NMTensor.slots_for(K, n, m)
        weight_bytes = N * S * dtype.itemsize + N * -(-S // indices_per_word(m)) * 4
        cands: list[Candidate] = []
        if device.type == "cpu":  # the interpreter: one large-tile config keeps it fast
            cands.append(_triton(kernel.INTERPRET_CONFIG))
        if precision == "ieee" and M > 8:
            cands.append(DENSE)  # no tensor cores for exact fp32: cuBLAS SGEMM on the dense weight
        cands.append(_triton(kernel.heuristic_for(M, out_cols, red_len, dtype, precision, limits.sms,
                                                  self.for_dx, weight_bytes)))
        cands += [_triton(c) for c in kernel.config_space(M, out_cols, red_len, dtype, precision, n, m, limits.sms,
                                                          limits.shared_memory, self.for_dx, weight_bytes)]
        cands.append(DENSE)
        if not self.for_dx and cusparselt_supported(tag, n, m, N, K, device, limits.capability):
            cands.append(CUSPARSELT)
        unique: dict[str, Candidate] = {}
        for c in cands:
            unique.setdefault(c.name, c)
        return list(unique.values())

    def from_entry(self, entry: Any, key: tuple, limits: DeviceLimits, device: torch.device) -> Candidate | None:
        if not isinstance(entry, dict):
            return None
        tag, n, m, N, K, M = self._dims(key)
        impl = entry.get("impl")
        if impl == "dense":
            return DENSE
        if impl == "cusparselt":
            supported = not self.for_dx and cusparselt_supported(tag, n, m, N, K, device, limits.capability)
            return CUSPARSELT if supported else None
        if impl == "triton" and stored_config(kernel.NMMatmulConfig, entry) is not None:
            cfg = kernel.config_from_dict(entry["config"], m, _precision(tag))
            if cfg is not None and kernel.shared_memory_estimate(
                    cfg, TAG_DTYPE[tag], self.for_dx, n / m) <= limits.shared_memory:
                return _triton(cfg)
        return None

    def make_inputs(self, key: tuple, device: torch.device, generator: torch.Generator) -> dict[str, Any]:
        from ..formats.nm import nm_compress

        tag, n, m, N, K, M = self._dims(key)
        dtype = TAG_DTYPE[tag]
        w = nm_compress(torch.randn(N, K, generator=generator, device=device).to(dtype), n, m)
        a = torch.randn(M, N if self.for_dx else K, generator=generator, device=device).to(dtype)
        inputs = {"a": a, "values": w.values, "indices": w.indices, "n": n, "m": m, "K": K, "bias": None}
        if not self.for_dx and key[5]:
            inputs["bias"] = torch.randn(N, generator=generator, device=device).to(dtype)
        inputs["out"] = torch.empty(M, K if self.for_dx else N, dtype=dtype, device=device)
        return inputs

    def reference(self, inputs: dict[str, Any]) -> torch.Tensor:
        w = reference.nm_decompress(inputs["values"].double(), inputs["indices"], inputs["n"], inputs["m"],
                                    inputs["K"])
        a = inputs["a"].double()
        if self.for_dx:
            return a @ w
        y = a @ w.t()
        return y if inputs["bias"] is None else y + inputs["bias"].double()

    def tolerance(self, key: tuple) -> float:
        return TOLERANCE[key[0]]


class NMLinearFwdTunable(_NMLinearTunable):
    name = "nm_linear_fwd"
    fields = ("dtype", "nm", "N", "K", "M", "bias")

    def run(self, candidate: Candidate, inputs: dict[str, Any]) -> torch.Tensor:
        return run_fwd(candidate, inputs["a"], inputs["values"], inputs["indices"], inputs["bias"],
                       inputs["n"], inputs["m"], inputs["K"], out=inputs["out"])


class NMLinearBwdDxTunable(_NMLinearTunable):
    name = "nm_linear_bwd_dx"
    fields = ("dtype", "nm", "N", "K", "M")
    for_dx = True

    def run(self, candidate: Candidate, inputs: dict[str, Any]) -> torch.Tensor:
        return run_bwd_dx(candidate, inputs["a"], inputs["values"], inputs["indices"],
                          inputs["n"], inputs["m"], inputs["K"], out=inputs["out"])


class _MemoryBoundTunable(TunableOp):
    """Bit-exact memory-bound kernels keyed by ``(dtype, pattern, R rows, K)``: every candidate must
    reproduce the reference exactly."""

    fields = ("dtype", "nm", "R", "K")
    bucket_field = "R"

    def _dims(self, key: tuple) -> tuple[torch.dtype, int, int, int, int]:
        tag, nm, R, K = key
        n, m = _parse_nm(nm)
        return TAG_DTYPE[tag], n, m, R, K

    def tolerance(self, key: tuple) -> float:
        return 0.0

    def error(self, out, ref) -> float:
        outs = out if isinstance(out, tuple) else (out,)
        refs = ref if isinstance(ref, tuple) else (ref,)
        same = all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(outs, refs))
        return 0.0 if same else float("inf")

    def _config(self, entry: Any, cls, valid) -> Candidate | None:
        if not isinstance(entry, dict) or entry.get("impl") != "triton":
            return None
        cfg = stored_config(cls, entry)
        if cfg is None:
            return None
        ints = [v for v in dataclasses.astuple(cfg) if not isinstance(v, bool)]
        if not all(isinstance(v, int) and 1 <= v <= 4096 and v & (v - 1) == 0 for v in ints) or not valid(cfg):
            return None
        return Candidate(_mem_name(cfg), "triton", cfg)


def _mem_name(cfg) -> str:
    return "".join(f"{k.lower()}{int(v)}" for k, v in dataclasses.asdict(cfg).items())


class NMPruneTunable(_MemoryBoundTunable):
    """``nm_prune_compress``: dense ``[R, K]`` -> (values, indices)."""

    name = "nm_prune_compress"

    def candidates(self, key: tuple, limits: DeviceLimits, device: torch.device) -> list[Candidate]:
        _, n, m, _, _ = self._dims(key)
        return [Candidate(_mem_name(c), "triton", c) for c in prune_kernel.prune_space(n, m)]

    def from_entry(self, entry, key, limits, device):
        _, n, m, _, _ = self._dims(key)
        groups = indices_per_word(m) % n == 0
        per_word = indices_per_word(m) // n if groups else 0

        def valid(c) -> bool:
            if c.GROUPS != groups:
                return False
            return c.BG % per_word == 0 if groups else c.BG == indices_per_word(m)
        return self._config(entry, prune_kernel.NMPruneConfig, valid)

    def make_inputs(self, key, device, generator):
        dtype, n, m, R, K = self._dims(key)
        S = NMTensor.slots_for(K, n, m)
        return {"w": torch.randn(R, K, generator=generator, device=device).to(dtype), "n": n, "m": m,
                "out": torch.empty(R, S, dtype=dtype, device=device),
                "idx": torch.empty(R, -(-S // indices_per_word(m)), dtype=torch.int32, device=device)}

    def reset(self, inputs):
        inputs["out"].fill_(float("nan"))
        inputs["idx"].fill_(-1)

    def run(self, candidate, inputs):
        return prune_kernel.nm_prune_compress(inputs["w"], inputs["n"], inputs["m"], config=candidate.config,
                                              out=(inputs["out"], inputs["idx"]))

    def reference(self, inputs):
        return prune_reference.nm_prune_compress(inputs["w"], inputs["n"], inputs["m"])


class NMGatherTunable(_MemoryBoundTunable):
    """``nm_gather``: a dense ``[R, K]`` gradient read at the kept positions (the values' gradient)."""

    name = "nm_gather"

    def candidates(self, key, limits, device):
        return [Candidate(_mem_name(c), "triton", c) for c in prune_kernel.GATHER_SPACE]

    def from_entry(self, entry, key, limits, device):
        return self._config(entry, prune_kernel.NMGatherConfig, lambda c: c.BR * c.BS <= 8192)

    def make_inputs(self, key, device, generator):
        from ..formats.nm import nm_compress

        dtype, n, m, R, K = self._dims(key)
        w = nm_compress(torch.randn(R, K, generator=generator, device=device).to(dtype), n, m)
        return {"dense": torch.randn(R, K, generator=generator, device=device).to(dtype), "idx": w.indices,
                "n": n, "m": m, "out": torch.empty_like(w.values)}

    def run(self, candidate, inputs):
        return prune_kernel.nm_gather(inputs["dense"], inputs["idx"], inputs["n"], inputs["m"], out=inputs["out"],
                                      config=candidate.config)

    def reference(self, inputs):
        return prune_reference.nm_gather(inputs["dense"], inputs["idx"], inputs["n"], inputs["m"])


FWD = NMLinearFwdTunable()
BWD_DX = NMLinearBwdDxTunable()
PRUNE = NMPruneTunable()
GATHER = NMGatherTunable()
TUNABLE = {op.name: op for op in (FWD, BWD_DX, PRUNE, GATHER)}


def fwd_key(x: torch.Tensor, N: int, K: int, n: int, m: int, has_bias: bool) -> tuple:
    return (dtype_tag(x.dtype), f"{n}:{m}", N, K, bucket(x.shape[0]), int(has_bias))


def bwd_dx_key(dy: torch.Tensor, N: int, K: int, n: int, m: int) -> tuple:
    return (dtype_tag(dy.dtype), f"{n}:{m}", N, K, bucket(dy.shape[0]))


MEM_TAG = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def mem_key(t: torch.Tensor, n: int, m: int) -> tuple:
    """Key of the prune and gather kernels for a dense ``[R, K]`` operand."""
    return (MEM_TAG[t.dtype], f"{n}:{m}", t.shape[0], t.shape[1])
