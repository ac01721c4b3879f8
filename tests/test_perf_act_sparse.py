"""perf/suites/act_sparse.py and its _act_sparse_cases.py without a GPU: the case lists, the |x|-quantile threshold,
the measured union of active channels, byte counting and the ideal speedup (by hand on tiny cases), --dry-run, and
one pass of every case kind on CPU tensors (the real kernels, interpreted) with the timing faked, written to JSON
and plotted. Nothing here is timed."""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # perf/ is not installed; plain `pytest` does not put the root on the path
    sys.path.insert(0, str(REPO))

from autotune.shapes import LinearShape  # noqa: E402
from perf import plot as perf_plot  # noqa: E402
from perf.harness import ResultWriter, Timing  # noqa: E402
from perf.suites import _act_sparse_cases as C  # noqa: E402
from perf.suites import act_sparse as A  # noqa: E402

TINY = LinearShape("tiny.gate_up", 96, 256)
TINY_FFN = C.FFNShape("tiny", 128, 192)
TINY_DECODE = C.DecodeDims("tiny", 128, 32, 192)
FAKE_ENV = {"gpu": {"name": "Fake GPU"}, "versions": {"torch": torch.__version__}, "git": {"commit": "abc1234"},
            "date_utc": "2026-01-01T00:00:00+00:00"}


def _settings(*argv):
    return C.settings_from_args(C.build_parser().parse_args(list(argv)))


# ------------------------------------------------------------------------------------------ cases and CLI


def test_quick_cases():
    cases = _settings("--quick").cases()
    by = {k: [c for c in cases if c.kind == k] for k in C.PARTS}
    b1 = [c for c in by["linear"] if c.batch == 1]
    assert {(c.shape.name, c.sparsity) for c in b1} == {(s, p) for s in ("llama3-8b.gate_up", "llama3-8b.down")
                                                       for p in (0, 40, 50, 70, 90)}
    sweep = [c for c in by["linear"] if c.batch > 1]
    assert [(c.shape.name, c.batch, c.sparsity) for c in sweep] == [("llama3-8b.gate_up", b, 50) for b in (4, 16, 64)]
    assert [(c.ffn, c.batch, c.sparsity) for c in by["ffn"]] == [(C.FFN_8B, 1, s) for s in C.SPARSITIES]
    assert C.FFN_8B.H == 4096 and C.FFN_8B.I == 14336 and C.FFN_70B.H == 8192 and C.FFN_70B.I == 28672
    assert {(c.shape.name, c.pattern, c.sparsity, c.batch) for c in by["nm"]} == {
        ("llama3-8b.gate_up", "2:4", 50, 1), ("llama3-8b.down", "2:4", 50, 1)}
    assert [(c.layers, c.sparsity, c.batch) for c in by["decode"]] == [(2, s, 1) for s in C.SPARSITIES]
    assert all(c.dtype == "fp16" for c in cases) and len(cases) == 25
    kinds = [c.kind for c in cases]
    assert cases[0].label == "linear llama3-8b.gate_up b1 s0% fp16"
    assert kinds.index("decode") > kinds.index("nm") > kinds.index("ffn")
    assert cases.index(sweep[0]) > max(cases.index(c) for c in by["decode"])  # batch sweeps last


def test_full_cases_cover_the_targets():
    s = _settings()
    cases = s.cases()
    lin = [c for c in cases if c.kind == "linear"]
    assert {c.shape.dims for c in lin} == {"4096x4096", "1024x4096", "14336x4096", "4096x14336", "8192x8192",
                                           "1024x8192", "28672x8192", "8192x28672"}
    assert {c.batch for c in lin} == set(C.BATCHES) and {c.sparsity for c in lin} == set(C.SPARSITIES)
    assert {c.ffn.name for c in cases if c.kind == "ffn"} == {"llama3-8b", "llama3-70b"}
    assert {c.sparsity for c in cases if c.kind == "nm"} == {0, 50, 70}
    assert {c.layers for c in cases if c.kind == "decode"} == {32}
    first_70b = next(i for i, c in enumerate(cases) if "70b" in c.model)
    assert all("70b" in c.model for c in cases[first_70b:])  # every 8B case first
    assert all(C.estimate_gb(c) < 70 for c in cases)
    assert len({c.label for c in cases}) == len(cases)


