"""tuning/: keys and buckets, the lookup order, the correctness gate, bad cache files, concurrent
writers, the mode switch. Tuning runs on CPU here with an injected fake timer and a toy op."""

import json
import multiprocessing as mp
import warnings

import pytest
import torch
from kit import CPU, H100_INFO, FakeTimer, no_timer

from sparse_triton import tuning
from sparse_triton.tuning import cache as tc
from sparse_triton.tuning import mode
from sparse_triton.tuning.tables import ShippedTable, bucket, key_str, load_shipped, parse_key
from sparse_triton.tuning.tuner import Candidate, TunableOp, Tuner

INFO = H100_INFO
SLUG = INFO.slug


class ToyOp(TunableOp):
    """y = 2 x. ``heur`` is the heuristic default; ``wrong`` is fast and wrong; ``boom`` raises."""

    name = "toy"
    fields = ("dtype", "N", "M")
    dense_impl = "dense"
    NAMES = ("heur", "wrong", "boom", "good", "dense")

    def __init__(self, names=NAMES):
        self.names = names
        self.runs = []

    def candidates(self, key, limits, device):
        return [Candidate(n, "dense" if n == "dense" else "kernel") for n in self.names]

    def from_entry(self, entry, key, limits, device):
        return Candidate(entry["name"], entry["impl"]) if entry.get("name") in self.names else None

    def make_inputs(self, key, device, generator):
        x = torch.randn(key[2], key[1], generator=generator, device=device)
        assert (x != 0).all()
        return {"x": x, "out": torch.empty_like(x)}

    def run(self, candidate, inputs):
        self.runs.append(candidate.name)
        if candidate.name == "boom":
            raise RuntimeError("out of resources: shared memory")
        out = inputs["out"]
        if candidate.name == "wrong":
            out[: out.shape[0] // 2].copy_(inputs["x"][: out.shape[0] // 2] * 2)  # half the tiles unwritten
            return out
        return torch.mul(inputs["x"], 2, out=out)

    def reference(self, inputs):
        return inputs["x"].double() * 2

    def tolerance(self, key):
        return 1e-6


TIMES = {"heur": 3.0, "wrong": 0.1, "boom": 0.1, "good": 1.0, "dense": 2.0}


def fake_timer(times=None):
    return FakeTimer(times or TIMES)


def _tuner(tmp_path, timer=None, shipped=None, **kw):
    return Tuner(timer=timer or fake_timer(), cache_root=tmp_path / "cache",
                 shipped_dir=shipped or (tmp_path / "shipped"), device_info=INFO, tune_on_cpu=True, **kw)


def _write_table(directory, entries, slug=SLUG):
    directory.mkdir(parents=True, exist_ok=True)
    data = {"format": tc.FORMAT, "meta": {**INFO.to_json(), "triton": "3.5.0"}, "entries": entries}
    (directory / f"{slug}.json").write_text(json.dumps(data))


@pytest.fixture(autouse=True)
def _clean():
    tc._warned.clear()
    mode.set_autotune(None)
    yield
    tc._warned.clear()
    mode.set_autotune(None)


# ------------------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize("m, b", [(0, 1), (1, 1), (2, 2), (3, 4), (8, 8), (9, 16), (17, 32), (4096, 4096),
                                  (4097, 8192), (16384, 16384), (10**9, 1 << 24)])
def test_bucket(m, b):
    assert bucket(m) == b


def test_key_str_round_trip():
    text = key_str(("dtype", "nm", "N", "K", "M"), ("fp16", "2:4", 4096, 14336, 16))
    assert text == "dtype=fp16|nm=2:4|N=4096|K=14336|M=16"
    assert parse_key(text) == {"dtype": "fp16", "nm": "2:4", "N": "4096", "K": "14336", "M": "16"}
    with pytest.raises(ValueError, match="malformed"):
        parse_key("dtype=fp16|oops")


# ------------------------------------------------------------------------------------------ lookup order

KEY = ("fp32", 64, 16)
KSTR = "dtype=fp32|N=64|M=16"


