"""Activation-sparse ops (``sparse_triton.ops.act_sparse``) against dense cuBLAS: GEMV, fused FFN, N:M, decode.

Run from the repository root on a GPU machine::

    PYTHONPATH=. python -m perf.suites.act_sparse --quick            # Llama-3-8B shapes, fp16: a few minutes
    PYTHONPATH=. python -m perf.suites.act_sparse                    # + Llama-3-70B, full batch sweeps, 32 layers
    PYTHONPATH=. python -m perf.suites.act_sparse --parts linear --shapes llama3-8b.down --sparsity 50 90 --batches 1
    PYTHONPATH=. python -m perf.suites.act_sparse --quick --dry-run  # list the cases (no GPU needed)

Four kinds of case (fp16 unless ``--dtype bf16``; weights ``randn * K^-0.5``, inputs ``randn``):

* ``linear``: one GEMV-like linear ``y = (x * (|x| > t)) @ W^T`` on the Llama-3-8B / 70B shapes (q/o, k/v,
  gate/up, down), batch (rows of x) 1..64, per-row input sparsity 0/40/50/70/90 %.
* ``ffn``: the fused SwiGLU MLP ``act_sparse_mlp`` (2 launches) on the 8B / 70B MLP shapes, both inputs at the
  same sparsity: the input threshold from |x|, the intermediate threshold from the actual |h| (h computed by
  the fp32 reference from the thresholded x, rounded to the dtype).
* ``nm``: a weight pruned n:m along its output features and stored input-major (``nm_input_major``), with
  sparse activations in the same kernel: 2:4 at 0/50/70 %.
* ``decode``: the linear-layer part of decoding (NOT a full model: no attention, norms or residuals) -- a stack
  of L Llama-3-8B layers, each q, k, v, o (``act_sparse_linear``) and the MLP (``act_sparse_mlp``), batch 1,
  one CUDA graph per token; ``tokens_per_s`` = 1000 / ms.

The threshold of each input is the |x| quantile that leaves the target fraction of its entries inactive (one
scalar threshold for all rows; rows independent, so at batch b the union of active channels -- what a batched
call must read -- has density about 1 - (1 - d)^b). Every row carries the MEASURED activity: ``row_sparsity``
(mean per-row %), ``union_count`` / ``union_density`` / ``sparsity_union`` (channels active in any row).

Implementations, each checked against an fp32 reference (TF32 off) of the function it computes before it is
timed (relative error above 1e-2 = ``wrong``, not timed; for ours a suite failure):

* ``dense``: what a user would otherwise run on the same (for N:M: the same pruned) weight, row-major:
  ``F.linear`` (cuBLAS); the FFN as 3 ``F.linear`` + ``silu`` * mul. Reference: the dense function.
* ``op``: the public op on the input-major weight, choosing its implementation as in real use (the runtime
  tuner: our kernel with a tuned config, or the masked dense product; from the user cache, the shipped table,
  or tuned on the first call, which happens before timing; ``backend``, ``config``, ``choice_source``).
* ``kernel``: the kernel launcher called directly with the op's heuristic default config (``config=``): what
  runs where nothing was tuned.

Conventions. ``bytes``: what the implementation must move -- the input-major weight rows of the union of active
channels (for N:M the stored values and index words of those rows; dense, or an op that chose dense: the whole
weight), plus x and y (FFN: plus the intermediate h written and read once); split-K workspaces are not counted.
``gbps`` = bytes / median time, ``pct_hbm`` = gbps against the GPU's HBM peak (H100 SXM 3350 GB/s, H200 4800,
by name, or ``--hbm-gbps``; omitted when unknown). ``speedup`` = dense ms / ms of the same case. ``ideal`` =
dense weight elements / weight elements read: 1 / union_density for a linear, m / (n * union_density) with N:M,
3 / (2 d_in + d_mid) for the FFN (d = union densities), the weighted sum for the decode stack; ``pct_ideal`` =
100 * speedup / ideal. All timings are CUDA graphs of many unrolled calls (everything here is microseconds)
over rotated weight copies, so that one cycle reads at least 3x the L2 size (``rotation``; capped by
``--rotate-gb``, said in ``timing_note``); medians of 10 replays. Results: ``<out>/<gpu-slug>/act_sparse.json``;
``python perf/plot.py`` draws ``act_sparse.png`` (batch 1, speedup against union sparsity with the ideal
1/(1-s)), ``-batch`` (speedup against batch), ``-ffn``, ``-nm`` and ``-decode``.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from perf.harness import Budget, ResultWriter, Timing, bench, gbps, relative_error, require_gpu, rotation_count
from perf.suites._act_sparse_cases import (
    DTYPES,
    FFN,
    IMPL_DENSE,
    IMPL_KERNEL,
    IMPL_OP,
    NM,
    REL_TOL,
    SUITE,
    Case,
    Decode,
    Linear,
    Settings,
    activity,
    build_parser,
    case_seed,
    estimate_gb,
    ffn_bytes,
    ideal_speedup,
    linear_bytes,
    pct_of_ideal,
    plot_spec,
    progress_line,
    quantile_threshold,
    settings_from_args,
    summary,
)
from perf.suites._attention_cases import hbm_peak_gbps

MAX_ROTATION = 256

# --------------------------------------------------------------------------------------------------
# The API under test
# --------------------------------------------------------------------------------------------------


@dataclass
class Api:
    """The code under test: the op module (``act_sparse_linear``, ``act_sparse_mlp``, ``input_major``,
    ``nm_input_major``), the kernel launchers, the tuning module (keys, tunable ops), the reference, the tuner."""

    mod: Any
    kernel: Any
    tuning: Any
    reference: Any
    tuner: Callable[[], Any]


def load_api() -> Api:
    try:
        import sparse_triton.kernels.act_sparse as kernel
        import sparse_triton.ops.act_sparse as mod
        import sparse_triton.ops.act_sparse_tuning as tuning
        import sparse_triton.reference.act_sparse as reference
        from sparse_triton.tuning import default_tuner
    except ImportError as exc:
        raise SystemExit(f"perf: cannot import sparse_triton ({exc}); run from the repo root with "
                         "PYTHONPATH=.") from exc
    return Api(mod, kernel, tuning, reference, default_tuner)


def _first_line(exc: BaseException, limit: int = 240) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: " + (text.splitlines()[0] if text else "")[:limit]


def dense_ffn(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
    """The dense SwiGLU MLP a user runs: 3 cuBLAS calls, silu and a multiply."""
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def _error(out: Any, ref: Any) -> float:
    if isinstance(ref, (list, tuple)):
        if not isinstance(out, (list, tuple)) or len(out) != len(ref):
            return math.inf
        return max((relative_error(o, r) for o, r in zip(out, ref)), default=0.0)
    return relative_error(out, ref)


@dataclass
class Impl:
    """One implementation of a case: callables over rotated inputs (all computing the same thing), which
    reference it must match (``"dense"`` or ``"sparse"``), the bytes it must move, and for the op a ``choice``
    callable giving the tuner's choice (resolved after the first call) and ``bytes_for`` (bytes given it)."""

    name: str
    fns: list[Callable[[], Any]]
    ref: str
    nbytes: int
    backend: str | None = None
    config: str | None = None
    note: str | None = None
    choice: Callable[[], dict[str, Any]] | None = None
    bytes_for: Callable[[dict[str, Any]], int] | None = None


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    api: Api
    s: Settings
    hbm_peak: float | None
    device: torch.device = field(default_factory=lambda: torch.device("cuda"))
    failures: list[str] = field(default_factory=list)
    overhead_s: float = 0.0  # first calls (compile, tuning) and checks of the current case: not timing
    _wkey: tuple[Any, ...] | None = None
    _w: dict[str, list[Any]] = field(default_factory=dict)
    _clone: dict[str, Callable[[Any], Any]] = field(default_factory=dict)

    def fail(self, text: str) -> None:
        self.failures.append(text)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _time(self, fns: Sequence[Callable[[], Any]], cuda_graph: bool = True) -> Timing:
        return bench(list(fns), warmup_ms=self.s.warmup_ms, rep_ms=self.s.rep_ms, cuda_graph=cuda_graph)

    # ---------------------------------------------------------------- inputs
    def _gen(self, text: str) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(case_seed(self.s.seed, text))

    def _randn(self, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0):
        return (torch.randn(*shape, device=self.device, generator=gen) * scale).to(dtype)  # random, never zeros

    def _thr(self, t: float) -> torch.Tensor:
        return torch.tensor(t, dtype=torch.float32, device=self.device)

    def _weights(self, key: tuple[Any, ...], make: Callable[[torch.Generator], dict[str, tuple[Any, Callable]]]):
        """The weights of ``key`` (made once, kept while consecutive cases share them): name -> copies."""
        if key != self._wkey:
            self._w.clear()
            self._clone.clear()
            self._wkey = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            for name, (obj, clone) in make(self._gen(repr(key))).items():
                self._w[name], self._clone[name] = [obj], clone
            self._wkey = key
        return self._w

    def _copies(self, name: str, n: int) -> list[Any]:
        have = self._w[name]
        while len(have) < n:
            have.append(self._clone[name](have[0]))
        return have[:n]

    def _rotation(self, per_call_bytes: int, copy_bytes: int) -> tuple[int, str | None]:
        """Copies for a CUDA-graph timing: one cycle moves >= 3x L2 (``rotation_count``), capped by MAX_ROTATION
        and by ``--rotate-gb`` (half of it per weight layout). On CPU (tests) one."""
        if self.device.type != "cuda":
            return 1, None
        want = rotation_count(per_call_bytes, cap=MAX_ROTATION)
        room = max(1, int(self.s.rotate_gb * 1e9 / 2 // max(1, copy_bytes)))
        if want <= room:
            return want, None
        return room, (f"rotation capped at {room} copies by --rotate-gb {self.s.rotate_gb:g}: one cycle reads "
                      f"{room * per_call_bytes / 1e6:.0f} MB (wanted {want} copies)")

    @staticmethod
    def _xs(x: torch.Tensor, n: int) -> list[torch.Tensor]:
        return [x] + [x.clone() for _ in range(n - 1)]

    # ---------------------------------------------------------------- the tuner
    def _heuristic(self, op: Any, key: tuple) -> Any:
        """The op's heuristic default for ``key`` (its first candidate): what the kernel rows run."""
        tuner = self.api.tuner()
        return op.candidates(key, tuner.limits(self.device), self.device)[0]

    def _choice(self, parts: Sequence[tuple[str, Any, tuple]]) -> dict[str, Any]:
        """What the op runs for each (label, tunable op, key), as row fields. The op's first call resolved these
        (tuning then if needed), so this is a memory hit."""
        tuner = self.api.tuner()
        got = [(label, tuner.resolve(op, key, self.device)) for label, op, key in parts]
        if len(got) == 1:
            ch = got[0][1]
            entry = ch.entry or {}
            return {"backend": ch.candidate.impl, "config": ch.candidate.name, "choice_source": ch.source,
                    "choice_key": ch.key, "tuned_ms": entry.get("ms"), "tuned_dense_ms": entry.get("dense_ms")}
        return {"backend": "+".join(ch.candidate.impl for _, ch in got),
                "config": "; ".join(f"{label}={ch.candidate.name}" for label, ch in got),
                "choice_source": "/".join(dict.fromkeys(ch.source for _, ch in got)),
                "choice_key": "; ".join(f"{label}: {ch.key}" for label, ch in got),
                **{f"{label}_backend": ch.candidate.impl for label, ch in got}}

    # ---------------------------------------------------------------- measuring
    def _measure(self, base: dict[str, Any], impls: Sequence[Impl], refs: dict[str, Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        dense_ms = None
        for imp in impls:
            ours = imp.name != IMPL_DENSE
            r = {**base, "batch_label": f"batch {base['batch']}", "impl": imp.name, "status": "ok",
                 "backend": imp.backend, "config": imp.config, "ms": None, "bytes": None, "gbps": None,
                 "pct_hbm": None, "hbm_peak_gbps": self.hbm_peak, "dense_ms": None, "speedup": None,
                 "pct_ideal": None, "rel_err": None, "first_call_s": None, "note": imp.note}
            rows.append(r)
            t0 = time.perf_counter()
            try:
                with torch.no_grad():  # the first call compiles, and for the op tunes on a miss: not timed
                    out = imp.fns[0]()
                self._sync()
                r["first_call_s"] = round(time.perf_counter() - t0, 3)
                if imp.choice is not None:
                    r.update(imp.choice())
                err = _error(out, refs[imp.ref])
            except Exception as exc:  # a row, never a crash
                r.update(status="error", note=_first_line(exc))
                if ours:
                    self.fail(f"{base['case']}: {imp.name} raised {_first_line(exc)}")
                continue
            finally:
                self.overhead_s += time.perf_counter() - t0
            del out
            r["rel_err"] = err
            if not err <= REL_TOL:
                r.update(status="wrong", note=f"relative error {err:.3g} > {REL_TOL:g} against the fp32 reference; "
                                              "not timed")
                if ours:
                    self.fail(f"{base['case']}: {imp.name}: relative error {err:.3g} > {REL_TOL:g}")
                continue
            try:
                with torch.no_grad():
                    t = self._time(imp.fns)
            except Exception as exc:
                r.update(status="error", note=f"timing raised {_first_line(exc)}")
                if ours:
                    self.fail(f"{base['case']}: timing {imp.name} raised {_first_line(exc)}")
                continue
            nbytes = imp.bytes_for(r) if imp.bytes_for is not None else imp.nbytes
            bw = gbps(nbytes, t.median_ms)
            r.update(t.as_row(), bytes=nbytes, gbps=bw, pct_hbm=100.0 * bw / self.hbm_peak if bw and self.hbm_peak
                     else None)
            if imp.note:
                r["timing_note"] = "; ".join(v for v in (r.get("timing_note"), imp.note) if v)
            if imp.name == IMPL_DENSE:
                dense_ms = t.median_ms
            speedup = dense_ms / t.median_ms if dense_ms else None
            r.update(dense_ms=dense_ms, speedup=speedup, pct_ideal=pct_of_ideal(speedup, base.get("ideal")))
            if base["kind"] == "decode":
                r["tokens_per_s"] = 1e3 * base["batch"] / t.median_ms
        return rows

    def run(self, c: Case) -> list[dict[str, Any]]:
        return {"linear": self.run_linear, "nm": self.run_nm, "ffn": self.run_ffn, "decode": self.run_decode}[c.kind](c)

    # ---------------------------------------------------------------- linear
    def run_linear(self, c: Linear) -> list[dict[str, Any]]:
        api, T = self.api, self.api.tuning
        N, K, M, dt = c.shape.N, c.shape.K, c.batch, DTYPES[c.dtype]
        e = dt.itemsize

        def make(gen: torch.Generator) -> dict[str, tuple[Any, Callable]]:
            w = self._randn((N, K), dt, gen, K ** -0.5)
            return {"w": (w, torch.clone), "w_im": (api.mod.input_major(w), lambda t: api.mod.input_major(t.clone()))}

        W = self._weights(("linear", N, K, c.dtype), make)
        x = self._randn((M, K), dt, self._gen(c.label))
        t = quantile_threshold(x, c.sparsity / 100.0)
        act, tt = activity(x, t), self._thr(t)
        w32 = W["w"][0].float()
        refs = {"dense": F.linear(x.float(), w32), "sparse": F.linear(api.reference.masked(x, tt).float(), w32)}
        del w32
        dense_b = linear_bytes(M, N, K, e, K)
        sparse_b = linear_bytes(M, N, K, e, act["union_count"])
        base = {"kind": c.kind, "case": c.label, "shape": c.shape.name, "dims": c.shape.dims, "N": N, "K": K,
                "batch": M, "dtype": c.dtype, "sparsity": c.sparsity, "pattern": None, **act,
                "ideal": ideal_speedup(K * N, act["union_count"] * N)}
        key = T.fwd_key(x, N, K, False, tt)
        heur = self._heuristic(T.FWD, key)
        nd, nd_note = self._rotation(dense_b, N * K * e)
        ns, ns_note = self._rotation(sparse_b, N * K * e)
        ws, wims, xs = self._copies("w", nd), self._copies("w_im", ns), self._xs(x, max(nd, ns))
        impls = [
            Impl(IMPL_DENSE, [functools.partial(F.linear, xs[i], ws[i]) for i in range(nd)], "dense", dense_b,
                 "cublas", note=nd_note),
            Impl(IMPL_OP, [functools.partial(api.mod.act_sparse_linear, xs[i], wims[i], tt) for i in range(ns)],
                 "sparse", sparse_b, note=ns_note, choice=lambda: self._choice([("linear", T.FWD, key)]),
                 bytes_for=lambda r: dense_b if r.get("backend") == "dense" else sparse_b),
            Impl(IMPL_KERNEL, [functools.partial(api.kernel.act_sparse_mm, xs[i], wims[i].t(), tt, None,
                                                 config=heur.config) for i in range(ns)],
                 "sparse", sparse_b, heur.impl, heur.name, note=ns_note),
        ]
        return self._measure(base, impls, refs)

    # ---------------------------------------------------------------- N:M weights + sparse activations
    def run_nm(self, c: NM) -> list[dict[str, Any]]:
        api, T = self.api, self.api.tuning
        N, K, M, dt, n, m = c.shape.N, c.shape.K, c.batch, DTYPES[c.dtype], c.n, c.m
        e = dt.itemsize

        def clone_nm(w: Any) -> Any:
            return type(w)(w.values.clone(), w.indices.clone(), w.shape, w.n, w.m, w.dim)

        def make(gen: torch.Generator) -> dict[str, tuple[Any, Callable]]:
            w_t = api.mod.nm_input_major(self._randn((N, K), dt, gen, K ** -0.5), n, m)  # NMTensor of W^T [K, N]
            pruned = w_t.to_dense().t().contiguous()  # the same pruned weight, row-major [N, K], for cuBLAS
            return {"w": (pruned, torch.clone), "w_nm": (w_t, clone_nm)}

        W = self._weights(("nm", N, K, n, m, c.dtype), make)
        w_nm = W["w_nm"][0]
        x = self._randn((M, K), dt, self._gen(c.label))
        t = quantile_threshold(x, c.sparsity / 100.0)
        act, tt = activity(x, t), self._thr(t)
        w32 = W["w"][0].float()
        refs = {"dense": F.linear(x.float(), w32), "sparse": F.linear(api.reference.masked(x, tt).float(), w32)}
        del w32
        row_b = w_nm.values.shape[1] * e + w_nm.indices.shape[1] * w_nm.indices.element_size()
        dense_b = linear_bytes(M, N, K, e, K)
        sparse_b = linear_bytes(M, N, K, e, act["union_count"], row_b)
        base = {"kind": c.kind, "case": c.label, "shape": c.shape.name, "dims": c.shape.dims, "N": N, "K": K,
                "batch": M, "dtype": c.dtype, "sparsity": c.sparsity, "pattern": c.pattern, "n": n, "m": m, **act,
                "ideal": ideal_speedup(K * N, act["union_count"] * N * n / m)}
        key = T.nm_fwd_key(x, n, m, N, K, False, tt)
        heur = self._heuristic(T.NM_FWD, key)
        nd, nd_note = self._rotation(dense_b, N * K * e)
        ns, ns_note = self._rotation(sparse_b, K * row_b)
        ws, wnms, xs = self._copies("w", nd), self._copies("w_nm", ns), self._xs(x, max(nd, ns))
        impls = [
            Impl(IMPL_DENSE, [functools.partial(F.linear, xs[i], ws[i]) for i in range(nd)], "dense", dense_b,
                 "cublas", note=nd_note),
            Impl(IMPL_OP, [functools.partial(api.mod.act_sparse_linear, xs[i], wnms[i], tt) for i in range(ns)],
                 "sparse", sparse_b, note=ns_note, choice=lambda: self._choice([("nm", T.NM_FWD, key)]),
                 bytes_for=lambda r: dense_b if r.get("backend") == "dense" else sparse_b),
            Impl(IMPL_KERNEL, [functools.partial(api.kernel.act_sparse_nm_mm, xs[i], wnms[i].values, wnms[i].indices,
                                                 n, m, N, tt, None, config=heur.config) for i in range(ns)],
                 "sparse", sparse_b, heur.impl, heur.name, note=ns_note),
        ]
        return self._measure(base, impls, refs)

    # ---------------------------------------------------------------- fused FFN
    def _mlp_weights(self, gen: torch.Generator, H: int, I: int, dt: torch.dtype) -> tuple[torch.Tensor, ...]:  # noqa: E741
        return (self._randn((I, H), dt, gen, H ** -0.5), self._randn((I, H), dt, gen, H ** -0.5),
                self._randn((H, I), dt, gen, I ** -0.5))

    def _input_major(self, ws: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(self.api.mod.input_major(w) for w in ws)

    def _ffn_inputs(self, x: torch.Tensor, ws: Sequence[torch.Tensor], sparsity: float) -> dict[str, Any]:
        """Thresholds, activity and fp32 references of the MLP on ``x``: t_in from |x|; h from the reference
        (fp32 from the thresholded x, rounded to x's dtype, as the fused kernel stores it); t_mid from |h|."""
        ref = self.api.reference
        wg, wu, wd = ws
        t_in = quantile_threshold(x, sparsity)
        tin = self._thr(t_in)
        h = ref.act_sparse_gate_up(x, wg, wu, tin, "silu")
        t_mid = quantile_threshold(h, sparsity)
        tmid = self._thr(t_mid)
        x32 = x.float()
        dense = F.linear(F.silu(F.linear(x32, wg.float())) * F.linear(x32, wu.float()), wd.float())
        sparse = F.linear(ref.masked(h, tmid).float(), wd.float())
        return {"tin": tin, "tmid": tmid, "act_in": activity(x, t_in), "act_mid": activity(h, t_mid),
                "dense": dense, "sparse": sparse}

    def run_ffn(self, c: FFN) -> list[dict[str, Any]]:
        api, T = self.api, self.api.tuning
        H, I, M, dt = c.ffn.H, c.ffn.I, c.batch, DTYPES[c.dtype]  # noqa: E741
        e = dt.itemsize

        def make(gen: torch.Generator) -> dict[str, tuple[Any, Callable]]:
            ws = self._mlp_weights(gen, H, I, dt)
            return {"w": (ws, lambda t: tuple(v.clone() for v in t)),
                    "w_im": (self._input_major(ws), lambda t: self._input_major([v.clone() for v in t]))}

        W = self._weights(("ffn", H, I, c.dtype), make)
        x = self._randn((M, H), dt, self._gen(c.label))
        fi = self._ffn_inputs(x, W["w"][0], c.sparsity / 100.0)
        tin, tmid, a_in, a_mid = fi["tin"], fi["tmid"], fi["act_in"], fi["act_mid"]
        u_in, u_mid = a_in["union_count"], a_mid["union_count"]
        dense_b = ffn_bytes(M, H, I, e, H, I)
        sparse_b = ffn_bytes(M, H, I, e, u_in, u_mid)
        base = {"kind": c.kind, "case": c.label, "shape": f"{c.ffn.name} ffn", "dims": c.ffn.dims, "H": H, "I": I,
                "batch": M, "dtype": c.dtype, "sparsity": c.sparsity, "pattern": None, **a_in,
                **{f"{k}_mid": v for k, v in a_mid.items()},
                "ideal": ideal_speedup(3 * H * I, 2 * u_in * I + u_mid * H)}
        gu_key = T.gate_up_key(x, I, H, "silu", tin)
        dn_key = T.fwd_key(x, H, I, False, tmid)  # h has x's rows and dtype
        gu, dn = self._heuristic(T.GATE_UP, gu_key), self._heuristic(T.FWD, dn_key)
        nd, nd_note = self._rotation(dense_b, 3 * H * I * e)
        ns, ns_note = self._rotation(sparse_b, 3 * H * I * e)
        ws, wims, xs = self._copies("w", nd), self._copies("w_im", ns), self._xs(x, max(nd, ns))
        K = api.kernel

        def kernel_ffn(xi: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
            h = K.act_sparse_gate_up(xi, wg.t(), wu.t(), tin, "silu", config=gu.config)
            return K.act_sparse_mm(h, wd.t(), tmid, None, config=dn.config)

        def op_bytes(r: dict[str, Any]) -> int:
            return ffn_bytes(M, H, I, e, H if r.get("gate_up_backend") == "dense" else u_in,
                             I if r.get("down_backend") == "dense" else u_mid)

        impls = [
            Impl(IMPL_DENSE, [functools.partial(dense_ffn, xs[i], *ws[i]) for i in range(nd)], "dense", dense_b,
                 "cublas", note=nd_note),
            Impl(IMPL_OP, [functools.partial(api.mod.act_sparse_mlp, xs[i], *wims[i], tin, tmid, "silu")
                           for i in range(ns)], "sparse", sparse_b, note=ns_note, bytes_for=op_bytes,
                 choice=lambda: self._choice([("gate_up", T.GATE_UP, gu_key), ("down", T.FWD, dn_key)])),
            Impl(IMPL_KERNEL, [functools.partial(kernel_ffn, xs[i], *wims[i]) for i in range(ns)], "sparse",
                 sparse_b, f"{gu.impl}+{dn.impl}", f"gate_up={gu.name}; down={dn.name}", note=ns_note),
        ]
        return self._measure(base, impls, {"dense": fi["dense"], "sparse": fi["sparse"]})

    # ---------------------------------------------------------------- decode stack
    def run_decode(self, c: Decode) -> list[dict[str, Any]]:
        api, T, d, L, dt = self.api, self.api.tuning, c.dims, c.layers, DTYPES[c.dtype]
        e, M = dt.itemsize, c.batch
        s = c.sparsity / 100.0

        def make(gen: torch.Generator) -> dict[str, tuple[Any, Callable]]:
            layers, inputs = [], []
            for _ in range(L):
                lin = tuple(self._randn((N, K), dt, gen, K ** -0.5) for _, N, K in d.linears())
                layers.append((lin, self._mlp_weights(gen, d.H, d.I, dt)))
                inputs.append(tuple(self._randn((M, d.H), dt, gen) for _ in range(3)))  # attn, o and MLP inputs

            def clone(stack: list) -> list:
                return [(tuple(w.clone() for w in lin), tuple(w.clone() for w in mlp)) for lin, mlp in stack]

            def clone_im(stack: list) -> list:
                return [(self._input_major([w.clone() for w in lin]), self._input_major([w.clone() for w in mlp]))
                        for lin, mlp in stack]

            im = [(self._input_major(lin), self._input_major(mlp)) for lin, mlp in layers]
            return {"w": (layers, clone), "w_im": (im, clone_im), "x": (inputs, list)}

        W = self._weights(("decode", d, L, M, c.dtype), make)
        layers, inputs = W["w"][0], W["x"][0]
        thresholds, unions, refs_dense, refs_sparse = [], [], [], []
        for (lin, mlp), (xa, xo, xm) in zip(layers, inputs):
            ta, to = quantile_threshold(xa, s), quantile_threshold(xo, s)
            tta, tto = self._thr(ta), self._thr(to)
            fi = self._ffn_inputs(xm, mlp, s)
            thresholds.append((tta, tto, fi["tin"], fi["tmid"]))
            unions.append((activity(xa, ta)["union_count"], activity(xo, to)["union_count"],
                           fi["act_in"]["union_count"], fi["act_mid"]["union_count"]))
            for w, xi, ti in zip(lin, (xa, xa, xa, xo), (tta, tta, tta, tto)):
                refs_dense.append(F.linear(xi.float(), w.float()))
                refs_sparse.append(F.linear(api.reference.masked(xi, ti).float(), w.float()))
            refs_dense.append(fi["dense"])
            refs_sparse.append(fi["sparse"])

        def stack(dense: dict[str, bool]) -> tuple[int, int]:
            """(bytes, weight elements) one token reads; ``dense[part]``: that part runs dense (reads it all)."""
            nbytes = elems = 0
            for u_a, u_o, u_in, u_mid in unions:
                for name, N, K in d.linears():
                    u = K if dense.get("q_o" if name in ("q", "o") else "k_v") else (u_o if name == "o" else u_a)
                    nbytes += linear_bytes(M, N, K, e, u)
                    elems += u * N
                u_in = d.H if dense.get("gate_up") else u_in
                u_mid = d.I if dense.get("down") else u_mid
                nbytes += ffn_bytes(M, d.H, d.I, e, u_in, u_mid)
                elems += 2 * u_in * d.I + u_mid * d.H
            return nbytes, elems

        all_dense = dict.fromkeys(("q_o", "k_v", "gate_up", "down"), True)
        dense_b, dense_elems = stack(all_dense)
        sparse_b, read = stack({})
        density = read / dense_elems
        base = {"kind": c.kind, "case": c.label, "shape": f"{d.name} decode x{L}", "dims": f"L{L} H{d.H} I{d.I}",
                "layers": L, "batch": M, "dtype": c.dtype, "sparsity": c.sparsity, "pattern": None,
                "union_density": density, "sparsity_union": 100.0 * (1.0 - density),
                "ideal": ideal_speedup(dense_elems, read),
                "scope": "linear layers of decode only (q, k, v, o and the MLP per layer); no attention, norms, "
                         "residuals"}

        def dense_step(weights: list) -> list[torch.Tensor]:
            out = []
            for ((wq, wk, wv, wo), mlp), (xa, xo, xm) in zip(weights, inputs):
                out += [F.linear(xa, wq), F.linear(xa, wk), F.linear(xa, wv), F.linear(xo, wo), dense_ffn(xm, *mlp)]
            return out

        def sparse_step(weights: list) -> list[torch.Tensor]:
            lin_op, mlp_op = api.mod.act_sparse_linear, api.mod.act_sparse_mlp
            out = []
            for ((wq, wk, wv, wo), mlp), (xa, xo, xm), (tta, tto, tin, tmid) in zip(weights, inputs, thresholds):
                out += [lin_op(xa, wq, tta), lin_op(xa, wk, tta), lin_op(xa, wv, tta), lin_op(xo, wo, tto),
                        mlp_op(xm, *mlp, tin, tmid, "silu")]
            return out

        xa, xm = inputs[0][0], inputs[0][2]
        tta, _, tin, tmid = thresholds[0]
        parts = [("q_o", T.FWD, T.fwd_key(xa, d.H, d.H, False, tta)),
                 ("k_v", T.FWD, T.fwd_key(xa, d.KV, d.H, False, tta)),
                 ("gate_up", T.GATE_UP, T.gate_up_key(xm, d.I, d.H, "silu", tin)),
                 ("down", T.FWD, T.fwd_key(xm, d.H, d.I, False, tmid))]
        copy_bytes = L * d.weight_elems() * e
        nd, nd_note = self._rotation(dense_b, copy_bytes)
        ns, ns_note = self._rotation(sparse_b, copy_bytes)
        impls = [
            Impl(IMPL_DENSE, [functools.partial(dense_step, w) for w in self._copies("w", nd)], "dense", dense_b,
                 "cublas", note=nd_note),
            Impl(IMPL_OP, [functools.partial(sparse_step, w) for w in self._copies("w_im", ns)], "sparse", sparse_b,
                 note=ns_note, choice=lambda: self._choice(parts),
                 bytes_for=lambda r: stack({p: r.get(f"{p}_backend") == "dense" for p, _, _ in parts})[0]),
        ]
        return self._measure(base, impls, {"dense": refs_dense, "sparse": refs_sparse})


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def tuning_state(api: Api, device: torch.device, autotune: bool) -> dict[str, Any]:
    """Where the op's choices can come from in this run (the mode, the user cache, the shipped table)."""
    try:
        tuner = api.tuner()
        info = tuner.device_info(device)
        cache, table = tuner.cache(info), tuner.shipped(info.slug)
        ops = tuple(api.tuning.TUNABLE)
        return {"autotune": autotune, "ops": list(ops), "user_cache": str(cache.path),
                "user_cache_keys": sum(len(cache.entries(op)) for op in ops),
                "shipped_table": str(table.path) if table.path else None, "shipped_keys_all_ops": len(table)}
    except Exception as exc:  # informational only
        return {"autotune": autotune, "error": _first_line(exc)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = settings_from_args(args)
    cases = s.cases()
    if args.dry_run:
        for i, c in enumerate(cases, 1):
            print(f"[{i:>3}/{len(cases)}] {c.kind:<7} {c.label:<46} ~{estimate_gb(c):5.1f} GB")
        print(f"{SUITE}: {len(cases)} cases (dry run; nothing measured)")
        return 0
    require_gpu("perf.suites.act_sparse")
    api = load_api()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references must be true fp32
    if not s.autotune:
        from sparse_triton.tuning import set_autotune

        set_autotune(False)
    device = torch.device("cuda", torch.cuda.current_device())
    config = {**s.to_json(), "tf32": False, "max_rotation": MAX_ROTATION,
              "tuning": tuning_state(api, device, s.autotune),
              "cublas_allow_fp16_reduced_precision_reduction":
                  torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction}
    writer = ResultWriter(SUITE, args.out, config=config, plot=plot_spec(s))
    gpu_name = (writer.env.get("gpu") or {}).get("name")
    peak = s.hbm_gbps or hbm_peak_gbps(gpu_name)
    writer.config.update(hbm_peak_gbps=peak,
                         hbm_peak_source="--hbm-gbps" if s.hbm_gbps else ("table" if peak else None))
    budget = Budget(s.budget_s)
    runner = Runner(api, s, peak, device=device)
    print(f"{SUITE}: {len(cases)} cases on {gpu_name}, torch {torch.__version__}, results -> {writer.path}", flush=True)
    skipped: list[Case] = []
    for i, c in enumerate(cases, 1):
        if not budget.fits():
            skipped.append(c)
            continue
        t0 = time.monotonic()
        runner.overhead_s = 0.0
        if estimate_gb(c) > s.mem_gb:
            rows = [{"kind": c.kind, "case": c.label, "impl": IMPL_OP, "status": "skipped",
                     "note": f"needs ~{estimate_gb(c):.0f} GB > --mem-gb {s.mem_gb:g}"}]
        else:
            try:
                rows = runner.run(c)
            except torch.OutOfMemoryError as exc:
                rows = [{"kind": c.kind, "case": c.label, "impl": IMPL_OP, "status": "skipped",
                         "note": f"out of GPU memory: {_first_line(exc)}"}]
            except Exception as exc:  # a bug in the op or the suite: record it, fail, go on
                rows = [{"kind": c.kind, "case": c.label, "impl": IMPL_OP, "status": "error",
                         "note": _first_line(exc)}]
                runner.fail(f"{c.label}: raised {_first_line(exc)}")
        budget.record(max(0.0, time.monotonic() - t0 - runner.overhead_s))
        writer.extend(rows)
        print(f"[{i:>3}/{len(cases)} {budget.elapsed():5.0f}s] {c.label:<44} {progress_line(rows)}", flush=True)
    if skipped:
        writer.note(f"budget of {s.budget_s:g}s reached: {len(skipped)} of {len(cases)} cases not run: "
                    + ", ".join(c.label for c in skipped))
    path = writer.close(complete=not skipped)
    print()
    print(summary(writer.rows))
    print(f"{SUITE}: x_op / x_kernel = dense ms / ms (same weight, same case); %ideal = x_op over dense weight "
          f"bytes / bytes read; GB/s on the bytes read (active weight rows + x + y); choice = what the tuner chose "
          f"for the op / where from")
    if skipped:
        print(f"{SUITE}: INCOMPLETE: budget {s.budget_s:g}s reached, {len(skipped)}/{len(cases)} cases not run")
    for f in runner.failures:
        print(f"{SUITE}: FAIL {f}")
    print(f"{SUITE}: {len(cases) - len(skipped)}/{len(cases)} cases in {budget.elapsed():.0f}s, "
          f"{len(runner.failures)} failures -> {path}")
    return 1 if runner.failures else 0


if __name__ == "__main__":
    sys.exit(main())
