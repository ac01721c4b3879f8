"""ActSparseLinear and ActSparseMLP: the masked dense formula, gradients, from_dense / to_dense, state dicts,
the input-major layout, and the errors."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_triton.nn import ActSparseLinear, ActSparseMLP
from sparse_triton.nn.act_sparse import detect_activation

ACTS = {"silu": F.silu, "relu": torch.relu, "relu2": lambda g: torch.relu(g).square()}


def masked(x, t):
    """``x * (|x| > t)`` in x's dtype (the specification; t a float or a tensor)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return torch.where(x.float().abs() > t, x, torch.zeros((), dtype=x.dtype, device=x.device))


def atol_for(K, layers=1):
    """fp32 against an fp64 reference: a few ulps per term, growing like sqrt(K)."""
    return 4e-6 * math.sqrt(K) * layers


def thresholds(kind, K, device, value=0.5):
    if kind == "scalar":
        return value
    if kind == "tensor0d":
        return torch.tensor(value, device=device)
    return torch.rand(K, device=device) * 2 * value  # per channel, spread around value


# ------------------------------------------------------------------------------------------------ ActSparseLinear


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", ["scalar", "tensor0d", "per_channel"])
@pytest.mark.parametrize("rows", [1, 5], ids=["M1", "M5"])
def test_linear_matches_masked_dense(device, rows, kind, bias):
    K, N = 80, 48  # ragged: not a multiple of the tile sizes
    lin = nn.Linear(K, N, bias=bias, device=device)
    t = thresholds(kind, K, device)
    m = ActSparseLinear.from_dense(lin, t)
    x = torch.randn(rows, K, device=device)
    y = m(x)
    want = F.linear(masked(x, t).double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    assert y.dtype == torch.float32 and y.shape == (rows, N)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=atol_for(K))


def test_linear_keeps_leading_dims(device):
    m = ActSparseLinear(32, 16, threshold=0.3, device=device)
    x = torch.randn(2, 3, 32, device=device)
    y = m(x)
    assert y.shape == (2, 3, 16)
    torch.testing.assert_close(y, F.linear(masked(x, 0.3), m.weight, m.bias), rtol=0, atol=atol_for(32))


@pytest.mark.parametrize("kind", ["scalar", "per_channel"])
def test_linear_gradients_match_autograd(device, kind):
    K, N, M = 64, 40, 3
    t = thresholds(kind, K, device)
    m = ActSparseLinear(K, N, threshold=t, device=device)
    ref = copy.deepcopy(m.to_dense()).double()
    x = torch.randn(M, K, device=device, requires_grad=True)
    xr = x.detach().double().requires_grad_()
    dy = torch.randn(M, N, device=device)
    m(x).backward(dy)
    F.linear(masked(xr, t), ref.weight, ref.bias).backward(dy.double())
    tol = atol_for(max(K, M))
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=tol)
    torch.testing.assert_close(m.weight.grad.double(), ref.weight.grad, rtol=0, atol=tol)
    torch.testing.assert_close(m.bias.grad.double(), ref.bias.grad, rtol=0, atol=tol)
    assert m.threshold.grad is None
    assert (x.grad[~(x.abs() > torch.as_tensor(t, device=device))] == 0).all()  # skipped inputs get no gradient


def test_linear_constructor_layout_and_init(device):
    m = ActSparseLinear(48, 24, device=device)
    assert m.weight.shape == (24, 48) and m.weight.t().is_contiguous()
    assert m.bias.shape == (24,)
    assert m.threshold.dtype == torch.float32 and m.threshold.shape == () and m.threshold.item() == 0.0
    bound = 1 / math.sqrt(48)
    assert m.weight.abs().max() <= bound and m.bias.abs().max() <= bound  # nn.Linear's init
    assert ActSparseLinear(8, 4, bias=False, dtype=torch.float16).weight.dtype == torch.float16
    with pytest.raises(TypeError, match="in_features"):
        ActSparseLinear(8.0, 4)
    with pytest.raises(ValueError, match="out_features"):
        ActSparseLinear(8, -1)


