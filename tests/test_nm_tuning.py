"""ops/nm_tuning.py: the N:M linear ops' candidates (dense always among them), entries, and the tuner
driving the real op on CPU (interpreted kernels) with a fake timer."""

import pytest
import torch
from kit import CPU, CUDA, FakeTimer

import sparse_triton as st
from sparse_triton.kernels import nm_matmul as kernel
from sparse_triton.ops import _prepared
from sparse_triton.ops import nm_tuning as nt
from sparse_triton.tuning.tuner import H100_LIMITS, DeviceLimits, Tuner

KEYS = [(op, (tag, f"{n}:{m}", N, K, M) + ((bias,) if op is nt.FWD else ()))
        for op in (nt.FWD, nt.BWD_DX)
        for tag in ("fp16", "bf16", "tf32", "fp32")
        for n, m in ((2, 4), (1, 4), (2, 8), (8, 16))
        for N, K in ((4096, 4096), (1000, 300))
        for M in (1, 2, 4, 8, 16, 32, 64, 256, 1024, 16384)
        for bias in (0, 1)
        if not (op is nt.BWD_DX and bias)]


@pytest.mark.parametrize("device", [CUDA, CPU], ids=["cuda", "cpu"])
def test_candidates_dense_always_heuristic_first(device):
    for op, key in KEYS:
        cands = op.candidates(key, H100_LIMITS, device)
        names = [c.name for c in cands]
        assert len(names) == len(set(names)), key
        assert "dense" in names, key
        tag, M = key[0], key[4]
        if device.type == "cpu":
            assert cands[0].config == kernel.INTERPRET_CONFIG
        elif tag == "fp32" and M > 8:
            assert names[0] == "dense"  # exact fp32 past decode: cuBLAS SGEMM is the default
        else:
            assert cands[0].impl == "triton" and cands[0].config == kernel.heuristic_for(
                M, key[3] if op is nt.BWD_DX else key[2], key[2] if op is nt.BWD_DX else key[3], nt.TAG_DTYPE[tag],
                "ieee" if tag == "fp32" else "tf32", H100_LIMITS.sms, op is nt.BWD_DX, cands[0].config and
                _weight_bytes(key))
        n, m = map(int, key[1].split(":"))
        # cuSPARSELt exactly where it can run: a CUDA device, a torch with cuSPARSELt, 2:4 fp16/bf16 forward
        offered = op is nt.FWD and nt.cusparselt_supported(tag, n, m, key[2], key[3], device, H100_LIMITS.capability)
        assert ("cusparselt" in names) == offered, key
        for c in cands:
            if c.impl == "triton" and c.config == kernel.INTERPRET_CONFIG and device.type == "cpu":
                continue  # the interpreter's one config (its tl.dot is exact in fp32); never stored
            if c.impl == "triton":
                assert c.config.BK % m == 0
                assert not (tag == "fp32" and c.config.USE_DOT)
            assert op.from_entry(c.to_entry(), key, H100_LIMITS, device) == c  # an entry rebuilds its candidate


