"""ops/act_sparse_tuning.py: the activation-sparse ops' candidates (dense always among them), stored entries, and
the tuner driving the real ops on CPU (interpreted kernels) with a fake timer."""

import pytest
import torch
import torch.nn.functional as F
from kit import CPU, CUDA, FakeTimer

import sparse_triton as st
from sparse_triton.kernels import act_sparse as kernel
from sparse_triton.ops import act_sparse as ops
from sparse_triton.ops import act_sparse_tuning as at
from sparse_triton.tuning.tuner import H100_LIMITS

KEYS = ([(at.FWD, (tag, N, K, M, bias, thr)) for tag in ("fp16", "bf16", "tf32", "fp32")
         for N, K in ((4096, 14336), (1000, 300)) for M in (1, 2, 4, 8, 16, 64) for bias in (0, 1)
         for thr in ("scalar", "channel")]
        + [(at.NM_FWD, ("fp16", nm, 4096, 4096, M, 0, "scalar")) for nm in ("2:4", "1:4", "2:8", "4:16")
           for M in (1, 8, 32)]
        + [(at.GATE_UP, (tag, 14336, 4096, M, act, "scalar")) for tag in ("fp16", "fp32") for M in (1, 4, 64)
           for act in ("silu", "relu2")])


@pytest.mark.parametrize("device", [CUDA, CPU], ids=["cuda", "cpu"])
def test_candidates_dense_always_heuristic_first(device):
    for op, key in KEYS:
        cands = op.candidates(key, H100_LIMITS, device)
        names = [c.name for c in cands]
        assert len(names) == len(set(names)) and "dense" in names, key
        tag, N, K, M = op.nkm(key)
        if device.type == "cpu":
            assert cands[0].config == kernel.INTERPRET_CONFIG
        else:
            assert cands[0].config == kernel.heuristic(M, N, K, at.TAG_DTYPE[tag], H100_LIMITS.sms)
        for c in cands:
            if c.impl != "triton" or c.config == kernel.INTERPRET_CONFIG:
                continue
            assert not (tag in ("fp32", "tf32") and c.config.USE_DOT), key
            if op is at.NM_FWD:
                assert c.config.BN % int(key[1].split(":")[1]) == 0
            assert op.from_entry(c.to_entry(), key, H100_LIMITS, device) == c  # an entry rebuilds its candidate


def test_heuristic_splits_decode_into_waves():
    cfg = kernel.heuristic(1, 4096, 14336, torch.float16, 132)  # Llama-3-8B down at decode: 32 column tiles
    tiles = -(-4096 // cfg.BN)
    assert cfg.BM == 1 and not cfg.USE_DOT and tiles * cfg.SPLIT >= 2 * 132
    assert kernel.heuristic(64, 4096, 4096, torch.float16).USE_DOT
    assert not kernel.heuristic(64, 4096, 4096, torch.float32).USE_DOT  # no tensor cores for exact fp32


@pytest.mark.parametrize("entry", [
    {"impl": "triton", "config": {"BM": 1, "BN": 128, "BK": 24}},  # not a power of two
    {"impl": "triton", "config": {"BM": 1, "BN": 128, "BK": 32, "BOGUS": 1}},
    {"impl": "triton", "config": {"BM": 8, "BN": 128, "BK": 64}},  # too many broadcast products
    {"impl": "triton", "config": {"BM": 8, "BN": 64, "BK": 64, "USE_DOT": True}},  # dot needs BM >= 16
    {"impl": "triton", "config": {"BM": 1, "BN": 128, "BK": 32, "SPLIT": 64}},
    {"impl": "triton", "config": None},
    {"impl": "cusparselt"},
    {},
])
def test_from_entry_rejects_bad_entries(entry):
    assert at.FWD.from_entry(entry, ("fp16", 64, 64, 1, 0, "scalar"), H100_LIMITS, CUDA) is None


def test_exact_fp32_never_gets_a_tensor_core_config():
    entry = {"impl": "triton", "config": {"BM": 16, "BN": 64, "BK": 64, "USE_DOT": True}}
    assert at.FWD.from_entry(entry, ("fp32", 64, 64, 16, 0, "scalar"), H100_LIMITS, CUDA) is None
    assert at.FWD.from_entry(entry, ("fp16", 64, 64, 16, 0, "scalar"), H100_LIMITS, CUDA) is not None


def _small(op_cls):
    class Small(op_cls):
        """The real op with its candidates cut to the interpreter's config and dense (the interpreter is slow)."""

        def candidates(self, key, limits, device):
            full = super().candidates(key, limits, device)
            return [full[0], at.DENSE]
    return Small()


@pytest.mark.parametrize("fastest", ["dense", "interp"])
def test_real_ops_tune_check_and_run_the_winner(fastest, tuner_factory, monkeypatch):
    fwd, gate_up = _small(at.ActSparseLinearTunable), _small(at.ActSparseGateUpTunable)
    monkeypatch.setattr(at, "FWD", fwd)
    monkeypatch.setattr(at, "GATE_UP", gate_up)
    name = "dense" if fastest == "dense" else kernel.config_name(kernel.INTERPRET_CONFIG)
    tuner = tuner_factory(FakeTimer(fastest=name))
    st.tuning.set_default_tuner(tuner)
    x = torch.randn(3, 96)
    w = ops.input_major(torch.randn(48, 96))
    y = st.act_sparse_linear(x, w, 0.5)
    torch.testing.assert_close(y, F.linear(x * (x.abs() > 0.5), w), rtol=1e-5, atol=1e-5)
    key = at.fwd_key(x, 48, 96, False, torch.tensor(0.5))
    assert tuner.resolve(fwd, key, CPU).candidate.name == name
    assert tuner.timer.calls[:2] == [kernel.config_name(kernel.INTERPRET_CONFIG), "dense"]  # both checked and timed
    wg, wu = (ops.input_major(torch.randn(64, 96) / 10) for _ in range(2))
    wd = ops.input_major(torch.randn(96, 64) / 8)
    z = st.act_sparse_mlp(x, wg, wu, wd, 0.5, 0.01)
    from sparse_triton.reference import act_sparse as ref
    expect = ref.act_sparse_mlp(x.double(), wg.double(), wu.double(), wd.double(), torch.tensor(0.5),
                                torch.tensor(0.01), "silu")
    torch.testing.assert_close(z.double(), expect, rtol=1e-4, atol=1e-4)
    assert tuner.resolve(gate_up, at.gate_up_key(x, 64, 96, "silu", torch.tensor(0.5)), CPU).candidate.name == name