def test_tune_now_picks_fastest_correct_and_records(tmp_path):
    op, timer = ToyOp(), fake_timer()
    tuner = _tuner(tmp_path, timer)
    choice = tuner.resolve(op, KEY, CPU)
    assert choice.source == "tuned" and choice.candidate.name == "good"
    # wrong and boom were never timed, whatever the fake timer would have said about them
    assert sorted(timer.calls) == ["dense", "good", "heur"]
    entry = json.loads(tuner.cache(INFO).path.read_text())["entries"]["toy"][KSTR]
    assert entry["name"] == "good" and entry["ms"] == 1.0
    assert entry["runner_up"] == "dense" and entry["runner_up_ms"] == 2.0 and entry["dense_ms"] == 2.0
    assert entry["rejected"] == ["boom", "wrong"] and entry["candidates"] == 5 and entry["tune_s"] >= 0


def test_memory_then_user_cache_then_no_retune(tmp_path):
    op = ToyOp()
    tuner = _tuner(tmp_path)
    tuner.resolve(op, KEY, CPU)
    tuner._timer = no_timer
    tuner.cache(INFO).path.unlink()  # memory answers without the file
    assert tuner.choose(op, KEY, CPU).name == "good"
    # a new process (new tuner) reads the user cache, and times nothing
    tuner = _tuner(tmp_path, fake_timer({"heur": 0.5, "good": 1.0, "dense": 2.0}))
    tuner.resolve(op, KEY, CPU)  # re-tunes (file was deleted): heur wins now
    fresh = _tuner(tmp_path, no_timer)
    choice = fresh.resolve(op, KEY, CPU)
    assert (choice.source, choice.candidate.name) == ("cache", "heur")


def test_user_cache_beats_shipped_and_shipped_beats_tuning(tmp_path):
    op = ToyOp()
    _write_table(tmp_path / "shipped", {"toy": {KSTR: {"name": "dense", "impl": "dense", "ms": 2.0}}})
    choice = _tuner(tmp_path, no_timer).resolve(op, KEY, CPU)
    assert (choice.source, choice.candidate.name) == ("shipped", "dense")
    tc.TuningCache(INFO, root=tmp_path / "cache").put("toy", KSTR, {"name": "heur", "impl": "kernel"})
    choice = _tuner(tmp_path, no_timer).resolve(op, KEY, CPU)
    assert (choice.source, choice.candidate.name) == ("cache", "heur")


@pytest.mark.parametrize("M, want_bucket", [(16, 16), (32, 16), (64, 256), (128, 256), (1, 16), (8192, 256)])
def test_nearest_bucket_from_shipped_table(tmp_path, M, want_bucket):
    op = ToyOp()
    entries = {f"dtype=fp32|N=64|M={b}": {"name": name, "impl": "kernel"} for b, name in ((16, "heur"), (256, "good"))}
    entries["dtype=fp32|N=128|M=64"] = {"name": "dense", "impl": "dense"}  # other N: never a neighbour
    _write_table(tmp_path / "shipped", {"toy": entries})
    choice = _tuner(tmp_path, no_timer).resolve(op, ("fp32", 64, M), CPU)
    assert choice.source == ("shipped" if M == want_bucket else "shipped-nearest")
    assert choice.key == f"dtype=fp32|N=64|M={want_bucket}"
    assert choice.candidate.name == ("heur" if want_bucket == 16 else "good")


def test_missing_n_in_shipped_table_tunes(tmp_path):
    _write_table(tmp_path / "shipped", {"toy": {"dtype=fp32|N=128|M=16": {"name": "dense", "impl": "dense"}}})
    assert _tuner(tmp_path).resolve(ToyOp(), KEY, CPU).source == "tuned"


