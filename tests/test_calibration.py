"""Activation-threshold calibration: accuracy on held-out data, the statistics' edge cases, Thresholds I/O."""

import dataclasses
import json
import logging
import math
import os

import pytest
import torch
from torch import nn

from sparse_triton.calibration import ActivationSparsity, Thresholds, activation_sparsity_report, calibrate_thresholds

D_IN, HIDDEN, INTER, VOCAB = 32, 48, 96, 40
SCALES = torch.logspace(-1.5, 1.5, D_IN)  # channel scales 0.03 .. 30: a scalar threshold cannot fit them all
METHODS = ["magnitude", "per_channel"]


class LlamaMLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(D_IN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.mlp = LlamaMLP(HIDDEN, INTER)
        self.lm_head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, x, scale=1.0):
        h = nn.functional.gelu(self.fc_in(x * scale))
        return self.lm_head(h + self.mlp(self.norm(h)))


LAYERS = ["fc_in", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def make_batches(seed, n=8, rows=1024):
    """``n`` batches ``[4, rows/4, D_IN]`` with per-channel scales ``SCALES``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, rows // 4, D_IN, generator=g) * SCALES for _ in range(n)]


CAL, HELD_OUT = make_batches(1), make_batches(2)


def hook_count(model):
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.0, 0.4, 0.5, 0.7, 0.9])
def test_achieved_sparsity_on_held_out_data(method, sparsity):
    model = Net()
    th = calibrate_thresholds(model, CAL, sparsity, method)
    assert sorted(th) == sorted(LAYERS) and (th.sparsity, th.method) == (sparsity, method)
    for fqn, t in th.items():
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        assert t.shape == ((model.get_submodule(fqn).in_features,) if method == "per_channel" else ())
        assert bool(torch.isfinite(t).all()) and bool((t >= 0).all())
    # On the calibration data itself only the histogram's error remains: well under 1 %.
    for fqn, got in activation_sparsity_report(model, CAL, th).items():
        assert abs(got - sparsity) < 0.005, (fqn, got)
    held = activation_sparsity_report(model, HELD_OUT, th)
    assert sorted(held) == sorted(LAYERS)
    for fqn, got in held.items():
        assert abs(got - sparsity) < 0.02, (fqn, got)


def channel_sparsity(batches, t):
    x = torch.cat([b.reshape(-1, D_IN) for b in batches])
    return (x.abs() <= t).double().mean(0)


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_per_channel_gives_every_channel_the_target(sparsity):
    model = Net()
    per_channel = calibrate_thresholds(model, CAL, sparsity, "per_channel")["fc_in"]
    assert (channel_sparsity(CAL, per_channel) - sparsity).abs().max() < 0.005
    # 8192 rows: each channel's sampling error is ~0.6 %, so a few % bounds all 32 channels.
    assert (channel_sparsity(HELD_OUT, per_channel) - sparsity).abs().max() < 0.04
    # The test can fail: one scalar per layer leaves the channels far from the target.
    scalar = calibrate_thresholds(model, CAL, sparsity, "magnitude")["fc_in"]
    assert (channel_sparsity(HELD_OUT, scalar) - sparsity).abs().max() > 0.3


@pytest.mark.parametrize("method", METHODS)
def test_shared_input_layers_get_bit_identical_thresholds(method):
    th = calibrate_thresholds(Net(), CAL, 0.6, method)
    assert torch.equal(th["mlp.gate_proj"], th["mlp.up_proj"])
    assert not torch.equal(th["mlp.gate_proj"], th["mlp.down_proj"])


@pytest.mark.parametrize("method", METHODS)
def test_zero_sparsity_gives_zero_thresholds(method):
    th = calibrate_thresholds(Net(), CAL[:2], 0.0, method)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in th.values())


def test_exact_zeros_after_relu():
    model = nn.Sequential(nn.Linear(D_IN, 64), nn.ReLU(), nn.Linear(64, 8))
    batches = [b.reshape(-1, D_IN) for b in CAL]
    zeros = activation_sparsity_report(model, batches, {"2": torch.tensor(0.0)})["2"]
    assert 0.45 < zeros < 0.55
    # Fewer than the zeros: t = 0 exactly (|x| > 0 keeps every non-zero); more: a real quantile.
    assert calibrate_thresholds(model, batches, zeros - 0.05)["2"].item() == 0.0
    th = calibrate_thresholds(model, batches, 0.75)
    assert th["2"] > 0
    assert abs(activation_sparsity_report(model, [b.reshape(-1, D_IN) for b in HELD_OUT], th)["2"] - 0.75) < 0.02


@pytest.mark.parametrize("method", METHODS)
def test_nan_ignored_and_inf_gives_finite_thresholds(method):
    model = nn.Sequential(nn.Linear(D_IN, 8))
    x = CAL[0].reshape(-1, D_IN)
    clean = calibrate_thresholds(model, [x], 0.5, method)["0"]
    nans = torch.full((100, D_IN), math.nan)
    assert torch.equal(calibrate_thresholds(model, [nans, x, nans], 0.5, method)["0"], clean)
    for sparsity in (0.5, 0.9):
        t = calibrate_thresholds(model, [torch.full((64, D_IN), -math.inf)], sparsity, method)["0"]
        assert bool(torch.isfinite(t).all()) and bool((t >= 0).all())


def test_per_channel_window_slides_order_independently():
    model = nn.Sequential(nn.Linear(D_IN, 8))
    g = torch.Generator().manual_seed(3)
    tiny, mid, big = (torch.randn(512, D_IN, generator=g) * s for s in (1e-9, 1.0, 1e6))
    ths = [calibrate_thresholds(model, batches, 0.5, "per_channel")["0"]
           for batches in ([tiny, mid, big], [big, mid, tiny], [torch.cat([mid, tiny, big])])]
    assert torch.equal(ths[0], ths[1]) and torch.equal(ths[0], ths[2])
    # Most of the tiny values fall below the 32-octave window but still count as below the threshold.
    assert (channel_sparsity([torch.cat([tiny, mid, big])], ths[0]) - 0.5).abs().max() < 0.01


def test_max_samples_uses_the_first_rows():
    model = Net()
    first = calibrate_thresholds(model, CAL[:1], 0.5, "per_channel")
    assert calibrate_thresholds(model, CAL, 0.5, "per_channel", max_samples=1024) == first
    assert calibrate_thresholds(model, CAL, 0.5, "per_channel", max_samples=10**9) != first


def test_batch_kinds():
    model = Net()
    ref = calibrate_thresholds(model, [b * 2 for b in CAL[:2]], 0.5)
    assert calibrate_thresholds(model, [{"x": b, "scale": 2.0} for b in CAL[:2]], 0.5) == ref
    assert calibrate_thresholds(model, ((b, 2.0) for b in CAL[:2]), 0.5) == ref  # a generator of tuples


def test_layers_never_called_warn_once_and_are_left_out(caplog):
    model = Net()
    model.unused = nn.Linear(4, 4)
    model.also_unused = nn.Linear(4, 4)
    with caplog.at_level(logging.WARNING, logger="sparse_triton"):
        th = calibrate_thresholds(model, CAL[:1], 0.5)
    assert sorted(th) == sorted(LAYERS)
    warnings = [r.getMessage() for r in caplog.records if r.name == "sparse_triton"]
    assert len(warnings) == 1 and "unused, also_unused" in warnings[0]


def test_filter_fn_lm_head_and_linear_subclasses():
    class MyLinear(nn.Linear):
        pass

    model = Net()
    model.mlp.down_proj = MyLinear(INTER, HIDDEN, bias=False)
    assert "lm_head" not in calibrate_thresholds(model, CAL[:1], 0.5)
    assert "mlp.down_proj" in calibrate_thresholds(model, CAL[:1], 0.5)
    seen = []
    th = calibrate_thresholds(model, CAL[:1], 0.5, filter_fn=lambda m, fqn: seen.append(fqn) or "mlp." in fqn)
    assert sorted(th) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert sorted(seen) == sorted([*LAYERS, "lm_head"])  # filter_fn sees every nn.Linear, lm_head included
    assert "lm_head" in calibrate_thresholds(model, CAL[:1], 0.5, filter_fn=lambda m, fqn: True)


def test_hooks_removed_and_training_flags_restored():
    model = Net().train()
    model.mlp.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    seen_training = []
    model.register_forward_pre_hook(lambda m, a: seen_training.append(m.training))
    calibrate_thresholds(model, CAL[:2], 0.5)
    assert seen_training == [False, False]
    assert hook_count(model) == 1 and {n: m.training for n, m in model.named_modules()} == flags

    class Boom(RuntimeError):
        pass

    def explode(m, a):
        if len(seen_training) in (4, 6):  # the second batch of each run below
            raise Boom
    model.register_forward_pre_hook(explode)
    with pytest.raises(Boom):
        calibrate_thresholds(model, CAL[:2], 0.5)
    assert hook_count(model) == 2 and {n: m.training for n, m in model.named_modules()} == flags
    with pytest.raises(Boom):
        activation_sparsity_report(model, CAL[:2], {"fc_in": torch.tensor(0.1)})
    assert hook_count(model) == 2 and {n: m.training for n, m in model.named_modules()} == flags


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"sparsity": 1.0}, ValueError, r"calibrate_thresholds: sparsity must be in \[0, 1\), got 1.0"),
    ({"sparsity": -0.1}, ValueError, r"sparsity must be in \[0, 1\), got -0.1"),
    ({"sparsity": math.nan}, ValueError, r"sparsity must be in \[0, 1\), got nan"),
    ({"sparsity": True}, ValueError, r"sparsity must be in \[0, 1\), got True"),
    ({"sparsity": "0.5"}, ValueError, r"sparsity must be in \[0, 1\), got '0.5'"),
    ({"method": "topk"}, ValueError, r"method must be one of 'magnitude', 'per_channel', got 'topk'"),
    ({"model": lambda x: x}, TypeError, r"model must be an nn.Module, got function"),
    ({"batches": []}, ValueError, r"batches is empty"),
    ({"batches": iter([])}, ValueError, r"batches is empty"),
    ({"batches": None}, ValueError, r"batches is None"),
    ({"batches": CAL[0]}, TypeError, r"batches must be an iterable of batches .* got Tensor"),
    ({"filter_fn": lambda m, fqn: False}, ValueError, r"no layer selected"),
    ({"model": nn.Sequential(nn.ReLU())}, ValueError, r"no layer selected"),
    ({"max_samples": 0}, ValueError, r"max_samples must be a positive int or None, got 0"),
], ids=["s=1", "s<0", "s=nan", "s=bool", "s=str", "method", "model", "empty", "empty-iter", "none", "tensor",
        "filter-none", "no-linear", "max_samples"])
def test_bad_inputs(kwargs, exc, match):
    args = {"model": Net(), "batches": CAL[:1], **kwargs}
    with pytest.raises(exc, match=match):
        calibrate_thresholds(**args)


def test_no_selected_layer_called():
    model = Net()
    model.spare = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="none of the 1 selected layers was called"):
        calibrate_thresholds(model, CAL[:1], filter_fn=lambda m, fqn: fqn == "spare")


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_bit_exact(tmp_path, method):
    th = calibrate_thresholds(Net(), CAL[:2], 0.37, method)
    path = tmp_path / "th.json"
    th.save(path)
    header = json.loads(path.read_text())
    assert {k: header[k] for k in ("format", "version", "sparsity", "method")} == {
        "format": "sparse_triton.thresholds", "version": 1, "sparsity": 0.37, "method": method}
    back = Thresholds.load(str(path))
    assert back == th and list(back) == list(th)
    assert all(torch.equal(back[k], th[k]) and back[k].dtype == torch.float32 for k in th)
    th.save(path)  # overwrite in place; no temp file is left behind
    assert os.listdir(tmp_path) == ["th.json"]
    empty = Thresholds({}, 0.5, "magnitude")
    empty.save(path)
    assert Thresholds.load(path) == empty


def write(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    return path


def good(**changes):
    return json.dumps({"format": "sparse_triton.thresholds", "version": 1, "sparsity": 0.5,
                       "method": "per_channel", "layers": {"a.b": [0.5, 1.0]}, **changes})


@pytest.mark.parametrize(("text", "match"), [
    ('{"format": "sparse_triton.thre', "not a valid JSON file"),
    ("[1, 2]", "expected \"format\": 'sparse_triton.thresholds', got 'list'"),
    (good(format="other"), "expected \"format\": 'sparse_triton.thresholds', got 'other'"),
    (good(version=2), "unsupported version 2"),
    (good(layers={"a.b": [0.5, -1.0]}), "'a.b' must be finite and non-negative"),
    (good(layers={"a.b": -0.0001}), "'a.b' must be finite and non-negative"),
    (good(layers={"a.b": math.nan}), "'a.b' must be finite and non-negative"),
    (good(layers={"a.b": 1e39}), "'a.b' must be finite and non-negative"),  # overflows float32
    (good(layers={"a.b": "0.5"}), "'a.b' must be a number or a list of numbers"),
    (good(layers={"a.b": [True]}), "'a.b' must be a number or a list of numbers"),
    (good(layers={"a.b": [[0.5]]}), "'a.b' must be a number or a list of numbers"),
    (good(layers=[0.5]), "\"layers\" must be an object"),
    (good(sparsity=1.5), r"sparsity must be in \[0, 1\), got 1.5"),
    (good(method="topk"), "method must be one of"),
], ids=["truncated", "not-object", "format", "version", "negative", "neg-scalar", "nan", "inf", "string", "bool",
        "nested", "layers", "sparsity", "method"])
def test_load_rejects_bad_files(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        Thresholds.load(write(tmp_path, text))


def test_thresholds_mapping_subset_repr_to():
    th = Thresholds({"model.layers.0.mlp.gate_proj": [0.5, 0.25], "model.layers.0.mlp.up_proj": [0.5, 0.25],
                     "model.layers.1.mlp.gate_proj": 0.75, "model.layers.0.mlpx": 1.0}, 0.5, "magnitude")
    assert len(th) == 4 and "model.layers.1.mlp.gate_proj" in th
    assert repr(th) == "Thresholds(4 layers, method='magnitude', sparsity=0.5)"
    sub = th.subset("model.layers.0.mlp")
    assert sorted(sub) == ["gate_proj", "up_proj"] and (sub.sparsity, sub.method) == (0.5, "magnitude")
    assert torch.equal(sub["gate_proj"], torch.tensor([0.5, 0.25]))
    assert th.subset("") == th and len(th.subset("nothing")) == 0
    meta = th.to("meta")
    assert all(t.device.type == "meta" and t.dtype == torch.float32 for t in meta.values())
    assert th["model.layers.1.mlp.gate_proj"].shape == ()
    with pytest.raises(ValueError, match="'x' must be finite and non-negative"):
        Thresholds({"x": -1.0}, 0.5, "magnitude")
    with pytest.raises(ValueError, match="'x' must be a scalar or a \\[K\\] tensor"):
        Thresholds({"x": torch.zeros(2, 2)}, 0.5, "magnitude")
    with pytest.raises(ValueError, match=r"Thresholds: sparsity must be in \[0, 1\)"):
        Thresholds({}, 1, "magnitude")


def test_report_errors_and_any_module_type():
    model = Net()
    with pytest.raises(ValueError, match="model has no module 'mlp.nope'"):
        activation_sparsity_report(model, CAL[:1], {"fc_in": torch.tensor(0.1), "mlp.nope": torch.tensor(0.1)})
    with pytest.raises(ValueError, match=r"fc_in has a \[5\] threshold but its input has K=32"):
        activation_sparsity_report(model, CAL[:1], {"fc_in": torch.zeros(5)})
    with pytest.raises(ValueError, match="thresholds must be a non-empty mapping"):
        activation_sparsity_report(model, CAL[:1], {})
    report = activation_sparsity_report(model, CAL[:1], {"mlp.act_fn": torch.tensor(0.0), "fc_in": torch.zeros(D_IN)})
    assert report["fc_in"] == 0.0 and 0 <= report["mlp.act_fn"] < 0.01


def test_activation_sparsity_config():
    cfg = ActivationSparsity()
    assert (cfg.sparsity, cfg.method, cfg.thresholds) == (0.5, "magnitude", None)
    assert str(cfg) == "ActivationSparsity(0.5, magnitude)" and hash(cfg) == hash(ActivationSparsity(0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sparsity = 0.7
    with pytest.raises(ValueError, match=r"ActivationSparsity: sparsity must be in \[0, 1\), got 1.0"):
        ActivationSparsity(1.0)
    with pytest.raises(ValueError, match="ActivationSparsity: method must be one of 'magnitude', 'per_channel'"):
        ActivationSparsity(0.5, "topk")
    with pytest.raises(TypeError, match="thresholds must be a Thresholds or None, got dict"):
        ActivationSparsity(thresholds={"a": torch.tensor(0.1)})
    th = Thresholds({"a": [0.1, 0.2]}, 0.7, "per_channel")
    with pytest.raises(ValueError, match="calibrated for sparsity=0.7, method='per_channel'"):
        ActivationSparsity(thresholds=th)
    cfg = ActivationSparsity.from_thresholds(th)
    assert (cfg.sparsity, cfg.method, cfg.thresholds) == (0.7, "per_channel", th)
    assert str(cfg) == "ActivationSparsity(0.7, per_channel, 1 precomputed)"
    assert cfg == ActivationSparsity(0.7, "per_channel", Thresholds({"a": [0.1, 0.2]}, 0.7, "per_channel"))
    hash(cfg)
