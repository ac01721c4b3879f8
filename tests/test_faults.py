"""Faults never crash an op: bad tuning files and cache locations (one warning, the next lookup source),
hand-built NMTensors with malformed packed positions (a ValueError naming the fault, checked once per
version), features a torch build may or may not have (cuSPARSELt), and bool arguments."""

import json
import math
import os
import warnings

import pytest
import torch
from kit import CPU, CUDA, H100_INFO, FakeTimer, assert_close

import sparse_triton as st
from sparse_triton.formats import nm as nm_format
from sparse_triton.formats.nm import pack_indices, unpack_indices
from sparse_triton.ops import _dispatch
from sparse_triton.ops import act_sparse_tuning as at
from sparse_triton.ops import nm_tuning as nt
from sparse_triton.ops.nm_linear import KERNEL_M
from sparse_triton.tuning import cache as tc
from sparse_triton.tuning import presets
from sparse_triton.tuning.tuner import H100_LIMITS, DeviceLimits, Tuner

SLUG = H100_INFO.slug
N, K, M = 16, 32, 2


@pytest.fixture(autouse=True)
def _fresh_warnings():
    tc._warned.clear()
    yield
    tc._warned.clear()


class _Two(nt.NMLinearFwdTunable):
    """The real forward with two candidates (the interpreter's config and dense), so tuning stays quick."""

    def candidates(self, key, limits, device):
        return [super().candidates(key, limits, device)[0], nt.DENSE]


def _cache_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "ignoring tuning cache" in str(w.message)]


class _OnePrune(nt.NMPruneTunable):
    """The prune op with its first candidate only (tuning the forward compresses a random weight)."""

    def candidates(self, key, limits, device):
        return super().candidates(key, limits, device)[:1]


class Rig:
    """``st.nm_linear`` on CPU through a tuner that tunes into ``tmp_path`` (as an H100), with a small weight."""

    def __init__(self, tmp_path, tuner_factory, monkeypatch):
        monkeypatch.setattr(nt, "FWD", _Two())
        monkeypatch.setattr(nt, "PRUNE", _OnePrune())
        self.tmp = tmp_path
        self.w = st.nm_compress(torch.randn(N, K), 2, 4)  # before the tuner: the prune op is not tuned
        self.x = torch.randn(M, K)
        self.key = nt.fwd_key(self.x, N, K, 2, 4, False)
        self.kstr = nt.FWD.key_str(self.key)
        self.make = tuner_factory
        self.timer = FakeTimer(fastest="dense")

    @property
    def cache_file(self):
        return self.tmp / "cache" / SLUG / tc.FILE_NAME

    @property
    def table_file(self):
        return self.tmp / "shipped" / f"{SLUG}.json"

    def file(self, entries=None, meta="info", **top):
        data = {"format": tc.FORMAT, "meta": H100_INFO.to_json() if meta == "info" else meta,
                "entries": {nt.FWD.name: {self.kstr: {"name": "dense", "impl": "dense", "ms": 0.5}}}
                if entries is None else entries}
        data.update(top)
        return json.dumps(data)

    def write(self, path, content):
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)

    def tuner(self, cache_from_env=False):
        """The default tuner from now on: its user cache in ``tmp/cache``, or where the environment says."""
        if cache_from_env:
            tuner = Tuner(timer=self.timer, shipped_dir=self.tmp / "shipped", device_info=H100_INFO, tune_on_cpu=True)
        else:
            tuner = self.make(self.timer)
        st.tuning.set_default_tuner(tuner)
        return tuner

    def run(self, tuner):
        """Run the op twice, then again after ``tuner`` forgets everything (as a new process, it reads the
        files again); every result is checked. Returns (where the first lookup resolved, cache warnings)."""
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for _ in range(2):
                y = st.nm_linear(self.x, self.w)
                assert_close(y, self.x.double() @ self.w.to_dense().double().t(), K)
            choice = tuner.resolve(nt.FWD, self.key, CPU)
            tuner.clear_memory()
            assert_close(st.nm_linear(self.x, self.w), self.x.double() @ self.w.to_dense().double().t(), K)
        return choice.source, _cache_warnings(record)