def _weight_bytes(key):
    tag, nm, N, K = key[:4]
    n, m = map(int, nm.split(":"))
    S = st.NMTensor.slots_for(K, n, m)
    return N * S * nt.TAG_DTYPE[tag].itemsize + N * -(-S // st.formats.nm.indices_per_word(m)) * 4


def test_candidates_pruned_by_shared_memory():
    small = DeviceLimits(shared_memory=48 * 1024, sms=20, capability=(7, 5))
    for M in (16, 64, 4096):
        key = ("fp16", "2:4", 4096, 4096, M, 0)
        big = nt.FWD.candidates(key, H100_LIMITS, CUDA)
        few = nt.FWD.candidates(key, small, CUDA)
        assert len(few) < len(big)
        for c in few[1:]:  # the heuristic default stays first whatever it needs
            if c.impl == "triton":
                assert kernel.shared_memory_estimate(c.config, torch.float16, False, 0.5) <= small.shared_memory
        assert any(c.name == "dense" for c in few)


@pytest.mark.parametrize("entry", [
    {"impl": "triton", "config": {"BM": 16, "BN": 64, "BK": 6, "USE_DOT": True}},  # BK not a multiple of m
    {"impl": "triton", "config": {"BM": 16, "BN": 64, "BK": 64, "BOGUS": 1}},
    {"impl": "triton", "config": {"BM": 16, "BN": 64, "BK": 64, "num_warps": 3}},
    {"impl": "triton", "config": {"BM": 16, "BN": 64, "BK": 64, "SPLIT": 0}},
    {"impl": "triton", "config": {"BM": 16, "BN": 64, "BK": 64, "USE_DOT": "yes"}},
    {"impl": "triton", "config": None},
    {"impl": "hand-written-asm"},
    {},
])
def test_from_entry_rejects_bad_entries(entry):
    assert nt.FWD.from_entry(entry, ("fp16", "2:4", 64, 64, 16, 0), H100_LIMITS, CUDA) is None


def test_cusparselt_entry_only_where_cusparselt_runs():
    key = ("fp16", "2:4", 64, 64, 16, 0)
    here = nt.cusparselt_supported("fp16", 2, 4, 64, 64, CUDA, H100_LIMITS.capability)  # asks torch, not the test
    assert nt.FWD.from_entry({"impl": "cusparselt"}, key, H100_LIMITS, CUDA) == (nt.CUSPARSELT if here else None)
    assert nt.FWD.from_entry({"impl": "cusparselt"}, key, H100_LIMITS, CPU) is None
    assert nt.BWD_DX.from_entry({"impl": "cusparselt"}, key[:5], H100_LIMITS, CUDA) is None  # forward only
    assert nt.FWD.from_entry({"impl": "cusparselt"}, ("fp16", "2:8", 64, 64, 16, 0), H100_LIMITS, CUDA) is None


def test_exact_fp32_never_gets_a_tensor_core_config():
    entry = {"impl": "triton", "config": {"BM": 16, "BN": 64, "BK": 64, "USE_DOT": True}}
    assert nt.FWD.from_entry(entry, ("fp32", "2:4", 64, 64, 16, 0), H100_LIMITS, CUDA) is None
    assert nt.FWD.from_entry(entry, ("tf32", "2:4", 64, 64, 16, 0), H100_LIMITS, CUDA) is not None


class _Small(nt.NMLinearFwdTunable):
    """The real forward, with the candidate list cut to three so the interpreter stays quick."""

    def candidates(self, key, limits, device):
        full = super().candidates(key, limits, device)
        gemv = next(c for c in full if c.impl == "triton" and not c.config.USE_DOT)
        return [full[0], gemv, nt.DENSE]


def test_real_op_tunes_checks_and_runs_the_winner(tuner_factory, monkeypatch):
    op = _Small()
    monkeypatch.setattr(nt, "FWD", op)
    tuner = tuner_factory(FakeTimer(fastest="dense"))
    w = st.nm_compress(torch.randn(48, 96), 2, 4)
    st.tuning.set_default_tuner(tuner)
    x = torch.randn(5, 96)
    ref = x.double() @ w.to_dense().double().t()
    before = _prepared.cached_forms()
    y = st.nm_linear(x, w)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
    choice = tuner.resolve(op, ("fp32", "2:4", 48, 96, 8, 0), CPU)
    assert (choice.source, choice.candidate.name) == ("tuned", "dense")
    names = [c.name for c in op.candidates(choice_key(), H100_LIMITS, CPU)]
    assert [c for c in tuner.timer.calls if c in names] == names  # (its random weight tuned the prune op too)
    assert _prepared.cached_forms() == before + 1  # the dense weight, kept for the next call
    # an in-place update of the weight (an optimizer step) is seen on the next call
    with torch.no_grad():
        w.values.mul_(-2)
    torch.testing.assert_close(st.nm_linear(x, w).double(), -2 * ref, atol=1e-4, rtol=1e-4)


def choice_key():
    return ("fp32", "2:4", 48, 96, 8, 0)


def test_interpreter_never_times(tuner_factory):
    def no_timer(name, fn):
        raise AssertionError(f"timed {name} under the interpreter")
    st.tuning.set_default_tuner(Tuner(timer=no_timer))  # the default: no tuning on CPU
    w = st.nm_compress(torch.randn(32, 64), 2, 4)
    x = torch.randn(3, 64, requires_grad=True)
    y = st.nm_linear(x, w)
    y.sum().backward()
    torch.testing.assert_close(y, x @ w.to_dense().t(), atol=1e-4, rtol=1e-4)
    choice = st.tuning.default_tuner().resolve(nt.FWD, nt.fwd_key(x, 32, 64, 2, 4, False), CPU)
    assert choice.source == "first" and choice.candidate.config == kernel.INTERPRET_CONFIG


def test_prepared_form_is_not_kept_for_inference_tensors():
    _prepared.clear_weight_cache()
    with torch.inference_mode():
        w = st.nm_compress(torch.randn(16, 32), 2, 4)
    calls = []
    form = _prepared.prepared(w.values, w.indices, "dense", lambda: calls.append(1) or w.to_dense())
    _prepared.prepared(w.values, w.indices, "dense", lambda: calls.append(1) or w.to_dense())
    assert calls == [1, 1] and _prepared.cached_forms() == 0 and form.shape == (16, 32)


def test_prepared_form_goes_with_its_tensor():
    _prepared.clear_weight_cache()
    w = st.nm_compress(torch.randn(16, 32), 2, 4)
    _prepared.prepared(w.values, w.indices, "dense", w.to_dense)
    assert _prepared.cached_forms() == 1
    del w
    import gc

    gc.collect()
    assert _prepared.cached_forms() == 0 and not _prepared._forms


def test_prune_and_gather_tuned_bit_exact(tuner_factory):
    from sparse_triton.reference import nm_prune as ref

    class Few(nt.NMPruneTunable):
        def candidates(self, key, limits, device):
            return super().candidates(key, limits, device)[:3]

    tuner = tuner_factory(FakeTimer(fastest="br4bg64groups1num_warps4"))
    key = ("fp16", "2:4", 40, 72)
    result = tuner.tune(Few(), key, CPU)
    assert result.winner.name == "br4bg64groups1num_warps4" and not result.rejected
    assert nt.PRUNE.from_entry(result.entry, key, H100_LIMITS, CPU) == result.winner
    w = torch.randn(40, 72, dtype=torch.float16)
    st.tuning.set_default_tuner(tuner)
    got = torch.ops.sparse_triton.nm_prune_compress(w, 2, 4)  # runs the tuned config
    want = ref.nm_prune_compress(w, 2, 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # a wrong config never wins: a candidate that skips rows fails the bit-exact check
    bad = nt.Candidate("bad", "triton", nt.prune_kernel.NMPruneConfig(BR=16, BG=32, GROUPS=True))
    inputs = nt.PRUNE.make_inputs(key, CPU, torch.Generator().manual_seed(0))
    nt.PRUNE.reset(inputs)
    ok = nt.PRUNE.run(bad, inputs)
    assert nt.PRUNE.error(ok, nt.PRUNE.reference(inputs)) == 0
    assert nt.PRUNE.error((ok[0][:-1], ok[1]), nt.PRUNE.reference(inputs)) == float("inf")
    gkey = ("fp32", "2:8", 24, 80)
    g = tuner.tune(nt.GATHER, gkey, CPU)
    assert g is not None and not g.rejected and len(g.times) == len(nt.prune_kernel.GATHER_SPACE)


@pytest.mark.parametrize("entry", [
    {"impl": "triton", "config": {"BR": 16, "BG": 32, "GROUPS": False}},  # 2:4 runs the in-thread kernel
    {"impl": "triton", "config": {"BR": 16, "BG": 12, "GROUPS": True}},
    {"impl": "triton", "config": {"BR": 0, "BG": 32, "GROUPS": True}},
    {"impl": "dense"},
])
def test_prune_from_entry_rejects(entry):
    assert nt.PRUNE.from_entry(entry, ("fp16", "2:4", 64, 64), H100_LIMITS, CPU) is None