def test_cli_parsing():
    s = _settings("--shapes", "4096x1024", "llama3-70b.down", "--sparsity", "25", "60", "--batches", "2",
                  "--parts", "linear", "nm", "--dtype", "bf16", "--nm-patterns", "1:4", "--layers", "3")
    assert [x.dims for x in s.shapes] == ["4096x1024", "8192x28672"] and s.batches == (1, 2)
    assert s.parts == ("linear", "nm") and s.nm_patterns == ((1, 4),) and s.decode_layers == 3
    labels = [c.label for c in s.cases()]
    assert labels[:2] == ["linear 4096x1024 b1 s25% bf16", "linear 4096x1024 b1 s60% bf16"]
    assert "linear 4096x1024 b2 s60% bf16" in labels and all("ffn" not in x and "decode" not in x for x in labels)
    assert C.parse_ffn("1024x2816") == C.FFNShape("1024x2816", 1024, 2816)
    for bad in (["--shapes", "4096"], ["--batches", "65"], ["--sparsity", "100"], ["--nm-patterns", "4:2"]):
        with pytest.raises(SystemExit):
            C.build_parser().parse_args(bad)


def test_dry_run_lists_cases_without_gpu(capsys):
    assert A.main(["--quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "25 cases (dry run" in out and "decode llama3-8b L2 s50% fp16" in out and "nm 2:4 llama3-8b.down" in out


# ------------------------------------------------------------------------------------------ inputs and counting


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.4, 0.5, 0.7, 0.9])
def test_quantile_threshold_reaches_its_target(dtype, sparsity):
    x = torch.randn(4, 4096).to(dtype)
    t = C.quantile_threshold(x, sparsity)
    assert t == float(torch.tensor(t, dtype=torch.float32))  # exact in float32, as the ops compare
    measured = float((x.float().abs() <= t).float().mean())
    if dtype == torch.float32:  # no ties: exactly round(s * n) entries
        assert measured * x.numel() == round(sparsity * x.numel())
    else:  # fp16 ties: the nearer side of the tie
        assert abs(measured - sparsity) <= 2e-3
    assert C.activity(x, t)["row_sparsity"] == pytest.approx(100 * measured)
    if sparsity == 0:
        assert t == 0.0


def test_quantile_threshold_with_ties():
    x = torch.tensor([0.5, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 4.0])
    assert C.quantile_threshold(x, 3 / 8) == pytest.approx(1.5)  # 5 <= 1.5 is nearer to 3 than 1 <= 0.75
    assert C.quantile_threshold(x, 2 / 8) == pytest.approx(0.75)  # 1 is as near to 2 as 5: the upper side
    x = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0])
    assert C.quantile_threshold(x, 0.2) == pytest.approx(0.5)  # nothing below the tie: half of it
    assert C.quantile_threshold(torch.zeros(4), 0.5) == 0.0  # a threshold cannot go below zero


def test_activity_counts_the_union():
    x = torch.tensor([[1.0, 0.1, 0.0, -2.0], [0.0, 3.0, 0.2, 0.0]], dtype=torch.float16)
    a = C.activity(x, 0.5)
    assert a["union_count"] == 3 and a["union_density"] == 0.75 and a["sparsity_union"] == 25.0
    assert a["row_sparsity"] == pytest.approx(62.5)
    a = C.activity(torch.tensor([[float("nan"), 0.0]]), 0.5)  # NaN is active, as in the ops
    assert a["union_count"] == 1
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 8192, generator=gen)
    a = C.activity(x, C.quantile_threshold(x, 0.5))
    assert a["union_density"] == pytest.approx(C.expected_union_density(0.5, 8), abs=0.01)
    assert C.expected_union_density(0.5, 1) == 0.5 and C.expected_union_density(0.3, 2) == pytest.approx(0.51)