@pytest.fixture
def rig(tmp_path, tuner_factory, monkeypatch):
    return Rig(tmp_path, tuner_factory, monkeypatch)


# --------------------------------------------------------------------------------------------- bad files

GOOD = {"name": "dense", "impl": "dense", "ms": 0.5}
TRITON = {"BM": 16, "BN": 64, "BK": 64}
BAD_ENTRIES = {
    "entry-list": [1, 2],
    "entry-string": "dense",
    "entry-number": 3,
    "entry-null": None,
    "impl-list": {"name": "dense", "impl": ["dense"]},
    "config-field-list": {"name": "t", "impl": "triton", "config": {**TRITON, "BN": [64]}},
    "config-field-float": {"name": "t", "impl": "triton", "config": {**TRITON, "BK": 64.0}},
    "config-a-string": {"name": "t", "impl": "triton", "config": "BM16BN64BK64"},
    "config-number-as-string": {"name": "t", "impl": "triton", "config": {**TRITON, "BM": "16"}},
    "config-bool-as-string": {"name": "t", "impl": "triton", "config": {**TRITON, "USE_DOT": "yes"}},
    "config-huge-int": {"name": "t", "impl": "triton", "config": {**TRITON, "BM": 10**30}},
    "time-as-string": {**GOOD, "ms": "0.5"},
    "time-nan": {**GOOD, "ms": math.nan},
    "time-inf": {**GOOD, "ms": math.inf},
    "time-negative": {**GOOD, "ms": -1.0},
    "time-huge-int": {**GOOD, "ms": 10**400},
    "candidates-as-string": {**GOOD, "candidates": "12"},
    "rejected-not-strings": {**GOOD, "rejected": [1]},
}


def _bad_files(rig: Rig) -> dict[str, str | bytes]:
    files = {k: rig.file({nt.FWD.name: {rig.kstr: v}}) for k, v in BAD_ENTRIES.items()}
    files.update({
        "op-not-an-object": rig.file({nt.FWD.name: [GOOD]}),
        "entries-not-an-object": rig.file([GOOD]),
        "meta-not-an-object": rig.file(meta=["NVIDIA H100 80GB HBM3"]),
        "format-as-string": rig.file(format="1"),
        "format-true": rig.file(format=True),
        "not-utf8": b"\xff\xfe" + rig.file().encode("utf-16-le"),
        "deeply-nested": "[" * 100_000 + "]" * 100_000,  # RecursionError in json.loads
        "deep-in-an-entry": rig.file({nt.FWD.name: {rig.kstr: {**GOOD, "notes": json.loads("[" * 50 + "]" * 50)}}}),
        "huge-integer-text": '{"format": 1, "entries": {}, "x": ' + "9" * 5000 + "}",
    })
    assert set(files) == set(BAD_KINDS)
    return files


FILE_FAULTS = ("op-not-an-object", "entries-not-an-object", "meta-not-an-object", "format-as-string",
               "format-true", "not-utf8", "deeply-nested", "deep-in-an-entry", "huge-integer-text")
BAD_KINDS = sorted([*BAD_ENTRIES, *FILE_FAULTS])


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_user_cache_warns_once_and_falls_back_to_the_shipped_table(rig, kind):
    rig.write(rig.cache_file, _bad_files(rig)[kind])
    rig.write(rig.table_file, rig.file({nt.FWD.name: {rig.kstr: {"name": "dense", "impl": "dense", "ms": 0.7}}}))
    source, warned = rig.run(rig.tuner())
    assert source == "shipped"  # the bad cache entry was not used
    assert len(warned) == 1, warned
    assert str(rig.cache_file) in warned[0]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_shipped_table_warns_once_and_tunes(rig, kind):
    rig.write(rig.table_file, _bad_files(rig)[kind])
    source, warned = rig.run(rig.tuner())
    assert source == "tuned" and rig.timer.calls  # the next step of the lookup order: tune now
    assert len(warned) == 1, warned
    assert str(rig.table_file) in warned[0]


