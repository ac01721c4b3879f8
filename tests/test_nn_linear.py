"""nn.SparseLinear: drop-in behaviour, state_dict, dtype moves and fixed-mask fine-tuning."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from kit import assert_close
from torch import nn

import sparse_triton as st
from sparse_triton.nn import SparseLinear

PATTERNS = [(2, 4), (1, 4), (2, 8), (4, 8)]
PIDS = [f"{n}:{m}" for n, m in PATTERNS]
DTYPES = [torch.float32, torch.float16]

# Per-dtype resolution against an fp64 reference of the same (already rounded) inputs.
# rtol: about two units of the output dtype's rounding (the result is rounded once).


def _linear(in_f, out_f, bias, dtype, device):
    return nn.Linear(in_f, out_f, bias=bias).to(device=device, dtype=dtype)


def _ref_forward(x, lin, n, m):
    """F.linear with the magnitude-pruned weight, in fp64."""
    w = st.nm_prune(lin.weight.detach(), n, m).double()
    b = None if lin.bias is None else lin.bias.detach().double()
    return F.linear(x.double(), w, b)


def _term_scale(x, w):
    return float(x.detach().abs().max()) * float(w.detach().abs().max())


@pytest.mark.parametrize("in_f", [64, 70], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n,m", PATTERNS, ids=PIDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_from_dense_matches_pruned_linear(dtype, n, m, bias, in_f, device):
    lin = _linear(in_f, 24, bias, dtype, device)
    sp = SparseLinear.from_dense(lin, st.NMSparsity(n, m))
    x = torch.randn(2, 3, in_f, dtype=dtype, device=device)  # leading batch dims
    y = sp(x)
    assert y.shape == (2, 3, 24) and y.dtype == dtype and y.device == x.device
    assert_close(y, _ref_forward(x, lin, n, m), in_f, scale=_term_scale(x, lin.weight))
    # The compressed weight is exactly the pruned dense weight, so a 2-D input agrees with F.linear too.
    x2 = x[0]
    assert_close(sp(x2), _ref_forward(x2, lin, n, m), in_f, scale=_term_scale(x2, lin.weight))


@pytest.mark.parametrize("n,m", PATTERNS, ids=PIDS)
def test_weight_property_is_pruned_dense(n, m, device):
    lin = _linear(70, 16, True, torch.float32, device)
    sp = SparseLinear.from_dense(lin, st.NMSparsity(n, m))
    w = sp.weight
    assert w.shape == (16, 70)
    assert torch.equal(w, st.nm_prune(lin.weight.detach(), n, m))
    assert torch.equal(sp.bias.detach(), lin.bias.detach())
    assert sp.bias.data_ptr() != lin.bias.data_ptr()  # copied, not shared


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_to_dense_returns_pruned_linear(bias, device):
    lin = _linear(70, 16, bias, torch.float32, device)
    sp = SparseLinear.from_dense(lin, st.NMSparsity(2, 4))
    back = sp.to_dense()
    assert type(back) is nn.Linear
    assert (back.in_features, back.out_features) == (70, 16)
    assert back.weight.device == lin.weight.device and back.weight.dtype == lin.weight.dtype
    assert torch.equal(back.weight.detach(), st.nm_prune(lin.weight.detach(), 2, 4))
    if bias:
        assert torch.equal(back.bias.detach(), lin.bias.detach())
    else:
        assert back.bias is None


def test_extra_repr_names_the_pattern():
    sp = SparseLinear.from_dense(nn.Linear(16, 8), st.NMSparsity(2, 4))
    r = repr(sp)
    assert "2:4" in r and "in_features=16" in r and "out_features=8" in r
    assert "1:8" in repr(SparseLinear(16, 8, sparsity=st.NMSparsity(1, 8)))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n,m", [(2, 4), (2, 8)], ids=["2:4", "2:8"])
def test_state_dict_round_trip(n, m, bias, device):
    sp = SparseLinear.from_dense(_linear(70, 24, bias, torch.float32, device), st.NMSparsity(n, m))
    buf = io.BytesIO()
    torch.save(sp.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True, map_location=device)
    fresh = SparseLinear(70, 24, bias=bias, sparsity=st.NMSparsity(n, m), device=device)
    assert not torch.equal(fresh.values, sp.values)  # really overwritten by the load below
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.values, sp.values)
    assert fresh.indices.dtype == torch.int32 and torch.equal(fresh.indices, sp.indices)
    if bias:
        assert torch.equal(fresh.bias, sp.bias)
    x = torch.randn(5, 70, device=device)
    assert torch.equal(fresh(x), sp(x))


CORRUPT = {
    "values-shape": ("values", lambda t: t[:, :-1].clone()),
    "indices-shape": ("indices", lambda t: torch.cat([t, t], dim=1)),
    "indices-int64": ("indices", lambda t: t.to(torch.int64)),
    "values-rows": ("values", lambda t: t[:-1].clone()),
}


@pytest.mark.parametrize("case", list(CORRUPT), ids=str)
def test_load_corrupted_state_dict_names_the_key(case):
    key, corrupt = CORRUPT[case]
    sp = SparseLinear.from_dense(nn.Linear(64, 8), st.NMSparsity(2, 4))
    sd = sp.state_dict()
    sd[key] = corrupt(sd[key])
    fresh = SparseLinear(64, 8, sparsity=st.NMSparsity(2, 4))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=rf"state_dict\['{key}'\]"):
        fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k])


def test_load_state_dict_of_another_pattern_fails():
    sd = SparseLinear.from_dense(nn.Linear(64, 8), st.NMSparsity(2, 8)).state_dict()
    with pytest.raises(ValueError, match="values"):
        SparseLinear(64, 8, sparsity=st.NMSparsity(2, 4)).load_state_dict(sd)


@pytest.mark.parametrize("convert", ["to", "half"])
def test_half_keeps_int32_indices(convert, device):
    lin = _linear(70, 24, True, torch.float32, device)
    sp = SparseLinear.from_dense(lin, st.NMSparsity(2, 4))
    idx = sp.indices.clone()
    sp = sp.to(torch.float16) if convert == "to" else sp.half()
    assert sp.values.dtype == torch.float16 and sp.bias.dtype == torch.float16
    assert isinstance(sp.values, nn.Parameter)
    assert sp.indices.dtype == torch.int32 and torch.equal(sp.indices, idx)
    x = torch.randn(4, 70, dtype=torch.float16, device=device)
    y = sp(x)
    assert y.dtype == torch.float16
    ref = F.linear(x.double(), sp.weight.detach().double(), sp.bias.detach().double())
    assert_close(y, ref, 70, scale=_term_scale(x, sp.weight))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)], ids=["2:4", "4:8"])
def test_fixed_mask_finetuning(n, m, device):
    torch.manual_seed(1)
    K, N = 70, 16
    teacher = torch.randn(N, K, device=device) / math.sqrt(K)
    x = torch.randn(32, K, device=device)
    target = x @ teacher.t()
    sp = SparseLinear.from_dense(_linear(K, N, True, torch.float32, device), st.NMSparsity(n, m))
    indices0 = sp.indices.clone()
    mask0 = sp.weight_nm().mask()
    opt = torch.optim.SGD(sp.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(sp(x), target)
        loss.backward()
        assert sp.indices.grad is None and not sp.indices.requires_grad
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert torch.equal(sp.indices, indices0)  # bit-identical: the mask is not trained
    w = sp.weight.detach()
    assert torch.equal(sp.weight_nm().mask(), mask0)
    assert not w[~mask0].any()  # zeros stay zeros
    assert torch.equal(w != 0, mask0)  # and the kept weights are still the non-zeros
    assert torch.equal(st.nm_prune(w, n, m), w)  # still N:M


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n,m", PATTERNS, ids=PIDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_dense_autograd(dtype, n, m, bias, device):
    K, N, T = 70, 24, 15
    sp = SparseLinear.from_dense(_linear(K, N, bias, dtype, device), st.NMSparsity(n, m))
    x = torch.randn(3, 5, K, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(3, 5, N, dtype=dtype, device=device)
    sp(x).backward(dy)

    w64 = sp.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    b64 = sp.bias.detach().double().requires_grad_() if bias else None
    F.linear(x64, w64, b64).backward(dy.double())

    assert sp.values.grad.shape == sp.values.shape and sp.values.grad.dtype == dtype
    # dvalues reduces over the T tokens, dx over the N outputs, dbias over the T tokens.
    assert_close(sp.values.grad, sp.weight_nm().gather(w64.grad), T, scale=_term_scale(dy, x))
    assert_close(x.grad, x64.grad, N, scale=_term_scale(dy, sp.values))
    if bias:
        assert_close(sp.bias.grad, b64.grad, T, scale=float(dy.abs().max()))
    assert sp.indices.grad is None


@pytest.mark.parametrize("in_f", [64, 70], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("n,m", PATTERNS, ids=PIDS)
def test_direct_construction_is_nm(n, m, in_f, device):
    sp = SparseLinear(in_f, 24, sparsity=st.NMSparsity(n, m), device=device)
    w = sp.weight.detach()
    assert w.shape == (24, in_f) and w.device.type == device
    # N:M: pruning again changes nothing, and every kept element is inside nm_mask.
    assert torch.equal(st.nm_prune(w, n, m), w)
    assert not (w != 0)[~st.nm_mask(w, n, m)].any()
    # Same init range as nn.Linear (kaiming uniform, a=sqrt(5)): |w|, |b| <= 1/sqrt(in_features).
    bound = 1 / math.sqrt(in_f)
    assert float(w.abs().max()) <= bound and float(sp.bias.detach().abs().max()) <= bound
    assert float(w.abs().max()) > 0.5 * bound  # not an all-zero / degenerate init
    x = torch.randn(6, in_f, device=device)
    ref = F.linear(x.double(), w.double(), sp.bias.detach().double())
    assert_close(sp(x), ref, in_f, scale=_term_scale(x, w))


def test_direct_construction_dtype_and_no_bias(device):
    sp = SparseLinear(70, 8, bias=False, sparsity=st.NMSparsity(2, 8), device=device, dtype=torch.float16)
    assert sp.bias is None and sp.values.dtype == torch.float16 and sp.indices.dtype == torch.int32
    x = torch.randn(3, 70, dtype=torch.float16, device=device)
    ref = F.linear(x.double(), sp.weight.detach().double())
    assert_close(sp(x), ref, 70, scale=_term_scale(x, sp.weight))


@pytest.mark.parametrize("n,m", PATTERNS, ids=PIDS)
def test_ragged_in_features_storage(n, m):
    # 70 is not a multiple of any m: the tail group is padded in storage, not in the dense shape.
    sp = SparseLinear.from_dense(nn.Linear(70, 8), st.NMSparsity(n, m))
    assert sp.values.shape == (8, -(-70 // m) * n)
    assert sp.weight.shape == (8, 70)
    assert sp.to_dense().weight.shape == (8, 70)


@pytest.mark.parametrize("in_f,out_f,T", [(0, 8, 3), (16, 0, 3), (16, 8, 0)], ids=["K0", "N0", "T0"])
def test_empty_dims_match_dense_linear(in_f, out_f, T, device):
    # F.linear defines all three (K = 0 gives the bias); the kernel launchers handle them too.
    lin = _linear(in_f, out_f, True, torch.float32, device)
    sp = SparseLinear.from_dense(lin, st.NMSparsity(2, 4))
    x = torch.randn(2, T, in_f, device=device, requires_grad=True)
    y = sp(x)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = sp.weight.detach().clone().requires_grad_()
    b_ref = sp.bias.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref, b_ref)
    assert y.shape == y_ref.shape == (2, T, out_f)
    assert torch.equal(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(sp.values.grad, sp.weight_nm().gather(w_ref.grad))
    assert torch.equal(sp.bias.grad, b_ref.grad)


def _corrupt_positions(case):
    """A state_dict whose packed indices have the right shape and dtype but impossible positions."""
    if case == "position>=m":  # 2:8 stores 4-bit positions: 8..15 fit in the field but not in a group
        sp = SparseLinear.from_dense(nn.Linear(64, 8), st.NMSparsity(2, 8))
        sd = sp.state_dict()
        sd["indices"] = sd["indices"] | 0x8  # slot 0 of every word gets position >= 8
    else:  # "repeated-position": 2:4 slot pair (1, 1) in every group
        sp = SparseLinear.from_dense(nn.Linear(64, 8), st.NMSparsity(2, 4))
        sd = sp.state_dict()
        sd["indices"] = torch.full_like(sd["indices"], 0x55555555)
    return sp.sparsity, sd


@pytest.mark.parametrize("case", ["position>=m", "repeated-position"], ids=str)
def test_load_state_dict_rejects_impossible_positions(case):
    # SparseLinear._load_from_state_dict promises that a corrupted checkpoint fails loudly, naming
    # what is wrong; positions outside a group (or twice the same) decode to a different weight in
    # the kernel (value dropped / overwritten) than in to_dense() (value written into the next group).
    sparsity, sd = _corrupt_positions(case)
    fresh = SparseLinear(64, 8, sparsity=sparsity)
    with pytest.raises(ValueError, match=r"indices"):
        fresh.load_state_dict(sd)
