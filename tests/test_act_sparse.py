"""kernels/act_sparse.py and ops/act_sparse.py: the activation-sparse kernels against fp64 references (per-tensor
and per-channel thresholds, batch 1 and > 1 with different active sets, all-zero / all-active, ragged shapes,
NaN policy, N:M weights, the fused gate/up), and the op's autograd, opcheck, torch.compile and input checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from kit import assert_close

import sparse_triton as st
from sparse_triton.kernels import act_sparse as kernel
from sparse_triton.ops import _prepared
from sparse_triton.ops import act_sparse as ops
from sparse_triton.reference import act_sparse as ref

Cfg = kernel.ActSparseConfig
CONFIGS = {
    "gemv": Cfg(BM=1, BN=64, BK=32),
    "gemv-split3": Cfg(BM=1, BN=64, BK=32, SPLIT=3),
    "sum4-split2": Cfg(BM=4, BN=32, BK=16, SPLIT=2),
    "dot16-split2": Cfg(BM=16, BN=64, BK=32, SPLIT=2, USE_DOT=True),
    "interpret": kernel.INTERPRET_CONFIG,
}



def _x(M, K, dtype, device, sparsity=0.5):
    """Rows with different active sets: at threshold 0.6745 about half of each row is inactive."""
    return torch.randn(M, K, device=device).to(dtype), torch.tensor(0.6745 if sparsity else 0.0, device=device)


# (config, rows): decode, rows sharing a tile (union rule) and several row tiles, each with and without split-K.
MM_CASES = [("gemv", 1), ("gemv", 3), ("gemv-split3", 1), ("sum4-split2", 3), ("sum4-split2", 9),
            ("dot16-split2", 17), ("interpret", 1), ("interpret", 17)]


@pytest.mark.parametrize("cfg,M", MM_CASES, ids=[f"{c}-M{m}" for c, m in MM_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
def test_mm_matches_reference(cfg, dtype, M, per_channel, device):
    cfg = CONFIGS[cfg]
    if cfg.USE_DOT and dtype == torch.float32:
        pytest.skip("tensor-core configs are fp16/bf16 only (the launcher rejects them for fp32)")
    N, K = 150, 200  # ragged against every tile
    x = torch.randn(M, K, device=device).to(dtype)
    t = torch.rand(K, device=device) * 1.5 if per_channel else torch.tensor(0.6745, device=device)
    w = torch.randn(K, N, device=device).to(dtype)
    b = torch.randn(N, device=device).to(dtype)
    out = torch.full((M, N), math.nan, dtype=dtype, device=device)
    kernel.act_sparse_mm(x, w, t, b, config=cfg, out=out)
    expect = ref.act_sparse_matmul(x.double(), w.double().t(), t, b.double())
    assert_close(out, expect, K)
    active = ref.active(x, t)
    assert 0.2 < active.float().mean() < 0.8
    assert M == 1 or not torch.equal(active.all(0), active.any(0))  # rows' active sets differ


def test_skipped_rows_are_never_read(device):
    """Weight rows of channels inactive in every row hold NaN: a kernel that read them would return NaN."""
    M, N, K = 3, 96, 256
    for cfg in CONFIGS.values():
        dtype = torch.float16 if cfg.USE_DOT else torch.float32
        x, t = _x(M, K, dtype, device)
        dead = ~ref.active(x, t).any(0)
        assert dead.sum() > 10
        w = torch.randn(K, N, device=device).to(dtype)
        w[dead] = math.nan
        out = kernel.act_sparse_mm(x, w, t, config=cfg)
        expect = ref.act_sparse_matmul(x.double(), torch.where(dead[:, None], 0, w.double()).t(), t)
        assert_close(out, expect, K)


@pytest.mark.parametrize("case", ["all-zero", "all-active", "none-pass", "empty-k", "empty-m"])
def test_edge_inputs(case, device):
    M, N, K = 2, 40, 70
    w = torch.randn(K, N, device=device)
    b = torch.randn(N, device=device)
    x = torch.randn(M, K, device=device) + 3.0 * torch.sign(torch.randn(M, K, device=device))
    t = torch.tensor(0.5, device=device)
    if case == "all-zero":
        x = torch.zeros(M, K, device=device)
    elif case == "none-pass":
        t = torch.tensor(1e30, device=device)
    elif case == "empty-k":
        K, x, w = 0, x[:, :0], w[:0]
    elif case == "empty-m":
        x = x[:0]
    for cfg in (CONFIGS["gemv-split3"], CONFIGS["sum4-split2"]):
        out = kernel.act_sparse_mm(x, w, t, b, config=cfg)
        expect = F.linear(x.double() * (x.double().abs() > t.double()), w.double().t(), b.double())
        assert_close(out, expect, K)
        if case == "all-active":
            assert_close(out, F.linear(x.double(), w.double().t(), b.double()), K)
        if case in ("all-zero", "none-pass", "empty-k"):
            assert torch.equal(out, b.expand(M, N))


def test_nan_input_policy(device):
    """A NaN input is active: its row's outputs are NaN, as in ``F.linear(x * (|x| > t), W)``; other rows of the
    same tile (which read that weight row under the union rule) are unaffected."""
    M, N, K = 3, 64, 128
    x, t = _x(M, K, torch.float32, device)
    x[1, 5] = math.nan
    w = torch.randn(K, N, device=device)
    formula = F.linear(x * (x.abs() > t), w.t())
    assert formula[1].isnan().all() and not formula[[0, 2]].isnan().any()
    for cfg in (CONFIGS["gemv"], CONFIGS["sum4-split2"], kernel.INTERPRET_CONFIG):
        out = kernel.act_sparse_mm(x, w, t, config=cfg)
        assert out[1].isnan().all()
        assert_close(out[[0, 2]], ref.act_sparse_matmul(x[[0, 2]].double(), w.double().t(), t), K)
    y = st.act_sparse_linear(x, w.t(), t)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


def test_split_counters_reset_between_launches(device):
    """The last program of each tile folds the split partials and zeroes its counter: back-to-back launches of
    different shapes (sharing the counters) stay correct, and the counters end at zero."""
    cfg = Cfg(BM=1, BN=32, BK=16, SPLIT=4)
    for M, N, K in ((1, 100, 200), (2, 64, 64), (1, 100, 200), (3, 33, 130)):
        x, t = _x(M, K, torch.float32, device)
        w = torch.randn(K, N, device=device)
        assert_close(kernel.act_sparse_mm(x, w, t, config=cfg), ref.act_sparse_matmul(x.double(), w.double().t(), t), K)
    counters = kernel._tile_counters(torch.device(device), 1)
    assert counters.abs().sum().item() == 0


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 16)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("M", [1, 5])
def test_nm_mm_matches_reference(n, m, dtype, M, device):
    N, K = 130, 200  # N ragged against m and the tile
    x, _ = _x(M, K, dtype, device)
    t = torch.rand(K, device=device)
    w_t = ops.nm_input_major(torch.randn(N, K, device=device).to(dtype), n, m)
    b = torch.randn(N, device=device).to(dtype)
    cfg = Cfg(BM=1, BN=64, BK=32, SPLIT=2) if M == 1 else Cfg(BM=8, BN=32, BK=16)
    out = torch.full((M, N), math.nan, dtype=dtype, device=device)
    kernel.act_sparse_nm_mm(x, w_t.values, w_t.indices, n, m, N, t, b, config=cfg, out=out)
    expect = ref.act_sparse_nm_matmul(x.double(), w_t.to(torch.float64), t, b.double())
    assert_close(out, expect, K)
    # the layout: in every input row, each group of m consecutive outputs keeps at most n weights
    dense = w_t.to_dense()
    groups = F.pad(dense, (0, -N % m)).reshape(K, -1, m)
    assert ((groups != 0).sum(-1) <= n).all()


@pytest.mark.parametrize("act", ["silu", "relu", "relu2"])
@pytest.mark.parametrize("cfg", ["gemv-split3", "sum4-split2", "dot16-split2", "interpret"], ids=str)
def test_gate_up_matches_reference(act, cfg, device):
    cfg = CONFIGS[cfg]
    dtype = torch.float16 if cfg.USE_DOT else torch.float32
    M, F_, H = 5, 150, 200
    x, t = _x(M, H, dtype, device)
    wg = (torch.randn(H, F_, device=device) / math.sqrt(H)).to(dtype)
    wu = (torch.randn(H, F_, device=device) / math.sqrt(H)).to(dtype)
    out = torch.full((M, F_), math.nan, dtype=dtype, device=device)
    kernel.act_sparse_gate_up(x, wg, wu, t, act, config=cfg, out=out)
    xm = ref.masked(x.double(), t)
    expect = ref.activate(xm @ wg.double(), act) * (xm @ wu.double())
    assert_close(out, expect, H)


def _gap_threshold(h: torch.Tensor) -> float:
    """A threshold in the widest gap between sorted |h| values near the median: rounding differences between
    implementations cannot move an entry across it."""
    v = h.abs().flatten().sort().values
    mid = v.numel() // 2
    lo, hi = mid - v.numel() // 8, mid + v.numel() // 8
    gaps = v[lo + 1:hi] - v[lo:hi - 1]
    i = int(gaps.argmax())
    assert gaps[i] > 1e-3
    return float((v[lo + i] + v[lo + i + 1]) / 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("act", ["silu", "relu2"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
def test_fused_mlp_matches_unfused_reference(dtype, act, per_channel, device):
    M, H, F_ = 3, 128, 256
    x = torch.randn(M, H, device=device).to(dtype)
    wg, wu = ((torch.randn(F_, H, device=device) / math.sqrt(H)).to(dtype) for _ in range(2))
    wd = (torch.randn(H, F_, device=device) / math.sqrt(F_)).to(dtype)
    t_in = torch.rand(H, device=device) if per_channel else torch.tensor(0.5, device=device)
    h = ref.act_sparse_gate_up(x.double(), wg.double(), wu.double(), t_in, act)
    t_mid = torch.tensor(_gap_threshold(h), device=device)
    y = st.act_sparse_mlp(x, ops.input_major(wg), ops.input_major(wu),
                          ops.input_major(wd), t_in, t_mid, act)
    expect = ref.act_sparse_mlp(x.double(), wg.double(), wu.double(), wd.double(), t_in, t_mid, act)
    assert 0.3 < ref.active(h, t_mid).float().mean() < 0.7
    assert_close(y, expect, F_)


# ------------------------------------------------------------------------------------------------ the op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("lead", [(1,), (4,), (2, 3), (0,), (70,)], ids=lambda v: f"lead{v}")
@pytest.mark.parametrize("layout", ["input-major", "row-major"])
def test_op_matches_formula(dtype, lead, layout, device):
    N, K = 48, 96
    x = torch.randn(*lead, K, device=device).to(dtype)
    w = torch.randn(N, K, device=device).to(dtype)
    w = ops.input_major(w) if layout == "input-major" else w
    b = torch.randn(N, device=device).to(dtype)
    y = st.act_sparse_linear(x, w, 0.6, b)
    assert y.shape == (*lead, N) and y.dtype == dtype
    # the comparison is made in fp32: the formula with an fp32 threshold on the exactly upcast x
    expect = F.linear(x.double() * (x.float().abs() > 0.6), w.double(), b.double())
    assert_close(y.reshape(-1, N), expect.reshape(-1, N), K)


def test_input_major_weight_is_read_without_a_copy(device):
    w = ops.input_major(torch.randn(32, 64, device=device))
    x = torch.randn(2, 64, device=device)
    _prepared.clear_weight_cache()
    st.act_sparse_linear(x, w, 0.3)
    assert _prepared.cached_forms() == 0
    w2 = torch.randn(32, 64, device=device)  # row-major: the masked dense product, no copy made or kept
    st.act_sparse_linear(x, w2, 0.3)
    st.act_sparse_linear(x, w2, 0.3)
    assert _prepared.cached_forms() == 0
    with torch.no_grad():
        w2.mul_(2)  # an in-place update is seen
    expect = F.linear(x * (x.abs() > 0.3), w2)
    torch.testing.assert_close(st.act_sparse_linear(x, w2, 0.3), expect, rtol=1e-5, atol=1e-5)
    _prepared.clear_weight_cache()


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
def test_gradients_match_masked_dense(per_channel, device):
    N, K = 40, 96
    x = torch.randn(5, K, device=device, requires_grad=True)
    w = ops.input_major(torch.randn(N, K, device=device)).requires_grad_(True)
    b = torch.randn(N, device=device, requires_grad=True)
    t = torch.rand(K, device=device) if per_channel else torch.tensor(0.5, device=device)
    y = st.act_sparse_linear(x, w, t, b)
    dy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    x2, w2, b2 = (v.detach().double().requires_grad_(True) for v in (x, w, b))
    y2 = F.linear(x2 * (x2.abs() > t.double()), w2, b2)
    rx, rw, rb = torch.autograd.grad(y2, (x2, w2, b2), dy.double())
    for g, r in ((gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)
    assert (gx[~ref.active(x, t)] == 0).all()  # a skipped input gets no gradient
    assert gw.shape == w.shape


def test_nm_weight_op_and_gradients(device):
    N, K = 64, 96
    w = torch.randn(N, K, device=device)
    w_t = ops.nm_input_major(w, 2, 4)
    x = torch.randn(3, K, device=device, requires_grad=True)
    b = torch.randn(N, device=device, requires_grad=True)
    y = st.act_sparse_linear(x, w_t, 0.5, b)
    dense = w_t.to_dense().t()
    x2, b2 = x.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    y2 = F.linear(x2 * (x2.abs() > 0.5), dense.double(), b2)
    torch.testing.assert_close(y.double(), y2, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), dy)
    rx, rb = torch.autograd.grad(y2, (x2, b2), dy.double())
    torch.testing.assert_close(gx.double(), rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-5)


def test_no_grad_and_inference_mode(device):
    w = ops.input_major(torch.randn(32, 64, device=device, requires_grad=True))
    x = torch.randn(2, 64, device=device)
    expect = F.linear(x * (x.abs() > 0.2), w.detach())
    with torch.no_grad():
        torch.testing.assert_close(st.act_sparse_linear(x, w, 0.2), expect, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(st.act_sparse_linear(x, w.detach(), 0.2), expect, rtol=1e-5, atol=1e-5)


def test_opcheck(device):
    K, N, F_ = 64, 32, 48
    x = torch.randn(3, K, device=device)
    w = ops.input_major(torch.randn(N, K, device=device))
    t = torch.tensor(0.4, device=device)
    tc = torch.rand(K, device=device)
    b = torch.randn(N, device=device)
    torch.library.opcheck(torch.ops.sparse_triton.act_sparse_linear_fwd.default, (x, w, t, b))
    torch.library.opcheck(torch.ops.sparse_triton.act_sparse_linear_fwd.default, (x, w, tc, None))
    dy = torch.randn(3, N, device=device)
    torch.library.opcheck(torch.ops.sparse_triton.act_sparse_linear_bwd_dx.default, (dy, x, w, t))
    torch.library.opcheck(torch.ops.sparse_triton.act_sparse_linear_bwd_dw.default, (dy, x, t))
    w_t = ops.nm_input_major(torch.randn(N, K, device=device), 2, 4)
    torch.library.opcheck(torch.ops.sparse_triton.act_sparse_nm_linear_fwd.default,
                          (x, w_t.values, w_t.indices, t, b, 2, 4, N))
    wg, wu = (ops.input_major(torch.randn(F_, K, device=device)) for _ in range(2))
    wd = ops.input_major(torch.randn(K, F_, device=device))
    torch.library.opcheck(torch.ops.sparse_triton.act_sparse_mlp_fwd.default,
                          (x, wg, wu, wd, t, torch.tensor(0.1, device=device), "silu"))


def test_torch_compile_fullgraph(device):
    K, N = 64, 32
    w = ops.input_major(torch.randn(N, K, device=device)).requires_grad_(True)
    t = torch.tensor(0.4, device=device)

    def f(x, w):
        return st.act_sparse_linear(torch.relu(x) - 0.5, w, t).square().sum()

    x = torch.randn(3, K, device=device, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, w)
    gx, gw = torch.autograd.grad(out, (x, w))
    x2 = x.detach().requires_grad_(True)
    ref_out = f(x2, w)
    rx, rw = torch.autograd.grad(ref_out, (x2, w))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_input(device):
    w = torch.randn(32, 64, device=device)
    x = torch.randn(2, 64, device=device)
    f = st.act_sparse_linear
    with pytest.raises(ValueError, match="threshold must be finite and >= 0, got -0.1"):
        f(x, w, -0.1)
    with pytest.raises(ValueError, match="threshold must be finite and >= 0"):
        f(x, w, torch.tensor([0.1] * 63 + [-1.0], device=device))
    with pytest.raises(ValueError, match="threshold must be finite and >= 0"):
        f(x, w, torch.tensor(math.nan, device=device))
    with pytest.raises(ValueError, match=r"one value per input channel \(64,\), got shape \(63,\)"):
        f(x, w, torch.rand(63, device=device))
    with pytest.raises(ValueError, match="one value per input channel"):
        f(x, w, torch.rand(2, 64, device=device))
    with pytest.raises(TypeError, match="threshold must be a floating-point tensor"):
        f(x, w, torch.ones(64, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="threshold must be a float or a tensor"):
        f(x, w, "0.5")
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=60 but weight has K=64"):
        f(torch.randn(2, 60, device=device), w, 0.1)
    with pytest.raises(TypeError, match="dtype mismatch"):
        f(x.half(), w, 0.1)
    with pytest.raises(ValueError, match="device mismatch"):
        f(x.to("meta"), w, 0.1)
    with pytest.raises(ValueError, match=r"bias.shape=\(31,\), expected \(32,\)"):
        f(x, w, 0.1, torch.randn(31, device=device))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor or an NMTensor"):
        f(x, w.tolist(), 0.1)
    with pytest.raises(ValueError, match="weight must be a 2-D floating-point"):
        f(x, w[0], 0.1)
    with pytest.raises(ValueError, match="x.shape\\[-1\\]=64 but the NMTensor weight has in_features=32"):
        f(x, st.nm_compress(w, 2, 4), 0.1)  # W [N, K] grouped along K instead of W^T
    with pytest.raises(ValueError, match="NMTensor weight must be W\\^T"):
        f(x, st.nm_compress(w.t().contiguous(), 2, 4, dim=0), 0.1)
    wg = torch.randn(48, 64, device=device)
    with pytest.raises(ValueError, match="activation must be one of"):
        st.act_sparse_mlp(x, wg, wg, wg.t(), 0.1, 0.1, "gelu")
    with pytest.raises(ValueError, match="expected w_gate and w_up"):
        st.act_sparse_mlp(x, wg, wg, wg, 0.1, 0.1)
    with pytest.raises(ValueError, match=r"threshold_mid must be a scalar or have one value per input channel \(48,\)"):
        st.act_sparse_mlp(x, wg, wg, wg.t(), 0.1, torch.rand(64, device=device))
    with pytest.raises(ValueError, match="threshold_in must be finite"):
        st.act_sparse_mlp(x, wg, wg, wg.t(), -1.0, 0.1)


# ------------------------------------------------------------------------------------------------ GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 32])
def test_bf16_on_gpu(M, device):
    N, K = 512, 1024
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w = ops.input_major(torch.randn(N, K, device=device, dtype=torch.bfloat16))
    for cfg in (kernel.heuristic(M, N, K, torch.bfloat16), Cfg(BM=min(M, 8), BN=64, BK=32, SPLIT=4)):
        out = kernel.act_sparse_mm(x, w.t(), torch.tensor(0.67, device=device), config=cfg)
        expect = ref.act_sparse_matmul(x.double(), w.double(), torch.tensor(0.67, device=device))
        torch.testing.assert_close(out.double(), expect, rtol=2e-2, atol=2e-2 * math.sqrt(K))
    wg, wu = (ops.input_major(torch.randn(2048, K, device=device, dtype=torch.bfloat16) / 32) for _ in range(2))
    wd = ops.input_major(torch.randn(K, 2048, device=device, dtype=torch.bfloat16) / 45)
    y = st.act_sparse_mlp(x, wg, wu, wd, 0.67, 0.01)
    expect = ref.act_sparse_mlp(x.float(), wg.float(), wu.float(), wd.float(), torch.tensor(0.67),
                                torch.tensor(0.01), "silu")
    assert (y.float() - expect).abs().max() < 5e-2 * expect.abs().max()


@pytest.mark.gpu
def test_cuda_graph_capture(device):
    """No host sync inside the ops: both capture in a CUDA graph and replay with new inputs and thresholds."""
    K, N, F_ = 1024, 512, 2048
    x = torch.randn(1, K, device=device, dtype=torch.float16)
    w = ops.input_major(torch.randn(N, K, device=device, dtype=torch.float16))
    wg, wu = (ops.input_major(torch.randn(F_, K, device=device, dtype=torch.float16) / 32) for _ in range(2))
    wd = ops.input_major(torch.randn(K, F_, device=device, dtype=torch.float16) / 45)
    t = torch.tensor(0.5, device=device)
    tm = torch.tensor(0.01, device=device)
    st.act_sparse_linear(x, w, t)
    st.act_sparse_mlp(x, wg, wu, wd, t, tm)  # warm up (compile, tune) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = st.act_sparse_linear(x, w, t)
        z = st.act_sparse_mlp(x, wg, wu, wd, t, tm)
    for thr in (0.5, 1.0):
        x.copy_(torch.randn_like(x))
        t.fill_(thr)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, st.act_sparse_linear(x, w, thr), rtol=0, atol=0)
        torch.testing.assert_close(z, st.act_sparse_mlp(x, wg, wu, wd, thr, 0.01), rtol=0, atol=0)


def test_threshold_checked_again_after_a_change(device):
    """A tensor threshold is checked once per version: an in-place change to a negative value is caught."""
    w = torch.randn(32, 64, device=device)
    x = torch.randn(2, 64, device=device)
    t = torch.full((64,), 0.2, device=device)
    st.act_sparse_linear(x, w, t)
    t[3] = -0.5
    with pytest.raises(ValueError, match="threshold must be finite and >= 0, got -0.5"):
        st.act_sparse_linear(x, w, t)
    for _ in range(3):  # fresh tensors (their ids and addresses may be reused) are checked too
        with pytest.raises(ValueError, match="threshold must be finite and >= 0"):
            st.act_sparse_linear(x, w, torch.full((64,), -1.0, device=device))
