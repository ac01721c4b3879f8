"""tuning/cache.py: round trips, bad files (one warning, no crash), atomic writes, concurrent writers."""

import json
import multiprocessing as mp
import warnings

import pytest
from kit import H100_INFO

from sparse_triton.tuning import cache as tc

INFO = H100_INFO


@pytest.fixture(autouse=True)
def _fresh_warnings():
    tc._warned.clear()
    yield
    tc._warned.clear()


def test_gpu_slug_and_cache_dir(monkeypatch, tmp_path):
    assert tc.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tc.gpu_slug("  NVIDIA GeForce RTX 4090 ") == "nvidia-geforce-rtx-4090"
    assert tc.gpu_slug("***") == "unknown-gpu"
    monkeypatch.setenv("SPARSE_TRITON_CACHE_DIR", str(tmp_path / "c"))
    assert tc.cache_dir() == tmp_path / "c"
    assert tc.TuningCache(INFO).path == tmp_path / "c" / "nvidia-h100-80gb-hbm3" / "tuning.json"
    monkeypatch.delenv("SPARSE_TRITON_CACHE_DIR")
    assert tc.cache_dir().parts[-2:] == (".cache", "sparse_triton")


def test_round_trip_and_file_contents(tmp_path):
    c = tc.TuningCache(INFO, root=tmp_path)
    assert c.get("op", "k") is None
    c.put("op", "k", {"config": {"BM": 16}, "ms": 1.5})
    c.put("op", "k2", {"config": {"BM": 32}, "ms": 2.0})
    c2 = tc.TuningCache(INFO, root=tmp_path)
    assert c2.get("op", "k") == {"config": {"BM": 16}, "ms": 1.5} and set(c2.entries("op")) == {"k", "k2"}
    data = json.loads(c.path.read_text())
    assert data["format"] == tc.FORMAT and data["meta"]["capability"] == [9, 0]
    assert data["meta"]["triton"] == "3.6.0" and data["meta"]["gpu"] == INFO.gpu
    assert [p.name for p in c.path.parent.iterdir() if p.name.endswith(".tmp")] == []  # no temp files left


def test_put_rejects_non_json_before_writing(tmp_path):
    c = tc.TuningCache(INFO, root=tmp_path)
    with pytest.raises(TypeError):
        c.put("op", "k", {"bad": object()})
    assert not c.path.exists() and c.get("op", "k") is None


BAD_FILES = {
    "garbage": "\x00\x01 not json",
    "truncated": '{"format": 1, "meta": {"gpu": "NVIDIA H1',
    "wrong-format": json.dumps({"format": 99, "meta": INFO.to_json(), "entries": {}}),
    "not-a-dict": json.dumps([1, 2, 3]),
    "stale-triton": json.dumps({"format": 1, "meta": {**INFO.to_json(), "triton": "3.5.0"},
                                "entries": {"op": {"k": {"ms": 1}}}}),
    "other-gpu": json.dumps({"format": 1, "meta": {**INFO.to_json(), "gpu": "NVIDIA A100"},
                             "entries": {"op": {"k": {"ms": 1}}}}),
    "bad-entries": json.dumps({"format": 1, "meta": INFO.to_json(), "entries": {"op": [1]}}),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_file_is_ignored_with_one_warning(kind, tmp_path):
    path = tmp_path / INFO.slug / tc.FILE_NAME
    path.parent.mkdir(parents=True)
    path.write_text(BAD_FILES[kind])
    with pytest.warns(RuntimeWarning, match="ignoring tuning cache") as record:
        c = tc.TuningCache(INFO, root=tmp_path)
        tc.TuningCache(INFO, root=tmp_path)  # the same file again: no second warning
    assert len(record) == 1
    assert c.get("op", "k") is None  # stale entries are never served
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.put("op", "k", {"ms": 2.0})  # the write replaces the bad file; warned already, no raise
    assert tc.TuningCache(INFO, root=tmp_path).get("op", "k") == {"ms": 2.0}
    assert json.loads(path.read_text())["meta"] == INFO.to_json()


def test_merge_on_write_keeps_other_writers_entries(tmp_path):
    a = tc.TuningCache(INFO, root=tmp_path)
    b = tc.TuningCache(INFO, root=tmp_path)  # both read an empty file
    a.put("op", "from-a", {"ms": 1})
    b.put("op", "from-b", {"ms": 2})  # b never saw a's entry; merging keeps it
    assert set(tc.TuningCache(INFO, root=tmp_path).entries("op")) == {"from-a", "from-b"}
    assert b.get("op", "from-a") == {"ms": 1}  # b's memory picked it up on write


def _writer(root: str, worker: int, count: int) -> None:
    c = tc.TuningCache(INFO, root=root)
    for i in range(count):
        c.put(f"op{i % 3}", f"w{worker}-k{i}", {"worker": worker, "i": i})


def test_four_processes_writing_concurrently_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    data = json.loads((tmp_path / INFO.slug / tc.FILE_NAME).read_text())  # valid JSON
    keys = {k for entries in data["entries"].values() for k in entries}
    assert keys == {f"w{w}-k{i}" for w in range(4) for i in range(25)}
