"""pytest-benchmark entries for representative N:M linear cases: ``pytest perf`` on a GPU machine.

2:4 on a Llama-3-8B q/o weight (4096x4096, fp16) at decode (M=1) and small batch (M=16), dense cuBLAS
``F.linear`` against ``st.nm_linear``, grouped so pytest-benchmark's table compares the two. Each round
is one call plus ``torch.cuda.synchronize()``: a host-observed latency (launch + kernel + sync), useful
to track regressions with ``--benchmark-autosave`` / ``--benchmark-compare``. The numbers of record
come from ``python -m perf.suites.nm_linear`` (CUDA events or graphs, L2 flush, medians).

``st.nm_linear`` runs what the runtime tuner chose for the key (user cache, shipped table, or tuned on
the first call, which is outside the benchmark); ``extra_info`` records that choice and its source, so
two saved runs that differ in it are not mistaken for a kernel regression.

Without a CUDA GPU (or with ``TRITON_INTERPRET`` set) every test here is collected and skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from perf.harness import relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="perf benchmarks need a CUDA GPU (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="TRITON_INTERPRET is set: interpreted kernels are not worth timing"),
]

N, K = 4096, 4096  # Llama-3-8B q_proj / o_proj
PATTERN = (2, 4)
DTYPE = torch.float16
REL_TOL = 1e-2


@pytest.mark.parametrize("impl", ["dense", "sparse_triton"])
@pytest.mark.parametrize("M", [1, 16], ids=lambda M: f"M{M}")
def test_nm_linear_2to4_4096(benchmark, nm_weight, M: int, impl: str) -> None:
    import sparse_triton as st

    w_nm, w_dense = nm_weight(N, K, *PATTERN, DTYPE)
    x = torch.randn(M, K, device="cuda", dtype=DTYPE)
    if impl == "dense":
        def fn() -> torch.Tensor:
            return F.linear(x, w_dense)
    else:
        def fn() -> torch.Tensor:
            return st.nm_linear(x, w_nm)

    # Correct before timed; this first call also compiles and tunes outside the benchmark.
    err = relative_error(fn(), F.linear(x.float(), w_dense.float()))
    assert err <= REL_TOL, f"{impl}: relative error {err:.3g} > {REL_TOL} against the fp32 reference"

    def run() -> None:
        fn()
        torch.cuda.synchronize()

    benchmark.group = f"nm_linear {N}x{K} 2:4 fp16 M={M}"
    benchmark.extra_info.update({
        "gpu": torch.cuda.get_device_name(), "N": N, "K": K, "M": M, "pattern": "2:4", "dtype": "fp16",
        "impl": impl, "rel_err": err, "timing": "host clock around call + cuda synchronize",
    })
    if impl == "sparse_triton":
        from sparse_triton.ops import nm_tuning as nt
        from sparse_triton.tuning import default_tuner

        choice = default_tuner().resolve(nt.FWD, nt.fwd_key(x, N, K, *PATTERN, False), x.device)
        benchmark.extra_info.update({"choice": choice.candidate.name, "choice_impl": choice.candidate.impl,
                                     "choice_source": choice.source})
    benchmark.pedantic(run, warmup_rounds=25, rounds=200, iterations=1)
