"""No computation with stale state, no half-loaded module.

- Prepared weight forms (ops/_prepared.py: the dense copy of an N:M weight when the tuner picks cuBLAS) are
  rebuilt after every update the host can see (in-place ops, no_grad copies, load_state_dict, fused
  optimizer steps), dropped by the modules on load and conversion, and dropped on demand by
  ``clear_weight_cache(obj)`` after ``.data`` writes, which no version counter sees.
- The activation-sparse paths keep no copy of a weight at all: ``.data`` writes are always seen.
- ``load_state_dict`` that raises leaves SparseLinear / ActSparseLinear / ActSparseMLP bit-identical.
- Python-float thresholds: a bounded LRU of fp32 scalars, and no lock on the torch.compile path.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from kit import assert_close, no_timer
from torch import nn

import sparse_triton as st
from sparse_triton.nn import ActSparseLinear, ActSparseMLP, SparseLinear
from sparse_triton.ops import _prepared
from sparse_triton.ops import act_sparse as act_ops
from sparse_triton.ops import nm_tuning as nt
from sparse_triton.reference.act_sparse import masked

# ------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _no_forms():
    """Each test starts and ends with no prepared form (cached_forms() counts this test's only)."""
    _prepared.clear_weight_cache()
    yield
    _prepared.clear_weight_cache()


@pytest.fixture
def dense_winner(tuner_factory):
    """The N:M forward and dx ops run their dense implementation (F.linear on the kept dense form), as
    where the tuner measured cuBLAS fastest; other ops take their first candidate (nothing is timed)."""
    tuner = tuner_factory(no_timer, tune_on_cpu=False)
    choose = tuner.choose

    def pick(op, key, device):
        return nt.DENSE if op is nt.FWD or op is nt.BWD_DX else choose(op, key, device)

    tuner.choose = pick
    st.tuning.set_default_tuner(tuner)
    yield


def _compress(w: torch.Tensor) -> st.NMTensor:
    """2:4 compression of fp32 ``w`` through the fp64 reference (the interpreted kernel is slow)."""
    c = st.nm_compress(w.double(), 2, 4)
    return st.NMTensor(c.values.float(), c.indices, c.shape, 2, 4, c.dim)


def _sparse(bias=True):
    return SparseLinear.from_dense(nn.Linear(96, 48, bias=bias, dtype=torch.float64), st.NMSparsity(2, 4)).float()


def _ref(lin: SparseLinear, x):
    b = None if lin.bias is None else lin.bias.detach().double()
    return F.linear(x.double(), lin.weight.detach().double(), b)


def _check_fresh(lin, x):
    """``lin(x)`` (no grad) against the fp64 formula on the module's current tensors."""
    with torch.no_grad():
        assert_close(lin(x), _ref(lin, x), lin.in_features)


def _new_values(lin):
    return torch.randn_like(lin.values)


# ------------------------------------------------------------------ N:M dense form: every write path

UPDATES = {
    "no_grad_copy": lambda lin, v: lin.values.copy_(v),
    "no_grad_mul": lambda lin, v: lin.values.mul_(-3),
    "detach_mul": lambda lin, v: lin.values.detach().mul_(-3),  # shares the version counter
    "view_write": lambda lin, v: lin.values[:, :4].fill_(7.0),
    "indices": lambda lin, v: lin.indices.copy_(_compress(torch.randn(48, 96)).indices),
}


@pytest.mark.parametrize("how", list(UPDATES))
def test_dense_form_follows_version_counted_writes(dense_winner, how):
    lin = _sparse()
    x = torch.randn(5, 96)
    _check_fresh(lin, x)
    assert _prepared.cached_forms() == 1  # the dense winner keeps its form
    with torch.no_grad():
        UPDATES[how](lin, _new_values(lin))
    _check_fresh(lin, x)


@pytest.mark.parametrize("target", ["module", "values", "values.data", "nmtensor"])
def test_data_write_then_clear_weight_cache(dense_winner, target):
    """``.data`` writes bypass the version counter (the documented rule): clear_weight_cache(obj) drops
    exactly the forms built from obj, whichever alias names it."""
    lin, other = _sparse(), _sparse()
    x = torch.randn(5, 96)
    _check_fresh(lin, x)
    _check_fresh(other, x)
    assert _prepared.cached_forms() == 2
    version = lin.values._version
    lin.values.data.mul_(-2)
    assert lin.values._version == version  # the premise of the rule: nothing for the host to see
    obj = {"module": lin, "values": lin.values, "values.data": lin.values.data, "nmtensor": lin.weight_nm()}[target]
    st.ops.clear_weight_cache(obj)
    assert _prepared.cached_forms() == 1  # the other layer's form is kept
    _check_fresh(lin, x)
    _check_fresh(other, x)
    with pytest.raises(TypeError, match="clear_weight_cache: expected tensors, NMTensors or nn.Modules, got str"):
        st.ops.clear_weight_cache("values")


@pytest.mark.parametrize("optim", ["adamw_fused", "adamw_foreach", "sgd_fused"])
def test_optimizer_steps_are_seen(dense_winner, optim):
    """Fused optimizers write parameters without bumping their version counters; a kept form of a
    trainable weight does not outlive an optimizer step (train step, then eval, then train again)."""
    lin = _sparse()
    opt = {"adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
           "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True),
           "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.01, fused=True)}[optim](lin.parameters())
    x = torch.randn(6, 96)
    for _ in range(2):
        lin(x).square().sum().backward()
        assert _prepared.cached_forms() == 1  # forward and backward shared the dense form
        before = lin.values.detach().clone()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(before, lin.values)
        _check_fresh(lin, x)  # eval after the step


def test_frozen_weight_form_survives_optimizer_steps(dense_winner):
    """A weight that does not require grad (a frozen sparse base) keeps its form across other steps."""
    lin = _sparse().requires_grad_(False)
    head = nn.Linear(48, 4)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    x = torch.randn(5, 96)
    _check_fresh(lin, x)
    form = next(iter(_prepared._forms.values()))[2]["dense"]
    head(lin(x)).sum().backward()
    opt.step()
    _check_fresh(lin, x)
    assert next(iter(_prepared._forms.values()))[2]["dense"] is form


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
def test_load_state_dict_drops_and_rebuilds_the_form(dense_winner, assign):
    lin = _sparse()
    x = torch.randn(5, 96)
    _check_fresh(lin, x)
    assert _prepared.cached_forms() == 1
    new = _sparse().state_dict()
    lin.load_state_dict(new, assign=assign)
    assert _prepared.cached_forms() == 0  # the dense copy of the old weight is gone at once
    assert torch.equal(lin.values, new["values"]) and torch.equal(lin.indices, new["indices"])
    _check_fresh(lin, x)


def test_conversion_drops_the_form(dense_winner):
    lin = _sparse()
    x = torch.randn(5, 96)
    _check_fresh(lin, x)
    lin.half()  # the same Parameter objects, new data
    assert _prepared.cached_forms() == 0
    _check_fresh(lin, x.half())


def test_functional_nm_linear_data_write_and_clear(dense_winner):
    w = _compress(torch.randn(48, 96))
    x = torch.randn(5, 96)
    assert_close(st.nm_linear(x, w), x.double() @ w.to_dense().double().t(), 96)
    w.values.data.mul_(0.5)
    st.ops.clear_weight_cache(w)
    assert_close(st.nm_linear(x, w), x.double() @ w.to_dense().double().t(), 96)


def test_deepcopy_has_forms_of_its_own(dense_winner):
    lin = _sparse()
    x = torch.randn(5, 96)
    _check_fresh(lin, x)
    twin = copy.deepcopy(lin)
    _check_fresh(twin, x)
    assert _prepared.cached_forms() == 2
    with torch.no_grad():
        twin.values.mul_(-1)
    _check_fresh(twin, x)
    _check_fresh(lin, x)


@pytest.mark.gpu
def test_cuda_graph_replays_see_data_writes(dense_winner, device):
    """Nothing cached is read during capture: a graph rebuilds the dense form on each replay."""
    lin = SparseLinear.from_dense(nn.Linear(256, 128, device=device, dtype=torch.float16))
    x = torch.randn(64, 256, device=device, dtype=torch.float16)
    with torch.no_grad():
        lin(x)  # tune and keep a form outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lin(x)
        lin.values.data.mul_(-1)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y.double(), _ref(lin, x), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ activation sparsity: nothing kept


def test_row_major_weight_sees_data_writes(device):
    """A weight not stored input-major runs the masked dense product: no transposed copy to go stale."""
    w = torch.randn(48, 96, device=device)
    x = torch.randn(3, 96, device=device)
    st.act_sparse_linear(x, w, 0.5)
    w.data.mul_(-2)
    assert_close(st.act_sparse_linear(x, w, 0.5), F.linear(masked(x, torch.tensor(0.5)).double(), w.double()), 96)
    assert _prepared.cached_forms() == 0


def test_mlp_op_with_row_major_weights_sees_data_writes(device):
    H, I = 64, 96  # noqa: E741
    wg, wu, wd = torch.randn(I, H, device=device), torch.randn(I, H, device=device), torch.randn(H, I, device=device)
    wg, wu = act_ops.input_major(wg), act_ops.input_major(wu)  # gate/up on the kernel, down row-major
    x = torch.randn(2, H, device=device)
    st.act_sparse_mlp(x, wg, wu, wd, 0.3, 0.05)
    wd.data.mul_(-1)
    wg.data.mul_(2)
    expect = act_ops.reference.act_sparse_mlp(x.double(), wg.double(), wu.double(), wd.double(), torch.tensor(0.3),
                                              torch.tensor(0.05), "silu")
    assert_close(st.act_sparse_mlp(x, wg, wu, wd, 0.3, 0.05), expect, I, scale=4.0)


WRITES = {
    "data_mul": lambda m: m.weight.data.mul_(-2),
    "no_grad_copy": lambda m: m.weight.copy_(torch.randn_like(m.weight)),
    "data_set_row_major": lambda m: setattr(m.weight, "data", m.weight.data.contiguous()),
    "row_major_then_data_mul": lambda m: (setattr(m.weight, "data", m.weight.data.contiguous()), m(torch.randn(
        2, m.in_features, device=m.weight.device)), m.weight.data.mul_(-2)),
    "load_state_dict": lambda m: m.load_state_dict(nn.Linear(96, 48, device=m.weight.device).state_dict()),
    "load_assign": lambda m: m.load_state_dict(nn.Linear(96, 48, device=m.weight.device).state_dict(), assign=True),
}


@pytest.mark.parametrize("how", list(WRITES))
def test_act_sparse_linear_module_sees_every_write(device, how):
    m = ActSparseLinear(96, 48, threshold=0.5, device=device)
    x = torch.randn(3, 96, device=device)
    m(x)
    with torch.no_grad():
        WRITES[how](m)
        y = m(x)
    assert_close(y, F.linear(masked(x, m.threshold).double(), m.weight.double(), m.bias.double()), 96)
    assert _prepared.cached_forms() == 0


@pytest.mark.parametrize("how", ["data_mul", "row_major_then_data_mul", "load_state_dict", "load_assign"])
def test_act_sparse_mlp_module_sees_every_write(device, how):
    mlp = ActSparseMLP(64, 96, threshold_in=0.3, threshold_mid=0.05, device=device)
    x = torch.randn(2, 64, device=device)
    with torch.no_grad():
        mlp(x)  # the fused op
        if how == "data_mul":
            mlp.down_proj.weight.data.mul_(-2)
        elif how == "row_major_then_data_mul":
            for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                p.weight.data = p.weight.data.contiguous()
            mlp(x)
            mlp.up_proj.weight.data.mul_(-2)
            mlp.down_proj.weight.data.mul_(3)
        else:
            mlp.load_state_dict(ActSparseMLP(64, 96, device=device).state_dict() | {
                k: v for k, v in mlp.state_dict().items() if k.endswith("threshold")}, assign=how == "load_assign")
        y = mlp(x)
    g, u, d = (p.weight.double() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    xm = masked(x, mlp.gate_proj.threshold).double()
    h = F.silu(xm @ g.t()) * (xm @ u.t())
    expect = masked(h, mlp.down_proj.threshold) @ d.t()
    assert_close(y, expect, 96, scale=2.0)


# --------------------------------------------------------------------- load_state_dict is all or nothing


def _bits(module: nn.Module) -> dict:
    """Every tensor of ``module`` (by name): its object, dtype, shape, strides and raw bytes."""
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()
        out[name] = (t, t.dtype, tuple(t.shape), t.stride(), raw)
    return out


def _assert_unchanged(module, before):
    after = _bits(module)
    assert list(after) == list(before)
    for name, (t, dtype, shape, stride, raw) in before.items():
        t2, dtype2, shape2, stride2, raw2 = after[name]
        assert t2 is t and (dtype2, shape2, stride2) == (dtype, shape, stride), name
        assert torch.equal(raw2, raw), f"{name} changed"


def _sl_bad(sd, case):
    sd = dict(sd)
    if case == "bias-shape":
        sd["bias"] = torch.zeros(47)
    elif case == "values-int":
        sd["values"] = sd["values"].to(torch.int32)
    elif case == "indices-shape":  # values of the right shape, indices not
        sd["indices"] = torch.cat([sd["indices"], sd["indices"]], dim=1)
    elif case == "indices-corrupt":
        sd["indices"] = torch.full_like(sd["indices"], -1)
    elif case == "values-without-indices":
        del sd["indices"]
    elif case == "indices-without-values":
        del sd["values"]
    elif case == "bias-int":
        sd["bias"] = torch.zeros(48, dtype=torch.int64)
    return sd


SL_CASES = ["bias-shape", "values-int", "indices-shape", "indices-corrupt", "values-without-indices",
            "indices-without-values", "bias-int"]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
@pytest.mark.parametrize("case", SL_CASES)
def test_sparse_linear_failed_load_changes_nothing(case, strict):
    lin = _sparse()
    before = _bits(lin)
    with pytest.raises((ValueError, TypeError), match=r"SparseLinear: .*(state_dict|values|indices|bias)"):
        lin.load_state_dict(_sl_bad(_sparse().state_dict(), case), strict=strict)
    _assert_unchanged(lin, before)


def test_sparse_linear_assign_needs_one_dtype_and_device():
    lin = _sparse()
    before = _bits(lin)
    sd = _sparse().state_dict()
    sd["bias"] = sd["bias"].double()
    with pytest.raises(ValueError, match=r"assign=True.*values: torch.float32.*bias: torch.float64"):
        lin.load_state_dict(sd, assign=True)
    _assert_unchanged(lin, before)
    sd["bias"] = sd["bias"].float()
    lin.load_state_dict(sd, assign=True)  # consistent: fine
    assert lin.values.data_ptr() == sd["values"].data_ptr()  # assigned, not copied


def _asl_bad(sd, case):
    sd = dict(sd)
    if case == "bias-shape":
        sd["bias"] = torch.zeros(47)
    elif case == "weight-shape":
        sd["weight"] = torch.zeros(48, 95)
    elif case == "weight-int":
        sd["weight"] = torch.zeros(48, 96, dtype=torch.int32)
    elif case == "threshold-negative":
        sd["threshold"] = torch.tensor(-0.5)
    elif case == "threshold-nan-channel":
        sd["threshold"] = torch.tensor([0.1] * 95 + [float("nan")])
    elif case == "threshold-fp64-overflow":
        sd["threshold"] = torch.tensor(1e300, dtype=torch.float64)
    elif case == "threshold-shape":
        sd["threshold"] = torch.ones(95)
    elif case == "new-kind-bad-bias":  # a per-channel threshold (resizes the buffer) and a bad bias
        sd["threshold"] = torch.full((96,), 0.25)
        sd["bias"] = torch.zeros(49)
    return sd


ASL_CASES = ["bias-shape", "weight-shape", "weight-int", "threshold-negative", "threshold-nan-channel",
             "threshold-fp64-overflow", "threshold-shape", "new-kind-bad-bias"]


@pytest.mark.parametrize("case", ASL_CASES)
def test_act_sparse_linear_failed_load_changes_nothing(case):
    m = ActSparseLinear(96, 48, threshold=0.5)
    before = _bits(m)
    with pytest.raises((ValueError, TypeError), match=r"ActSparseLinear: .*(state_dict|threshold)"):
        m.load_state_dict(_asl_bad(ActSparseLinear(96, 48, threshold=0.25).state_dict(), case))
    _assert_unchanged(m, before)


MLP_CASES = {
    "down-threshold-negative": lambda sd: sd.update({"down_proj.threshold": torch.tensor(-1.0)}),
    "down-weight-shape": lambda sd: sd.update({"down_proj.weight": torch.zeros(64, 95)}),
    "up-threshold-differs": lambda sd: sd.update({"up_proj.threshold": torch.tensor(0.75)}),
    "gate-threshold-only": lambda sd: sd.pop("up_proj.threshold"),  # would differ from the kept up_proj one
    "up-threshold-overflow": lambda sd: sd.update({"up_proj.threshold": torch.tensor(1e39, dtype=torch.float64),
                                                   "gate_proj.threshold": torch.tensor(1e39, dtype=torch.float64)}),
}


@pytest.mark.parametrize("case", list(MLP_CASES))
def test_act_sparse_mlp_failed_load_changes_nothing(case):
    mlp = ActSparseMLP(64, 96, threshold_in=0.3, threshold_mid=0.05)
    before = _bits(mlp)
    sd = ActSparseMLP(64, 96, threshold_in=0.5, threshold_mid=0.1).state_dict()
    MLP_CASES[case](sd)
    with pytest.raises(ValueError, match="ActSparse(MLP|Linear)"):
        mlp.load_state_dict(sd, strict=False)
    _assert_unchanged(mlp, before)


def test_mlp_set_thresholds_checks_both_first():
    mlp = ActSparseMLP(64, 96, threshold_in=0.3, threshold_mid=0.05)
    before = _bits(mlp)
    with pytest.raises(ValueError, match="ActSparseMLP.set_thresholds: threshold_mid must be finite"):
        mlp.set_thresholds(threshold_in=0.9, threshold_mid=-1.0)
    _assert_unchanged(mlp, before)


# --------------------------------------------------------------------------- the float-threshold cache


def test_float_threshold_cache_is_a_bounded_lru(monkeypatch):
    monkeypatch.setattr(act_ops, "_scalars", type(act_ops._scalars)())
    bound = act_ops.SCALAR_CACHE_SIZE
    assert bound == 256
    cpu = torch.device("cpu")
    first = act_ops.check_threshold(0.001, 8, cpu, "t")
    hot = act_ops.check_threshold(0.5, 8, cpu, "t")
    for i in range(2 * bound):
        act_ops.check_threshold(1.0 + i, 8, cpu, "t")
        assert act_ops.check_threshold(0.5, 8, cpu, "t") is hot  # recently used: kept
        assert len(act_ops._scalars) <= bound
    assert len(act_ops._scalars) == bound
    again = act_ops.check_threshold(0.001, 8, cpu, "t")  # evicted, made again
    assert again is not first and again.dtype == torch.float32 and again.item() == torch.tensor(0.001).item()
    w = act_ops.input_major(torch.randn(16, 8))
    x = torch.tensor([[0.0005, 0.002, -0.001, 0.0011, -0.3, 0.0, 2.0, 0.001]])
    y = st.act_sparse_linear(x, w, 0.001)
    assert_close(y, F.linear(masked(x, torch.tensor(0.001)).double(), w.double()), 8)


def test_float_threshold_compiles_fullgraph(device):
    """A Python-float threshold traces without touching the cache's lock (a graph break before)."""
    w = act_ops.input_major(torch.randn(32, 64, device=device))

    def f(x):
        return st.act_sparse_linear(x, w, 0.4)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.randn(2, 64, device=device)
    torch.testing.assert_close(compiled(x), f(x))
    with pytest.raises(ValueError, match="threshold must be finite and >= 0, got 1e\\+39"):
        torch.compile(lambda x: st.act_sparse_linear(x, w, 1e39), backend="eager")(x)  # the check still runs
