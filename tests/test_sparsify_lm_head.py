"""sparsify: output layers stay dense by default (and say so), opting in through filter_fn, and a bare
module as the model (the replacement is returned)."""

import logging

import pytest
import torch
from kit import assert_close
from torch import nn

import sparse_triton as st
from sparse_triton.calibration import ActivationSparsity, Thresholds
from sparse_triton.nn import ActSparseLinear, ActSparseMLP, SparseLinear
from sparse_triton.sparsify import output_heads

transformers = pytest.importorskip("transformers", reason="the Llama tests need transformers (pip install .[hf])")
LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM  # the slow import, once

CFG = st.NMSparsity(2, 4)
VOCAB = 96


def tiny_llama(device, tied: bool):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device).eval()


def messages(caplog, level):
    return [r.getMessage() for r in caplog.records if r.name == "sparse_triton" and r.levelno == level]


def test_lm_head_stays_dense_resize_token_embeddings_works_and_filter_fn_opts_in(device, caplog):
    model = tiny_llama(device, tied=False)
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        out = st.sparsify(model, CFG)
    assert out is model
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.layers[0].mlp.up_proj) is SparseLinear  # the rest is swapped
    kept = [m for m in messages(caplog, logging.INFO) if m.startswith("sparsify: kept lm_head dense")]
    assert len(kept) == 1 and "filter_fn" in kept[0], messages(caplog, logging.INFO)
    model.resize_token_embeddings(VOCAB + 32, mean_resizing=False)
    assert type(model.lm_head) is nn.Linear and model.lm_head.out_features == VOCAB + 32
    with torch.no_grad():
        logits = model(torch.randint(0, VOCAB + 32, (1, 8), device=device)).logits
    assert logits.shape == (1, 8, VOCAB + 32) and torch.isfinite(logits).all()

    opted = st.sparsify(tiny_llama(device, tied=False), CFG, filter_fn=lambda module, fqn: fqn == "lm_head")
    assert type(opted.lm_head) is SparseLinear


class Net(nn.Module):
    """No ``lm_head`` by name: an output layer from get_output_embeddings() and one tied to an embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.body = nn.Linear(16, 16)
        self.proj_out = nn.Linear(16, 32)
        self.decoder = nn.Linear(16, 32, bias=False)
        self.decoder.weight = self.emb.weight

    def get_output_embeddings(self):
        return self.proj_out

    def forward(self, ids):
        h = self.body(self.emb(ids))
        return self.proj_out(h) + self.decoder(h)


def test_output_heads_found_by_method_and_by_tie(caplog):
    net = Net()
    heads = output_heads(net)
    assert set(heads) == {id(net.proj_out), id(net.decoder)}
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        st.sparsify(net, CFG)
    assert type(net.body) is SparseLinear
    assert type(net.proj_out) is nn.Linear and type(net.decoder) is nn.Linear
    assert any(m.startswith("sparsify: kept proj_out dense") for m in messages(caplog, logging.INFO))
    assert any("decoder" in m and "tied" in m for m in messages(caplog, logging.WARNING))
    st.sparsify(net, CFG, filter_fn=lambda module, fqn: True)  # opted in: the untied one goes, the tie stays
    assert type(net.proj_out) is SparseLinear and type(net.decoder) is nn.Linear
    assert net(torch.randint(0, 32, (2, 5))).shape == (2, 5, 32)


def test_activation_sparsity_keeps_the_head_dense_by_default(device):
    model = tiny_llama(device, tied=False)
    names = [fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "lm_head" in names
    th = Thresholds({n: 0.05 for n in names}, 0.5, "magnitude")
    st.sparsify(model, ActivationSparsity.from_thresholds(th))
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[0].mlp) is ActSparseMLP
    opted = st.sparsify(tiny_llama(device, tied=False), ActivationSparsity.from_thresholds(th),
                        filter_fn=lambda module, fqn: True)
    assert type(opted.lm_head) is ActSparseLinear


# ---------------------------------------------------------------------------------------------------- bare


def test_bare_linear_nm_returns_the_replacement(device, caplog):
    lin = nn.Linear(64, 32).to(device)
    x = torch.randn(5, 64, device=device)
    want = torch.nn.functional.linear(x.double(), st.nm_prune(lin.weight, 2, 4).double(), lin.bias.double())
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        out = st.sparsify(lin, CFG)
    assert type(out) is SparseLinear and type(lin) is nn.Linear
    assert any("the model (Linear) -> SparseLinear(64, 32" in m for m in messages(caplog, logging.INFO))
    assert_close(out(x), want, K=64)
    kept = nn.Linear(8, 8)
    assert st.sparsify(kept, CFG, filter_fn=lambda m, fqn: fqn != "") is kept  # filter_fn sees the root as ""


def test_bare_linear_and_mlp_activation_sparsity_return_the_replacement(device):
    lin = nn.Linear(64, 32).to(device)
    out = st.sparsify(lin, ActivationSparsity(0.5), calibration_data=[torch.randn(64, 64, device=device)])
    assert type(out) is ActSparseLinear and out.threshold.dim() == 0
    mlp = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4)).model.layers[0].mlp.to(device)
    out = st.sparsify(mlp, ActivationSparsity(0.5), calibration_data=[torch.randn(4, 8, 64, device=device)])
    assert type(out) is ActSparseMLP


def test_bare_meta_linear_is_returned_with_a_warning(caplog):
    lin = nn.Linear(16, 8, device="meta")
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        assert st.sparsify(lin, CFG) is lin
    assert any("meta" in m for m in messages(caplog, logging.WARNING))