def test_from_dense_to_dense_round_trip(device):
    lin = nn.Linear(40, 24, device=device)
    lin.bias.requires_grad_(False)
    m = ActSparseLinear.from_dense(lin, torch.full((40,), 0.25, dtype=torch.float64, device=device))
    assert m.weight.t().is_contiguous() and m.weight.data_ptr() != lin.weight.data_ptr()
    assert torch.equal(m.weight, lin.weight) and torch.equal(m.bias, lin.bias)
    assert m.threshold.dtype == torch.float32 and m.threshold.shape == (40,)
    assert not m.bias.requires_grad and m.weight.requires_grad
    back = m.to_dense()
    assert type(back) is nn.Linear and back.weight.is_contiguous()
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)
    assert not back.bias.requires_grad
    x = torch.zeros(2, 40, device=device)  # all inputs skipped: only the bias is left
    torch.testing.assert_close(m(x), lin.bias.expand(2, -1))


def test_from_dense_keeps_dtype(device):
    lin = nn.Linear(32, 16, bias=False, device=device, dtype=torch.float16)
    m = ActSparseLinear.from_dense(lin, 0.5)
    assert m.weight.dtype == torch.float16 and m.bias is None and m.threshold.dtype == torch.float32
    x = torch.randn(2, 32, device=device, dtype=torch.float16)
    want = F.linear(masked(x, 0.5).double(), lin.weight.double())
    torch.testing.assert_close(m(x).double(), want, rtol=2e-3, atol=2e-3)


def test_state_dict_round_trip(device):
    m = ActSparseLinear(32, 16, threshold=torch.rand(32, device=device), device=device)
    sd = m.state_dict()
    assert list(sd) == ["weight", "bias", "threshold"]
    other = ActSparseLinear(32, 16, device=device)  # scalar threshold: the checkpoint's per-channel one replaces it
    assert str(other.load_state_dict(sd)) == "<All keys matched successfully>"
    assert other.weight.t().is_contiguous()
    for k in sd:
        assert torch.equal(other.state_dict()[k], sd[k]), k
    x = torch.randn(3, 32, device=device)
    torch.testing.assert_close(other(x), m(x))


def test_loads_nn_linear_state_dict_keeping_threshold(device):
    lin = nn.Linear(32, 16, device=device)
    m = ActSparseLinear(32, 16, threshold=0.4, device=device)
    result = m.load_state_dict(lin.state_dict())  # strict: threshold may be missing
    assert not result.missing_keys and not result.unexpected_keys
    assert m.weight.t().is_contiguous()
    assert torch.equal(m.weight, lin.weight) and torch.equal(m.bias, lin.bias)
    assert m.threshold.item() == pytest.approx(0.4)
    # Other missing keys still fail a strict load.
    with pytest.raises(RuntimeError, match="bias"):
        m.load_state_dict({"weight": lin.weight.detach()})


def test_load_with_assign_restores_layout(device):
    lin = nn.Linear(32, 16, device=device)
    m = ActSparseLinear(32, 16, device=device)
    sd = dict(lin.state_dict(), threshold=torch.tensor(0.3, dtype=torch.float64))
    m.load_state_dict(sd, assign=True)
    assert isinstance(m.weight, nn.Parameter) and m.weight.t().is_contiguous()
    assert torch.equal(m.weight, lin.weight)
    assert m.threshold.dtype == torch.float32 and m.threshold.item() == pytest.approx(0.3)


def test_load_rejects_bad_threshold(device):
    m = ActSparseLinear(32, 16, device=device)
    sd = m.state_dict()
    with pytest.raises(ValueError, match="threshold"):
        m.load_state_dict(dict(sd, threshold=torch.tensor(-1.0)))
    with pytest.raises(ValueError, match="threshold"):
        m.load_state_dict(dict(sd, threshold=torch.ones(31)))


@pytest.mark.parametrize("convert", ["half", "to_fp16", "double", "to_device"])
def test_conversions_keep_layout_and_fp32_threshold(device, convert):
    m = ActSparseLinear(32, 16, threshold=torch.full((32,), 0.1 + 1e-4, device=device), device=device)
    t = m.threshold.clone()
    w = m.weight
    fn = {"half": lambda: m.half(), "to_fp16": lambda: m.to(torch.float16), "double": lambda: m.double(),
          "to_device": lambda: m.to(device)}[convert]
    assert fn() is m
    assert m.weight is w  # the same Parameter object
    assert m.weight.t().is_contiguous()
    assert m.threshold.dtype == torch.float32 and torch.equal(m.threshold, t)


