"""kernels/nm_prune.py vs its reference twin: bit-exact values and packed indices."""

import pytest
import torch

from sparse_triton.kernels import nm_prune as kernel
from sparse_triton.reference import nm_prune as reference

PATTERNS = [(2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (3, 8), (8, 16), (15, 16), (1, 2), (2, 3), (3, 5), (6, 7)]
PIDS = [f"{n}:{m}" for n, m in PATTERNS]
DTYPES = [torch.float32, torch.float16]


def _weight(R, K, dtype, device):
    w = torch.randn(R, K, dtype=torch.float32)
    w[w.abs() < 0.25] = 0.0  # zeros and exact ties
    if R > 3 and K > 4:
        w[1, :3] = float("nan")
        w[2, :] = 0.5
        w[3, ::2] = -0.0
        w[0, K - 1] = float("inf")
    return w.to(dtype=dtype, device=device)


def _nan_out(R, K, n, m, dtype, device):
    ref_v, ref_i = reference.nm_prune_compress(torch.zeros(R, K), n, m)
    values = torch.full(ref_v.shape, float("nan"), dtype=dtype, device=device)
    indices = torch.full(ref_i.shape, 0x5A5A5A5A, dtype=torch.int32, device=device)
    return values, indices


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", PATTERNS, ids=PIDS)
@pytest.mark.parametrize("R,K", [(1, 1), (5, 17), (33, 100), (16, 256)], ids=lambda v: str(v))
def test_prune_kernel_matches_reference(R, K, n, m, dtype, device):
    w = _weight(R, K, dtype, device)
    out = _nan_out(R, K, n, m, dtype, device)
    values, indices = kernel.nm_prune_compress(w, n, m, out=out)
    ref_v, ref_i = reference.nm_prune_compress(w.cpu(), n, m)
    assert values.data_ptr() == out[0].data_ptr()
    assert torch.equal(indices.cpu(), ref_i)
    assert torch.equal(values.cpu().isnan(), ref_v.isnan())  # NaN only where the weight had NaN
    assert torch.equal(values.cpu().nan_to_num(), ref_v.nan_to_num())


def test_prune_kernel_strided_input(device):
    w = _weight(40, 64, torch.float32, device)
    wt = w.t()  # non-contiguous [64, 40]
    values, indices = kernel.nm_prune_compress(wt, 2, 4)
    ref_v, ref_i = reference.nm_prune_compress(wt.contiguous().cpu(), 2, 4)
    assert torch.equal(indices.cpu(), ref_i)
    assert torch.equal(values.cpu().nan_to_num(), ref_v.nan_to_num())


@pytest.mark.parametrize("R,K", [(0, 16), (4, 0)])
def test_prune_kernel_empty(R, K, device):
    values, indices = kernel.nm_prune_compress(torch.randn(R, K, device=device), 2, 4)
    assert values.shape == (R, 0 if K == 0 else 8) and indices.shape[0] == R


def test_prune_kernel_rejects_bad_out_and_dtype(device):
    w = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="out values"):
        kernel.nm_prune_compress(w, 2, 4, out=(torch.empty(4, 3, device=device),
                                               torch.empty(4, 1, dtype=torch.int32, device=device)))
    with pytest.raises(TypeError, match="float64"):
        kernel.nm_prune_compress(w.double(), 2, 4)


@pytest.mark.parametrize("n,m", [(2, 4), (8, 16)])
def test_heuristic_config_is_power_of_two(n, m):
    br = kernel.heuristic_config(n, m).BR
    assert br >= 1 and br & (br - 1) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", PATTERNS, ids=PIDS)
@pytest.mark.parametrize("R,K", [(1, 1), (5, 17), (33, 300)], ids=lambda v: str(v))
def test_gather_kernel_matches_reference(R, K, n, m, dtype, device):
    _, indices = reference.nm_prune_compress(torch.randn(R, K), n, m)
    dense = torch.randn(R, K, dtype=dtype)
    out = torch.full((R, -(-K // m) * n), float("nan"), dtype=dtype, device=device)
    got = kernel.nm_gather(dense.to(device), indices.to(device), n, m, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got.cpu(), reference.nm_gather(dense, indices, n, m))


def test_gather_kernel_strided_and_empty(device):
    dense = torch.randn(64, 40, device=device).t()  # [40, 64], column-major
    _, indices = reference.nm_prune_compress(torch.randn(40, 64), 2, 8)
    got = kernel.nm_gather(dense, indices.to(device), 2, 8)
    assert torch.equal(got.cpu(), reference.nm_gather(dense.cpu(), indices, 2, 8))
    assert kernel.nm_gather(torch.randn(0, 16, device=device), indices[:0].to(device), 2, 8).shape == (0, 4)


@pytest.mark.parametrize("n,m", [(2, 4), (2, 8), (8, 16), (1, 2)], ids=lambda v: str(v))
@pytest.mark.parametrize("BR,BG", [(16, 32), (4, 32)], ids=lambda v: str(v))
def test_groups_kernel_gpu_tiles(BR, BG, n, m, device):
    # The GPU's tile sizes (the interpreter's default tiles are larger), over several ragged tiles.
    w = _weight(37, 300, torch.float32, device)
    cfg = kernel.NMPruneConfig(BR=BR, BG=BG, GROUPS=True)
    values, indices = kernel.nm_prune_compress(w, n, m, config=cfg)
    ref_v, ref_i = reference.nm_prune_compress(w.cpu(), n, m)
    assert torch.equal(indices.cpu(), ref_i)
    assert torch.equal(values.cpu().nan_to_num(), ref_v.nan_to_num())
