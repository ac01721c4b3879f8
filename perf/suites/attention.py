"""Block-sparse attention (``st.block_sparse_attention``) against dense SDPA and FlexAttention.

Run from the repository root on a GPU machine::

    PYTHONPATH=. python -m perf.suites.attention --quick            # B=1, S=32k and 8k, D=128, bf16: ~4 min
    PYTHONPATH=. python -m perf.suites.attention                    # TARGETS shapes, D=128 and 64, bf16 and fp16
    PYTHONPATH=. python -m perf.suites.attention --shapes 1x32k --sparsity 90 --directions fwd bwd --parts prefill
    PYTHONPATH=. python -m perf.suites.attention --quick --dry-run  # list the cases (no GPU needed)

Three kinds of case (Hq=32 query heads, Hkv=8 kv heads, 128x128 blocks unless said otherwise):

* ``prefill``: q, k, v [B, H, S, D]; forward (``fwd``), backward alone (``bwd``: ``autograd.grad`` of a
  retained graph) and both (``fwdbwd``). Masks: ``random`` block masks at the requested block sparsities
  (per query block about (1-s) of the candidate kv blocks kept, the diagonal block always, fixed seed;
  candidates are all blocks, or with ``causal`` the blocks touching the lower triangle, so s is measured
  against causal attention there), ``sliding_window`` (causal, window 4096) and ``document`` (8 random
  documents, not causal). Cases come in groups of (B, S, D, dtype, causal); each group starts with its
  dense reference, ``dense`` (every block) or ``causal`` (``BlockMask.causal``), which gives the
  own-dense time and is the only case where dense SDPA runs: SDPA computes DENSE attention
  (``is_causal`` = the group's flag) for every mask of the group, because that is what a user without
  block sparsity runs; the speedup is the gain from skipping blocks. FlexAttention runs the same mask
  (``torch.compile(flex_attention)`` with ``block_mask=ours.to_flex()``; where the op's ``causal=True``
  is not carried by the mask, a causal ``mask_mod`` is ANDed in and the diagonal blocks made partial).
* ``decode``: Sq = 1 or 4 queries against S = 32k / 64k keys; a top-k style mask (per kv head, shared by
  its query heads; the first and the last kv block always kept) keeps 10 % of the kv blocks (BK 64 or
  128). Baseline: dense SDPA decode. Timed with CUDA graphs over rotated q/k/v copies.
* ``mask_build``: ``BlockMask.from_dense`` of a random 90 % block-bool mask [1, 32, S/128, S/128] on the
  GPU, against one forward call of the op on the same kind of mask (TARGETS: <= 5 %).

Conventions. ``flops`` is the work actually needed: fwd = 4 * D * (allowed (q, k) pairs summed over batch
and query heads) (two matmuls, 2 flops per multiply-add), bwd = 2.5 x fwd, fwdbwd = 3.5 x fwd; for dense
SDPA rows the pairs of the dense (or causal) function it computes. ``tflops`` = flops / median time.
``block_sparsity`` = 1 - (listed blocks) / (blocks of the group's dense function) in %, ``ideal`` =
1 / (1 - block_sparsity), ``pct_ideal`` = 100 * (own dense ms / ms) / ideal. Decode ``bytes`` = the K/V
bytes of the selected blocks (each (batch, kv head, block) once) + q + o; ``pct_hbm`` = GB/s against the
GPU's HBM peak (``--hbm-gbps`` or a table of known GPUs). Prefill fwd is timed in training mode (inputs
require grad) so FlexAttention compiles one graph per mask, not two.

Correctness before timing: each implementation's forward is compared with an fp32 reference on a slice of
the real case (two query blocks, the last batch, the last kv-head group; the element mask of the slice is
decoded from the BlockMask's index lists per the contract, S x S is never materialised); our backward is
checked at a reduced size (B=1, Hq=8, Hkv=2, S=2048, same mask kind, dtype, D) against fp32 autograd
with ``BlockMask.element_mask()``. A wrong or raising sparse_triton result (op, mask builder, ``to_flex``)
marks its rows and makes the suite exit 1; SDPA/FlexAttention refusals are rows with status
``unavailable`` and the reason. Results: ``<out>/<gpu-slug>/attention.json``; ``python perf/plot.py`` draws
speedup against block sparsity with the ideal 1/(1-s) line, speedup over SDPA, and decode speedup.
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from perf.harness import Budget, ResultWriter, bench, gbps, relative_error, require_gpu, rotation_count, tflops
from perf.suites._attention_cases import (
    BLOCK,
    BWD_TOL,
    CHECK_HKV,
    CHECK_HQ,
    CHECK_S,
    DTYPES,
    FWD_TOL,
    IMPL_FLEX,
    IMPL_OURS,
    N_DOCS,
    PLOT,
    WINDOW,
    Case,
    Decode,
    MaskBuild,
    Prefill,
    Settings,
    allowed_pairs,
    as_pair,
    block_counts,
    build_mask,
    build_parser,
    case_seed,
    decode_bytes,
    dense_pairs,
    element_mask_rows,
    estimate_gb,
    flex_add_causal,
    flops_for,
    hbm_peak_gbps,
    ideal_speedup,
    link_builds,
    listed_blocks,
    pct_of_ideal,
    progress_line,
    random_block_mask,
    reference_attention,
    sdpa_fn,
    settings_from_args,
    short_len,
    summary,
    vs_sdpa,
)

SUITE = "attention"
FLEX_RESERVE_S = 60.0  # budget kept back before compiling FlexAttention for a new mask
MAX_REP_MS = 4000.0


# --------------------------------------------------------------------------------------------------
# The API under test
# --------------------------------------------------------------------------------------------------


@dataclass
class Api:
    """The op under test: ``st.BlockMask``, ``st.block_sparse_attention`` and its module (see ``load_api``), or
    a test double."""

    BlockMask: Any
    attention: Callable[..., Any]
    module: Any


def load_api() -> Api:
    """``st.BlockMask`` and ``st.block_sparse_attention`` (imported here, after ``require_gpu``, as nm_linear does)."""
    try:
        import sparse_triton as st
        import sparse_triton.ops.attention as mod
    except ImportError as exc:
        raise SystemExit(f"perf: cannot import sparse_triton ({exc}); run from the repo root with "
                         "PYTHONPATH=.") from exc
    return Api(st.BlockMask, st.block_sparse_attention, mod)


def _first_line(exc: BaseException, limit: int = 240) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: " + (text.splitlines()[0] if text else "")[:limit]


def _attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None, str]:
    """Run ``fn``; return (result or None, the exception or None, its warnings joined): SDPA warns why a
    backend refuses a call before it raises."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out, exc = fn(), None
        except Exception as e:  # reported by the caller
            out, exc = None, e
    said = dict.fromkeys((str(w.message).strip().splitlines() or [""])[0][:200] for w in caught)
    return out, exc, " | ".join(m for m in said if m)


