"""formats/nm.py: NMSparsity, masks, the packed index layout and NMTensor (pure torch)."""

import io

import pytest
import torch

import sparse_triton as st
from sparse_triton.formats.nm import index_bits, indices_per_word, pack_indices, unpack_indices

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8), (3, 8), (8, 16), (15, 16), (1, 2), (2, 3), (3, 5)]
PIDS = [f"{n}:{m}" for n, m in PATTERNS]


def brute_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Group by group in Python: n largest |w| (NaN largest), ties to the lower index."""
    rows, K = w.shape
    keep = torch.zeros(rows, K, dtype=torch.bool)
    for r in range(rows):
        for g0 in range(0, K, m):
            vals = {i: float(w[r, i]) for i in range(g0, min(g0 + m, K))}
            # NaN first, then larger magnitude first, then lower index first
            order = sorted(vals, key=lambda i: (0 if vals[i] != vals[i] else 1, -abs(vals[i]), i))
            for i in order[:n]:
                keep[r, i] = True
    return keep


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (3, 5), (15, 16)])
def test_nmsparsity(n, m):
    s = st.NMSparsity(n, m)
    assert (s.n, s.m, str(s), s.density) == (n, m, f"{n}:{m}", n / m)
    with pytest.raises(AttributeError):
        s.n = 1  # frozen


@pytest.mark.parametrize("n,m", [(0, 4), (4, 4), (5, 4), (2, 17), (-1, 2), (1, 1)])
def test_nmsparsity_rejects(n, m):
    with pytest.raises(ValueError, match="n="):
        st.NMSparsity(n, m)


def test_nmsparsity_rejects_non_int():
    with pytest.raises(TypeError, match="n must be an int"):
        st.NMSparsity(2.0, 4)
    with pytest.raises(TypeError, match="m must be an int"):
        st.NMSparsity(2, True)


@pytest.mark.parametrize("n,m", PATTERNS, ids=PIDS)
@pytest.mark.parametrize("K", [1, 7, 16, 37])
def test_nm_mask_matches_definition(n, m, K):
    w = torch.randn(5, K)
    w[0, : min(K, 6)] = 0.5  # ties
    w[1, 0] = float("nan")
    w[2, :] = -0.0
    w[3, K // 2] = float("inf")
    assert torch.equal(st.nm_mask(w, n, m), brute_mask(w, n, m))


def test_nm_mask_ties_and_nan_examples():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, float("nan"), 0.0, float("inf"), -5.0]])
    assert st.nm_mask(w, 2, 4).tolist() == [[True, True, False, False, True, False, True, False]]
    # -0.0 and 0.0 tie: lower index wins
    z = torch.tensor([[-0.0, 0.0, -0.0, 0.0]])
    assert st.nm_mask(z, 1, 4).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_nm_mask_and_prune_along_dim(dim):
    w = torch.randn(6, 10, 9)
    mask = st.nm_mask(w, 2, 4, dim=dim)
    moved = w.movedim(dim, -1).reshape(-1, w.shape[dim])
    assert torch.equal(mask.movedim(dim, -1).reshape(moved.shape), brute_mask(moved, 2, 4))
    pruned = st.nm_prune(w, 2, 4, dim=dim)
    assert torch.equal(pruned, torch.where(mask, w, torch.zeros(())))


def test_nm_prune_keeps_nan_drops_rest():
    w = torch.tensor([[float("nan"), 1.0, 2.0, 3.0]])
    p = st.nm_prune(w, 1, 4)
    assert torch.isnan(p[0, 0]) and torch.equal(p[0, 1:], torch.zeros(3))


@pytest.mark.parametrize("m", [2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("S", [0, 1, 15, 16, 17, 33])
def test_pack_unpack_round_trip(m, S):
    pos = torch.randint(0, m, (3, S))
    words = pack_indices(pos, m)
    assert words.dtype == torch.int32
    assert words.shape == (3, -(-S // indices_per_word(m)))
    assert torch.equal(unpack_indices(words, S, m), pos)
    assert 32 % index_bits(m) == 0 and (1 << index_bits(m)) >= m


def test_packed_layout_matches_docstring_picture():
    # Row | a 0 b 0 | 0 0 c d | e 0 0 f | 0 g h 0 | from the formats.nm docstring.
    a, b, c, d, e, f, g, h = range(1, 9)
    w = torch.tensor([[a, 0, b, 0, 0, 0, c, d, e, 0, 0, f, 0, g, h, 0]], dtype=torch.float32)
    wc = st.nm_compress(w, 2, 4)
    assert wc.values.tolist() == [[a, b, c, d, e, f, g, h]]
    expected = sum(p << (2 * j) for j, p in enumerate([0, 2, 2, 3, 0, 3, 1, 2]))
    assert wc.indices.tolist() == [[expected]]


def test_packed_top_bits_are_exact():
    # 4-bit positions in the top nibble: the int32 word is negative; unpacking must not sign-extend.
    pos = torch.full((1, 8), 15)
    words = pack_indices(pos, 16)
    assert words.item() == -1
    assert unpack_indices(words, 8, 16).tolist() == [[15] * 8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("n,m", PATTERNS, ids=PIDS)
@pytest.mark.parametrize("K", [5, 64, 70])
def test_compress_round_trip(n, m, K, dtype):
    w = torch.randn(9, K, dtype=dtype)
    wc = st.nm_compress(w, n, m)
    assert wc.shape == w.shape and wc.dtype == dtype and (wc.n, wc.m, wc.dim) == (n, m, 1)
    assert wc.values.shape == (9, -(-K // m) * n)
    dense = wc.to_dense()
    assert torch.equal(dense, st.nm_prune(w, n, m))
    assert torch.equal(wc.mask(), st.nm_mask(w, n, m))
    wc.validate()
    # Compressing an N:M tensor again (strict) is exact: same values, same indices.
    again = st.nm_compress(dense, n, m, strict=True)
    assert torch.equal(again.values, wc.values) and torch.equal(again.indices, wc.indices)


@pytest.mark.parametrize("dim", [0, 1, -1, 2])
def test_compress_along_other_dims(dim):
    w = torch.randn(8, 12, 6)
    wc = st.nm_compress(w, 2, 4, dim=dim)
    assert wc.dim == dim % 3
    assert torch.equal(wc.to_dense(), st.nm_prune(w, 2, 4, dim=dim))


def test_compress_negative_zero_counts_as_zero():
    w = torch.tensor([[1.0, -0.0, -0.0, 2.0, -0.0, -0.0, -0.0, -0.0]])
    wc = st.nm_compress(w, 2, 4, strict=True)  # would raise if -0.0 counted as a non-zero
    assert torch.equal(wc.to_dense(), w)


def test_compress_strict_rejects_non_nm():
    w = torch.ones(2, 8)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        st.nm_compress(w, 2, 4, strict=True)
    w = st.nm_prune(torch.randn(4, 8), 2, 4)
    w[3, 5] = float("nan") if w[3, 5] == 0 else w[3, 5]
    w[3, 4:8] = torch.tensor([1.0, float("nan"), 2.0, 0.0])  # NaN counts as a non-zero
    with pytest.raises(ValueError, match="a group has 3 non-zeros"):
        st.nm_compress(w, 2, 4, strict=True)


def test_compress_empty():
    for shape in [(0, 16), (4, 0)]:
        wc = st.nm_compress(torch.randn(shape), 2, 4)
        assert wc.to_dense().shape == shape


def test_to_dense_is_differentiable_in_values():
    wc = st.nm_compress(torch.randn(4, 8), 2, 4)
    v = wc.values.clone().requires_grad_(True)
    d = st.NMTensor(v, wc.indices, wc.shape, 2, 4).to_dense()
    (d * torch.arange(32.0).reshape(4, 8)).sum().backward()
    assert torch.equal(v.grad, wc.gather(torch.arange(32.0).reshape(4, 8)))


def test_nmtensor_to_and_pickle():
    wc = st.nm_compress(torch.randn(6, 20), 2, 8)
    half = wc.to(torch.float16)
    assert half.dtype == torch.float16 and half.indices.dtype == torch.int32
    assert torch.equal(half.to_dense(), wc.to_dense().half())
    buf = io.BytesIO()
    torch.save(wc, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert torch.equal(back.to_dense(), wc.to_dense()) and back.shape == wc.shape
    assert "2:8" in repr(wc)
    with pytest.raises(TypeError, match="floating point"):
        wc.to(torch.int32)


def test_nmtensor_rejects_inconsistent_parts():
    wc = st.nm_compress(torch.randn(6, 20), 2, 4)
    with pytest.raises(ValueError, match="values.shape"):
        st.NMTensor(wc.values[:, :-1], wc.indices, wc.shape, 2, 4)
    with pytest.raises(ValueError, match="indices.shape"):
        st.NMTensor(wc.values, wc.indices[:5], wc.shape, 2, 4)
    with pytest.raises(TypeError, match="int32"):
        st.NMTensor(wc.values, wc.indices.long(), wc.shape, 2, 4)
    with pytest.raises(ValueError, match="values.shape"):
        st.NMTensor(wc.values, wc.indices, (6, 40), 2, 4)
    with pytest.raises(ValueError, match="dim=2"):
        st.NMTensor(wc.values, wc.indices, wc.shape, 2, 4, dim=2)


def test_validate_catches_bad_positions():
    wc = st.nm_compress(torch.randn(2, 8), 2, 4)
    bad = pack_indices(torch.tensor([[1, 1, 0, 2], [0, 1, 2, 3]]), 4)  # group 0 of row 0 repeats 1
    with pytest.raises(ValueError, match="ascending"):
        st.NMTensor(wc.values, bad, wc.shape, 2, 4).validate()
    bad = pack_indices(torch.tensor([[0, 7]]), 8)
    with pytest.raises(ValueError, match=">= m=6"):
        st.NMTensor(torch.zeros(1, 2), bad, (1, 6), 2, 6).validate()