def test_invalid_entries_fall_through(tmp_path):
    op = ToyOp(names=("heur", "good", "dense"))
    tc.TuningCache(INFO, root=tmp_path / "cache").put("toy", KSTR, {"name": "removed-config", "impl": "kernel"})
    _write_table(tmp_path / "shipped", {"toy": {KSTR: {"name": "boom", "impl": "kernel"}}})
    choice = _tuner(tmp_path).resolve(op, KEY, CPU)
    assert (choice.source, choice.candidate.name) == ("tuned", "good")


def test_tuning_off_uses_heuristic_then_tunes_when_allowed(tmp_path):
    op = ToyOp()
    timer = fake_timer()
    tuner = _tuner(tmp_path, timer)
    with tuning.autotune(False):
        choice = tuner.resolve(op, KEY, CPU)
        assert (choice.source, choice.candidate.name) == ("heuristic", "heur") and choice.provisional
        assert tuner.choose(op, KEY, CPU).name == "heur" and timer.calls == []
    assert tuner.choose(op, KEY, CPU).name == "good" and timer.calls  # provisional: retried once allowed
    assert not tuner.cache(INFO).path.read_text() == ""


def test_tuning_off_prefers_user_cache_nearest_bucket(tmp_path):
    tc.TuningCache(INFO, root=tmp_path / "cache").put("toy", "dtype=fp32|N=64|M=64", {"name": "dense", "impl": "dense"})
    mode.set_autotune(False)
    choice = _tuner(tmp_path, no_timer).resolve(ToyOp(), KEY, CPU)
    assert (choice.source, choice.candidate.name, choice.key) == ("cache-nearest", "dense", "dtype=fp32|N=64|M=64")


def test_every_candidate_failing_warns_and_falls_back(tmp_path):
    op = ToyOp(names=("wrong", "boom"))
    tuner = _tuner(tmp_path)
    with pytest.warns(RuntimeWarning, match="failed its check"):
        choice = tuner.resolve(op, KEY, CPU)
    assert choice.source == "heuristic" and not tuner.cache(INFO).path.exists()


def test_cpu_without_tune_on_cpu_never_looks_up_or_times(tmp_path):
    _write_table(tmp_path / "shipped", {"toy": {KSTR: {"name": "dense", "impl": "dense"}}})
    tuner = Tuner(timer=no_timer, cache_root=tmp_path / "cache", shipped_dir=tmp_path / "shipped")
    choice = tuner.resolve(ToyOp(), KEY, CPU)
    assert (choice.source, choice.candidate.name) == ("first", "heur")
    assert not (tmp_path / "cache").exists()


def test_tuning_leaves_the_callers_random_stream_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _tuner(tmp_path).resolve(ToyOp(), KEY, CPU)
    assert torch.equal(torch.rand(3), expected)


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_TRITON_CACHE_DIR", str(tmp_path / "env-cache"))
    tuner = Tuner(timer=fake_timer(), shipped_dir=tmp_path / "shipped", device_info=INFO, tune_on_cpu=True)
    tuner.resolve(ToyOp(), KEY, CPU)
    data = json.loads((tmp_path / "env-cache" / SLUG / "tuning.json").read_text())
    assert data["entries"]["toy"][KSTR]["name"] == "good"


# --------------------------------------------------------------------------------------------- bad files

BAD = {
    "garbage": "\x00 not json",
    "truncated": '{"format": 1, "meta": {"gpu": "NVIDIA H1',
    "stale": json.dumps({"format": 1, "meta": {**INFO.to_json(), "torch": "2.0.0"},
                         "entries": {"toy": {KSTR: {"name": "dense", "impl": "dense"}}}}),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_cache_file_warns_once_and_retunes(tmp_path, kind):
    path = tmp_path / "cache" / SLUG / "tuning.json"
    path.parent.mkdir(parents=True)
    path.write_text(BAD[kind])
    with pytest.warns(RuntimeWarning, match="ignoring tuning cache") as record:
        choice = _tuner(tmp_path).resolve(ToyOp(), KEY, CPU)
        _tuner(tmp_path).resolve(ToyOp(), ("fp32", 64, 32), CPU)  # second reader: no second warning
    assert len([w for w in record if "ignoring tuning cache" in str(w.message)]) == 1
    assert (choice.source, choice.candidate.name) == ("tuned", "good")
    data = json.loads(path.read_text())  # rewritten whole, for this GPU and these versions
    assert data["meta"] == INFO.to_json() and set(data["entries"]["toy"]) == {KSTR, "dtype=fp32|N=64|M=32"}


@pytest.mark.parametrize("text", ["{{{", '{"format": 7}', json.dumps({"format": 1, "entries": {"toy": [1]}})])
def test_bad_shipped_table_warns_and_is_empty(tmp_path, text):
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / f"{SLUG}.json").write_text(text)
    with pytest.warns(RuntimeWarning, match="ignoring tuning cache"):
        assert len(load_shipped(SLUG, tmp_path / "shipped")) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _tuner(tmp_path).resolve(ToyOp(), KEY, CPU).source == "tuned"  # warned once already


