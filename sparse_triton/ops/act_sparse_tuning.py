"""The activation-sparse ops' implementations and what the tuner chooses among for them.

* ``triton``: our kernels (``kernels.act_sparse``), one candidate per launch config;
* ``dense``: the masked input (one elementwise op) times the dense weight on cuBLAS.

**The crossover.** With ``B`` rows sharing a weight read, a weight row is read when its channel is
active in any row, so the bytes saved shrink as the batch grows (``1 - (1 - d)^B`` of the rows are read
at per-row density ``d`` and independent rows). Dense is a candidate for every key and the tuner keeps
the fastest, so past the crossover the op runs dense. Candidates are timed on inputs at 50 % per-row
sparsity with independent rows (``SPARSITY``): the crossover found there holds for sparser inputs too
(they only make the kernel faster). Past 64 rows (``MAX_ROWS``) the op is dense without asking.

Keys: ``dtype`` (``fp16``, ``bf16``, ``tf32``/``fp32`` as for the N:M ops), exact ``N`` and ``K``,
``M`` (rows, bucketed to a power of two), ``thr`` (``scalar`` | ``channel``), and per op ``bias``,
``nm`` (pattern) or ``act`` (the gated activation).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..formats.nm import NMTensor
from ..kernels import act_sparse as kernel
from ..kernels import nm_matmul as nm_kernel
from ..reference import act_sparse as reference
from ..reference import nm_matmul as nm_reference
from ..reference._masked import masked_matmul
from ..tuning.tables import bucket
from ..tuning.tuner import Candidate, DeviceLimits, TunableOp, stored_config
from ._prepared import prepared
from .nm_tuning import TAG_DTYPE, TOLERANCE, dtype_tag

MAX_ROWS = 64
SPARSITY = 0.5
DENSE = Candidate("dense", "dense")
# |x| quantile of a standard normal at SPARSITY: the tuner's threshold for its random inputs.
_T50 = 0.6744897501960817


def _triton(cfg: kernel.ActSparseConfig) -> Candidate:
    return Candidate(kernel.config_name(cfg), "triton", cfg)


def thr_kind(threshold: torch.Tensor) -> str:
    return "channel" if threshold.dim() == 1 else "scalar"


def masked_input(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``x * (|x| > t)`` in x's dtype (the dense implementations' one extra elementwise op)."""
    return reference.masked(x, threshold.to(torch.float32))


def dense_weight_t(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, N: int) -> torch.Tensor:
    """The dense input-major ``Wt[K, N]`` of an N:M ``W^T``, built once per weight and kept."""
    def build() -> torch.Tensor:
        if values.is_cuda or (values.device.type == "cpu" and nm_kernel.INTERPRET and values.dtype != torch.bfloat16):
            return nm_kernel.nm_decompress(values, indices, n, m, N)
        return nm_reference.nm_decompress(values, indices, n, m, N)
    return prepared(values, indices, "dense", build)


# ------------------------------------------------------------------------------------------ implementations


def _dense_exact(x, weight_t, threshold, bias, out):
    """The dense product where a weight may hold inf/NaN: an inactive input adds nothing (``0 * inf`` is
    not NaN here), with no host sync; a few extra products, for the rare non-finite weight."""
    y = masked_matmul(x, weight_t, reference.active(x, threshold.to(torch.float32)))
    y = y if bias is None else y + bias
    return y if out is None else out.copy_(y)


def run_mm(cand: Candidate, x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor,
           bias: torch.Tensor | None, out: torch.Tensor | None = None, finite: bool = False) -> torch.Tensor:
    """``(x * (|x| > t)) @ weight_t (+ bias)`` with implementation ``cand``; weight_t ``[K, N]``.

    Every implementation follows one rule for non-finite weights: an inactive input contributes nothing.
    ``finite``: the caller knows the weight holds only finite values (``_prepared.known_finite`` of the
    weight it was given, once per version), where the plain products are exact under that rule; else the
    kernels run their fix-up and the dense product its exact form."""
    if cand.impl == "triton":
        return kernel.act_sparse_mm(x, weight_t, threshold, bias, config=cand.config, out=out, exact=not finite)
    if cand.impl == "dense":
        if not finite:
            return _dense_exact(x, weight_t, threshold, bias, out)
        xm = masked_input(x, threshold)
        if bias is None:
            return torch.mm(xm, weight_t) if out is None else torch.mm(xm, weight_t, out=out)
        return torch.addmm(bias, xm, weight_t) if out is None else torch.addmm(bias, xm, weight_t, out=out)
    raise ValueError(f"act_sparse_linear_fwd: unknown implementation {cand.impl!r}")