def test_bytes_by_hand():
    # y[2, 3] = x[2, 4] @ W^T, fp16, 3 of 4 channels active: 3 rows x 3 x 2 B + x 2*4*2 + y 2*3*2
    assert C.linear_bytes(2, 3, 4, 2, 3) == 18 + 16 + 12
    assert C.linear_bytes(2, 3, 4, 2, 4) == 24 + 16 + 12  # dense reads every row
    # 2:4 along N=8: a row stores 4 values (8 B) + one int32 index word; 2 active rows
    assert C.linear_bytes(1, 8, 4, 2, 2, row_bytes=4 * 2 + 4) == 2 * 12 + 8 + 16
    # FFN H=2, I=3, one row, 1 input and 2 intermediates active: gate+up 2*1*3*2, down 2*2*2, x 4, h 2*3*2, y 4
    assert C.ffn_bytes(1, 2, 3, 2, 1, 2) == 12 + 8 + 4 + 12 + 4
    assert C.ideal_speedup(100, 25) == 4.0 and C.ideal_speedup(1, 0) is None
    assert C.ideal_speedup(3 * 2 * 3, 2 * 1 * 3 + 2 * 2) == pytest.approx(1.8)  # 3HI / (2 u_in I + u_mid H)
    assert C.pct_of_ideal(1.5, 2.0) == 75.0 and C.pct_of_ideal(None, 2.0) is None


# ------------------------------------------------------------------------------------------ the runner on CPU


def _runner(monkeypatch, api=None):
    def fake_time(self, fns, cuda_graph=True):
        fns[0]()
        return Timing(median_ms=0.02, p20_ms=0.019, p80_ms=0.021, mode="cudagraph", samples=10)

    monkeypatch.setattr(A.Runner, "_time", fake_time)
    return A.Runner(api or A.load_api(), _settings("--quick"), hbm_peak=3350.0, device=torch.device("cpu"))


