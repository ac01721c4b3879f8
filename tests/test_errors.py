"""Every public entry point rejects bad input with a ValueError/TypeError that names the argument;
NaN policy; non-contiguous inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_triton as st
from sparse_triton.nn import SparseLinear

NAN = float("nan")

# ------------------------------------------------------------------------------------------------
# NMSparsity

BAD_NM = {
    "n=0": ((0, 4), ValueError, r"n=0"),
    "n=m": ((4, 4), ValueError, r"n=4, m=4"),
    "n>m": ((5, 4), ValueError, r"n=5, m=4"),
    "m=17": ((2, 17), ValueError, r"m=17"),
    "n<0": ((-1, 4), ValueError, r"n=-1"),
    "n-float": ((2.0, 4), TypeError, r"\bn must be an int"),
    "m-float": ((2, 4.0), TypeError, r"\bm must be an int"),
    "m-str": ((2, "4"), TypeError, r"\bm must be an int"),
    "n-bool": ((True, 4), TypeError, r"\bn must be an int"),
}


@pytest.mark.parametrize("case", list(BAD_NM), ids=str)
def test_nmsparsity_rejects(case):
    (n, m), exc, msg = BAD_NM[case]
    with pytest.raises(exc, match=rf"^NMSparsity: .*{msg}"):
        st.NMSparsity(n, m)


def test_nmsparsity_accepts_full_range():
    for m in range(2, 17):
        for n in range(1, m):
            assert str(st.NMSparsity(n, m)) == f"{n}:{m}"


# ------------------------------------------------------------------------------------------------
# nm_mask / nm_prune / nm_compress

PRUNERS = {"nm_mask": st.nm_mask, "nm_prune": st.nm_prune, "nm_compress": st.nm_compress}

BAD_PRUNE = {
    "dim=2": (lambda: (torch.randn(4, 8), 2, 4, {"dim": 2}), ValueError, r"dim=2"),
    "dim=-3": (lambda: (torch.randn(4, 8), 2, 4, {"dim": -3}), ValueError, r"dim=-3"),
    "dim-float": (lambda: (torch.randn(4, 8), 2, 4, {"dim": 1.0}), TypeError, r"dim must be an int"),
    "w-int": (lambda: (torch.ones(4, 8, dtype=torch.int32), 2, 4, {}), TypeError, r"\bw must be a floating"),
    "w-bool": (lambda: (torch.ones(4, 8, dtype=torch.bool), 2, 4, {}), TypeError, r"\bw must be a floating"),
    "w-list": (lambda: ([[1.0, 2.0, 3.0, 4.0]], 2, 4, {}), TypeError, r"\bw must be a torch.Tensor"),
    "w-0dim": (lambda: (torch.tensor(1.0), 2, 4, {}), ValueError, r"0-dim"),
    "n=m": (lambda: (torch.randn(4, 8), 4, 4, {}), ValueError, r"n=4, m=4"),
    "n=0": (lambda: (torch.randn(4, 8), 0, 4, {}), ValueError, r"n=0"),
    "m=17": (lambda: (torch.randn(4, 8), 2, 17, {}), ValueError, r"m=17"),
    "n-float": (lambda: (torch.randn(4, 8), 2.0, 4, {}), TypeError, r"\bn must be an int"),
}


@pytest.mark.parametrize("case", list(BAD_PRUNE), ids=str)
@pytest.mark.parametrize("fn", list(PRUNERS), ids=str)
def test_prune_functions_reject(fn, case):
    make, exc, msg = BAD_PRUNE[case]
    w, n, m, kw = make()
    with pytest.raises(exc, match=msg):
        PRUNERS[fn](w, n, m, **kw)


@pytest.mark.parametrize("case", ["dim=2", "w-int", "n=m"], ids=str)
@pytest.mark.parametrize("fn", list(PRUNERS), ids=str)
def test_prune_function_errors_name_the_called_function(fn, case):
    # Convention (STYLE.md): the message starts with the entry point the user called.
    make, exc, msg = BAD_PRUNE[case]
    w, n, m, kw = make()
    with pytest.raises(exc, match=rf"^{fn}: .*{msg}"):
        PRUNERS[fn](w, n, m, **kw)


def test_compress_strict_rejects_non_nm_weight():
    w = torch.tensor([[1.0, 2.0, 3.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"not 2:4 sparse.*3 non-zeros") as info:
        st.nm_compress(w, 2, 4, strict=True)
    assert "strict" in str(info.value)
    # Along dim 0 the message names that dim.
    with pytest.raises(ValueError, match=r"not 2:4 sparse along dim 0"):
        st.nm_compress(w.t().contiguous(), 2, 4, dim=0, strict=True)


def test_compress_strict_counts_negative_zero_as_zero():
    w = torch.tensor([[1.0, -0.0, 2.0, -0.0, -0.0, -0.0, -0.0, 3.0]])
    wc = st.nm_compress(w, 2, 4, strict=True)
    assert torch.equal(wc.to_dense(), w)


def test_compress_strict_counts_nan_as_non_zero():
    w = torch.tensor([[1.0, NAN, 2.0, 0.0]])
    with pytest.raises(ValueError, match=r"3 non-zeros"):
        st.nm_compress(w, 2, 4, strict=True)


# ------------------------------------------------------------------------------------------------
# nm_linear


def _w(N=8, K=16, dtype=torch.float32, device="cpu"):
    return st.nm_compress(torch.randn(N, K, dtype=dtype, device=device), 2, 4)


BAD_LINEAR = {
    "x-K": (lambda w: (torch.randn(3, 20), w, None), ValueError, r"x\.shape\[-1\]=20 but weight has K=16"),
    "x-dtype": (lambda w: (torch.randn(3, 16, dtype=torch.float16), w, None), TypeError,
                r"dtype mismatch, x is torch.float16 but the weight is torch.float32"),
    "x-device": (lambda w: (torch.randn(3, 16, device="meta"), w, None), ValueError,
                 r"device mismatch, x is on meta but the weight is on cpu"),
    "x-int": (lambda w: (torch.ones(3, 16, dtype=torch.int64), w, None), TypeError, r"\bx must be a floating"),
    "x-list": (lambda w: ([[0.0] * 16], w, None), TypeError, r"\bx must be a torch.Tensor"),
    "x-0dim": (lambda w: (torch.tensor(1.0), w, None), ValueError, r"\bx must have at least 1 dim"),
    "w-dense": (lambda w: (torch.randn(3, 16), w.to_dense(), None), TypeError, r"w_nm must be an NMTensor"),
    "w-dim0": (lambda w: (torch.randn(3, 8), st.nm_compress(torch.randn(8, 16), 2, 4, dim=0), None), ValueError,
               r"w_nm must be .*grouped along dim 0"),
    "w-3d": (lambda w: (torch.randn(3, 16), st.nm_compress(torch.randn(2, 8, 16), 2, 4), None), ValueError,
             r"w_nm must be a 2-D"),
    "bias-shape": (lambda w: (torch.randn(3, 16), w, torch.randn(9)), ValueError,
                   r"bias\.shape=\(9,\), expected \(8,\)"),
    "bias-2d": (lambda w: (torch.randn(3, 16), w, torch.randn(1, 8)), ValueError, r"bias\.shape=\(1, 8\)"),
    "bias-dtype": (lambda w: (torch.randn(3, 16), w, torch.randn(8, dtype=torch.float64)), TypeError,
                   r"dtype mismatch, bias is torch.float64"),
    "bias-device": (lambda w: (torch.randn(3, 16), w, torch.randn(8, device="meta")), ValueError,
                    r"device mismatch, bias is on meta"),
    "bias-list": (lambda w: (torch.randn(3, 16), w, [0.0] * 8), TypeError, r"bias must be a torch.Tensor or None"),
}


@pytest.mark.parametrize("case", list(BAD_LINEAR), ids=str)
def test_nm_linear_rejects(case):
    make, exc, msg = BAD_LINEAR[case]
    x, w, b = make(_w())
    with pytest.raises(exc, match=rf"nm_linear: {msg}"):
        st.nm_linear(x, w, b)


def test_nm_linear_weight_on_meta_is_a_clear_error():
    # The other direction of the device mismatch: a meta weight with a CPU input.
    w = _w().to("meta")
    with pytest.raises(ValueError, match=r"nm_linear: device mismatch, x is on cpu but the weight is on meta"):
        st.nm_linear(torch.randn(3, 16), w)


BAD_SPARSE_LINEAR = {
    "input-K": (lambda: torch.randn(3, 20), ValueError, r"SparseLinear: input\.shape\[-1\]=20"),
    "input-dtype": (lambda: torch.randn(3, 16, dtype=torch.float16), TypeError, r"SparseLinear: dtype mismatch"),
    "input-int": (lambda: torch.ones(3, 16, dtype=torch.int32), TypeError, r"SparseLinear: input must be a floating"),
    "input-meta": (lambda: torch.randn(3, 16, device="meta"), ValueError, r"SparseLinear: device mismatch"),
}


@pytest.mark.parametrize("case", list(BAD_SPARSE_LINEAR), ids=str)
def test_sparse_linear_forward_rejects(case):
    make, exc, msg = BAD_SPARSE_LINEAR[case]
    sp = SparseLinear(16, 8)
    with pytest.raises(exc, match=msg):
        sp(make())


BAD_SPARSE_LINEAR_INIT = {
    "in_features-neg": (lambda: SparseLinear(-1, 8), r"in_features"),
    "in_features-float": (lambda: SparseLinear(16.0, 8), r"in_features"),
    "out_features-str": (lambda: SparseLinear(16, "8"), r"out_features"),
    "sparsity-tuple": (lambda: SparseLinear(16, 8, sparsity=(2, 4)), r"sparsity must be an NMSparsity"),
    "from_dense-conv": (lambda: SparseLinear.from_dense(nn.Conv1d(4, 4, 1)), r"expected an nn.Linear"),
    "from_dense-sparsity": (lambda: SparseLinear.from_dense(nn.Linear(16, 8), "2:4"),
                            r"sparsity must be an NMSparsity"),
}


@pytest.mark.parametrize("case", list(BAD_SPARSE_LINEAR_INIT), ids=str)
def test_sparse_linear_construction_rejects(case):
    make, msg = BAD_SPARSE_LINEAR_INIT[case]
    with pytest.raises((ValueError, TypeError), match=rf"SparseLinear.*{msg}"):
        make()


# ------------------------------------------------------------------------------------------------
# NMTensor


def _parts():
    wc = st.nm_compress(torch.randn(8, 64), 2, 4)
    return wc.values, wc.indices  # [8, 32] values, [8, 2] int32 words


BAD_NMTENSOR = {
    "values-cols": (lambda v, i: (v[:, :-1], i, (8, 64)), ValueError, r"values\.shape=\(8, 31\)"),
    "values-rows": (lambda v, i: (v[:-1], i, (8, 64)), ValueError, r"values\.shape=\(7, 32\)"),
    "indices-cols": (lambda v, i: (v, i[:, :1], (8, 64)), ValueError, r"indices\.shape=\(8, 1\)"),
    "indices-rows": (lambda v, i: (v, i[:-1], (8, 64)), ValueError, r"indices\.shape=\(7, 2\)"),
    "shape-K": (lambda v, i: (v, i, (8, 128)), ValueError, r"values\.shape=\(8, 32\) does not match dense shape"),
    "indices-int64": (lambda v, i: (v, i.to(torch.int64), (8, 64)), TypeError, r"indices must be int32"),
    "indices-uint8": (lambda v, i: (v, i.to(torch.uint8), (8, 64)), TypeError, r"indices must be int32"),
    "values-int": (lambda v, i: (v.to(torch.int32), i, (8, 64)), TypeError, r"values must be a floating"),
    "indices-device": (lambda v, i: (v, i.to("meta"), (8, 64)), ValueError,
                       r"values are on cpu but indices are on meta"),
}


@pytest.mark.parametrize("case", list(BAD_NMTENSOR), ids=str)
def test_nmtensor_rejects_inconsistent_parts(case):
    make, exc, msg = BAD_NMTENSOR[case]
    values, indices, shape = make(*_parts())
    with pytest.raises(exc, match=rf"NMTensor: {msg}"):
        st.NMTensor(values, indices, shape, 2, 4)


def test_nmtensor_rejects_bad_pattern_and_dim():
    v, i = _parts()
    with pytest.raises(ValueError, match=r"NMTensor: expected 1 <= n < m"):
        st.NMTensor(v, i, (8, 64), 4, 4)
    with pytest.raises(ValueError, match=r"NMTensor: dim=2"):
        st.NMTensor(v, i, (8, 64), 2, 4, dim=2)


def test_nmtensor_to_integer_dtype_rejected():
    with pytest.raises(TypeError, match=r"NMTensor.to: values must stay floating point"):
        _w().to(torch.int32)


def test_nmtensor_gather_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"NMTensor.gather: dense.shape=\(8, 15\)"):
        _w().gather(torch.randn(8, 15))


# ------------------------------------------------------------------------------------------------
# NaN policy: NaN counts as the largest magnitude, is kept, and propagates.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["+nan", "-nan"])
def test_nan_is_kept_by_mask_and_compress(sign, dtype, device):
    w = torch.tensor([[1.0, 5.0, float("inf"), -float("inf"), 0.5, 0.25, 2.0, 3.0]], dtype=dtype, device=device)
    w[0, 1] = sign * torch.tensor(NAN, dtype=dtype)  # beats +-inf
    w[0, 5] = sign * torch.tensor(NAN, dtype=dtype)  # beats 0.5, 2.0, 3.0
    expect_1 = torch.tensor([[False, True, False, False, False, True, False, False]], device=device)
    expect_2 = torch.tensor([[False, True, True, False, False, True, False, True]], device=device)
    assert torch.equal(st.nm_mask(w, 1, 4), expect_1)
    assert torch.equal(st.nm_mask(w, 2, 4), expect_2)  # inf beats -inf at a higher position (tie)
    for n, expect in ((1, expect_1), (2, expect_2)):
        wc = st.nm_compress(w, n, 4)
        assert torch.equal(wc.mask(), expect)
        dense = wc.to_dense()
        assert torch.equal(dense.isnan(), w.isnan())
        assert torch.equal(dense.nan_to_num(), torch.where(expect, w, 0.0).nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (2, 8), (2, 3)], ids=["2:4", "2:8", "2:3"])
def test_nan_weight_propagates_through_nm_linear(n, m, dtype, device):
    w = torch.randn(8, 40, dtype=dtype, device=device)
    w[3, 5] = NAN
    wc = st.nm_compress(w, n, m)
    x = torch.randn(4, 40, dtype=dtype, device=device)
    y = st.nm_linear(x, wc)
    # Output column 3 (weight row 3) is NaN for every token; nothing else is.
    expect = torch.zeros(4, 8, dtype=torch.bool, device=device)
    expect[:, 3] = True
    assert torch.equal(y.isnan(), expect)
    ref = F.linear(x.double(), wc.to_dense().double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-3, atol=1e-3, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# Non-contiguous inputs give the same result as their contiguous copies.


def _views(device):
    base = torch.randn(40, 6, device=device)
    wide = torch.randn(6, 80, device=device)
    batched = torch.randn(6, 2, 40, device=device)
    return {
        "transposed": base.t(),  # [6, 40], strides (1, 6)
        "column-slice": wide[:, ::2],  # [6, 40], inner stride 2
        "row-slice": torch.randn(12, 40, device=device)[::2],  # [6, 40], row stride 80
        "offset": wide[:, 17:57],  # [6, 40], storage offset, row stride 80
        "3d-permuted": batched.permute(1, 0, 2),  # [2, 6, 40]
        "expanded": torch.randn(1, 40, device=device).expand(6, 40),  # row stride 0
    }


@pytest.mark.parametrize("case", list(_views("cpu")), ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (2, 3)], ids=["2:4-kernel", "2:3-reference"])
def test_non_contiguous_x_matches_contiguous(case, n, m, device):
    x = _views(device)[case]
    assert not x.is_contiguous()
    w = st.nm_compress(torch.randn(8, 40, device=device), n, m)
    b = torch.randn(8, device=device)
    y, y_contig = st.nm_linear(x, w, b), st.nm_linear(x.contiguous(), w, b)
    if m == 4:  # the Triton kernel reads any strides with the same arithmetic: bit-exact
        assert torch.equal(y, y_contig)
    else:  # the reference calls BLAS, whose summation order depends on the strides (fp32, K = 40)
        scale = float(x.abs().max()) * float(w.values.abs().max())
        torch.testing.assert_close(y, y_contig, rtol=1e-5, atol=1e-6 * 40**0.5 * scale)


def test_non_contiguous_x_gradient_matches_contiguous(device):
    w = st.nm_compress(torch.randn(8, 40, device=device), 2, 4)
    w.values.requires_grad_()
    base = torch.randn(40, 6, device=device)
    grads = []
    for x in (base.t(), base.t().contiguous()):
        x = x.detach().requires_grad_()
        w.values.grad = None
        st.nm_linear(x, w).sum().backward()
        grads.append((x.grad, w.values.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_non_contiguous_weight_compresses_like_contiguous(device):
    w = torch.randn(40, 16, device=device)
    a, b = st.nm_compress(w.t(), 2, 4), st.nm_compress(w.t().contiguous(), 2, 4)
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
