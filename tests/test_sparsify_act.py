"""sparsify(model, ActivationSparsity(...)): calibration, which modules are swapped, and the logits of a tiny
Hugging Face Llama against the dense model with the same input masks applied by hooks."""

import copy
import logging
import math

import pytest
import torch
from torch import nn

import sparse_triton as st
from sparse_triton.calibration import ActivationSparsity, Thresholds, calibrate_thresholds
from sparse_triton.nn import ActSparseLinear, ActSparseMLP, SparseLinear

transformers = pytest.importorskip("transformers", reason="the Llama tests need transformers (pip install .[hf])")
LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM  # the slow import, once

VOCAB = 100
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny_llama(device):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB)
    return LlamaForCausalLM(cfg).to(device).eval()


def batches(device, n=2, rows=2, seq=8):
    return [torch.randint(0, VOCAB, (rows, seq), device=device) for _ in range(n)]


def masked_dense_logits(model, thresholds, ids):
    """The dense model's logits with every thresholded Linear's input replaced by ``x * (|x| > t)``."""
    handles = []
    modules = dict(model.named_modules())

    def hook(t):
        return lambda mod, args: (torch.where(args[0].float().abs() > t.to(args[0].device), args[0], 0.0),)

    for fqn, t in thresholds.items():
        handles.append(modules[fqn].register_forward_pre_hook(hook(t)))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def check_swapped(model):
    for layer in model.model.layers:
        assert type(layer.mlp) is ActSparseMLP
        for p in ATTN:
            assert type(getattr(layer.self_attn, p)) is ActSparseLinear, p
    assert type(model.lm_head) is nn.Linear


# Two decoder layers of K <= 128 in fp32 against the same model in fp32: rounding only, carried through.
ATOL = 1e-5 * math.sqrt(128) * 4


def test_llama_sparsity_zero_equals_dense(device):
    model = tiny_llama(device)
    dense = copy.deepcopy(model)
    keys = set(model.state_dict())
    out = st.sparsify(model, ActivationSparsity(0.0), calibration_data=batches(device))
    assert out is model
    check_swapped(model)
    assert set(model.state_dict()) - keys == {f"{fqn}.threshold" for fqn, m in model.named_modules()
                                              if isinstance(m, ActSparseLinear)}
    assert all(m.threshold.eq(0).all() for m in model.modules() if isinstance(m, ActSparseLinear))
    ids = batches(device, n=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", ["magnitude", "per_channel"])
def test_llama_half_sparsity_equals_masked_dense(device, method):
    model = tiny_llama(device)
    dense = copy.deepcopy(model)
    data = batches(device)
    th = calibrate_thresholds(dense, data, 0.5, method)
    st.sparsify(model, ActivationSparsity(0.5, method), calibration_data=data)
    check_swapped(model)
    mlp = model.model.layers[0].mlp
    assert torch.equal(mlp.gate_proj.threshold.cpu(), th["model.layers.0.mlp.gate_proj"])
    assert torch.equal(mlp.down_proj.threshold.cpu(), th["model.layers.0.mlp.down_proj"])
    ids = batches(device, n=1)[0]
    want = masked_dense_logits(dense, th, ids)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    with torch.no_grad():
        assert (dense(ids).logits - want).abs().max() > 100 * ATOL  # half the inputs skipped: it shows


def test_precomputed_thresholds_need_no_data(device):
    model = tiny_llama(device)
    th = calibrate_thresholds(model, batches(device), 0.4)
    st.sparsify(model, ActivationSparsity.from_thresholds(th))
    check_swapped(model)
    assert model.model.layers[1].self_attn.o_proj.threshold.item() == th["model.layers.1.self_attn.o_proj"].item()


def test_thresholds_for_a_subset(device, caplog):
    # Thresholds for layer 0's MLP and one attention projection only: the rest stays dense.
    model = tiny_llama(device)
    th = calibrate_thresholds(model, batches(device), 0.5)
    keep = {k: v for k, v in th.items()
            if k.startswith("model.layers.0.mlp.") or k == "model.layers.1.self_attn.q_proj"}
    sub = Thresholds(keep, 0.5, "magnitude")
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        st.sparsify(model, ActivationSparsity.from_thresholds(sub))
    assert type(model.model.layers[0].mlp) is ActSparseMLP
    assert type(model.model.layers[1].mlp) is not ActSparseMLP
    assert type(model.model.layers[1].mlp.gate_proj) is nn.Linear
    assert type(model.model.layers[1].self_attn.q_proj) is ActSparseLinear
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    msgs = [r.getMessage() for r in caplog.records if r.name == "sparse_triton"]
    assert any("model.layers.0.mlp -> ActSparseMLP" in s for s in msgs), msgs
    assert any("1 MLPs and 1 of 1" in s for s in msgs), msgs


def test_unequal_gate_up_thresholds_swap_layers_one_by_one(device, caplog):
    model = tiny_llama(device)
    th = dict(calibrate_thresholds(model, batches(device), 0.5))
    th["model.layers.0.mlp.up_proj"] = th["model.layers.0.mlp.up_proj"] + 0.1
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        st.sparsify(model, ActivationSparsity.from_thresholds(Thresholds(th, 0.5, "magnitude")))
    mlp0 = model.model.layers[0].mlp
    assert type(mlp0) is not ActSparseMLP and type(mlp0.up_proj) is ActSparseLinear
    assert type(model.model.layers[1].mlp) is ActSparseMLP
    assert any("different thresholds" in r.getMessage() for r in caplog.records)


def test_filter_fn_selects_calibrated_layers(device):
    model = tiny_llama(device)
    st.sparsify(model, ActivationSparsity(0.5), filter_fn=lambda m, fqn: ".mlp." in fqn,
                calibration_data=batches(device))
    assert all(type(layer.mlp) is ActSparseMLP for layer in model.model.layers)
    assert all(type(layer.self_attn.q_proj) is nn.Linear for layer in model.model.layers)


def test_plain_mlp_and_skip_rules(caplog):
    class Sub(nn.Linear):
        pass

    emb = nn.Embedding(10, 16)
    head = nn.Linear(16, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "fc": nn.Linear(16, 16), "sub": Sub(16, 16), "head": head})
    names = ["fc", "sub", "head"]
    th = Thresholds({n: 0.1 for n in names}, 0.5, "magnitude")
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        st.sparsify(model, ActivationSparsity.from_thresholds(th))
    assert type(model["fc"]) is ActSparseLinear
    assert type(model["sub"]) is Sub and model["head"] is head
    skipped = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(skipped) == 2 and any("subclass" in s for s in skipped) and any("tied" in s for s in skipped)


def test_missing_calibration_data_raises():
    with pytest.raises(ValueError, match="calibration_data"):
        st.sparsify(nn.Sequential(nn.Linear(8, 8)), ActivationSparsity(0.5))


def test_calibration_data_with_nm_config_raises():
    with pytest.raises(ValueError, match="calibration_data"):
        st.sparsify(nn.Sequential(nn.Linear(8, 8)), st.NMSparsity(2, 4), calibration_data=[torch.randn(2, 8)])


def test_config_type_error_names_both_configs():
    with pytest.raises(TypeError, match="NMSparsity or an ActivationSparsity"):
        st.sparsify(nn.Sequential(nn.Linear(8, 8)), 0.5)


def test_nm_path_unchanged(device):
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).to(device)
    st.sparsify(model, st.NMSparsity(2, 4))
    assert type(model[0]) is SparseLinear and type(model[2]) is SparseLinear