def run_nm_mm(cand: Candidate, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int, m: int,
              N: int, threshold: torch.Tensor, bias: torch.Tensor | None,
              out: torch.Tensor | None = None, finite: bool = False) -> torch.Tensor:
    """As :func:`run_mm` with the input-major weight N:M compressed along N."""
    if cand.impl == "triton":
        return kernel.act_sparse_nm_mm(x, values, indices, n, m, N, threshold, bias, config=cand.config, out=out,
                                       exact=not finite)
    if cand.impl == "dense":
        return run_mm(DENSE, x, dense_weight_t(values, indices, n, m, N), threshold, bias, out=out, finite=finite)
    raise ValueError(f"act_sparse_nm_linear_fwd: unknown implementation {cand.impl!r}")


def run_gate_up(cand: Candidate, x: torch.Tensor, wg_t: torch.Tensor, wu_t: torch.Tensor,
                threshold: torch.Tensor, activation: str, out: torch.Tensor | None = None,
                finite: bool = False) -> torch.Tensor:
    """``act(xs @ wg_t) * (xs @ wu_t)`` with implementation ``cand`` (non-finite weights and ``finite`` as
    in :func:`run_mm`)."""
    if cand.impl == "triton":
        return kernel.act_sparse_gate_up(x, wg_t, wu_t, threshold, activation, config=cand.config, out=out,
                                         exact=not finite)
    if cand.impl == "dense":
        if not finite:
            h = reference.activate(_dense_exact(x, wg_t, threshold, None, None), activation) * \
                _dense_exact(x, wu_t, threshold, None, None)
            return h if out is None else out.copy_(h)
        xm = masked_input(x, threshold)
        h = reference.activate(xm @ wg_t, activation) * (xm @ wu_t)
        return h if out is None else out.copy_(h)
    raise ValueError(f"act_sparse_mlp_fwd: unknown implementation {cand.impl!r}")


# --------------------------------------------------------------------------------------------- tunable ops


class _ActSparseTunable(TunableOp):
    dense_impl = "dense"

    def nkm(self, key: tuple) -> tuple[str, int, int, int]:
        """(dtype tag, N, K, M) of a key."""
        raise NotImplementedError

    def candidates(self, key: tuple, limits: DeviceLimits, device: torch.device) -> list[Candidate]:
        tag, N, K, M = self.nkm(key)
        dtype = TAG_DTYPE[tag]
        cands: list[Candidate] = []
        if device.type == "cpu":  # the interpreter: one large-tile config keeps it fast
            cands.append(_triton(kernel.INTERPRET_CONFIG))
        cands.append(_triton(kernel.heuristic(M, N, K, dtype, limits.sms)))
        cands += [_triton(c) for c in kernel.config_space(M, N, K, dtype, limits.sms) if self.fits(c, key)]
        cands.append(DENSE)
        unique: dict[str, Candidate] = {}
        for c in cands:
            unique.setdefault(c.name, c)
        return list(unique.values())

    def fits(self, cfg: kernel.ActSparseConfig, key: tuple) -> bool:
        return True

    def from_entry(self, entry: Any, key: tuple, limits: DeviceLimits, device: torch.device) -> Candidate | None:
        if not isinstance(entry, dict):
            return None
        if entry.get("impl") == "dense":
            return DENSE
        if entry.get("impl") == "triton" and stored_config(kernel.ActSparseConfig, entry) is not None:
            cfg = kernel.config_from_dict(entry["config"])
            if cfg is not None and not (cfg.USE_DOT and key[0] in ("tf32", "fp32")) and self.fits(cfg, key):
                return _triton(cfg)
        return None

    def tolerance(self, key: tuple) -> float:
        return TOLERANCE[key[0]]

    def _x(self, key: tuple, M: int, K: int, device, generator) -> dict[str, Any]:
        dtype = TAG_DTYPE[key[0]]
        x = torch.randn(M, K, generator=generator, device=device).to(dtype)
        if key[-1] == "channel":
            t = torch.full((K,), _T50, dtype=torch.float32, device=device)
        else:
            t = torch.tensor(_T50, dtype=torch.float32, device=device)
        return {"x": x, "t": t}


