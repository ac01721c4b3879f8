"""kernels/nm_matmul.py vs its reference twin (fp64), for every config, pattern and dtype."""

from dataclasses import replace

import pytest
import torch
from kit import assert_close

from sparse_triton.kernels import nm_matmul as kernel
from sparse_triton.reference import nm_matmul as reference
from sparse_triton.reference import nm_prune as ref_prune

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (3, 8), (8, 16), (1, 2)]
CONFIGS = [*kernel.CONFIGS, kernel.INTERPRET_CONFIG]
SPLIT_CONFIGS = [replace(kernel.GEMV_CONFIGS[2], SPLIT=3), replace(kernel.DOT_CONFIGS[16], SPLIT=3)]
SHAPES = [(1, 40, 100), (5, 64, 64), (33, 70, 300), (3, 17, 7)]


def cfg_id(c):
    return f"{kernel.config_label(c)}-split{c.SPLIT}"



def make(M, N, K, n, m, dtype, device, bias=True):
    w = torch.randn(N, K, dtype=dtype)
    values, indices = ref_prune.nm_prune_compress(w, n, m)
    x = torch.randn(M, K, dtype=dtype)
    b = torch.randn(N, dtype=dtype) if bias else None
    to = lambda t: None if t is None else t.to(device)
    return to(x), to(values), to(indices), to(b)


def cases():
    for cfg in CONFIGS + SPLIT_CONFIGS:
        for M, N, K in SHAPES:
            if cfg.USE_DOT or M <= 2 * cfg.BM:  # broadcast-sum configs are for tiny M only
                yield pytest.param(cfg, M, N, K, 2, 4, id=f"{cfg_id(cfg)}-{M}x{N}x{K}-2:4")
    for cfg in (kernel.GEMV_CONFIGS[1], kernel.DOT_CONFIGS[256]):
        for n, m in PATTERNS[1:]:
            for M, N, K in SHAPES[:2]:
                if cfg.USE_DOT or M <= 2 * cfg.BM:
                        yield pytest.param(cfg, M, N, K, n, m, id=f"{cfg_id(cfg)}-{M}x{N}x{K}-{n}:{m}")