def test_malformed_entries_are_left_out_and_the_rest_is_used(rig):
    other = nt.FWD.key_str(nt.fwd_key(torch.randn(64, K), N, K, 2, 4, False))
    rig.write(rig.cache_file, rig.file({nt.FWD.name: {rig.kstr: GOOD, other: {**GOOD, "ms": math.nan}},
                                        "other_op": [1]}))
    source, warned = rig.run(rig.tuner())
    assert source == "cache" and len(warned) == 1 and "2 malformed entries" in warned[0]
    # the next write drops them from the file
    rig.tuner().tune(nt.FWD, nt.fwd_key(torch.randn(8, K), N, K, 2, 4, False), CPU)
    data = json.loads(rig.cache_file.read_text())
    assert "other_op" not in data["entries"] and other not in data["entries"][nt.FWD.name]


def test_from_entry_that_raises_warns_once_and_falls_through(rig, monkeypatch):
    class Raising(_Two):
        def from_entry(self, entry, key, limits, device):
            if entry.get("name") == "boom":
                raise KeyError("config")
            return super().from_entry(entry, key, limits, device)

    monkeypatch.setattr(nt, "FWD", Raising())
    rig.write(rig.table_file, rig.file({nt.FWD.name: {rig.kstr: {"name": "boom", "impl": "triton"}}}))
    tuner = rig.tuner()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            assert_close(st.nm_linear(rig.x, rig.w), rig.x.double() @ rig.w.to_dense().double().t(), K)
    warned = _cache_warnings(record)
    assert len(warned) == 1 and "from_entry raised KeyError" in warned[0]
    assert tuner.resolve(nt.FWD, rig.key, CPU).source == "tuned"


# ---------------------------------------------------------------------------------------- bad locations


def _file_as_cache_dir(rig):
    rig.write(rig.tmp / "cache", "not a directory")


def _file_as_gpu_dir(rig):
    rig.write(rig.tmp / "cache" / SLUG, "not a directory")


def _dir_as_cache_file(rig):
    rig.write(rig.cache_file / "inside", "a directory where tuning.json should be")


LOCATIONS = {"file-as-cache-dir": _file_as_cache_dir, "file-as-gpu-dir": _file_as_gpu_dir,
             "dir-as-cache-file": _dir_as_cache_file}


@pytest.mark.parametrize("where", sorted(LOCATIONS))
def test_unusable_cache_location_warns_once_and_tunes_in_memory(rig, where):
    LOCATIONS[where](rig)
    tuner = rig.tuner()
    source, warned = rig.run(tuner)
    assert source == "tuned" and len(warned) == 1, warned
    assert str(rig.cache_file) in warned[0]
    assert tuner.cache(H100_INFO).get(nt.FWD.name, rig.kstr)["name"] == "dense"  # kept in memory


@pytest.mark.parametrize("where", sorted(LOCATIONS))
def test_cache_dir_env_at_a_bad_place(rig, monkeypatch, where):
    LOCATIONS[where](rig)
    monkeypatch.setenv("SPARSE_TRITON_CACHE_DIR", str(rig.tmp / "cache"))
    source, warned = rig.run(rig.tuner(cache_from_env=True))
    assert source == "tuned" and len(warned) == 1, warned
    assert str(rig.cache_file) in warned[0]


