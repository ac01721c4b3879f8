"""GPU tier: the tuner with the real timer. Every candidate of a key must pass its correctness check
(only resource limits may reject one), the winner is the fastest, never slower than dense, and nothing
is tuned during CUDA-graph capture. Collected everywhere, skipped without a CUDA GPU (see conftest)."""

import pytest
import torch
import torch.nn.functional as F

import sparse_triton as st
from sparse_triton.ops import nm_tuning as nt
from sparse_triton.tuning import CudaTimer, Tuner

pytestmark = pytest.mark.gpu

KEYS = [
    (nt.FWD, ("fp16", "2:4", 1024, 2048, 1, 0)),
    (nt.FWD, ("bf16", "2:4", 1024, 2048, 16, 1)),
    (nt.FWD, ("fp16", "1:4", 512, 1024, 256, 0)),
    (nt.FWD, ("tf32", "2:8", 512, 1024, 64, 0)),
    (nt.FWD, ("fp32", "2:4", 512, 1024, 4, 1)),
    (nt.BWD_DX, ("fp16", "2:4", 1024, 2048, 64, )),
    (nt.PRUNE, ("fp16", "2:4", 1024, 2048)),
    (nt.GATHER, ("bf16", "2:8", 1024, 2048)),
]


@pytest.mark.parametrize("op,key", KEYS, ids=lambda v: v.name if hasattr(v, "name") else "|".join(map(str, v)))
def test_every_candidate_correct_and_winner_fastest(op, key, tmp_path, set_tf32):
    set_tf32(key[0] != "fp32")
    tuner = Tuner(timer=CudaTimer(budget_ms=5), cache_root=tmp_path)
    device = torch.device("cuda", torch.cuda.current_device())
    result = tuner.tune(op, key, device)
    assert result is not None
    wrong = {n: why for n, why in result.rejected.items() if "tolerance" in why}
    assert not wrong, wrong
    assert result.times and all(t > 0 for t in result.times.values())
    assert result.entry["ms"] == min(result.times.values())
    if op.dense_impl:
        assert "dense" in result.times and result.entry["ms"] <= result.entry["dense_ms"]
    if op is nt.FWD and nt.cusparselt_supported(key[0], 2, 4, key[2], key[3], device) and key[1] == "2:4":
        assert "cusparselt" in result.times, result.rejected.get("cusparselt")
    assert tuner.resolve(op, key, device).source == "tuned"
    assert Tuner(timer=None, cache_root=tmp_path).resolve(op, key, device).source == "cache"


def test_no_tuning_during_graph_capture(tmp_path):
    tuner = Tuner(timer=CudaTimer(budget_ms=2), cache_root=tmp_path)
    previous = st.tuning.set_default_tuner(tuner)
    try:
        w = st.nm_compress(torch.randn(768, 1024, device="cuda", dtype=torch.float16), 2, 4)
        x = torch.randn(8, 1024, device="cuda", dtype=torch.float16)
        key = nt.fwd_key(x, 768, 1024, 2, 4, False)
        with st.tuning.autotune(False):  # warm up (compiles the heuristic's kernel) without tuning
            st.nm_linear(x, w)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with st.tuning.autotune(True), torch.cuda.graph(graph):
            y = st.nm_linear(x, w)
        assert tuner._memo[(nt.FWD.name, x.device, key)].source == "heuristic"
        graph.replay()
        torch.testing.assert_close(y.double(), F.linear(x.double(), w.to_dense().double()), atol=2e-2, rtol=2e-2)
        with st.tuning.autotune(True):
            st.nm_linear(x, w)  # eager again: now it tunes
        assert tuner._memo[(nt.FWD.name, x.device, key)].source == "tuned"
    finally:
        st.tuning.set_default_tuner(previous)


def test_cuda_timer_tracks_kernel_length():
    timer = CudaTimer(budget_ms=20)
    short = timer("short", lambda: torch.cuda._sleep(200_000))
    long = timer("long", lambda: torch.cuda._sleep(800_000))
    assert short > 0 and 3.0 < long / short < 5.0
