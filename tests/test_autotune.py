"""autotune/regenerate.py: the campaign's keys and their order, --dry-run, resuming, the budget, the
atomic table write, and the exit code without a GPU. Nothing here tunes: tuning is faked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_triton.ops import act_sparse_tuning as ast
from sparse_triton.ops import nm_tuning as nt
from sparse_triton.tuning import DeviceInfo, Tuner, TuneResult, load_shipped
from sparse_triton.tuning.cache import FORMAT
from sparse_triton.tuning.tables import parse_key
from sparse_triton.tuning.tuner import H100_LIMITS

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # autotune/ is not installed; plain `pytest` does not put the root on the path
    sys.path.insert(0, str(REPO))

from autotune import regenerate as rg  # noqa: E402

FULL, QUICK = rg.plan(), rg.plan(quick=True)


def _fwd(tag, nm, N, K, M, bias=0):
    return ("nm_linear_fwd", (tag, nm, N, K, M, bias))


# ------------------------------------------------------------------------------------------------ the plan


def test_plan_counts():
    by_op = {op: [j for j in FULL if j.op == op] for op in rg.OPS}
    # forward: Llama-3-8B 4 layers x 8 token counts, 70B 2 x 8, ViT-L 2 x 1; x 4 patterns x 2 dtypes
    assert len(by_op[rg.FWD]) == (4 * 8 + 2 * 8 + 2 * 1) * 4 * 2 == 400
    # dX at M >= 256: 8B 4 x 4, 70B 2 x 4, ViT-L 2 x 1, less ViT-L fc2 = Llama k/v (1024x4096 at 16384)
    assert len(by_op[rg.BWD_DX]) == (4 * 4 + 2 * 4 + 2 - 1) * 4 * 2 == 200
    # prune and gather: once per weight shape (7: ViT-L fc2 is Llama k/v's 1024x4096)
    assert len(by_op[rg.PRUNE]) == len(by_op[rg.GATHER]) == 7 * 4 * 2 == 56
    # activation-sparse, after the N:M keys: every Llama linear at 7 decode batches x 2 dtypes, plus the fused
    # gate/up of each MLP (8B: 4 linears + gate/up, 70B: 2 + gate/up)
    act = [j for j in FULL if j.op in rg.ACT_OPS]
    assert len(act) == (5 + 3) * 7 * 2 == 112 and FULL[-len(act):] == act
    assert len({(j.op, j.key) for j in FULL}) == len(FULL) == 712 + 112
    # --quick: what perf's --quick runs (Llama-3-8B, fp16, M <= 4096, all patterns, forward + compression;
    # activation-sparse decode at batch 1)
    assert len(QUICK) == 4 * 7 * 4 + 4 * 4 + 5 == 133
    assert {j.op for j in QUICK} == {rg.FWD, rg.PRUNE, rg.ACT_FWD, rg.ACT_GATE_UP}
    assert all(j.key[0] == "fp16" and (j.op == rg.PRUNE or j.key[3 if j.op in rg.ACT_OPS else 4] <= 4096)
               for j in QUICK)
    assert {j.layers[0].split(".")[0] for j in QUICK} == {"llama3-8b"}
    assert {(j.op, j.key) for j in QUICK} <= {(j.op, j.key) for j in FULL}


def test_plan_order_most_important_first():
    # 2:4 fp16 Llama-3-8B decode first, layers in model order within a token count
    assert [(j.op, j.key) for j in FULL[:4]] == [_fwd("fp16", "2:4", N, K, 1) for N, K in
                                                 ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))]
    assert [j.key[4] for j in FULL[:16]] == [1] * 4 + [4] * 4 + [16] * 4 + [64] * 4
    assert all(j.layers[0].startswith("llama3-8b") for j in FULL[:32])
    assert [(j.op, j.key) for j in QUICK] == [(j.op, j.key) for j in FULL if (j.op, j.key) in
                                              {(q.op, q.key) for q in QUICK}]  # quick keeps the same order

    patterns = [f"{n}:{m}" for n, m in rg.NM_PATTERNS]
    nm_jobs = [j for j in FULL if j.op in rg.OPS]
    ranks = [(patterns.index(j.key[1]), rg.OPS.index(j.op), rg.DTYPES.index(j.key[0])) for j in nm_jobs]
    assert ranks == sorted(ranks)  # pattern, then op (forward, dX, prune, gather), then dtype (fp16, bf16)
    assert rg.OPS == (rg.FWD, rg.BWD_DX, rg.PRUNE, rg.GATHER)
    assert patterns[0] == "2:4" and FULL[49].key[1] == "2:4" and nm_jobs[-1].key[1] == "4:8"


def test_plan_keys_are_the_ops_keys():
    shared = [j for j in FULL if len(j.layers) > 1]
    assert {j.layers for j in shared} == {("llama3-8b.k_v", "vit-l.fc2")}
    assert {(j.op, j.key[2:]) for j in shared} == {(rg.BWD_DX, (1024, 4096, 16384)), (rg.PRUNE, (1024, 4096)),
                                                   (rg.GATHER, (1024, 4096))}
    for j in FULL:
        if j.op in rg.ACT_OPS:
            tag, N, K, M = j.key[:4]
            x = torch.empty(M, K, dtype=nt.TAG_DTYPE[tag], device="meta")
            t = torch.empty((), device="meta")
            if j.op == rg.ACT_FWD:
                assert j.key == ast.fwd_key(x, N, K, bool(j.key[4]), t)
            else:
                assert j.key == ast.gate_up_key(x, N, K, "silu", t) and j.layers[0].endswith("gate_up")
            assert list(parse_key(j.key_str)) == list(ast.TUNABLE[j.op].fields)
            continue
        tag, nm, N, K = j.key[:4]
        n, m = map(int, nm.split(":"))
        dtype = nt.TAG_DTYPE[tag]
        if j.op in (rg.PRUNE, rg.GATHER):  # keyed by the dense weight (or its gradient), [N, K]
            assert j.key == nt.mem_key(torch.empty(N, K, dtype=dtype, device="meta"), n, m)
            assert list(parse_key(j.key_str)) == list(nt.TUNABLE[j.op].fields)
            continue
        M = j.key[4]
        x = torch.empty(M, N if j.op == rg.BWD_DX else K, dtype=dtype, device="meta")
        if j.op == rg.FWD:
            assert j.key == nt.fwd_key(x, N, K, n, m, bool(j.key[5]))
            assert j.key[5] == int(any(layer.startswith("vit-l") for layer in j.layers))
        else:
            assert M >= rg.TRAINING_MIN_TOKENS
            assert j.key == nt.bwd_dx_key(x, N, K, n, m)
        assert list(parse_key(j.key_str)) == list(nt.TUNABLE[j.op].fields)


# ------------------------------------------------------------------------------------ dry run and resume


def test_dry_run_lists_keys_in_order(capsys):
    assert rg.main(["--dry-run", "--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(QUICK) + 1
    assert lines[0].split()[:7] == ["1", "tune", "nm_linear_fwd", "fp16", "2:4", "4096x4096", "M=1"]
    assert lines[0].endswith("llama3-8b.q_o")
    assert lines[28].split()[:6] == ["29", "tune", "nm_prune_compress", "fp16", "2:4", "4096x4096"]
    assert lines[-1] == ("133 keys (nm_linear_fwd 112, nm_prune_compress 16, act_sparse_linear_fwd 4, "
                         "act_sparse_gate_up 1)")

    assert rg.main(["--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "824 keys (nm_linear_fwd 400, nm_linear_bwd_dx 200, nm_prune_compress 56, nm_gather 56, "
        "act_sparse_linear_fwd 84, act_sparse_gate_up 28)")


def _fake_entry(name="dense", ms=1.0, tune_s=0.5):
    return {"name": name, "impl": "dense", "config": None, "ms": ms, "dense_ms": ms, "candidates": 3,
            "tune_s": tune_s}


def _table_with(path, jobs, meta=None):
    entries = {}
    for j in jobs:
        entries.setdefault(j.op, {})[j.key_str] = _fake_entry()
    rg.write_table(path, meta or {"gpu": "NVIDIA H100 80GB HBM3"}, entries)
    return entries


def test_dry_run_with_resume_marks_what_the_table_has(tmp_path, capsys):
    table = tmp_path / "t.json"
    _table_with(table, [QUICK[0], QUICK[2]])
    assert rg.main(["--dry-run", "--quick", "--resume", str(table)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[:4]] == ["have", "tune", "have", "tune"]
    assert lines[-1] == (f"133 keys (nm_linear_fwd 112, nm_prune_compress 16, act_sparse_linear_fwd 4, "
                         f"act_sparse_gate_up 1); 2 already in {table}, 131 to tune")
    # a missing resume file is a new table; a corrupt one is refused (exit 2), never overwritten
    assert rg.main(["--dry-run", "--quick", "--resume", str(tmp_path / "missing.json")]) == 0
    (tmp_path / "bad.json").write_text('{"format": 1, "entries": ')
    assert rg.main(["--dry-run", "--resume", str(tmp_path / "bad.json")]) == 2
    assert "--resume" in capsys.readouterr().err


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _fake_tune(clock, seconds=10.0, calls=None, fail=()):
    def tune(job):
        clock.t += seconds
        if calls is not None:
            calls.append(job)
        if job in fail:
            if fail[job] == "raise":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.5 GiB\nmore")
            return None
        return _fake_entry(tune_s=seconds)
    return tune


def test_resume_skips_keys_the_table_has(tmp_path):
    table = tmp_path / "t.json"
    _table_with(table, QUICK[:3])
    _, entries = rg.load_table(table)
    calls, clock = [], FakeClock()
    report = rg.run_jobs(QUICK[:6], _fake_tune(clock, calls=calls), entries, rg.Budget(None, clock), log=lambda s: None)
    assert calls == list(QUICK[3:6])
    assert [j for j, _ in report.tuned] == list(QUICK[3:6])
    assert all(rg.has(entries, j) for j in QUICK[:6])


def test_budget_stops_before_running_out_and_checkpoints_every_key():
    clock = FakeClock()
    entries, checkpoints, log = {}, [], []
    budget = rg.Budget(45.0, clock, min_key_s=5.0)
    report = rg.run_jobs(QUICK[:10], _fake_tune(clock, 10.0), entries, budget,
                         checkpoint=lambda: checkpoints.append(sum(len(v) for v in entries.values())),
                         log=log.append)
    # 0 s: 45 left > 5 -> tune; 10 s: 35 > 15 -> tune; 20 s: 25 > 15 -> tune; 30 s: 15 > 15 fails -> stop
    assert [j for j, _ in report.tuned] == list(QUICK[:3])
    assert report.left == list(QUICK[3:10])
    assert checkpoints == [1, 2, 3]
    assert report.tune_s == 30.0
    assert budget.elapsed() < 45.0
    assert "7 keys not started" in log[-1]


def test_a_failing_key_does_not_stop_the_others():
    clock = FakeClock()
    jobs = QUICK[:4]
    entries, log = {}, []
    report = rg.run_jobs(jobs, _fake_tune(clock, fail={jobs[1]: None, jobs[2]: "raise"}), entries,
                         rg.Budget(None, clock), log=log.append)
    assert [j for j, _ in report.tuned] == [jobs[0], jobs[3]]
    assert [(j, why.split(":")[0]) for j, why in report.failed] == [
        (jobs[1], "every candidate failed its check"), (jobs[2], "OutOfMemoryError")]
    assert not rg.has(entries, jobs[1]) and not rg.has(entries, jobs[2])
    assert sum("FAILED" in line for line in log) == 2


# --------------------------------------------------------------------------------------------- the table


def test_write_table_is_atomic_and_loads_as_a_shipped_table(tmp_path, monkeypatch):
    path = tmp_path / "tuned" / "nvidia-h100-80gb-hbm3.json"
    meta = {"gpu": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "campaign": {"date": "2026-01-01"}}
    entries = _table_with(path, QUICK[:5], meta)
    assert json.loads(path.read_text()) == {"format": FORMAT, "meta": meta, "entries": entries}
    assert rg.load_table(path) == (meta, entries)
    assert os.stat(path).st_mode & 0o777 == 0o644
    shipped = load_shipped(path.stem, path.parent)  # what the runtime tuner reads
    assert len(shipped) == 5
    # q/o has M = 1 and 4: M = 2 is a tie in log2 distance, the larger bucket wins; k/v has only M = 1
    assert shipped.nearest("nm_linear_fwd", QUICK[0].key_str.replace("M=1|", "M=2|"))[0] == QUICK[4].key_str
    assert shipped.nearest("nm_linear_fwd", QUICK[1].key_str.replace("M=1|", "M=4096|"))[0] == QUICK[1].key_str

    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rg.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        rg.write_table(path, meta, {})
    assert path.read_bytes() == before  # the old table is intact
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_load_table_rejects_what_it_cannot_resume(tmp_path):
    assert rg.load_table(tmp_path / "none.json") == ({}, {})
    for text in ("not json", '{"format": 2, "entries": {}}', '[]', '{"format": 1, "entries": {"op": []}}'):
        (tmp_path / "t.json").write_text(text)
        with pytest.raises(rg.TableError):
            rg.load_table(tmp_path / "t.json")


def test_campaign_meta_keeps_earlier_runs():
    first = rg.campaign_meta(None, {"date": "d1", "commit": "c1", "quick": True}, quick=True)
    second = rg.campaign_meta(first, {"date": "d2", "commit": "c2", "quick": False}, quick=False)
    assert (first["date"], first["commit"], first["quick"]) == ("d1", "c1", True)
    assert (second["date"], second["commit"], second["quick"]) == ("d2", "c2", False)
    assert [r["commit"] for r in second["runs"]] == ["c1", "c2"]
    assert [s["name"] for s in second["shape_sets"]] == ["llama3-8b", "llama3-70b", "vit-l"]
    assert second["ops"][rg.BWD_DX] == "M >= 256"
    json.dumps(second)


def test_tune_entry_adds_heuristic_and_best_time_per_implementation():
    job = QUICK[0]
    device = torch.device("cuda", 0)  # candidate lists only: nothing runs on it
    cands = nt.FWD.candidates(job.key, H100_LIMITS, device)

    class FakeTuner:
        def limits(self, dev):
            return H100_LIMITS

        def tune(self, op, key, dev, candidates=None, store=True):
            assert store is False and [c.name for c in candidates] == [c.name for c in cands]
            times = {c.name: 1.0 + i for i, c in enumerate(candidates)}
            times["dense"] = 0.5
            entry = {**nt.DENSE.to_entry(), "ms": 0.5, "candidates": len(candidates), "tune_s": 2.0}
            return TuneResult(op.key_str(key), nt.DENSE, entry, times, {})

    entry = rg.tune_entry(FakeTuner(), device, job)
    assert entry["name"] == "dense" and entry["heuristic"] == cands[0].name and entry["heuristic_ms"] == 1.0
    # cuSPARSELt is a candidate where torch and the GPU have it (a CUDA build of torch ships it even on a
    # machine without a GPU, where the package does not offer it): the expectation asks the package.
    want = {"triton": 1.0, "dense": 0.5}
    cslt = [i for i, c in enumerate(cands) if c.impl == "cusparselt"]
    n, m = map(int, job.key[1].split(":"))
    assert bool(cslt) == nt.cusparselt_supported(job.key[0], n, m, job.key[2], job.key[3], device,
                                                 H100_LIMITS.capability)
    if cslt:
        want["cusparselt"] = 1.0 + cslt[0]
    assert entry["impl_ms"] == want
    assert "dense" in rg.describe(entry) and "heuristic 1.0000 ms" in rg.describe(entry)


@pytest.mark.slow  # every candidate runs once (interpreted on CPU) for the correctness check
def test_tune_entry_with_the_real_tuner(tmp_path, device):
    info = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), "3.6.0", "2.11.0", "0.1.0")
    timed = []

    def timer(name, fn):
        fn()
        timed.append(name)
        return 0.5 if name == "dense" else 1.0 + 0.01 * len(timed)

    tuner = Tuner(timer=timer, cache_root=tmp_path / "cache", shipped_dir=tmp_path, device_info=info,
                  tune_on_cpu=True)
    entry = rg.tune_entry(tuner, torch.device(device), rg.Job(rg.FWD, ("fp16", "2:4", 32, 64, 4, 1), ("toy",)))
    assert entry["name"] == "dense" and entry["dense_ms"] == 0.5 and entry["impl_ms"]["dense"] == 0.5
    assert entry["heuristic"] == timed[0] and entry["heuristic_ms"] == 1.01
    assert entry["candidates"] == len(timed) + len(entry.get("rejected", ())) and entry["tune_s"] > 0
    assert not (tmp_path / "cache").exists()  # store=False: nothing in the (scratch) user cache
    json.dumps(entry)


def test_main_writes_meta_and_campaign_and_resumes(tmp_path, monkeypatch, capsys):
    """The whole run on CPU with the GPU parts faked: what it writes, and a second call resuming it."""
    info = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), "3.6.0", "2.11.0", "0.1.0")
    tuned, failed = [], {QUICK[5]}

    def fake_tune_entry(tuner, device, job):
        assert Path(tuner.cache_root).name.startswith("sparse_triton_regenerate_")  # never the user's cache
        assert job not in tuned
        tuned.append(job)
        if job in failed:
            failed.discard(job)  # fails once, like an out-of-memory the next call does not hit
            return None
        return _fake_entry(tune_s=0.25)

    monkeypatch.setattr(rg, "cuda_problem", lambda: None)
    monkeypatch.setattr(rg, "tune_entry", fake_tune_entry)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(DeviceInfo, "current", classmethod(lambda cls, index=None: info))
    out = tmp_path / "t.json"

    assert rg.main(["--quick", "--out", str(out)]) == 1  # QUICK[5] failed: reported, left out, run goes on
    meta, entries = rg.load_table(out)
    assert tuned == QUICK and sum(len(v) for v in entries.values()) == len(QUICK) - 1
    assert {k: meta[k] for k in info.to_json()} == info.to_json()
    run = meta["campaign"]["runs"][-1]
    assert (run["keys_tuned"], run["tune_s"], run["complete"], run["quick"]) == (132, 33.0, False, True)
    assert meta["campaign"]["quick"] is True and meta["campaign"]["date"] == run["date"]
    text = capsys.readouterr().out
    assert "tuned 132 keys in 33.0s of tuning" in text and f"FAILED {QUICK[5].label}" in text

    tuned.clear()
    assert rg.main(["--quick", "--resume", str(out), "--budget-s", "1000"]) == 0  # writes into the same file
    meta, entries = rg.load_table(out)
    assert tuned == [QUICK[5]] and sum(len(v) for v in entries.values()) == len(QUICK)
    assert [r["keys_tuned"] for r in meta["campaign"]["runs"]] == [132, 1]
    assert meta["campaign"]["runs"][-1]["complete"] is True

    other = tmp_path / "other.json"
    rg.write_table(other, {"gpu": "NVIDIA A100-SXM4-80GB"}, {})
    assert rg.main(["--resume", str(other)]) == 2
    assert "measured on 'NVIDIA A100-SXM4-80GB'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- no GPU


@pytest.mark.slow  # a fresh interpreter imports torch (a few seconds)
def test_exits_2_without_cuda(tmp_path):
    out = tmp_path / "t.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "autotune.regenerate", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr
    assert not out.exists()
