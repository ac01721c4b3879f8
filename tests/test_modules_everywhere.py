"""SparseLinear, ActSparseLinear and ActSparseMLP wherever a model goes: built, printed and ``to_empty``-ed on
the meta device (then loaded with real weights), pickled, ``torch.save``-d whole, deep-copied. Also the
arguments they take: thresholds beyond float32 range and float32 rounding, bool flags, and calibration on
activations of any layout."""

import copy
import io
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from kit import assert_close
from torch import nn

import sparse_triton as st
from sparse_triton.nn import ActSparseLinear, ActSparseMLP, SparseLinear
from sparse_triton.ops import act_sparse as act_ops

# ----------------------------------------------------------------------------------- a small model


class GatedMLP(nn.Module):
    """A Llama-style MLP (module level, so that a converted model pickles)."""

    def __init__(self, H, I, device=None):  # noqa: E741
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False, device=device)
        self.up_proj = nn.Linear(H, I, bias=False, device=device)
        self.down_proj = nn.Linear(I, H, bias=False, device=device)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, H, I, device=None, dtype=None):  # noqa: E741
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.o_proj = SparseLinear(H, H, **kw)
        self.proj = ActSparseLinear(H, H, threshold=torch.linspace(0.1, 0.9, H), **kw)
        self.mlp = ActSparseMLP(H, I, threshold_in=0.3, threshold_mid=0.05, **kw)

    def forward(self, x):
        x = x + self.o_proj(x)
        x = x + self.proj(x)
        return x + self.mlp(x)