def test_read_only_cache_dir(rig):
    rig.write(rig.cache_file, rig.file({}))  # a valid, empty cache: reading works, writing cannot
    os.chmod(rig.cache_file.parent, 0o555)
    try:
        if os.access(rig.cache_file.parent, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop root from writing "
                        "(test_write_failure_keeps_the_entry_in_memory covers the failing write)")
        source, warned = rig.run(rig.tuner())
        assert source == "tuned" and len(warned) == 1 and "cannot write" in warned[0], warned
    finally:
        os.chmod(rig.cache_file.parent, 0o755)


@pytest.mark.parametrize("fails", ["mkdir", "mkstemp", "replace"])
def test_write_failure_keeps_the_entry_in_memory(rig, monkeypatch, fails):
    """A write that fails with EACCES wherever it fails (as in a read-only directory, for any user)."""
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    target = {"mkdir": (tc.Path, "mkdir"), "mkstemp": (tc.tempfile, "mkstemp"), "replace": (tc.os, "replace")}
    monkeypatch.setattr(*target[fails], denied)
    tuner = rig.tuner()
    source, warned = rig.run(tuner)
    assert source == "tuned" and len(warned) == 1 and "cannot write" in warned[0], warned
    assert not rig.cache_file.exists() and not list(rig.cache_file.parent.glob("*.tmp"))


def test_shipped_tables_at_a_bad_place(rig):
    rig.write(rig.table_file / "inside", "a directory where the table should be")
    source, warned = rig.run(rig.tuner())
    assert source == "tuned" and len(warned) == 1 and str(rig.table_file) in warned[0]


def test_put_rejects_a_malformed_entry_before_writing(tmp_path):
    cache = tc.TuningCache(H100_INFO, root=tmp_path)
    with pytest.raises(ValueError, match="TuningCache.put: malformed entry .* 'ms' is not a finite time"):
        cache.put("op", "k", {**GOOD, "ms": math.nan})
    assert not cache.path.exists() and cache.get("op", "k") is None


def test_a_timer_returning_nan_never_reaches_the_cache(rig):
    timer = FakeTimer(times={"dense": math.nan, nt.FWD.candidates(rig.key, H100_LIMITS, CPU)[0].name: 2.0})
    tuner = rig.make(timer)
    result = tuner.tune(nt.FWD, rig.key, CPU)
    assert result.winner.name != "dense" and "dense" in result.rejected
    assert json.loads(rig.cache_file.read_text())["entries"][nt.FWD.name][rig.kstr]["ms"] == 2.0


# ------------------------------------------------------------------------------------------- from_entry

KEYS = {nt.FWD: ("fp16", "2:4", 64, 64, 16, 0), nt.BWD_DX: ("fp16", "2:4", 64, 64, 16),
        nt.PRUNE: ("fp16", "2:4", 64, 64), nt.GATHER: ("fp16", "2:4", 64, 64),
        at.FWD: ("fp16", 64, 64, 16, 0, "scalar"), at.NM_FWD: ("fp16", "2:4", 64, 64, 16, 0, "scalar"),
        at.GATE_UP: ("fp16", 64, 64, 16, "silu", "scalar")}
ANY_JSON = [None, 3, 2.5, "triton", [], ["triton"], {}, {"impl": None}, {"impl": ["triton"]}, {"impl": {}},
            {"impl": "triton"}, {"impl": "triton", "config": None}, {"impl": "triton", "config": []},
            {"impl": "triton", "config": "BM16"}, {"impl": "triton", "config": {1: 2}},
            {"impl": "triton", "config": {"BM": 16, "BN": 64, "BK": 64, "USE_DOT": "yes"}},
            {"impl": "triton", "config": {"BM": True, "BN": 64, "BK": 64}},
            {"impl": "triton", "config": {"BM": 16.0, "BN": 64, "BK": 64}},
            {"impl": "triton", "config": {"BM": 10**30, "BN": 64, "BK": 64}},
            {"impl": "triton", "config": {"BM": 16, "BN": 64, "BK": 64, "SPLIT": 1, "USE_DOT": 1}},
            {"impl": "triton", "config": {"BR": True, "BG": 64, "GROUPS": True}},
            {"impl": "triton", "config": {"BR": 16, "BG": 64, "GROUPS": 1}},
            {"impl": "triton", "config": {"BR": 16, "BS": "128"}}]