def test_cpu_pass_writes_json_and_plots(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    r = _runner(monkeypatch)
    cases = [C.Linear(TINY, 1, 50, "fp16"), C.Linear(TINY, 1, 90, "fp16"), C.Linear(TINY, 2, 50, "fp16"),
             C.NM(TINY, 1, 50, "fp16"), C.FFN(TINY_FFN, 2, 50, "fp16"), C.Decode(2, 50, "fp16", TINY_DECODE)]
    writer = ResultWriter(C.SUITE, tmp_path, env=FAKE_ENV, config={"quick": True}, plot=C.plot_spec(r.s))
    for c in cases:
        writer.extend(r.run(c))
    path = writer.close()
    assert r.failures == []
    doc = json.loads(path.read_text())
    assert path == tmp_path / "fake-gpu" / "act_sparse.json" and doc["complete"] and doc["env"] == FAKE_ENV
    rows = doc["rows"]
    assert [(x["case"], x["impl"]) for x in rows[:3]] == [(cases[0].label, i) for i in ("dense", "op", "kernel")]
    assert all(x["status"] == "ok" and x["rel_err"] < C.REL_TOL and x["ms"] == 0.02 for x in rows)
    assert {x["impl"] for x in rows if x["kind"] == "decode"} == {"dense", "op"}
    for x in rows:
        for key in ("bytes", "gbps", "pct_hbm", "speedup", "ideal", "pct_ideal", "union_density", "sparsity_union",
                    "dense_ms", "timing", "rotation", "first_call_s", "batch", "dtype", "sparsity"):
            assert x[key] is not None, (x["case"], x["impl"], key)
        assert x["gbps"] == pytest.approx(x["bytes"] / 0.02e-3 / 1e9)
        assert x["pct_hbm"] == pytest.approx(100 * x["gbps"] / 3350.0)
        assert x["pct_ideal"] == pytest.approx(100 * x["speedup"] / x["ideal"])
    by = {(x["case"], x["impl"]): x for x in rows}
    op = by[(cases[0].label, "op")]
    assert op["choice_source"] == "first" and op["backend"] == "triton" and op["config"]
    assert by[(cases[0].label, "kernel")]["config"] and by[(cases[0].label, "kernel")]["backend"] == "triton"
    # batch 1 at 50 %: 128 of 256 channels read; dense reads all 256
    assert op["union_count"] == 128 and op["ideal"] == pytest.approx(2.0)
    assert op["bytes"] == C.linear_bytes(1, 96, 256, 2, 128)
    assert by[(cases[0].label, "dense")]["bytes"] == C.linear_bytes(1, 96, 256, 2, 256)
    two = by[(cases[2].label, "op")]  # batch 2: the union of two independent halves, about 3/4
    assert two["row_sparsity"] == pytest.approx(50.0, abs=0.5) and 0.6 < two["union_density"] < 0.9
    assert two["bytes"] == C.linear_bytes(2, 96, 256, 2, two["union_count"])
    nm = by[(cases[3].label, "op")]
    assert nm["pattern"] == "2:4" and nm["ideal"] == pytest.approx(4.0)
    assert nm["bytes"] == C.linear_bytes(1, 96, 256, 2, 128, row_bytes=48 * 2 + 3 * 4)
    ffn = by[(cases[4].label, "op")]
    assert ffn["config"].startswith("gate_up=") and "down=" in ffn["config"] and ffn["backend"] == "triton+triton"
    assert ffn["bytes"] == C.ffn_bytes(2, 128, 192, 2, ffn["union_count"], ffn["union_count_mid"])
    assert 40 <= ffn["row_sparsity_mid"] <= 60
    dec = by[(cases[5].label, "op")]
    assert dec["tokens_per_s"] == pytest.approx(1e3 / 0.02) and dec["layers"] == 2 and "no attention" in dec["scope"]
    assert 1.5 < dec["ideal"] < 2.5 and dec["choice_source"] == "first"
    assert C.summary(rows).count("\n") >= len(cases)

    pngs = perf_plot.plot_file_all(path)
    assert [p.name for p in pngs] == ["act_sparse.png", "act_sparse-batch.png", "act_sparse-ffn.png",
                                      "act_sparse-nm.png", "act_sparse-decode.png"]
    assert all(p.stat().st_size > 0 for p in pngs)
    spec = doc["plot"]
    main = perf_plot.select_series(rows, spec)
    assert set(main) == {("tiny.gate_up", "fp16")} and set(main[("tiny.gate_up", "fp16")]) == {("op", None),
                                                                                              ("kernel", None)}
    assert [p[0] for p in main[("tiny.gate_up", "fp16")][("op", None)]] == pytest.approx([50.0, 90.0], abs=0.5)
    batch = perf_plot.select_series(rows, spec["also"][0])
    assert [p[0] for p in batch[("tiny.gate_up", "fp16")][("op", None)]] == [1.0, 2.0]  # at 50 % only
    assert spec["curves"][0]["points"][90] == pytest.approx([90.0, 10.0])
    assert spec["also"][0]["curves"][0]["points"][1] == pytest.approx([2.0, 1 / 0.75])
    assert spec["also"][2]["curves"][0]["points"][50] == pytest.approx([50.0, 4.0])  # 2:4 + 50 %


def test_wrong_op_is_marked_and_fails(monkeypatch):
    api = A.load_api()
    mod = SimpleNamespace(**{k: getattr(api.mod, k) for k in ("input_major", "nm_input_major", "act_sparse_mlp")})
    mod.act_sparse_linear = lambda x, w, t, bias=None: api.mod.act_sparse_linear(x, w, t, bias) * 1.1
    r = _runner(monkeypatch, A.Api(mod, api.kernel, api.tuning, api.reference, api.tuner))
    rows = r.run(C.Linear(TINY, 1, 50, "fp16"))
    st = {x["impl"]: x for x in rows}
    assert st["op"]["status"] == "wrong" and st["op"]["ms"] is None and st["op"]["rel_err"] > C.REL_TOL
    assert st["dense"]["status"] == "ok" and st["kernel"]["status"] == "ok"
    assert len(r.failures) == 1 and "relative error" in r.failures[0]
    assert math.isfinite(st["op"]["rel_err"])


def test_rotation_defeats_l2_within_the_memory_cap():
    s = _settings("--quick", "--rotate-gb", "1")
    r = A.Runner(None, s, hbm_peak=None, device=torch.device("cuda"))  # only the device type is read
    l2 = 64 * 2**20  # perf.harness.l2_cache_bytes() without a GPU
    assert r._rotation(200 * 2**20, 200 * 2**20) == (1, None)  # one call already moves > 3x L2
    assert r._rotation(8 * 2**20, 8 * 2**20) == (math.ceil(3 * l2 / (8 * 2**20)), None)
    n, note = r._rotation(2**20, 100 * 2**20)  # a sparse call reads 1 MB of a 100 MB weight: memory decides
    assert n == int(0.5e9 // (100 * 2**20)) and "capped" in note
    assert A.Runner(None, s, None, device=torch.device("cpu"))._rotation(2**20, 2**20) == (1, None)


def test_main_without_gpu_exits_with_a_message():
    with pytest.raises(SystemExit, match="needs a CUDA GPU|TRITON_INTERPRET"):
        A.main(["--quick", "--parts", "linear"])
