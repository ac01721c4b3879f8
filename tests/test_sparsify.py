"""sparsify(model, config, filter_fn): which layers are swapped, which are skipped and why."""

import copy
import logging
import math

import pytest
import torch
from torch import nn

import sparse_triton as st
from sparse_triton.nn import SparseLinear

CFG = st.NMSparsity(2, 4)
LINEAR_FQNS = ["0", "2.layers.0", "2.layers.1", "3.0"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(32, 48), nn.Linear(48, 32, bias=False)])
        self.act = nn.GELU()

    def forward(self, x):
        return self.layers[1](self.act(self.layers[0](x)))


def make_model():
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), Block(), nn.Sequential(nn.Linear(32, 8)))


def pruned_copy(model):
    """The dense model with every nn.Linear weight magnitude-pruned to 2:4 (the expected result)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for mod in ref.modules():
            if type(mod) is nn.Linear:
                mod.weight.copy_(st.nm_prune(mod.weight, CFG.n, CFG.m))
    return ref


def skip_records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "sparse_triton" and r.levelno >= logging.WARNING]


def test_swaps_every_linear_in_nested_model(device):
    model = make_model().to(device)
    ref = pruned_copy(model)
    out = st.sparsify(model, CFG)
    assert out is model
    assert [type(model[0]), type(model[2].layers[0]), type(model[2].layers[1]), type(model[3][0])] == [SparseLinear] * 4
    assert not any(type(mod) is nn.Linear for mod in model.modules())
    assert model[2].layers[1].bias is None
    x = torch.randn(3, 5, 20, device=device)
    y, y_ref = model(x), ref(x).double()
    # Four layers of K <= 48 in fp32: per-layer error ~1e-6 * sqrt(K), carried through the layers.
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-6 * math.sqrt(48) * 4)


def test_returns_same_model_and_logs_swaps(caplog):
    model = make_model()
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        assert st.sparsify(model, CFG) is model
    msgs = [r.getMessage() for r in caplog.records if r.name == "sparse_triton"]
    assert any("4 of 4" in s for s in msgs), msgs
    assert not skip_records(caplog)


def test_filter_fn_gets_fully_qualified_names():
    model = make_model()
    seen = []

    def keep_block(module, fqn):
        seen.append((fqn, module))
        return fqn.startswith("2.")

    originals = {fqn: mod for fqn, mod in model.named_modules()}
    st.sparsify(model, CFG, filter_fn=keep_block)
    assert [f for f, _ in seen] == LINEAR_FQNS
    for fqn, mod in seen:  # the module itself is passed, as it was before the swap
        assert mod is originals[fqn] and type(mod) is nn.Linear
    assert type(model[2].layers[0]) is SparseLinear and type(model[2].layers[1]) is SparseLinear
    assert model[0] is originals["0"] and model[3][0] is originals["3.0"]


def test_filter_fn_rejecting_all_leaves_model_untouched():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    st.sparsify(model, CFG, filter_fn=lambda mod, fqn: False)
    assert not any(isinstance(mod, SparseLinear) for mod in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_skips_linear_subclass_with_reason(caplog):
    model = nn.Sequential(nn.Linear(16, 16), ScaledLinear(16, 8))
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        st.sparsify(model, CFG)
    assert type(model[0]) is SparseLinear
    assert type(model[1]) is ScaledLinear
    skipped = skip_records(caplog)
    assert len(skipped) == 1 and "1" in skipped[0] and "subclass" in skipped[0], skipped


class AttnBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_skips_multihead_attention_out_proj(caplog):
    model = AttnBlock().eval()
    x = torch.randn(2, 5, 16)
    attn_before = model.attn(x, x, x, need_weights=False)[0]
    out_proj = model.attn.out_proj
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        st.sparsify(model, CFG)
    assert type(model.proj) is SparseLinear
    assert model.attn.out_proj is out_proj
    skipped = skip_records(caplog)
    assert len(skipped) == 1 and "attn.out_proj" in skipped[0], skipped
    # The attention still runs, unchanged, and so does the whole block.
    assert torch.equal(model.attn(x, x, x, need_weights=False)[0], attn_before)
    assert model(x).shape == (2, 5, 16)


def test_skips_plain_linear_owned_by_multihead_attention(caplog):
    # MHA reads out_proj.weight directly; even a plain nn.Linear there must stay dense.
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    plain = nn.Linear(16, 16)
    plain.load_state_dict(mha.out_proj.state_dict())
    mha.out_proj = plain
    model = nn.Sequential(mha)
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        st.sparsify(model, CFG)
    assert model[0].out_proj is plain
    skipped = skip_records(caplog)
    assert len(skipped) == 1 and "0.out_proj" in skipped[0] and "MultiheadAttention" in skipped[0], skipped
    x = torch.randn(2, 5, 16)
    assert model[0](x, x, x)[0].shape == (2, 5, 16)


def test_skips_tied_weights(caplog):
    a, b, c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b, c)
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        st.sparsify(model, CFG)
    assert model[0] is a and model[2] is b and a.weight is b.weight
    assert type(model[3]) is SparseLinear
    skipped = skip_records(caplog)
    assert len(skipped) == 2, skipped
    assert {s.split(":")[1].split()[-1] for s in skipped} == {"0", "2"}
    assert all("tied" in s or "shared" in s for s in skipped)
    assert model(torch.randn(3, 16)).shape == (3, 8)


def test_skips_head_tied_to_embedding(caplog):
    emb, head = nn.Embedding(32, 16), nn.Linear(16, 32, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        st.sparsify(model, CFG)
    assert model["head"] is head and head.weight is emb.weight
    skipped = skip_records(caplog)
    assert len(skipped) == 1 and "head" in skipped[0], skipped


def test_skips_module_shared_between_parents(caplog):
    # One nn.Linear instance registered under two parents: swapping it at either would untie them.
    shared = nn.Linear(16, 16)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        st.sparsify(model, CFG)
    assert model[0][0] is shared and model[1][0] is shared
    assert skip_records(caplog)


def test_skips_meta_weights(caplog):
    model = nn.Sequential(nn.Linear(16, 8, device="meta"), nn.Linear(8, 8))
    with caplog.at_level(logging.INFO, logger="sparse_triton"):
        st.sparsify(model, CFG)
    assert type(model[0]) is nn.Linear and type(model[1]) is SparseLinear
    skipped = skip_records(caplog)
    assert len(skipped) == 1 and "meta" in skipped[0], skipped


def test_sparsify_twice_is_a_no_op():
    model = st.sparsify(make_model(), CFG)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mods = list(model.modules())
    st.sparsify(model, st.NMSparsity(1, 4))
    assert list(model.modules()) == mods
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


BAD_ARGS = {
    "model": ("model", lambda: ("not a module", CFG, None)),
    "model-None": ("model", lambda: (None, CFG, None)),
    "config-tuple": ("config", lambda: (make_model(), (2, 4), None)),
    "config-str": ("config", lambda: (make_model(), "2:4", None)),
    "filter_fn": ("filter_fn", lambda: (make_model(), CFG, 42)),
}


@pytest.mark.parametrize("case", list(BAD_ARGS), ids=str)
def test_bad_arguments_raise_type_error(case):
    name, make = BAD_ARGS[case]
    model, config, filter_fn = make()
    with pytest.raises(TypeError, match=name):
        st.sparsify(model, config, filter_fn=filter_fn)