class ActSparseLinearTunable(_ActSparseTunable):
    name = "act_sparse_linear_fwd"
    fields = ("dtype", "N", "K", "M", "bias", "thr")

    def nkm(self, key):
        return key[0], key[1], key[2], key[3]

    def make_inputs(self, key, device, generator):
        tag, N, K, M = self.nkm(key)
        dtype = TAG_DTYPE[tag]
        inputs = self._x(key, M, K, device, generator)
        inputs["w_t"] = torch.randn(K, N, generator=generator, device=device).to(dtype)
        inputs["bias"] = torch.randn(N, generator=generator, device=device).to(dtype) if key[4] else None
        inputs["out"] = torch.empty(M, N, dtype=dtype, device=device)
        return inputs

    def run(self, candidate, inputs):
        # random, finite weights: timed on the path a (known) finite weight takes
        return run_mm(candidate, inputs["x"], inputs["w_t"], inputs["t"], inputs["bias"], out=inputs["out"],
                      finite=True)

    def reference(self, inputs):
        b = inputs["bias"]
        return reference.act_sparse_matmul(inputs["x"].double(), inputs["w_t"].double().t(), inputs["t"],
                                           None if b is None else b.double())


class ActSparseNMLinearTunable(_ActSparseTunable):
    name = "act_sparse_nm_linear_fwd"
    fields = ("dtype", "nm", "N", "K", "M", "bias", "thr")

    def nkm(self, key):
        return key[0], key[2], key[3], key[4]

    def fits(self, cfg, key):
        m = int(key[1].split(":")[1])
        return cfg.BN % m == 0

    def make_inputs(self, key, device, generator):
        from ..formats.nm import nm_compress

        tag, N, K, M = self.nkm(key)
        n, m = (int(v) for v in key[1].split(":"))
        dtype = TAG_DTYPE[tag]
        inputs = self._x(key, M, K, device, generator)
        w = nm_compress(torch.randn(K, N, generator=generator, device=device).to(dtype), n, m)
        inputs.update(values=w.values, indices=w.indices, n=n, m=m, N=N)
        inputs["bias"] = torch.randn(N, generator=generator, device=device).to(dtype) if key[5] else None
        inputs["out"] = torch.empty(M, N, dtype=dtype, device=device)
        return inputs

    def run(self, candidate, inputs):
        return run_nm_mm(candidate, inputs["x"], inputs["values"], inputs["indices"], inputs["n"], inputs["m"],
                         inputs["N"], inputs["t"], inputs["bias"], out=inputs["out"], finite=True)

    def reference(self, inputs):
        w_t = NMTensor(inputs["values"].double(), inputs["indices"], (inputs["x"].shape[1], inputs["N"]),
                       inputs["n"], inputs["m"])
        b = inputs["bias"]
        return reference.act_sparse_nm_matmul(inputs["x"].double(), w_t, inputs["t"],
                                              None if b is None else b.double())


class ActSparseGateUpTunable(_ActSparseTunable):
    name = "act_sparse_gate_up"
    fields = ("dtype", "N", "K", "M", "act", "thr")

    def nkm(self, key):
        return key[0], key[1], key[2], key[3]

    def make_inputs(self, key, device, generator):
        tag, N, K, M = self.nkm(key)
        dtype = TAG_DTYPE[tag]
        inputs = self._x(key, M, K, device, generator)
        scale = 1 / math.sqrt(K)  # keeps the gate in silu's curved range
        inputs["wg_t"] = (torch.randn(K, N, generator=generator, device=device) * scale).to(dtype)
        inputs["wu_t"] = (torch.randn(K, N, generator=generator, device=device) * scale).to(dtype)
        inputs["act"] = key[4]
        inputs["out"] = torch.empty(M, N, dtype=dtype, device=device)
        return inputs

    def run(self, candidate, inputs):
        return run_gate_up(candidate, inputs["x"], inputs["wg_t"], inputs["wu_t"], inputs["t"], inputs["act"],
                           out=inputs["out"], finite=True)

    def reference(self, inputs):
        xm = reference.masked(inputs["x"].double(), inputs["t"])
        return reference.activate(xm @ inputs["wg_t"].double(), inputs["act"]) * (xm @ inputs["wu_t"].double())


FWD = ActSparseLinearTunable()
NM_FWD = ActSparseNMLinearTunable()
GATE_UP = ActSparseGateUpTunable()
TUNABLE = {op.name: op for op in (FWD, NM_FWD, GATE_UP)}


def fwd_key(x: torch.Tensor, N: int, K: int, has_bias: bool, threshold: torch.Tensor) -> tuple:
    return (dtype_tag(x.dtype), N, K, bucket(x.shape[0]), int(has_bias), thr_kind(threshold))


def nm_fwd_key(x: torch.Tensor, n: int, m: int, N: int, K: int, has_bias: bool, threshold: torch.Tensor) -> tuple:
    return (dtype_tag(x.dtype), f"{n}:{m}", N, K, bucket(x.shape[0]), int(has_bias), thr_kind(threshold))


def gate_up_key(x: torch.Tensor, N: int, K: int, activation: str, threshold: torch.Tensor) -> tuple:
    return (dtype_tag(x.dtype), N, K, bucket(x.shape[0]), activation, thr_kind(threshold))

