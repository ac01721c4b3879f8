"""Property tests over drawn shapes and N:M patterns (kernel-path m and reference-path m)."""


import hypothesis.strategies as hs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from kit import assert_close

import sparse_triton as st

# m the matmul kernels rebuild in registers, and m that only the pure-torch reference handles.
PATHS = {"kernel-m": (4, 8, 16), "reference-m": (3, 5, 6)}
FLOAT_DTYPES = [torch.float32, torch.float16]

# Per-dtype resolution against an fp64 reference of the same (already rounded) inputs.
# rtol: about two units of the output dtype's rounding (the result is rounded once).

# The device fixture only names a device; it holds no state that examples could share.
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def patterns(ms):
    return hs.sampled_from(ms).flatmap(lambda m: hs.tuples(hs.integers(1, m - 1), hs.just(m)))


def all_patterns():
    return patterns(PATHS["kernel-m"] + PATHS["reference-m"])


# Leading dims of x: none (1-D x), a token count, or a batch x tokens pair; at most 9 tokens, 0 allowed.
lead_shapes = hs.one_of(
    hs.just(()),
    hs.tuples(hs.integers(0, 9)),
    hs.tuples(hs.integers(1, 3), hs.integers(0, 3)),
)
rows = hs.integers(1, 48)
ks = hs.integers(1, 200)
seeds = hs.integers(0, 2**31 - 1)


def randn(shape, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def tie_heavy(shape, seed, dtype):
    """Small integers with many exact ties and zeros, some of them -0.0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-2, 3, shape, generator=g).to(dtype)
    neg_zero = (w == 0) & (torch.rand(shape, generator=g) < 0.5)
    return torch.where(neg_zero, torch.full_like(w, -0.0), w)


@pytest.mark.parametrize("path", list(PATHS), ids=str)
@fixture_ok
@given(nm=hs.data(), R=rows, K=ks, lead=lead_shapes, dtype=hs.sampled_from(FLOAT_DTYPES),
       bias=hs.booleans(), seed=seeds)
def test_nm_linear_matches_dense(path, nm, R, K, lead, dtype, bias, seed, device):
    n, m = nm.draw(patterns(PATHS[path]), label="n, m")
    x = randn((*lead, K), seed, dtype, device)
    w = st.nm_compress(randn((R, K), seed + 1, dtype, device), n, m)
    b = randn((R,), seed + 2, dtype, device) if bias else None
    y = st.nm_linear(x, w, b)
    assert y.shape == (*lead, R) and y.dtype == dtype
    ref = F.linear(x.double(), w.to_dense().double(), None if b is None else b.double())
    scale = float(x.abs().max()) * float(w.values.abs().max()) if x.numel() and w.values.numel() else 1.0
    assert_close(y, ref, K, scale=scale)


@pytest.mark.parametrize("path", list(PATHS), ids=str)
@fixture_ok
@given(nm=hs.data(), R=hs.integers(1, 24), K=hs.integers(1, 130), T=hs.integers(1, 9),
       dtype=hs.sampled_from(FLOAT_DTYPES), seed=seeds)
def test_nm_linear_gradients_match_dense(path, nm, R, K, T, dtype, seed, device):
    n, m = nm.draw(patterns(PATHS[path]), label="n, m")
    w = st.nm_compress(randn((R, K), seed, dtype, device), n, m)
    w.values.requires_grad_()
    x = randn((T, K), seed + 1, dtype, device).requires_grad_()
    b = randn((R,), seed + 2, dtype, device).requires_grad_()
    dy = randn((T, R), seed + 3, dtype, device)
    st.nm_linear(x, w, b).backward(dy)

    w64 = w.to_dense().detach().double().requires_grad_()
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    F.linear(x64, w64, b64).backward(dy.double())
    dy_max = float(dy.abs().max())
    assert_close(x.grad, x64.grad, R, scale=dy_max * float(w.values.detach().abs().max()))
    assert_close(w.values.grad, w.gather(w64.grad), T, scale=dy_max * float(x.detach().abs().max()))
    assert_close(b.grad, b64.grad, T, scale=dy_max)


@fixture_ok
@given(nm=all_patterns(), R=rows, K=ks, dtype=hs.sampled_from([*FLOAT_DTYPES, torch.float64]),
       dim=hs.sampled_from([-1, 0]), seed=seeds)
def test_compress_equals_prune_and_mask_counts(nm, R, K, dtype, dim, seed, device):
    n, m = nm
    shape = (R, K) if dim == -1 else (K, R)  # the grouped dim has size K either way
    w = randn(shape, seed, dtype, device)
    wc = st.nm_compress(w, n, m, dim=dim)
    assert wc.shape == w.shape and wc.dim == (dim % 2) and wc.indices.dtype == torch.int32
    assert torch.equal(wc.to_dense(), st.nm_prune(w, n, m, dim=dim))
    mask = st.nm_mask(w, n, m, dim=dim)
    assert torch.equal(wc.mask(), mask)
    # Kept per group: n, except a short tail group of fewer than n elements keeps all of them.
    G = -(-K // m)
    per_group = F.pad(mask.movedim(dim, -1).to(torch.int64), (0, G * m - K)).reshape(R, G, m).sum(-1)
    group_len = torch.full((G,), m)
    group_len[-1] = K - (G - 1) * m
    assert torch.equal(per_group.cpu(), group_len.clamp(max=n).expand(R, G))


@pytest.mark.slow  # 12 examples x two interpreted prune kernels: ~3-4 s
@fixture_ok
@given(nm=all_patterns(), R=rows, K=ks, dtype=hs.sampled_from([*FLOAT_DTYPES, torch.float64]),
       kind=hs.sampled_from(["continuous", "ties"]), seed=seeds)
def test_compress_round_trip(nm, R, K, dtype, kind, seed, device):
    n, m = nm
    w = randn((R, K), seed, dtype) if kind == "continuous" else tie_heavy((R, K), seed, dtype)
    w = w.to(device)
    a = st.nm_compress(w, n, m)
    dense = a.to_dense()
    a.validate()  # positions in range and ascending within each group
    b = st.nm_compress(dense, n, m, strict=True)
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
    assert torch.equal(b.to_dense(), dense)
    # Kernel (fp16/fp32) and reference (fp64) pick the same elements, ties included.
    if dtype != torch.float64:
        c = st.nm_compress(w.double(), n, m)
        assert torch.equal(c.indices, a.indices) and torch.equal(c.values, a.values.double())