def skip_ieee_dot(cfg, dtype, device):
    if device == "cuda" and dtype == torch.float32 and cfg.USE_DOT:
        pytest.skip("an exact-fp32 tl.dot is never launched on a GPU (exact fp32 runs the broadcast-sum "
                    "configs or cuBLAS); it compiles to spill-heavy code, and test_gpu covers TF32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("cfg,M,N,K,n,m", list(cases()))
def test_fwd_matches_reference(cfg, M, N, K, n, m, dtype, device):
    skip_ieee_dot(cfg, dtype, device)
    x, values, indices, b = make(M, N, K, n, m, dtype, device, bias=(M % 2 == 1))
    out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
    y = kernel.nm_matmul_fwd(x, values, indices, b, n, m, K, config=cfg, out=out)
    assert y.data_ptr() == out.data_ptr()
    ref = reference.nm_matmul_fwd(x.double().cpu(), values.double().cpu(), indices.cpu(),
                                  None if b is None else b.double().cpu(), n, m, K)
    assert_close(y, ref, K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("cfg,M,N,K,n,m", list(cases()))
def test_bwd_dx_matches_reference(cfg, M, N, K, n, m, dtype, device):
    skip_ieee_dot(cfg, dtype, device)
    _, values, indices, _ = make(M, N, K, n, m, dtype, device)
    dy = torch.randn(M, N, dtype=dtype, device=device)
    out = torch.full((M, K), float("nan"), dtype=dtype, device=device)
    dx = kernel.nm_matmul_bwd_dx(dy, values, indices, n, m, K, config=cfg, out=out)
    ref = reference.nm_matmul_bwd_dx(dy.double().cpu(), values.double().cpu(), indices.cpu(), n, m, K)
    assert_close(dx, ref, N)


@pytest.mark.parametrize("M,N,K", [(0, 16, 32), (4, 0, 32), (4, 16, 0)])
def test_empty_dims(M, N, K, device):
    x, values, indices, b = make(M, N, K, 2, 4, torch.float32, device)
    y = kernel.nm_matmul_fwd(x, values, indices, b, 2, 4, K)
    assert y.shape == (M, N)
    if K == 0:
        torch.testing.assert_close(y, b.expand(M, N))
    dx = kernel.nm_matmul_bwd_dx(torch.randn(M, N, device=device), values, indices, 2, 4, K)
    assert dx.shape == (M, K)
    if N == 0:
        assert torch.equal(dx, torch.zeros(M, K, device=device))


def test_strided_inputs(device):
    M, N, K = 9, 48, 96
    _, values, indices, b = make(M, N, K, 2, 4, torch.float32, device)
    xt = torch.randn(K, M, device=device).t()  # column-major x
    y = kernel.nm_matmul_fwd(xt, values, indices, b, 2, 4, K)
    ref = reference.nm_matmul_fwd(xt.double().cpu(), values.double().cpu(), indices.cpu(), b.double().cpu(), 2, 4, K)
    assert_close(y, ref, K)
    dyt = torch.randn(N, M, device=device).t()
    dx = kernel.nm_matmul_bwd_dx(dyt, values, indices, 2, 4, K)
    assert_close(dx, reference.nm_matmul_bwd_dx(dyt.double().cpu(), values.double().cpu(), indices.cpu(), 2, 4, K), N)


def test_nan_in_weight_stays_in_its_column(device):
    M, N, K = 3, 32, 64
    x, values, indices, _ = make(M, N, K, 2, 4, torch.float32, device, bias=False)
    values[5, 0] = float("nan")
    y = kernel.nm_matmul_fwd(x, values, indices, None, 2, 4, K)
    assert y[:, 5].isnan().all() and not y[:, torch.arange(N) != 5].isnan().any()


def test_launcher_rejections(device):
    x, values, indices, b = make(4, 16, 32, 2, 4, torch.float32, device)
    with pytest.raises(TypeError, match="dtype mismatch"):
        kernel.nm_matmul_fwd(x.half(), values, indices, b, 2, 4, 32)
    with pytest.raises(TypeError, match="float64"):
        kernel.nm_matmul_fwd(x.double(), values.double(), indices, None, 2, 4, 32)
    with pytest.raises(ValueError, match="out must be"):
        kernel.nm_matmul_fwd(x, values, indices, b, 2, 4, 32, out=torch.empty(4, 15, device=device))
    with pytest.raises(ValueError, match="not a multiple of m"):
        kernel.nm_matmul_fwd(x, values, indices, b, 2, 4, 32, config=kernel.NMMatmulConfig(16, 16, 18))


def test_pick_split():
    assert kernel._pick_split(out_tiles=1000, red_tiles=64, sms=132) == 1
    s = kernel._pick_split(out_tiles=32, red_tiles=64, sms=132)
    assert 1 < s <= 16 and 32 * s <= 4 * 132 * 2
    assert kernel._pick_split(out_tiles=1, red_tiles=2, sms=132) == 1  # nothing to split
    assert kernel._pick_split(out_tiles=1, red_tiles=1000, sms=132, max_split=2) == 2


@pytest.fixture
def h100(monkeypatch):
    """The CUDA branch of the heuristic with an H100's 132 SMs, on any machine."""
    monkeypatch.setattr(kernel, "_sm_count", lambda index: 132)
    kernel.heuristic_config.cache_clear()
    yield
    kernel.heuristic_config.cache_clear()


@pytest.mark.parametrize("M", [1, 2, 3, 4, 8, 9, 16, 17, 32, 64, 256, 257, 4096])
@pytest.mark.parametrize("dtype,precision", [(torch.float16, "tf32"), (torch.bfloat16, "tf32"),
                                             (torch.float32, "tf32"), (torch.float32, "ieee")], ids=str)
def test_heuristic_picks_listed_configs(M, dtype, precision, h100):
    for for_dx in (False, True):
        cfg = kernel.heuristic_config(M, 4096, 4096, dtype, precision, 0, for_dx, 4096 * 2048 * 2)
        assert replace(cfg, SPLIT=1) in kernel.CONFIGS
        assert cfg.BM >= min(M, 8) or cfg.USE_DOT
        assert cfg.USE_DOT == (M > 8 and precision == "tf32")  # exact fp32 never uses an ieee tl.dot


@pytest.mark.parametrize("N,K", [(4096, 4096), (1024, 4096), (4096, 14336), (14336, 4096)])
def test_decode_grid_fills_the_gpu(N, K, h100):
    # M = 1: enough programs for the 132 SMs, counted with each kernel's own output tiling.
    for for_dx, out_cols, red in ((False, N, K), (True, K, N)):
        cfg = kernel.heuristic_config(1, out_cols, red, torch.float16, "tf32", 0, for_dx, N * K)
        out_tile, red_tile = (cfg.BK, cfg.BN) if for_dx else (cfg.BN, cfg.BK)
        programs = -(-out_cols // out_tile) * cfg.SPLIT
        assert programs >= 2 * 132 or cfg.SPLIT == 16, (for_dx, cfg, programs)
        assert -(-red // red_tile) >= 2 * cfg.SPLIT  # every split has work


def test_split_workspace_is_capped(h100):
    # M = 64 on 4096 x 4096 2:4 fp16: the fp32 workspace stays under a quarter of the weight bytes.
    weight_bytes = 4096 * 2048 * 2 + 4096 * 128 * 4
    cfg = kernel.heuristic_config(64, 4096, 4096, torch.float16, "tf32", 0, False, weight_bytes)
    assert cfg.SPLIT * 64 * 4096 * 4 <= weight_bytes // 4


def test_interpreter_uses_one_config():
    x = torch.empty(5, 64)
    v, i = torch.empty(32, 32), torch.empty(32, 2, dtype=torch.int32)
    assert kernel._config(5, 32, 64, x, v, i, for_dx=False) == kernel.INTERPRET_CONFIG
    assert kernel._config(4096, 32, 64, x, v, i, for_dx=True) == kernel.INTERPRET_CONFIG


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n,m", PATTERNS, ids=lambda v: str(v))
@pytest.mark.parametrize("N,K", [(1, 1), (40, 100), (70, 300)], ids=lambda v: str(v))
def test_decompress_matches_reference(N, K, n, m, dtype, device):
    _, values, indices, _ = make(1, N, K, n, m, dtype, device)
    out = torch.full((N, K), float("nan"), dtype=dtype, device=device)
    w = kernel.nm_decompress(values, indices, n, m, K, out=out)
    assert w.data_ptr() == out.data_ptr()
    assert torch.equal(w.cpu(), reference.nm_decompress(values.cpu(), indices.cpu(), n, m, K))


def test_split_range_is_balanced():
    # 9 tiles over 4 splits: 2, 2, 2, 3 (never 3, 3, 3, 0).
    sizes = [(i + 1) * 9 // 4 - i * 9 // 4 for i in range(4)]
    assert sorted(sizes) == [2, 2, 2, 3] and sum(sizes) == 9
    x, values, indices, _ = make(1, 40, 9 * 32, 2, 4, torch.float32, "cpu")
    cfg = kernel.NMMatmulConfig(BM=1, BN=16, BK=32, USE_DOT=False, SPLIT=4)
    y = kernel.nm_matmul_fwd(x, values, indices, None, 2, 4, 9 * 32, config=cfg)
    ref = reference.nm_matmul_fwd(x.double(), values.double(), indices, None, 2, 4, 9 * 32)
    assert_close(y, ref, 9 * 32)