class Model(nn.Module):
    def __init__(self, H, I, layers, device=None, dtype=None):  # noqa: E741
        super().__init__()
        self.layers = nn.ModuleList(Block(H, I, device, dtype) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# The small models below are float64: they run the pure-torch reference (the module state is under test
# here, not the kernels), and SparseLinear's compression skips the interpreted kernel.
F64 = torch.float64


def _outputs(model, x):
    """The model's output with grad (three ActSparseLinear in the MLP) and without (the fused op)."""
    with torch.no_grad():
        fused = model(x)
    return fused, model(x).detach()


def _assert_same_outputs(a, b, x):
    for ya, yb in zip(_outputs(a, x), _outputs(b, x)):
        assert torch.equal(ya, yb)


# --------------------------------------------------------------------------------------- meta device


def test_large_model_on_meta_builds_and_prints():
    """Llama-3-8B-sized layers (about 1.4e9 parameters if real) cost nothing on meta, and print."""
    with torch.device("meta"):
        model = Model(4096, 14336, 4, dtype=torch.float16)
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    text = str(model)
    assert "SparseLinear(in_features=4096, out_features=4096, bias=True, sparsity=2:4)" in text
    assert "ActSparseLinear(in_features=4096, out_features=4096, bias=True, threshold=per_channel[4096] (meta))" in text
    assert "(gate_proj): ActSparseLinear(in_features=4096, out_features=14336, bias=False, threshold=meta)" in text
    also = ActSparseMLP(4096, 14336, device="meta")
    assert also.down_proj.weight.device.type == "meta" and "threshold=meta" in repr(also)
    x = torch.randn(2, 4096, device="meta", dtype=torch.float16)
    with torch.no_grad():
        assert model(x).shape == (2, 4096)  # shape propagation on meta


@pytest.mark.parametrize("how", ["to_empty", "assign"])
def test_meta_model_loads_real_weights_and_runs(how):
    real = Model(64, 96, 2, dtype=F64)
    with torch.device("meta"):
        model = Model(64, 96, 2, dtype=F64)
    str(model)
    if how == "to_empty":
        model.to_empty(device="cpu")
        for m in model.modules():
            if isinstance(m, ActSparseLinear):
                assert m.weight.t().is_contiguous() and m.threshold.dtype == torch.float32
        model.load_state_dict(real.state_dict())
    else:
        model.load_state_dict(real.state_dict(), assign=True)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    _assert_same_outputs(model, real, torch.randn(3, 64, dtype=F64))


def test_from_dense_of_meta_modules():
    lin = nn.Linear(64, 32, device="meta")
    sp = SparseLinear.from_dense(lin)
    asp = ActSparseLinear.from_dense(lin, torch.full((64,), 0.2))
    mlp = ActSparseMLP.from_dense(GatedMLP(64, 96, device="meta"), {
        "gate_proj": torch.full((64,), 0.3), "up_proj": 0.3, "down_proj": torch.tensor(0.05, dtype=torch.float64)})
    for m in (sp, asp, mlp):
        assert all(t.device.type == "meta" for t in m.state_dict().values())
        repr(m)
    real_lin, real_mlp = nn.Linear(64, 32), GatedMLP(64, 96)  # fp32: the kernels run (interpreted)
    th = {"gate_proj": torch.full((64,), 0.3), "down_proj": 0.05}
    expect = (SparseLinear.from_dense(real_lin), ActSparseLinear.from_dense(real_lin, torch.full((64,), 0.2)),
              ActSparseMLP.from_dense(real_mlp, th))
    x = torch.randn(2, 64)
    for m, e in zip((sp, asp, mlp), expect):
        m.to_empty(device="cpu")
        m.load_state_dict(e.state_dict())
        with torch.no_grad():
            assert torch.equal(m(x), e(x))
    assert isinstance(mlp.to_dense(), GatedMLP)


# ---------------------------------------------------------------------------- pickle, save, deepcopy


def _converted_model():
    mlp = ActSparseMLP.from_dense(GatedMLP(64, 96).to(F64), {"gate_proj": 0.2, "down_proj": 0.01})
    return nn.Sequential(Model(64, 96, 1, dtype=F64), mlp)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_whole_model_round_trips(how):
    model = _converted_model()
    if how == "pickle":
        back = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
    x = torch.randn(3, 64, dtype=F64)
    _assert_same_outputs(back, model, x)
    for m in back.modules():
        if isinstance(m, ActSparseLinear):
            assert m.weight.t().is_contiguous()
    assert isinstance(back[1].to_dense(), GatedMLP)
    back[1].load_state_dict(model[1].state_dict())  # the loading checks came along


def test_deepcopy_is_independent():
    model = _converted_model()
    twin = copy.deepcopy(model)
    x = torch.randn(3, 64, dtype=F64)
    _assert_same_outputs(twin, model, x)
    before = _outputs(model, x)
    blk = twin[0].layers[0]
    with torch.no_grad():
        blk.o_proj.values.mul_(-1)
        blk.proj.weight.data.mul_(2)
    blk.proj.set_threshold(0.0)
    twin[1].set_thresholds(threshold_in=0.9)
    for a, b in zip(_outputs(model, x), before):
        assert torch.equal(a, b)  # the original is untouched
    assert not torch.equal(_outputs(twin, x)[0], before[0])
    with torch.no_grad():
        twin[1].down_proj.threshold.fill_(-1.0)  # the copy's threshold check is its own
    with pytest.raises(ValueError, match="threshold"):
        with torch.no_grad():
            twin(x)
    for a, b in zip(_outputs(model, x), before):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------- calibration on any layout


class _Feed(nn.Module):
    """Hands its linear the activation in a chosen layout."""

    def __init__(self, lin, layout):
        super().__init__()
        self.lin, self.layout = lin, layout

    def forward(self, h):
        if self.layout == "transposed":  # h [K, R] -> [R, K], column-major
            return self.lin(h.t())
        if self.layout == "strided_rows":  # every other token of [B, S, K]
            return self.lin(h[:, ::2])
        if self.layout == "strided_channels":  # every other channel of [R, 2K]
            return self.lin(h[:, ::2])
        if self.layout == "expanded":  # one row repeated: stride 0
            return self.lin(h[:1].expand(7, -1))
        return self.lin(h)


def _layout_data(layout, gen):
    scale = torch.linspace(0.05, 4.0, 24)  # channels of different scales
    if layout == "transposed":
        return (torch.randn(300, 24, generator=gen) * scale).t().contiguous()
    if layout == "strided_rows":
        return torch.randn(2, 150, 24, generator=gen) * scale
    if layout == "strided_channels":
        return torch.stack([torch.randn(300, 24, generator=gen) * scale] * 2, dim=-1).flatten(1)
    return torch.randn(300, 24, generator=gen) * scale


def _as_given(layout, h):
    """The activation the linear sees, made contiguous: what calibration must agree with."""
    if layout == "transposed":
        return h.t().contiguous()
    if layout in ("strided_rows", "strided_channels"):
        return h[:, ::2].contiguous()
    if layout == "expanded":
        return h[:1].expand(7, -1).contiguous()
    return h


@pytest.mark.parametrize("method", ["per_channel", "magnitude"])
@pytest.mark.parametrize("layout", ["transposed", "strided_rows", "strided_channels", "expanded"])
def test_calibration_takes_non_contiguous_inputs(layout, method):
    gen = torch.Generator().manual_seed(1)
    data = [_layout_data(layout, gen) for _ in range(2)]
    lin = nn.Linear(24, 8)
    got = st.calibrate_thresholds(_Feed(lin, layout), data, 0.5, method)
    want = st.calibrate_thresholds(_Feed(lin, "contiguous"), [_as_given(layout, h) for h in data], 0.5, method)
    assert torch.equal(got["lin"], want["lin"])
    assert got["lin"].shape == ((24,) if method == "per_channel" else ())


# ------------------------------------------------------------------ thresholds beyond float32 range

OVER = [1e39, 10**40, torch.tensor(1e300, dtype=torch.float64),
        torch.tensor([0.5] * 31 + [1e300], dtype=torch.float64), 2.0**128 - 2.0**103]
OVER_IDS = ["float", "int", "fp64-scalar", "fp64-channel", "rounds-to-inf"]
RANGE = r"must be finite and >= 0, got .*beyond float32 range"


@pytest.mark.parametrize("bad", OVER, ids=OVER_IDS)
def test_thresholds_beyond_float32_are_rejected(bad):
    x, w = torch.randn(2, 32), act_ops.input_major(torch.randn(16, 32))
    with pytest.raises(ValueError, match="act_sparse_linear: threshold " + RANGE):
        st.act_sparse_linear(x, w, bad)
    wg, wu, wd = torch.randn(48, 32), torch.randn(48, 32), torch.randn(32, 48)
    with pytest.raises(ValueError, match="act_sparse_mlp: threshold_in " + RANGE):
        st.act_sparse_mlp(x, wg, wu, wd, bad, 0.1)
    mid = bad if not isinstance(bad, torch.Tensor) or bad.dim() == 0 else torch.tensor([0.5] * 47 + [1e300],
                                                                                        dtype=torch.float64)
    with pytest.raises(ValueError, match="act_sparse_mlp: threshold_mid " + RANGE):
        st.act_sparse_mlp(x, wg, wu, wd, 0.1, mid)
    m = ActSparseLinear(32, 16, threshold=0.25)
    with pytest.raises(ValueError, match="ActSparseLinear.set_threshold: threshold " + RANGE):
        m.set_threshold(bad)
    assert m.threshold.item() == 0.25
    with pytest.raises(ValueError, match="ActSparseLinear.from_dense: threshold " + RANGE):
        ActSparseLinear.from_dense(nn.Linear(32, 16), bad)
    with pytest.raises(ValueError, match="ActSparseLinear: threshold " + RANGE):
        ActSparseLinear(32, 16, threshold=bad)
    with pytest.raises(ValueError, match=r"ActSparseMLP.from_dense: thresholds\['gate_proj'\] " + RANGE):
        ActSparseMLP.from_dense(GatedMLP(32, 48), {"gate_proj": bad, "down_proj": 0.1})
    with pytest.raises(ValueError, match=r"Thresholds: threshold of 'a' must be finite .*beyond float32 range"):
        st.Thresholds({"a": bad}, 0.5, "per_channel")


def test_threshold_file_beyond_float32_is_rejected(tmp_path):
    path = tmp_path / "t.json"
    for layers in ({"a": 1e39}, {"a": [0.5, 3.5e38]}):
        path.write_text(json.dumps({"format": "sparse_triton.thresholds", "version": 1, "sparsity": 0.5,
                                    "method": "per_channel", "layers": layers}))
        with pytest.raises(ValueError, match=r"Thresholds.load.*threshold of 'a' .*beyond float32 range"):
            st.Thresholds.load(path)


def test_float32_edge_and_rounding_rule():
    """The largest values that round to a finite float32 are accepted; a float64 threshold is compared in
    float32 after rounding to nearest, on every path (kernel, dense, module, Thresholds)."""
    fmax = torch.finfo(torch.float32).max
    edge = 2.0**128 - 2.0**103  # the first value that rounds to inf
    cpu = torch.device("cpu")
    for ok in (fmax, 3.4028235e38, math.nextafter(edge, 0.0)):
        assert act_ops.check_threshold(ok, 4, cpu, "t").item() == fmax
        assert act_ops.check_threshold(torch.tensor(ok, dtype=torch.float64), 4, cpu, "t").item() == fmax
    t32 = torch.tensor(0.1, dtype=torch.float32)  # 0.100000001490116...: above the float64 0.1
    assert t32.double().item() > 0.1
    up = torch.nextafter(t32, torch.tensor(1.0))
    w = act_ops.input_major(torch.randn(8, 4))
    for M in (1, 70):  # the kernel (interpreted on CPU) and, past 64 rows, the dense product
        x = torch.stack([t32, up, -t32, -up]).repeat(M, 1)
        want = F.linear(x.double() * torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64), w.double())
        for t in (0.1, torch.tensor(0.1, dtype=torch.float64), torch.full((4,), 0.1, dtype=torch.float64)):
            assert_close(st.act_sparse_linear(x, w, t), want, 4)
        m = ActSparseLinear(4, 8, bias=False, threshold=torch.tensor(0.1, dtype=torch.float64))
        with torch.no_grad():
            m.weight.copy_(w)
        assert_close(m(x), want, 4)
    th = st.Thresholds({"a": 0.1, "b": torch.tensor([0.1], dtype=torch.float64)}, 0.5, "per_channel")
    assert th["a"].item() == t32.item() and th["b"].item() == t32.item()


# ------------------------------------------------------------------------------------- bool flags


@pytest.mark.parametrize("bad", ["yes", 1, None, torch.tensor(True)], ids=["str", "int", "None", "tensor"])
def test_bias_flag_must_be_a_bool(bad):
    for cls in (SparseLinear, ActSparseLinear):
        with pytest.raises(TypeError, match=f"{cls.__name__}: bias must be a bool"):
            cls(8, 4, bias=bad)
    assert SparseLinear(8, 4, bias=False).bias is None and ActSparseLinear(8, 4, bias=False).bias is None

