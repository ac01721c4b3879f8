"""GPU tier only: compiled kernels in bf16, heuristic configs at real sizes, CUDA-graph capture and
no host syncs. Collected everywhere, skipped without a CUDA GPU (see conftest)."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import sparse_triton as st
from sparse_triton.kernels import nm_matmul as kernel
from sparse_triton.reference import nm_prune as ref_prune

pytestmark = pytest.mark.gpu

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (8, 16)]


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("n,m", PATTERNS, ids=lambda v: str(v))
@pytest.mark.parametrize("M", [1, 3, 16, 100, 1024])
def test_bf16_forward_backward(M, n, m):
    N, K = 512, 1024 + 17 * m
    w_nm = st.nm_compress(torch.randn(N, K, device="cuda", dtype=torch.bfloat16), n, m)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    values = w_nm.values.detach().requires_grad_(True)
    y = st.nm_linear(x, st.NMTensor(values, w_nm.indices, w_nm.shape, n, m), b)
    dy = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, values), dy)
    wd = w_nm.to_dense().double()
    assert rel_err(y, F.linear(x.double(), wd, b.double())) < 1e-2
    assert rel_err(gx, dy.double() @ wd) < 1e-2
    assert rel_err(gv, w_nm.gather(dy.double().t() @ x.double())) < 1e-2


def _config_cases():
    for cfg in kernel.CONFIGS:
        for dtype in kernel._config_dtypes(cfg):
            yield pytest.param(cfg, dtype, id=f"{kernel.config_label(cfg)}-{str(dtype)[6:]}")


@pytest.mark.parametrize("cfg,dtype", list(_config_cases()))
@pytest.mark.parametrize("split", [1, 3])
def test_every_config_compiled(cfg, dtype, split, set_tf32):
    tf32 = cfg in kernel.TF32_CONFIGS.values()
    set_tf32(tf32)
    cfg = replace(cfg, SPLIT=split)
    M, N, K = max(1, cfg.BM - 3), 300, 700
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    values, indices = ref_prune.nm_prune_compress(torch.randn(N, K, device="cuda", dtype=dtype), 2, 4)
    b = torch.randn(N, device="cuda", dtype=dtype)
    y = kernel.nm_matmul_fwd(x, values, indices, b, 2, 4, K, config=cfg)
    dense = st.NMTensor(values, indices, (N, K), 2, 4).to_dense().double()
    tol = 1e-5 if dtype == torch.float32 and not tf32 else 1e-2
    assert rel_err(y, x.double() @ dense.t() + b.double()) < tol
    dy = torch.randn(M, N, device="cuda", dtype=dtype)
    dx = kernel.nm_matmul_bwd_dx(dy, values, indices, 2, 4, K, config=cfg)
    assert rel_err(dx, dy.double() @ dense) < tol


def test_gather_kernel_on_gpu():
    from sparse_triton.kernels import nm_prune as prune_kernel

    dense = torch.randn(4096, 4096 + 5, device="cuda", dtype=torch.bfloat16)
    for n, m in PATTERNS:
        _, indices = ref_prune.nm_prune_compress(torch.randn_like(dense), n, m)
        got = prune_kernel.nm_gather(dense, indices, n, m)
        assert torch.equal(got, ref_prune.nm_gather(dense, indices, n, m))


def test_launch_follows_the_tensors_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: checks that a launch runs on its tensors' device, not the current one")
    w_nm = st.nm_compress(torch.randn(256, 512, device="cuda:1", dtype=torch.float16), 2, 4)
    x = torch.randn(3, 512, device="cuda:1", dtype=torch.float16)
    with torch.cuda.device(0):
        y = st.nm_linear(x, w_nm)
    assert y.device == x.device
    assert rel_err(y, F.linear(x.double(), w_nm.to_dense().double())) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_prune_kernel_bit_exact_on_gpu(dtype):
    w = torch.randn(1000, 4096 + 3, device="cuda", dtype=dtype)
    w[w.abs() < 0.1] = 0
    for n, m in PATTERNS:
        values, indices = torch.ops.sparse_triton.nm_prune_compress(w, n, m)
        ref_v, ref_i = ref_prune.nm_prune_compress(w.cpu(), n, m)
        assert torch.equal(indices.cpu(), ref_i) and torch.equal(values.cpu(), ref_v)


@pytest.mark.parametrize("M", [1, 16, 256])
def test_llm_shape_matches_cublas(M):
    N, K = 4096, 4096
    w = st.nm_prune(torch.randn(N, K, device="cuda", dtype=torch.float16), 2, 4)
    w_nm = st.nm_compress(w, 2, 4, strict=True)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    ref = F.linear(x.double(), w.double())
    ours, cublas = rel_err(st.nm_linear(x, w_nm), ref), rel_err(F.linear(x, w), ref)
    assert ours <= 2 * cublas + 1e-4, (ours, cublas)


def test_cuda_graph_capture_and_no_host_sync():
    layer = st.nn.SparseLinear.from_dense(torch.nn.Linear(1024, 512), st.NMSparsity(2, 4)).cuda().half()
    static_x = torch.randn(4, 1024, device="cuda", dtype=torch.float16, requires_grad=True)
    # warm up (compiles kernels) on a side stream, as CUDA graphs require
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            layer(static_x).float().square().sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    layer.values.grad = None
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_y.float().square().sum().backward()
    for _ in range(3):
        with torch.no_grad():
            static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        eager = layer(static_x.detach())
        torch.testing.assert_close(static_y, eager, rtol=0, atol=0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(static_x.detach())
        st.nm_compress(torch.randn(256, 256, device="cuda"), 2, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert math.isfinite(static_y.float().sum().item())


def test_exact_fp32_past_decode_matches_cublas(set_tf32):
    set_tf32(False)
    w_nm = st.nm_compress(torch.randn(512, 1024, device="cuda"), 2, 4)
    for M in (1, 8, 9, 300):
        x = torch.randn(M, 1024, device="cuda")
        ref = F.linear(x.double(), w_nm.to_dense().double())
        assert rel_err(st.nm_linear(x, w_nm), ref) < 1e-6