def test_apply_restores_layout_of_contiguous_result(device):
    # A conversion that returns contiguous tensors (e.g. memory_format=contiguous_format) is undone.
    m = ActSparseLinear(32, 16, device=device)
    m._apply(lambda t: t.contiguous())
    assert m.weight.t().is_contiguous()


def test_set_threshold(device):
    m = ActSparseLinear(16, 8, threshold=0.5, device=device)
    buf = m.threshold
    m.set_threshold(0.25)
    assert m.threshold is buf and buf.item() == 0.25  # same shape: in place
    m.set_threshold(torch.linspace(0, 1, 16, device=device))
    assert m.threshold.shape == (16,) and m.threshold.dtype == torch.float32
    x = torch.randn(2, 16, device=device)
    torch.testing.assert_close(m(x), F.linear(masked(x, m.threshold), m.weight, m.bias))
    for bad, err in ((-0.1, ValueError), (math.nan, ValueError), (math.inf, ValueError),
                     (torch.ones(15), ValueError), (torch.ones(2, 16), ValueError),
                     (torch.ones(16, dtype=torch.int64), TypeError), ("0.5", TypeError),
                     (torch.tensor([math.nan] * 16), ValueError)):
        with pytest.raises(err, match="threshold"):
            m.set_threshold(bad)
    assert m.threshold.shape == (16,)  # unchanged by the failed calls


def test_from_dense_errors():
    with pytest.raises(TypeError, match="nn.Linear"):
        ActSparseLinear.from_dense(nn.Conv1d(4, 4, 1), 0.1)
    with pytest.raises(ValueError, match="threshold"):
        ActSparseLinear.from_dense(nn.Linear(8, 4), torch.ones(4))
    with pytest.raises(ValueError, match="threshold"):
        ActSparseLinear.from_dense(nn.Linear(8, 4), -1.0)


def test_extra_repr():
    assert repr(ActSparseLinear(8, 4, threshold=0.5)) == (
        "ActSparseLinear(in_features=8, out_features=4, bias=True, threshold=0.5)")
    r = repr(ActSparseLinear(8, 4, bias=False, threshold=torch.full((8,), 0.25)))
    assert "bias=False" in r and "per_channel[8]" in r and "mean=0.25" in r


# ------------------------------------------------------------------------------------------------ ActSparseMLP


class GatedMLP(nn.Module):
    """A Llama-style MLP with a chosen act_fn."""

    def __init__(self, H, I, act_fn, device=None):  # noqa: E741
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False, device=device)
        self.up_proj = nn.Linear(H, I, bias=False, device=device)
        self.down_proj = nn.Linear(I, H, bias=False, device=device)
        self.act_fn = act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


ACT_MODULES = {"silu": nn.SiLU, "relu": nn.ReLU}


def make_mlp(activation, device, H=64, I=96):  # noqa: E741
    if activation == "relu2":
        from transformers.activations import ReLUSquaredActivation
        act = ReLUSquaredActivation()
    else:
        act = ACT_MODULES[activation]()
    return GatedMLP(H, I, act, device)


def masked_mlp_fp64(mlp, x, t_in, t_mid, activation):
    """``down(mask(act(gate(mask(x))) * up(mask(x))))`` in fp64 from the original weights."""
    xs = masked(x.double(), t_in)
    h = ACTS[activation](F.linear(xs, mlp.gate_proj.weight.double())) * F.linear(xs, mlp.up_proj.weight.double())
    return F.linear(masked(h, t_mid), mlp.down_proj.weight.double())


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per_channel"])
@pytest.mark.parametrize("activation", ["silu", "relu", "relu2"])
def test_mlp_matches_masked_reference(device, activation, per_channel):
    H, I = 64, 96  # noqa: E741
    mlp = make_mlp(activation, device, H, I)
    t_in = torch.rand(H, device=device) if per_channel else 0.5
    t_mid = torch.rand(I, device=device) * 0.02 if per_channel else 0.01
    sp = ActSparseMLP.from_dense(mlp, {"gate_proj": t_in, "up_proj": t_in, "down_proj": t_mid})
    assert sp.activation == activation
    x = torch.randn(3, H, device=device)
    want = masked_mlp_fp64(mlp, x, t_in, t_mid, activation)
    with torch.no_grad():
        fused = sp(x)
    unfused = sp(x)  # parameters require grad: the differentiable path
    assert unfused.requires_grad and not fused.requires_grad
    tol = atol_for(I, 2)
    torch.testing.assert_close(fused.double(), want, rtol=0, atol=tol)
    torch.testing.assert_close(unfused.double(), want, rtol=0, atol=tol)
    # The skipping matters: the unmasked MLP differs.
    assert (mlp(x).double() - want).abs().max() > 100 * tol