@pytest.mark.parametrize("op", list(KEYS), ids=lambda op: op.name)
def test_from_entry_answers_none_for_any_malformed_json(op):
    for entry in ANY_JSON:
        for device in (CUDA, CPU):
            assert op.from_entry(entry, KEYS[op], H100_LIMITS, device) is None, entry


@pytest.mark.parametrize("op", list(KEYS), ids=lambda op: op.name)
def test_every_candidate_round_trips_through_the_schema(op):
    for c in op.candidates(KEYS[op], H100_LIMITS, CUDA):
        entry = {**c.to_entry(), "ms": 1.0}
        assert tc.entry_problem(entry) is None and op.from_entry(entry, KEYS[op], H100_LIMITS, CUDA) == c


# -------------------------------------------------------------------------------------------- cuSPARSELt


def test_cusparselt_needs_a_gpu_not_only_a_torch_that_ships_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not nt.cusparselt_available()  # a CUDA build of torch on a machine without a GPU
    key = ("fp16", "2:4", 64, 64, 16, 0)
    assert "cusparselt" not in [c.name for c in nt.FWD.candidates(key, H100_LIMITS, CUDA)]
    assert nt.FWD.from_entry({"impl": "cusparselt"}, key, H100_LIMITS, CUDA) is None


def test_cusparselt_offered_exactly_where_it_runs(monkeypatch):
    monkeypatch.setattr(nt, "cusparselt_available", lambda: True)
    key = ("fp16", "2:4", 64, 64, 16, 0)

    def offered(op, key, limits=H100_LIMITS, device=CUDA):
        return "cusparselt" in [c.name for c in op.candidates(key, limits, device)]

    assert offered(nt.FWD, key) and nt.FWD.from_entry({"impl": "cusparselt"}, key, H100_LIMITS, CUDA) == nt.CUSPARSELT
    turing = DeviceLimits(65536, 40, (7, 5))  # no sparse tensor cores
    assert not offered(nt.FWD, key, turing)
    assert nt.FWD.from_entry({"impl": "cusparselt"}, key, turing, CUDA) is None
    assert not offered(nt.FWD, key, device=CPU) and not offered(nt.BWD_DX, key[:5])
    assert not offered(nt.FWD, ("fp32", "2:4", 64, 64, 16, 0)) and not offered(nt.FWD, ("fp16", "2:8", 64, 64, 16, 0))


# ------------------------------------------------------------------------------------ hand-built NMTensor


def _hand_built(kind: str, dtype=torch.float32, seed=0):
    """A hand-built NMTensor of ``kind``; (tensor, fault message or None)."""
    g = torch.Generator().manual_seed(seed)
    n, m, rows, K_ = {"position>=m": (2, 8, 6, 40), "more-than-n-in-a-group": (2, 3, 6, 30)}.get(kind, (2, 4, 6, 40))
    dense = st.nm_prune(torch.randn(rows, K_, generator=g, dtype=torch.float64), n, m).to(dtype)
    ok = st.nm_compress(dense, n, m)
    S = ok.values.shape[-1]
    pos = unpack_indices(ok.indices, S, m)
    words = None
    why = None
    if kind == "position>=m":  # row 1, group 2 keeps positions 3 and 9 of a group of 8
        pos[1, 4:6] = torch.tensor([3, 9])
        why = "a stored position is >= m=8"
    elif kind == "more-than-n-in-a-group":  # 2:3, position 3 of group 0 is column 0 of group 1: 3 kept there
        pos[2, 0:2] = torch.tensor([1, 3])
        why = "a stored position is >= m=3"
    elif kind == "not-ascending":
        pos[3, 2:4] = torch.tensor([3, 1])
        why = "not strictly ascending"
    elif kind == "repeated":
        pos[0, 0:2] = torch.tensor([2, 2])
        why = "not strictly ascending"
    elif kind == "padding-bits":  # 2:4, 20 slots in two words of 16: slots 20..31 are padding
        words = ok.indices.clone()
        words[4, -1] |= 1 << 30
        why = "padding after a row's last slot holds non-zero bits"
    if words is None:
        words = pack_indices(pos, m)
    return st.NMTensor(ok.values.clone(), words, ok.shape, n, m), why