def _op_config(api: Api) -> str | None:
    """The launch config the op last used, where ``sparse_triton.ops.attention`` exposes ``last_config``."""
    cfg = getattr(api.module, "last_config", None)
    try:
        cfg = cfg() if callable(cfg) else cfg
    except Exception:  # optional introspection; never fails a case
        return None
    return None if cfg is None else str(cfg)


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """Runs the cases; holds what later cases of a group need (own dense and SDPA times, checks)."""

    api: Api
    s: Settings
    hbm_peak: float | None
    budget: Budget | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cuda"))
    failures: list[str] = field(default_factory=list)
    own_dense: dict[tuple[Any, ...], float] = field(default_factory=dict)  # (group, direction) -> ms
    sdpa: dict[tuple[Any, ...], dict[str, float]] = field(default_factory=dict)  # (group, dir) -> backend -> ms
    bwd_checks: dict[tuple[Any, ...], tuple[float | None, str | None]] = field(default_factory=dict)
    inputs_key: tuple[Any, ...] | None = None
    inputs: tuple[torch.Tensor, ...] | None = None
    flex: Any = None
    overhead_s: float = 0.0  # compile / first-call / check time of the current case (not a timing cost)

    def fail(self, text: str) -> None:
        self.failures.append(text)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ---------------------------------------------------------------- timing
    def _time(self, fn: Callable[[], Any] | Sequence[Callable[[], Any]], cuda_graph: bool = False) -> Any:
        """``bench`` with enough repetitions for ``--min-samples`` calls (estimated from one timed call)."""
        first = fn if callable(fn) else fn[0]
        first()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        first()
        end.record()
        torch.cuda.synchronize()
        est = start.elapsed_time(end)
        rep = min(max(self.s.rep_ms, self.s.min_samples * est), max(self.s.rep_ms, MAX_REP_MS))
        return bench(fn, warmup_ms=self.s.warmup_ms, rep_ms=rep, cuda_graph=cuda_graph)

    def _time_dir(self, fwd: Callable[..., torch.Tensor], qkv: tuple[torch.Tensor, ...], do: torch.Tensor,
                  direction: str) -> Any:
        q, k, v = qkv
        if direction == "fwd":
            return self._time(lambda: fwd(q, k, v))
        if direction == "bwd":  # backward alone, over one retained graph
            o = fwd(q, k, v)
            return self._time(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
        return self._time(lambda: torch.autograd.grad(fwd(q, k, v), (q, k, v), do))

    # ---------------------------------------------------------------- prefill
    def _inputs(self, c: Prefill) -> tuple[torch.Tensor, ...]:
        """q, k, v (leaves requiring grad) and do of the case's shape; reused by every case of the shape."""
        key = (c.B, c.S, c.D, c.dtype, c.Hq, c.Hkv)
        if key != self.inputs_key:
            self.inputs = self.inputs_key = None
            torch.cuda.empty_cache()
            gen = torch.Generator(device=self.device).manual_seed(case_seed(self.s.seed, repr(key)))

            def rnd(h: int) -> torch.Tensor:  # random data, never zeros
                return torch.randn(c.B, h, c.S, c.D, device=self.device, dtype=DTYPES[c.dtype], generator=gen)

            self.inputs = (rnd(c.Hq).requires_grad_(), rnd(c.Hkv).requires_grad_(), rnd(c.Hkv).requires_grad_(),
                           rnd(c.Hq))
            self.inputs_key = key
        return self.inputs

    @staticmethod
    def _slice(c: Prefill) -> tuple[int, list[int], list[int]]:
        """The checked slice: last batch, last kv-head group, the middle and the last query block."""
        g, nq = c.Hq // c.Hkv, -(-c.S // BLOCK)
        return c.B - 1, list(range(c.Hq - g, c.Hq)), sorted({nq // 2, nq - 1})

    def _slice_error(self, c: Prefill, out: torch.Tensor, allowed: torch.Tensor, rows: torch.Tensor) -> float:
        """Relative error of ``out`` on the slice against the fp32 reference with ``allowed`` [g, rows, S]."""
        q, k, v, _ = self._inputs(c)
        b, heads, _ = self._slice(c)
        h = torch.tensor(heads, device=self.device)
        kvh = heads[0] // (c.Hq // c.Hkv)
        ref = reference_attention(q.detach()[b, h][:, rows], k.detach()[b, kvh:kvh + 1],
                                  v.detach()[b, kvh:kvh + 1], allowed, c.D ** -0.5)
        return relative_error(out.detach()[b, h][:, rows], ref)

    def _bwd_check(self, c: Prefill) -> tuple[float | None, str | None]:
        """Our forward + backward at a reduced size, same mask kind, vs fp32 autograd (cached per kind)."""
        key = (c.mask, c.sparsity, c.causal, c.D, c.dtype)
        if key not in self.bwd_checks:
            self.bwd_checks[key] = self._run_bwd_check(c, key)
        return self.bwd_checks[key]

    def _run_bwd_check(self, c: Prefill, key: tuple[Any, ...]) -> tuple[float | None, str | None]:
        S, scale = min(c.S, CHECK_S), c.D ** -0.5
        try:
            gen = torch.Generator(device=self.device).manual_seed(case_seed(self.s.seed, "bwd " + repr(key)))
            q, k, v, do = (torch.randn(1, h, S, c.D, device=self.device, dtype=DTYPES[c.dtype], generator=gen)
                           for h in (CHECK_HQ, CHECK_HKV, CHECK_HKV, CHECK_HQ))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            bm = build_mask(self.api.BlockMask, c.mask, S, CHECK_HQ, c.sparsity, c.causal,
                            case_seed(self.s.seed, "mask " + repr(key)), self.device,
                            window=max(BLOCK, WINDOW * S // c.S))
            allowed = bm.element_mask().to(self.device).bool()
            if c.causal:  # the op's flag ANDs k <= q into the mask
                allowed = allowed & torch.ones(S, S, dtype=torch.bool, device=self.device).tril()
            mine, _ = element_mask_rows(bm, 0, range(CHECK_HQ), range(-(-S // BLOCK)), c.causal)
            note = None if torch.equal(mine, allowed[0].expand(CHECK_HQ, S, S)) else (
                "the suite's slice decoder disagrees with BlockMask.element_mask(): slice checks unreliable")
            ref = reference_attention(q, k, v, allowed, scale)
            ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
            out = self.api.attention(q, k, v, bm, scale=scale, causal=c.causal)
            grads = torch.autograd.grad(out, (q, k, v), do)
            return max(relative_error(x, r) for x, r in zip((out, *grads), (ref, *ref_grads))), note
        except Exception as exc:  # recorded on the rows; a failure of ours
            return None, f"reduced-size backward check raised {_first_line(exc)}"

    def run_prefill(self, c: Prefill) -> list[dict[str, Any]]:
        base: dict[str, Any] = {
            "kind": "prefill", "case": c.label, "shape": f"B{c.B} S{short_len(c.S)} D{c.D} {c.dtype}", "B": c.B,
            "Hq": c.Hq, "Hkv": c.Hkv, "S": c.S, "Sq": c.S, "D": c.D, "dtype": c.dtype, "causal": c.causal,
            "attn": "causal" if c.causal else "non-causal", "mask": c.mask, "family": c.family,
            "sparsity": c.sparsity, "block_size": BLOCK, "window": WINDOW if c.mask == "sliding_window" else None,
            "n_docs": N_DOCS if c.mask == "document" else None}
        rows: list[dict[str, Any]] = []

        def row(impl: str, direction: str, status: str, **kw: Any) -> None:
            rows.append({**base, "impl": impl, "direction": direction, "status": status, "ms": None,
                         "rel_err": None, "note": None, **kw})

        need = estimate_gb(c)
        if need > self.s.mem_gb:
            for d in self.s.directions:
                row(IMPL_OURS, d, "skipped", note=f"needs ~{need:.0f} GB > --mem-gb {self.s.mem_gb:g}")
            return rows
        self._inputs(c)
        b, heads, qblocks = self._slice(c)
        dense_p = dense_pairs(c.B, c.Hq, c.S, c.S, c.causal)
        base["dense_pairs"] = dense_p
        bm = None
        try:
            t0 = time.perf_counter()
            bm = build_mask(self.api.BlockMask, c.mask, c.S, c.Hq, c.sparsity, c.causal,
                            case_seed(self.s.seed, c.label), self.device)
            self._sync()
            build_s = time.perf_counter() - t0
            pairs = allowed_pairs(bm, c.B, c.Hq, c.causal)
            listed, ref_blocks = block_counts(bm, c.B, c.Hq, c.causal)
            allowed, pos = element_mask_rows(bm, b, heads, qblocks, c.causal)
        except Exception as exc:
            bm = None
            for d in self.s.directions:
                row(IMPL_OURS, d, "error", note=f"mask: {_first_line(exc)}")
            self.fail(f"{c.label}: building the mask raised {_first_line(exc)}")
        if bm is not None:
            bsp = 100.0 * (1.0 - listed / ref_blocks)
            try:
                api_sp = float(bm.sparsity())
            except Exception:  # informational only
                api_sp = None
            base.update(block_sparsity=bsp, ideal=ideal_speedup(bsp), pairs=pairs, density=pairs / dense_p,
                        mask_build_s=round(build_s, 4), mask_sparsity_api=api_sp)
            self._ours_prefill(c, bm, allowed, pos, pairs, row)
            if self._flex_wanted(c):
                self._flex_prefill(c, bm, allowed, pos, pairs, row)
        if c.reference:
            self._sdpa_prefill(c, dense_p, row)
        self._derive(c, rows)
        return rows

    def _ours_prefill(self, c: Prefill, bm: Any, allowed: torch.Tensor, pos: torch.Tensor, pairs: int,
                      row: Callable[..., None]) -> None:
        q, k, v, do = self._inputs(c)
        scale = c.D ** -0.5

        def fwd(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
            return self.api.attention(q_, k_, v_, bm, scale=scale, causal=c.causal)

        t0 = time.perf_counter()
        try:
            err = self._slice_error(c, fwd(q, k, v), allowed, pos)
        except Exception as exc:
            for d in self.s.directions:
                row(IMPL_OURS, d, "error", note=f"forward raised {_first_line(exc)}")
            self.fail(f"{c.label}: block_sparse_attention raised {_first_line(exc)}")
            return
        bwd_err, bwd_note = self._bwd_check(c) if set(self.s.directions) - {"fwd"} else (None, None)
        self.overhead_s += time.perf_counter() - t0
        config = _op_config(self.api)
        for d in self.s.directions:
            info = {"rel_err": err, "bwd_rel_err": None if d == "fwd" else bwd_err, "config": config,
                    "flops": flops_for(pairs, c.D, d), "note": None if d == "fwd" else bwd_note}
            if not err <= FWD_TOL:
                row(IMPL_OURS, d, "wrong", **{**info, "note": f"forward slice rel err {err:.3g} > {FWD_TOL:g}; "
                                                              "not timed"})
                self.fail(f"{c.label} {d}: forward relative error {err:.3g} > {FWD_TOL:g}")
                continue
            if d != "fwd" and (bwd_err is None or not bwd_err <= BWD_TOL):
                why = bwd_note if bwd_err is None else f"reduced-size backward rel err {bwd_err:.3g} > {BWD_TOL:g}"
                row(IMPL_OURS, d, "error" if bwd_err is None else "wrong", **{**info, "note": f"{why}; not timed"})
                self.fail(f"{c.label} {d}: {why}")
                continue
            try:
                t = self._time_dir(fwd, (q, k, v), do, d)
            except Exception as exc:
                row(IMPL_OURS, d, "error", **{**info, "note": f"timing raised {_first_line(exc)}"})
                self.fail(f"{c.label} {d}: timing raised {_first_line(exc)}")
                continue
            row(IMPL_OURS, d, "ok", tflops=tflops(info["flops"], t.median_ms), **info, **t.as_row())

    def _flex_wanted(self, c: Prefill) -> bool:
        """``all``: every mask; ``key``: the random 90 % masks at S >= 32k (or the largest S asked for)."""
        if self.s.flex != "key":
            return self.s.flex == "all"
        key_s = min(32768, max(S for _, S in self.s.shapes))
        return c.mask == "random" and c.sparsity == 90 and c.S >= key_s

    def _flex_prefill(self, c: Prefill, bm: Any, allowed: torch.Tensor, pos: torch.Tensor, pairs: int,
                      row: Callable[..., None]) -> None:
        q, k, v, do = self._inputs(c)
        scale = c.D ** -0.5
        bud = self.budget
        if bud is not None and bud.remaining() < FLEX_RESERVE_S + bud.longest * bud.margin:
            for d in self.s.directions:
                row(IMPL_FLEX, d, "skipped", note="budget: too little time left to compile FlexAttention")
            return
        t0 = time.perf_counter()
        try:
            from torch.nn.attention.flex_attention import flex_attention

            if self.flex is None:
                self.flex = torch.compile(flex_attention, dynamic=False)
            fbm, how = bm.to_flex(), "to_flex"
            if c.causal and not bm.causal:  # the op's flag is not in the mask: AND it in
                fbm, how = flex_add_causal(fbm), "to_flex+causal"
        except Exception as exc:
            for d in self.s.directions:
                row(IMPL_FLEX, d, "error", note=f"to_flex(): {_first_line(exc)}")
            self.fail(f"{c.label}: BlockMask.to_flex() raised {_first_line(exc)}")
            return

        def fwd(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
            return self.flex(q_, k_, v_, block_mask=fbm, scale=scale, enable_gqa=True)

        def backward() -> None:  # compiles the backward outside every timing
            torch.autograd.grad(fwd(q, k, v), (q, k, v), do)
            self._sync()

        # Compile (first calls) outside every timing; FlexAttention refusing a direction is a peer's limit.
        err, exc, said = _attempt(lambda: self._slice_error(c, fwd(q, k, v), allowed, pos))
        refused = {d: exc for d in self.s.directions} if exc is not None else {}
        if exc is None and set(self.s.directions) - {"fwd"}:
            _, bexc, bsaid = _attempt(backward)
            if bexc is not None:
                refused.update({d: bexc for d in self.s.directions if d != "fwd"})
                said = bsaid
        compile_s = time.perf_counter() - t0
        self.overhead_s += compile_s
        for d in self.s.directions:
            info = {"rel_err": err, "flops": flops_for(pairs, c.D, d), "flex_mask": how,
                    "compile_s": round(compile_s, 2), "backend": "flex_attention (torch.compile)"}
            if d in refused:
                row(IMPL_FLEX, d, "unavailable", **{**info, "note": _first_line(refused[d])
                                                    + (f" (warnings: {said})" if said else "")})
                continue
            if not err <= FWD_TOL:
                row(IMPL_FLEX, d, "wrong", note=f"forward slice rel err {err:.3g}: the to_flex() mask differs", **info)
                self.fail(f"{c.label} {d}: FlexAttention with the to_flex() mask: relative error {err:.3g}")
                continue
            try:
                t = self._time_dir(fwd, (q, k, v), do, d)
            except Exception as exc:
                row(IMPL_FLEX, d, "unavailable", note=f"timing raised {_first_line(exc)}", **info)
                continue
            row(IMPL_FLEX, d, "ok", tflops=tflops(info["flops"], t.median_ms), **info, **t.as_row())

    def _sdpa_prefill(self, c: Prefill, dense_p: int, row: Callable[..., None]) -> None:
        """Dense SDPA per backend (the group's baseline): GQA through ``enable_gqa``, else k/v repeated."""
        q, k, v, do = self._inputs(c)
        scale, g = c.D ** -0.5, c.Hq // c.Hkv
        b, heads, qblocks = self._slice(c)
        pos = torch.cat([torch.arange(i * BLOCK, min((i + 1) * BLOCK, c.S), device=self.device) for i in qblocks])
        allowed = torch.ones(len(heads), pos.numel(), c.S, dtype=torch.bool, device=self.device)
        if c.causal:
            allowed &= torch.arange(c.S, device=self.device)[None, None, :] <= pos[None, :, None]
        for backend in self.s.sdpa_backends:
            impl, t0, tried, chosen, wrong = f"sdpa_{backend}", time.perf_counter(), [], None, None
            for gqa in ("enable_gqa", "repeat_kv"):
                if gqa == "repeat_kv" and estimate_gb(c, repeat_kv=True) > self.s.mem_gb:
                    tried.append("repeat_kv: would not fit in --mem-gb")
                    continue
                fn = sdpa_fn(backend, c.causal, scale, gqa == "enable_gqa")
                qkv = (q, k, v) if gqa == "enable_gqa" else (
                    q, k.detach().repeat_interleave(g, 1).requires_grad_(),
                    v.detach().repeat_interleave(g, 1).requires_grad_())
                err, exc, said = _attempt(lambda fn=fn, qkv=qkv: self._slice_error(c, fn(*qkv), allowed, pos))
                if exc is None and err <= FWD_TOL:
                    chosen = (gqa, fn, qkv, err)
                    break
                tried.append(f"{gqa}: " + (f"rel err {err:.3g} against the dense reference" if exc is None else
                                           _first_line(exc) + (f" (warnings: {said})" if said else "")))
                wrong = (gqa, err) if exc is None else wrong  # a result, but not the dense function
            self.overhead_s += time.perf_counter() - t0
            if chosen is None:
                for d in self.s.directions:
                    row(impl, d, "wrong" if wrong else "unavailable", backend=backend, gqa=wrong and wrong[0],
                        rel_err=wrong and wrong[1], note="; ".join(tried))
                continue
            gqa, fn, qkv, err = chosen
            for d in self.s.directions:
                info = {"backend": backend, "gqa": gqa, "rel_err": err, "flops": flops_for(dense_p, c.D, d),
                        "note": "k/v repeated to Hq heads outside the timing" if gqa == "repeat_kv" else None}
                try:
                    t = self._time_dir(fn, qkv, do, d)
                except Exception as exc:
                    row(impl, d, "unavailable", **{**info, "note": f"timing raised {_first_line(exc)}"})
                    continue
                row(impl, d, "ok", tflops=tflops(info["flops"], t.median_ms), **info, **t.as_row())
                self.sdpa.setdefault((c.group, d), {})[backend] = t.median_ms
            del qkv, fn, chosen

    def _derive(self, c: Prefill, rows: list[dict[str, Any]]) -> None:
        """Speedups of our rows over own dense mode, the group's best dense SDPA, and FlexAttention."""
        by = {(r["impl"], r["direction"]): r for r in rows}
        for d in self.s.directions:
            ours = by.get((IMPL_OURS, d))
            if ours is None:
                continue
            ms = ours["ms"] if ours["status"] == "ok" else None
            if c.reference and ms:
                self.own_dense[(c.group, d)] = ms
            own = self.own_dense.get((c.group, d))
            flex = by.get((IMPL_FLEX, d))
            flex_ms = flex["ms"] if flex is not None and flex["status"] == "ok" else None
            ours.update(own_dense_ms=own, speedup_vs_own_dense=own / ms if own and ms else None,
                        pct_ideal=pct_of_ideal(own, ms, ours.get("block_sparsity")),
                        flex_ms=flex_ms, speedup_vs_flex=flex_ms / ms if flex_ms and ms else None,
                        **vs_sdpa(self.sdpa.get((c.group, d), {}), ms))
            if flex_ms:
                flex.update(vs_sdpa(self.sdpa.get((c.group, d), {}), flex_ms))

    # ---------------------------------------------------------------- decode
    def run_decode(self, c: Decode) -> list[dict[str, Any]]:
        dt, g = DTYPES[c.dtype], c.Hq // c.Hkv
        nkv = -(-c.S // c.BK)
        kept = max(1, round(c.keep * nkv))
        base: dict[str, Any] = {
            "kind": "decode", "case": c.label, "shape": f"B{c.B} D{c.D} {c.dtype}", "B": c.B, "Hq": c.Hq,
            "Hkv": c.Hkv, "S": c.S, "Sq": c.Sq, "D": c.D, "dtype": c.dtype, "causal": False, "attn": "non-causal",
            "mask": "topk", "family": "topk", "BK": c.BK, "block_size": c.BK, "queries": f"Sq={c.Sq}",
            "kv_block": f"BK={c.BK}", "kept_blocks": kept, "kv_blocks": nkv,
            "block_sparsity": 100.0 * (1 - kept / nkv), "hbm_peak_gbps": self.hbm_peak}
        rows: list[dict[str, Any]] = []

        def row(impl: str, status: str, **kw: Any) -> None:
            rows.append({**base, "impl": impl, "direction": "fwd", "status": status, "ms": None, "rel_err": None,
                         "note": None, **kw})

        if estimate_gb(c) > self.s.mem_gb:
            row(IMPL_OURS, "skipped", note=f"needs ~{estimate_gb(c):.0f} GB > --mem-gb {self.s.mem_gb:g}")
            return rows
        self.inputs = self.inputs_key = None
        torch.cuda.empty_cache()
        gen = torch.Generator(device=self.device).manual_seed(case_seed(self.s.seed, c.label))
        q = torch.randn(c.B, c.Hq, c.Sq, c.D, device=self.device, dtype=dt, generator=gen)
        k = torch.randn(c.B, c.Hkv, c.S, c.D, device=self.device, dtype=dt, generator=gen)
        v = torch.randn(c.B, c.Hkv, c.S, c.D, device=self.device, dtype=dt, generator=gen)
        scale = c.D ** -0.5
        # Scores per kv head, shared by its query heads; the sink (first) and the newest (last) block always win.
        scores = torch.rand(c.B, c.Hkv, 1, nkv, device=self.device, generator=gen)
        scores[..., 0] = scores[..., -1] = 2.0
        scores = scores.repeat_interleave(g, dim=1)
        try:
            bm, builder = self._decode_mask(c, scores, kept)
            pairs = allowed_pairs(bm, c.B, c.Hq)
            nbytes = decode_bytes(bm, c.B, c.Hq, c.Hkv, c.D, c.Sq, dt.itemsize)
        except Exception as exc:
            row(IMPL_OURS, "error", note=f"mask: {_first_line(exc)}")
            self.fail(f"{c.label}: building the mask raised {_first_line(exc)}")
            return rows
        base.update(mask_builder=builder, pairs=pairs)
        dense_bytes = 2 * c.B * c.Hkv * c.S * c.D * dt.itemsize + 2 * c.B * c.Hq * c.Sq * c.D * dt.itemsize

        def error(out: torch.Tensor, mask: Any) -> float:  # first and last batch, first and last kv group
            errs = []
            for b in sorted({0, c.B - 1}):
                for kvh in sorted({0, c.Hkv - 1}):
                    hs = list(range(kvh * g, (kvh + 1) * g))
                    allowed = (torch.ones(g, c.Sq, c.S, dtype=torch.bool, device=self.device) if mask is None
                               else element_mask_rows(mask, b, hs, [0])[0])
                    ref = reference_attention(q[b, hs], k[b, kvh:kvh + 1], v[b, kvh:kvh + 1], allowed, scale)
                    errs.append(relative_error(out[b, hs], ref))
            return max(errs)

        impls: list[tuple[str, Callable[..., torch.Tensor], int, Any, float]] = [
            (IMPL_OURS, lambda q_, k_, v_: self.api.attention(q_, k_, v_, bm, scale=scale), nbytes, bm,
             flops_for(pairs, c.D, "fwd"))]
        dense_flops = flops_for(dense_pairs(c.B, c.Hq, c.Sq, c.S, False), c.D, "fwd")
        impls += [(f"sdpa_{be}", sdpa_fn(be, False, scale, True), dense_bytes, None, dense_flops)
                  for be in self.s.sdpa_backends]
        with torch.no_grad():
            for impl, fn, moved, mask, flops in impls:
                ours = impl == IMPL_OURS
                info = {"backend": None if ours else impl.removeprefix("sdpa_"), "bytes": moved, "flops": flops}
                t0 = time.perf_counter()
                err, exc, said = _attempt(lambda fn=fn, mask=mask: error(fn(q, k, v), mask))
                self.overhead_s += time.perf_counter() - t0
                if exc is not None:
                    row(impl, "error" if ours else "unavailable", **info,
                        note=_first_line(exc) + (f" (warnings: {said})" if said else ""))
                    if ours:
                        self.fail(f"{c.label}: block_sparse_attention raised {_first_line(exc)}")
                    continue
                if not err <= FWD_TOL:
                    row(impl, "wrong", rel_err=err, note=f"rel err {err:.3g} > {FWD_TOL:g}; not timed", **info)
                    if ours:
                        self.fail(f"{c.label}: decode relative error {err:.3g} > {FWD_TOL:g}")
                    continue
                # Graph replays do not flush L2: rotate q/k/v copies (memory permitting) so no call hits it.
                room = int((self.s.mem_gb - estimate_gb(c)) * 1e9 // max(1, 2 * k.nbytes))
                copies = [(q, k, v)] + [(q.clone(), k.clone(), v.clone())
                                        for _ in range(max(1, min(rotation_count(moved), room)) - 1)]
                try:
                    t = self._time([functools.partial(fn, *x) for x in copies], cuda_graph=True)
                except Exception as exc:
                    row(impl, "error" if ours else "unavailable", rel_err=err, **info,
                        note=f"timing raised {_first_line(exc)}")
                    if ours:
                        self.fail(f"{c.label}: timing raised {_first_line(exc)}")
                    continue
                finally:
                    del copies
                bw = gbps(moved, t.median_ms)
                row(impl, "ok", rel_err=err, tflops=tflops(flops, t.median_ms), gbps=bw,
                    pct_hbm=100.0 * bw / self.hbm_peak if bw and self.hbm_peak else None,
                    config=_op_config(self.api) if ours else None, **info, **t.as_row())
        sdpa = {r["backend"]: r["ms"] for r in rows if r["impl"] != IMPL_OURS and r["status"] == "ok"}
        for r in rows:
            if r["impl"] == IMPL_OURS and r["status"] == "ok":
                r.update(vs_sdpa(sdpa, r["ms"]))
        return rows

    def _decode_mask(self, c: Decode, scores: torch.Tensor, kept: int) -> tuple[Any, str]:
        """``BlockMask.topk``; where its lengths are not (Sq, S) (a top-k mask knows only NQ*BQ x NKV*BK), the
        same selection through ``from_dense(..., seq_lens=(Sq, S))``. A raising ``topk`` is a failure."""
        try:
            try:
                bm = self.api.BlockMask.topk(scores, kept, block_size=c.BK, seq_lens=(c.Sq, c.S))
            except TypeError:  # a topk without seq_lens
                bm = self.api.BlockMask.topk(scores, kept, block_size=c.BK)
            if as_pair(bm.seq_lens) == (c.Sq, c.S):
                return bm, "topk"
        except Exception as exc:  # measure the op anyway, through from_dense
            self.fail(f"{c.label}: BlockMask.topk raised {_first_line(exc)}")
        blk = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        blk.scatter_(-1, scores.topk(kept, dim=-1).indices, True)
        return self.api.BlockMask.from_dense(blk, block_size=c.BK, seq_lens=(c.Sq, c.S)), "from_dense(topk)"

    # ---------------------------------------------------------------- mask build
    def run_build(self, c: MaskBuild) -> list[dict[str, Any]]:
        n = -(-c.S // BLOCK)
        blk = random_block_mask(c.Hq, n, n, c.sparsity / 100.0, causal=False,
                                seed=case_seed(self.s.seed, c.label)).to(self.device)
        r: dict[str, Any] = {
            "kind": "mask_build", "case": c.label, "impl": IMPL_OURS, "direction": "build", "B": 1, "S": c.S,
            "Sq": c.S, "Hq": c.Hq, "mask": "random", "family": "random", "sparsity": c.sparsity,
            "block_size": BLOCK, "input": f"bool [1, {c.Hq}, {n}, {n}] on {self.device.type}", "status": "ok",
            "ms": None, "note": None}
        try:
            bm = self.api.BlockMask.from_dense(blk, block_size=BLOCK)
            part, full = listed_blocks(bm)
            if not torch.equal((part | full).expand_as(blk), blk):
                r.update(status="wrong", note="from_dense lists differ from the input block mask")
                self.fail(f"{c.label}: BlockMask.from_dense lists differ from its input")
                return [r]
            del bm, part, full
            r.update(self._time(lambda: self.api.BlockMask.from_dense(blk, block_size=BLOCK)).as_row())
        except Exception as exc:
            r.update(status="error", note=_first_line(exc))
            self.fail(f"{c.label}: BlockMask.from_dense raised {_first_line(exc)}")
        return [r]


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = settings_from_args(args)
    cases = s.cases()
    if args.dry_run:
        for i, c in enumerate(cases, 1):
            print(f"[{i:>3}/{len(cases)}] {c.kind:<10} {c.label:<52} ~{estimate_gb(c):5.1f} GB")
        print(f"{SUITE}: {len(cases)} cases (dry run; nothing measured)")
        return 0
    require_gpu("perf.suites.attention")
    api = load_api()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references must be true fp32
    from torch._dynamo import config as dyn
    for name, value in (("recompile_limit", 1024), ("cache_size_limit", 1024), ("accumulated_recompile_limit", 8192),
                        ("accumulated_cache_size_limit", 8192), ("fail_on_recompile_limit_hit", True)):
        if hasattr(dyn, name):  # one compiled flex_attention per mask; never a silent eager fallback
            setattr(dyn, name, value)
    config = {**s.to_json(), "flex_policy": s.flex, "tf32": False}
    writer = ResultWriter(SUITE, args.out, config=config, plot=PLOT)
    gpu_name = (writer.env.get("gpu") or {}).get("name")
    peak = s.hbm_gbps or hbm_peak_gbps(gpu_name)
    writer.config["hbm_peak_gbps"] = peak
    writer.config["hbm_peak_source"] = "--hbm-gbps" if s.hbm_gbps else ("table" if peak else None)
    budget = Budget(s.budget_s)
    runner = Runner(api, s, peak, budget=budget)
    print(f"{SUITE}: {len(cases)} cases on {gpu_name}, torch {torch.__version__}, results -> {writer.path}",
          flush=True)
    skipped: list[Case] = []
    for i, c in enumerate(cases, 1):
        if not budget.fits():
            skipped.append(c)
            continue
        t0 = time.monotonic()
        runner.overhead_s = 0.0
        run = {"prefill": runner.run_prefill, "decode": runner.run_decode, "mask_build": runner.run_build}[c.kind]
        try:
            rows = run(c)
        except torch.OutOfMemoryError as exc:
            rows = [{"kind": c.kind, "case": c.label, "impl": IMPL_OURS, "status": "skipped",
                     "note": f"out of GPU memory: {_first_line(exc)}"}]
        except Exception as exc:  # a bug in the op or the suite: record it, fail, go on with the next case
            rows = [{"kind": c.kind, "case": c.label, "impl": IMPL_OURS, "status": "error", "note": _first_line(exc)}]
            runner.fail(f"{c.label}: raised {_first_line(exc)}")
        torch.cuda.empty_cache()
        budget.record(max(0.0, time.monotonic() - t0 - runner.overhead_s))
        writer.extend(rows)
        print(f"[{i:>3}/{len(cases)} {budget.elapsed():5.0f}s] {c.label:<48} {progress_line(rows)}", flush=True)
    link_builds(writer.rows)
    if skipped:
        writer.note(f"budget of {s.budget_s:g}s reached: {len(skipped)} of {len(cases)} cases not run: "
                    + ", ".join(c.label for c in skipped))
    path = writer.close(complete=not skipped)
    print()
    print(summary(writer.rows))
    print(f"{SUITE}: x_dense = own dense mode ms / ms; %ideal = x_dense over 1/(1-s); x_sdpa = fastest dense SDPA "
          f"backend ms / ms (SDPA runs dense attention); x_flex = FlexAttention (same mask) ms / ms")
    if skipped:
        print(f"{SUITE}: INCOMPLETE: budget {s.budget_s:g}s reached, {len(skipped)}/{len(cases)} cases not run")
    for f in runner.failures:
        print(f"{SUITE}: FAIL {f}")
    print(f"{SUITE}: {len(cases) - len(skipped)}/{len(cases)} cases in {budget.elapsed():.0f}s, "
          f"{len(runner.failures)} failures -> {path}")
    return 1 if runner.failures else 0


if __name__ == "__main__":
    sys.exit(main())