def test_mlp_fused_path_when_nothing_requires_grad(device, monkeypatch):
    import sparse_triton.nn.act_sparse as mod

    sp = ActSparseMLP(32, 64, threshold_in=0.3, threshold_mid=0.01, device=device).requires_grad_(False)
    calls = []
    monkeypatch.setattr(mod, "act_sparse_mlp", lambda *a: calls.append(a) or torch.zeros(2, 32, device=device))
    sp(torch.randn(2, 32, device=device))  # grad enabled, but nothing needs it
    assert len(calls) == 1
    sp(torch.randn(2, 32, device=device, requires_grad=True))  # the input needs grad: unfused
    assert len(calls) == 1


def test_mlp_gradients_flow_in_training(device):
    mlp = make_mlp("silu", device, 32, 48)
    sp = ActSparseMLP.from_dense(mlp, {"gate_proj": 0.4, "down_proj": 0.01}).train()
    ref = copy.deepcopy(mlp).double()
    x = torch.randn(4, 32, device=device, requires_grad=True)
    xr = x.detach().double().requires_grad_()
    sp(x).square().sum().backward()
    masked_mlp_fp64(ref, xr, 0.4, 0.01, "silu").square().sum().backward()
    tol = 1e-4
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=tol)
    for name in ("gate_proj", "up_proj", "down_proj"):
        g = getattr(sp, name).weight.grad
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g.double(), getattr(ref, name).weight.grad, rtol=1e-5, atol=tol)