def _tune_in_process(args):
    root, shipped, worker = args
    tuner = Tuner(timer=fake_timer(), cache_root=root, shipped_dir=shipped, device_info=INFO, tune_on_cpu=True)
    op = ToyOp(names=("heur", "good", "dense"))
    for M in range(1, 9):
        tuner.resolve(op, ("fp32", 16 * (worker + 1), 2 ** M), CPU)
    return worker


def test_four_processes_tuning_into_one_cache(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        done = pool.map(_tune_in_process, [(tmp_path / "c", tmp_path / "s", w) for w in range(4)])
    assert sorted(done) == [0, 1, 2, 3]
    data = json.loads((tmp_path / "c" / SLUG / "tuning.json").read_text())
    keys = set(data["entries"]["toy"])
    assert keys == {f"dtype=fp32|N={16 * (w + 1)}|M={2 ** M}" for w in range(4) for M in range(1, 9)}
    assert all(e["name"] == "good" for e in data["entries"]["toy"].values())


# -------------------------------------------------------------------------------------------------- mode


def test_mode_precedence(monkeypatch):
    monkeypatch.delenv("SPARSE_TRITON_AUTOTUNE", raising=False)
    assert tuning.autotune_enabled()
    monkeypatch.setenv("SPARSE_TRITON_AUTOTUNE", "0")
    assert not tuning.autotune_enabled()
    tuning.set_autotune(True)
    assert tuning.autotune_enabled()
    with tuning.autotune(False):
        assert not tuning.autotune_enabled()
        with tuning.autotune(True):
            assert tuning.autotune_enabled()
        assert not tuning.autotune_enabled()
    tuning.set_autotune(None)
    for raw, want in (("1", True), ("off", False), ("TRUE", True), ("no", False), (" ", True)):
        monkeypatch.setenv("SPARSE_TRITON_AUTOTUNE", raw)
        assert tuning.autotune_enabled() is want


def test_mode_bad_values(monkeypatch):
    monkeypatch.setenv("SPARSE_TRITON_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="SPARSE_TRITON_AUTOTUNE='maybe'"):
        tuning.autotune_enabled()
    with pytest.raises(TypeError, match="set_autotune"):
        tuning.set_autotune(1)
    with pytest.raises(TypeError, match="autotune"):
        with tuning.autotune("no"):
            pass


def test_autotune_context_is_per_thread():
    import threading

    seen = {}
    with tuning.autotune(False):
        t = threading.Thread(target=lambda: seen.setdefault("other", tuning.autotune_enabled()))
        t.start()
        t.join()
        assert not tuning.autotune_enabled()
    assert seen["other"] is True


def test_shipped_table_nearest_tie_prefers_larger():
    table = ShippedTable(None, {"op": {"a=1|M=4": {"v": 4}, "a=1|M=16": {"v": 16}, "a=2|M=8": {"v": 0}}})
    assert table.nearest("op", "a=1|M=8")[1] == {"v": 16}
    assert table.nearest("op", "a=1|M=2")[1] == {"v": 4}
    assert table.nearest("op", "a=3|M=8") is None and table.nearest("op", "a=1") is None