FAULTS = ["position>=m", "more-than-n-in-a-group", "not-ascending", "repeated", "padding-bits"]


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("kind", FAULTS)
def test_malformed_hand_built_nmtensor_is_rejected(kind, path):
    dtype = torch.float32 if path == "kernel" else torch.float64  # fp64 runs the reference
    w, why = _hand_built(kind, dtype)
    x = torch.randn(3, w.shape[1], dtype=dtype)
    kernel_path = w.m in KERNEL_M and _dispatch.use_kernels(x)
    if kind == "more-than-n-in-a-group":  # m = 3: the reference on either dtype
        assert not kernel_path
    else:
        assert kernel_path == (path == "kernel")
    with pytest.raises(ValueError, match=f"nm_linear: malformed N:M indices .*{why}"):
        st.nm_linear(x, w)
    with pytest.raises(ValueError, match=f"NMTensor.to_dense: malformed N:M indices .*{why}"):
        w.to_dense()
    with pytest.raises(ValueError, match=why):
        w.validate()


@pytest.mark.parametrize("kind", FAULTS)
def test_check_in_blocks_of_rows_finds_the_first_bad_row(kind, monkeypatch):
    monkeypatch.setattr(nm_format, "_CHECK_BLOCK", 40)  # one or two rows per block
    w, why = _hand_built(kind)
    first = {"position>=m": 1, "more-than-n-in-a-group": 2, "not-ascending": 3, "repeated": 0, "padding-bits": 4}
    with pytest.raises(ValueError, match=f"{why}.* \\(first in row {first[kind]}\\)"):
        w.validate()
    ok, _ = _hand_built("valid")
    ok.validate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_valid_hand_built_nmtensor_runs(dtype):
    ok, _ = _hand_built("valid", dtype)
    w = st.NMTensor(ok.values, pack_indices(ok.positions(), ok.m), ok.shape, ok.n, ok.m)  # packed by hand
    x = torch.randn(3, w.shape[1], dtype=dtype)
    assert_close(st.nm_linear(x, w), x.double() @ w.to_dense().double().t(), w.shape[1])
    w.validate()


def test_checked_once_per_version_and_in_place_corruption_caught(monkeypatch):
    calls = []
    real = nm_format._raise_faults
    monkeypatch.setattr(nm_format, "_raise_faults", lambda *a: calls.append(1) or real(*a))
    ok, _ = _hand_built("valid")
    w = st.NMTensor(ok.values, ok.indices.clone(), ok.shape, ok.n, ok.m)  # a new tensor: never checked
    x = torch.randn(3, w.shape[1])
    assert _dispatch.use_kernels(x)  # the interpreted kernels
    for _ in range(3):
        y = st.nm_linear(x, w)
    w.to_dense()
    st.nm_linear(x.requires_grad_(True), w).sum().backward()
    assert len(calls) == 1
    assert_close(y, x.detach().double() @ w.to_dense().double().t(), w.shape[1])
    with torch.no_grad():
        w.indices[2, 0] = w.indices[2, 0] | 0b1111  # group 0 of row 2 now keeps positions 3 and 3
    with pytest.raises(ValueError, match="nm_linear: .*not strictly ascending .*row 2"):
        st.nm_linear(x, w)
    assert len(calls) == 2
    # nm_compress's tensors are valid by construction: never read back
    fresh = st.nm_compress(torch.randn(8, 16), 2, 4)
    st.nm_linear(torch.randn(2, 16), fresh)
    fresh.to_dense()
    fresh.to(torch.float64).to_dense()
    assert len(calls) == 2