def test_hf_llama_mlp(device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128)
    mlp = LlamaMLP(cfg).to(device)
    sp = ActSparseMLP.from_dense(mlp, {"gate_proj": torch.tensor(0.3), "up_proj": 0.3, "down_proj": 0.005})
    assert sp.activation == "silu"
    assert [type(getattr(sp, p)) for p in ("gate_proj", "up_proj", "down_proj")] == [ActSparseLinear] * 3
    assert all(getattr(sp, p).weight.t().is_contiguous() for p in ("gate_proj", "up_proj", "down_proj"))
    keys = set(mlp.state_dict())
    assert set(sp.state_dict()) == keys | {"gate_proj.threshold", "up_proj.threshold", "down_proj.threshold"}
    x = torch.randn(2, 3, 64, device=device)
    with torch.no_grad():
        y = sp(x)
    assert y.shape == (2, 3, 64)
    torch.testing.assert_close(y.double(), masked_mlp_fp64(mlp, x, 0.3, 0.005, "silu"), rtol=0, atol=atol_for(128, 2))
    dense = sp.to_dense()
    assert type(dense) is LlamaMLP and dense.config is cfg and dense.hidden_size == 64
    assert all(type(getattr(dense, p)) is nn.Linear for p in ("gate_proj", "up_proj", "down_proj"))
    torch.testing.assert_close(dense(x), mlp(x))
    # A LlamaMLP state dict (no thresholds) loads strictly and keeps the thresholds.
    sp2 = ActSparseMLP.from_dense(LlamaMLP(cfg).to(device), {"gate_proj": 0.3, "down_proj": 0.005})
    sp2.load_state_dict(mlp.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(sp2(x), y)


def test_mlp_constructor_and_to_dense(device):
    sp = ActSparseMLP(32, 48, activation="relu2", threshold_in=0.2, threshold_mid=0.01, device=device)
    assert sp.gate_proj.weight.shape == (48, 32) and sp.down_proj.weight.shape == (32, 48)
    assert sp.gate_proj.bias is None and sp.gate_proj.threshold.item() == pytest.approx(0.2)
    assert detect_activation(sp.act_fn) == "relu2"
    dense = sp.to_dense()
    x = torch.randn(2, 32, device=device)
    with torch.no_grad():
        want = dense.down_proj(masked(dense.act_fn(dense.gate_proj(masked(x, 0.2))) * dense.up_proj(masked(x, 0.2)),
                                      0.01))
        torch.testing.assert_close(sp(x), want, rtol=1e-5, atol=atol_for(48, 2))
    assert "activation='relu2'" in repr(sp)
    with pytest.raises(ValueError, match="activation"):
        ActSparseMLP(32, 48, activation="gelu")


def test_mlp_set_thresholds_and_shared_threshold_check(device):
    sp = ActSparseMLP(16, 32, device=device)
    sp.set_thresholds(threshold_in=torch.full((16,), 0.5, device=device), threshold_mid=0.1)
    assert torch.equal(sp.gate_proj.threshold, sp.up_proj.threshold)
    assert sp.down_proj.threshold.item() == pytest.approx(0.1)
    sd = sp.state_dict()
    sd["up_proj.threshold"] = torch.full((16,), 0.25)
    with pytest.raises(ValueError, match="up_proj.threshold differs"):
        sp.load_state_dict(sd)
    sd["up_proj.threshold"] = torch.tensor(0.5)  # the same threshold as a scalar is fine
    sp.load_state_dict(sd)


def test_mlp_half_keeps_layout(device):
    sp = ActSparseMLP(16, 32, threshold_in=0.1, device=device).half()
    for p in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(sp, p)
        assert lin.weight.dtype == torch.float16 and lin.weight.t().is_contiguous()
        assert lin.threshold.dtype == torch.float32


def test_detect_activation():
    from transformers.activations import ACT2FN

    assert detect_activation(nn.SiLU()) == "silu"
    assert detect_activation(ACT2FN["silu"]) == "silu"
    assert detect_activation(nn.ReLU(inplace=True)) == "relu"
    assert detect_activation(ACT2FN["relu2"]) == "relu2"
    assert detect_activation(F.silu) == "silu"
    with pytest.raises(ValueError, match="GELUActivation"):
        detect_activation(ACT2FN["gelu"])
    with pytest.raises(ValueError, match="Tanh"):
        detect_activation(nn.Tanh())


def test_mlp_errors():
    th = {"gate_proj": 0.1, "down_proj": 0.1}
    no_down = nn.Module()
    no_down.gate_proj, no_down.up_proj, no_down.act_fn = nn.Linear(8, 16), nn.Linear(8, 16), nn.SiLU()
    with pytest.raises(ValueError, match="down_proj"):
        ActSparseMLP.from_dense(no_down, th)
    with pytest.raises(ValueError, match="Tanh"):
        ActSparseMLP.from_dense(GatedMLP(8, 16, nn.Tanh()), th)
    with pytest.raises(ValueError, match="up_proj.*differs"):
        ActSparseMLP.from_dense(GatedMLP(8, 16, nn.SiLU()), {"gate_proj": 0.1, "up_proj": 0.2, "down_proj": 0.1})
    with pytest.raises(ValueError, match="'down_proj'"):
        ActSparseMLP.from_dense(GatedMLP(8, 16, nn.SiLU()), {"gate_proj": 0.1})
    with pytest.raises(ValueError, match="down_proj"):
        ActSparseMLP.from_dense(GatedMLP(8, 16, nn.SiLU()), {"gate_proj": 0.1, "down_proj": torch.ones(8)})
    with pytest.raises(TypeError, match="mapping"):
        ActSparseMLP.from_dense(GatedMLP(8, 16, nn.SiLU()), 0.1)
    biased = GatedMLP(8, 16, nn.SiLU())
    biased.up_proj = nn.Linear(8, 16)
    with pytest.raises(ValueError, match="bias"):
        ActSparseMLP.from_dense(biased, th)
    extra = GatedMLP(8, 16, nn.SiLU())
    extra.dropout = nn.Dropout(0.1)
    with pytest.raises(ValueError, match="dropout"):
        ActSparseMLP.from_dense(extra, th)
    # An activation given explicitly is trusted (e.g. a custom module computing SiLU).
    assert ActSparseMLP.from_dense(GatedMLP(8, 16, nn.Tanh()), th, activation="silu").activation == "silu"
    with pytest.raises(ValueError, match="activation"):
        ActSparseMLP.from_dense(GatedMLP(8, 16, nn.SiLU()), th, activation="gelu")