def test_no_check_while_compiling(monkeypatch):
    w, _ = _hand_built("not-ascending")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    nm_format.check_indices(w.indices, w.values.shape[-1], w.n, w.m, "nm_linear")  # traced code never syncs
    monkeypatch.undo()
    with pytest.raises(ValueError, match="not strictly ascending"):
        nm_format.check_indices(w.indices, w.values.shape[-1], w.n, w.m, "nm_linear")


@pytest.mark.gpu
def test_capture_skips_the_check_and_a_checked_weight_never_syncs(device):
    ok, _ = _hand_built("valid", torch.float16)
    w = st.NMTensor(ok.values.to(device), ok.indices.clone().to(device), ok.shape, ok.n, ok.m)
    x = torch.randn(4, w.shape[1], dtype=torch.float16, device=device)
    s = torch.cuda.Stream()  # warm up (compiles kernels; checks w) on a side stream, as CUDA graphs require
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        st.nm_linear(x, w)
    torch.cuda.current_stream().wait_stream(s)
    fresh = st.NMTensor(w.values, w.indices.clone(), w.shape, w.n, w.m)  # never checked: capture must not sync
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = st.nm_linear(x, w)
        y2 = st.nm_linear(x, fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, x.double() @ w.to_dense().double().t(), w.shape[1])
    assert torch.equal(y2, y)
    torch.cuda.set_sync_debug_mode("error")
    try:
        st.nm_linear(x, w)  # checked at this version: no host read
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------------ bools


def test_bool_arguments_reject_non_bools(tmp_path):
    w = torch.randn(4, 8)
    for bad in (1, "yes", None, torch.tensor(True)):
        with pytest.raises(TypeError, match="nm_compress: strict must be a bool"):
            st.nm_compress(w, 2, 4, strict=bad)
        with pytest.raises(TypeError, match="Tuner: tune_on_cpu must be a bool"):
            Tuner(tune_on_cpu=bad)
    tuner = Tuner(timer=FakeTimer(fastest="dense"), cache_root=tmp_path, device_info=H100_INFO, tune_on_cpu=True)
    with pytest.raises(TypeError, match="autotune: flag must be a bool"):
        with st.tuning.autotune(1):
            pass
    with pytest.raises(TypeError, match="LinearShape: bias must be a bool"):
        presets.LinearShape("fc", 8, 8, bias=1)
    with pytest.raises(TypeError, match="Tuner.tune: store must be a bool"):
        tuner.tune(nt.FWD, ("fp32", "2:4", 8, 8, 1, 0), CPU, store=0)
    assert st.nm_compress(w, 2, 4, strict=False).n == 2


@pytest.mark.parametrize("kind", [k for k in FAULTS if k != "more-than-n-in-a-group"])
def test_malformed_nmtensor_rejected_by_act_sparse_linear(kind):
    # As W^T [in_features=6, out_features=40] for the activation-sparse kernel, which reads the positions as
    # they are: a malformed one is refused before any launch.
    w_t, why = _hand_built(kind)
    x = torch.randn(3, w_t.shape[0])
    assert _dispatch.use_kernels(x)
    with pytest.raises(ValueError, match=f"act_sparse_linear: malformed N:M indices .*{why}"):
        st.act_sparse_linear(x, w_t, 0.1)
    ok, _ = _hand_built("valid")
    ref = torch.nn.functional.linear(x.double() * (x.abs() > 0.1), ok.to_dense().double().t())
    torch.testing.assert_close(st.act_sparse_linear(x, ok, 0.1).double(), ref, rtol=1e-5, atol=1e-5)
