"""perf/suites/attention.py and its _attention_cases.py without a GPU: the mask generators, pair / flop / byte
counting, the slice decoder (against a contract-faithful fake BlockMask), the case enumeration, % of ideal,
--dry-run, the plot spec, and one pass of every case kind on CPU tensors with the timing faked (nothing here is
timed)."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # perf/ is not installed; plain `pytest` does not put the root on the path
    sys.path.insert(0, str(REPO))

from perf import plot as perf_plot  # noqa: E402
from perf.harness import Timing  # noqa: E402
from perf.suites import _attention_cases as C  # noqa: E402
from perf.suites import attention as A  # noqa: E402

# ------------------------------------------------------------------------------------------ a fake BlockMask


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """bool [BQ, BK] -> int32 [BQ, ceil(BK/32)], bit t of word w = column 32*w + t."""
    BQ, BK = bits.shape
    W = -(-BK // 32)
    padded = torch.zeros(BQ, W * 32, dtype=torch.int64)
    padded[:, :BK] = bits.long()
    words = (padded.view(BQ, W, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _lists(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort((~d).to(torch.int8), dim=-1, stable=True)
    return d.sum(-1, dtype=torch.int32), order.to(torch.int32)


class FakeBlockMask:
    """The contract of /tmp/spec/attention.md in plain torch, built from an element mask (small sizes only)."""

    def __init__(self, allowed: torch.Tensor, BQ: int, BK: int, causal: bool = False, bits: bool = True):
        Bm, Hm, Sq, Skv = allowed.shape
        NQ, NKV = -(-Sq // BQ), -(-Skv // BK)
        self.block_size, self.seq_lens, self.causal = (BQ, BK), (Sq, Skv), causal
        q = torch.arange(NQ * BQ)[:, None]
        k = torch.arange(NKV * BK)[None, :]
        rule = (q < Sq) & (k < Skv) & ((k <= q) if causal else True)
        el = torch.zeros(Bm, Hm, NQ * BQ, NKV * BK, dtype=torch.bool)
        el[:, :, :Sq, :Skv] = allowed
        el &= rule
        self._el = el[:, :, :Sq, :Skv].clone()
        blk = el.view(Bm, Hm, NQ, BQ, NKV, BK).permute(0, 1, 2, 4, 3, 5)  # [Bm, Hm, NQ, NKV, BQ, BK]
        rblk = rule.view(NQ, BQ, NKV, BK).permute(0, 2, 1, 3)
        listed = blk.any(-1).any(-1)
        plain = (blk == rblk).all(-1).all(-1)  # the rule alone decides inside the block
        straddle = ~rblk.all(-1).all(-1)  # the kv tail or the causal diagonal crosses it
        full = listed & plain & ~straddle
        part = listed & ~full
        slot = torch.full((Bm, Hm, NQ, NKV), -1, dtype=torch.int32)
        words = []
        if bits:
            for b, h, i, j in torch.nonzero(part & ~plain).tolist():
                slot[b, h, i, j] = len(words)
                words.append(_pack(blk[b, h, i, j]))
        elif bool((part & ~plain).any()):
            raise ValueError("mask needs bitmasks")
        self.kv_num_blocks, self.kv_indices = _lists(part)
        self.full_kv_num_blocks, self.full_kv_indices = _lists(full)
        order = torch.argsort((~part).to(torch.int8), dim=-1, stable=True)
        self.partial_bits = torch.stack(words) if words else None
        self.kv_bits_slot = torch.gather(slot, -1, order).contiguous() if words else None
        self.q_bits_slot = self.kv_bits_slot

    def element_mask(self) -> torch.Tensor:
        return self._el.clone()

    def sparsity(self) -> float:
        return 0.0

    def to(self, device):
        return self

    @classmethod
    def from_dense(cls, mask, block_size=128, seq_lens=None):
        BQ, BK = C.as_pair(block_size)
        Sq, Skv = seq_lens or (mask.shape[-2] * BQ, mask.shape[-1] * BK)
        el = mask.repeat_interleave(BQ, -2).repeat_interleave(BK, -1)[..., :Sq, :Skv]
        return cls(el.cpu(), BQ, BK, bits=False)

    @classmethod
    def causal(cls, seq_len, block_size=128):
        return cls(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool), block_size, block_size, causal=True)

    @classmethod
    def sliding_window(cls, seq_len, window, block_size=128, causal=True):
        q = torch.arange(seq_len)[:, None]
        k = torch.arange(seq_len)[None, :]
        el = (q - k < window) & ((k <= q) if causal else (k - q < window))
        return cls(el[None, None], block_size, block_size, causal=causal)

    @classmethod
    def document(cls, document_ids, block_size=128, causal=False):
        ids = document_ids.cpu()
        return cls((ids[:, None] == ids[None, :])[None, None], block_size, block_size, causal=causal)

    @classmethod
    def topk(cls, block_scores, k, block_size=128, causal=False):
        blk = torch.zeros(block_scores.shape, dtype=torch.bool)
        blk.scatter_(-1, block_scores.cpu().topk(k, -1).indices, True)
        return cls.from_dense(blk, block_size)  # lengths NQ*BQ x NKV*BK: the suite falls back to from_dense


def fake_attention(q, k, v, block_mask, *, scale=None, causal=False, return_lse=False):
    allowed = block_mask.element_mask()
    if causal:
        allowed = allowed & torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    return C.reference_attention(q, k, v, allowed, scale or q.shape[-1] ** -0.5).to(q.dtype)


FAKE_API = A.Api(FakeBlockMask, fake_attention, SimpleNamespace(last_config=lambda: "fake-config"))


def _brute_pairs(bm, B, Hq, causal):
    el = bm.element_mask()
    if causal:
        el = el & torch.ones(el.shape[-2:], dtype=torch.bool).tril()
    return int(el.sum()) * (B // el.shape[0]) * (Hq // el.shape[1])


# ------------------------------------------------------------------------------------------ masks and counting


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75, 0.9, 0.95])
def test_random_block_mask_sparsity_and_diagonal(sparsity, causal):
    NQ = 64
    m = C.random_block_mask(4, NQ, NQ, sparsity, causal=causal, seed=3)
    assert m.shape == (1, 4, NQ, NQ) and m.dtype == torch.bool
    assert bool(m[0].diagonal(dim1=-2, dim2=-1).all())
    cand = torch.ones(NQ, NQ, dtype=torch.bool).tril() if causal else torch.ones(NQ, NQ, dtype=torch.bool)
    assert not bool((m[0] & ~cand).any())
    density = m.sum().item() / (4 * cand.sum().item())
    # rows keep round((1-s) n) blocks, at least the diagonal: short causal rows keep a little more
    assert abs(density - (1 - sparsity)) <= (0.01 if not causal else 0.03)
    assert torch.equal(m, C.random_block_mask(4, NQ, NQ, sparsity, causal=causal, seed=3))
    assert not torch.equal(m, C.random_block_mask(4, NQ, NQ, sparsity, causal=causal, seed=4)) or sparsity == 0


def test_document_ids():
    ids = C.document_ids(1000, 8, seed=1)
    assert ids.dtype == torch.int32 and ids.shape == (1000,)
    assert ids[0] == 0 and ids[-1] == 7 and bool((ids.diff() >= 0).all()) and len(ids.unique()) == 8


def _masks():
    S, blk = 300, 64  # ragged: the last block holds 44 rows / keys
    n = -(-S // blk)
    return {
        "from_dense": FakeBlockMask.from_dense(C.random_block_mask(2, n, n, 0.5, causal=False, seed=0), blk,
                                               seq_lens=(S, S)),
        "causal": FakeBlockMask.causal(S, blk),
        "sliding": FakeBlockMask.sliding_window(S, 100, blk),
        "document": FakeBlockMask.document(C.document_ids(S, 4, seed=2), blk),
    }


@pytest.mark.parametrize("name", ["from_dense", "causal", "sliding", "document"])
@pytest.mark.parametrize("op_causal", [False, True])
def test_pairs_and_decoder_match_element_mask(name, op_causal):
    bm = _masks()[name]
    B, Hq = 2, 4
    assert C.allowed_pairs(bm, B, Hq, op_causal) == _brute_pairs(bm, B, Hq, op_causal)
    el = bm.element_mask()
    if op_causal:
        el = el & torch.ones(el.shape[-2:], dtype=torch.bool).tril()
    NQ = C._geometry(bm)[4]
    for b in range(el.shape[0]):
        got, pos = C.element_mask_rows(bm, b, range(el.shape[1]), range(NQ), op_causal)
        assert torch.equal(pos, torch.arange(el.shape[-2]))
        assert torch.equal(got, el[b])
    got, pos = C.element_mask_rows(bm, 0, [el.shape[1] - 1], [NQ - 1, 1], op_causal)
    assert torch.equal(got[0], el[0, -1][pos])


def test_pairs_and_decoder_match_the_real_block_mask():
    """The same checks against sparse_triton's BlockMask itself (its builders make bitmask tiles too)."""
    bm_mod = pytest.importorskip("sparse_triton.formats.block_mask")
    BM, S = bm_mod.BlockMask, 300
    masks = [BM.sliding_window(S, 100, 64), BM.document(C.document_ids(S, 4, seed=2), 64, causal=True),
             BM.from_dense(C.random_block_mask(2, 5, 5, 0.5, causal=True, seed=0), 64, seq_lens=(S, S)),
             BM.topk(torch.rand(2, 4, 1, 16), 3, block_size=64, seq_lens=(4, 1000))]
    for bm in masks:
        for op_causal in (False, True):
            assert C.allowed_pairs(bm, 2, 4, op_causal) == _brute_pairs(bm, 2, 4, op_causal)
            el = bm.element_mask()
            if op_causal:
                el = el & torch.ones(el.shape[-2:], dtype=torch.bool).tril()
            got, _ = C.element_mask_rows(bm, el.shape[0] - 1, range(el.shape[1]), range(C._geometry(bm)[4]),
                                         op_causal)
            assert torch.equal(got, el[-1])


def test_flops_convention_and_dense_pairs():
    bm = FakeBlockMask.from_dense(torch.tensor([[[[1, 0], [1, 1]]]], dtype=torch.bool), 4)  # 3 of 4 blocks
    pairs = C.allowed_pairs(bm, B=2, Hq=3)
    assert pairs == 3 * 16 * 2 * 3
    assert C.flops_for(pairs, 64, "fwd") == 4 * 64 * pairs
    assert C.flops_for(pairs, 64, "bwd") == 2.5 * 4 * 64 * pairs
    assert C.flops_for(pairs, 64, "fwdbwd") == 3.5 * 4 * 64 * pairs
    assert C.dense_pairs(1, 1, 8, 8, False) == 64 and C.dense_pairs(1, 1, 8, 8, True) == 36
    assert C.dense_pairs(2, 3, 5, 3, True) == 6 * (1 + 2 + 3 + 3 + 3)
    assert C.dense_pairs(1, 1, 4096, 4096, True) == _brute_pairs(FakeBlockMask.causal(4096, 128), 1, 1, False)
    listed, ref = C.block_counts(bm, 2, 3, causal=False)
    assert (listed, ref) == (3 * 6, 4 * 6)
    assert C.block_counts(FakeBlockMask.causal(512, 128), 1, 1, causal=True) == (10, 10)


def test_pct_of_ideal():
    assert C.ideal_speedup(90) == pytest.approx(10.0)
    assert C.pct_of_ideal(10.0, 1.25, 90.0) == pytest.approx(80.0)  # 8x of an ideal 10x
    assert C.pct_of_ideal(4.0, 1.0, 75.0) == pytest.approx(100.0)
    assert C.pct_of_ideal(None, 1.0, 50.0) is None and C.pct_of_ideal(1.0, None, 50.0) is None


def test_decode_bytes_counts_each_kv_block_once():
    # 2 kv heads, 2 query heads each; heads 0,1 pick blocks {0, 2}, heads 2,3 pick {1}; Skv = 200, BK = 64
    blk = torch.zeros(1, 4, 1, 4, dtype=torch.bool)
    blk[0, 0, 0, [0, 2]] = blk[0, 1, 0, [0, 2]] = True
    blk[0, 2:, 0, 1] = True
    bm = FakeBlockMask.from_dense(blk, 64, seq_lens=(1, 200))
    D, elt = 16, 2
    assert C.decode_bytes(bm, B=1, Hq=4, Hkv=2, D=D, Sq=1, elt=elt) == (64 + 64 + 64) * D * 2 * elt + 2 * 4 * D * elt
    blk[0, :, 0, 3] = True  # the ragged tail block holds 8 keys
    bm = FakeBlockMask.from_dense(blk, 64, seq_lens=(1, 200))
    assert C.decode_bytes(bm, 1, 4, 2, D, 1, elt) == (3 * 64 + 2 * 8) * D * 2 * elt + 2 * 4 * D * elt


def test_unpack_bits_high_bit():
    bits = torch.zeros(2, 40, dtype=torch.bool)
    bits[0, 31] = bits[1, 0] = bits[1, 39] = True
    assert torch.equal(C.unpack_bits(_pack(bits), 40), bits)


# ------------------------------------------------------------------------------------------ cases and CLI


def test_quick_cases_respect_the_shapes():
    s = C.settings_from_args(C.build_parser().parse_args(["--quick"]))
    cases = s.cases()
    pre = [c for c in cases if c.kind == "prefill"]
    assert {(c.B, c.S, c.D, c.dtype, c.Hq, c.Hkv) for c in pre} == {(1, 32768, 128, "bf16", 32, 8),
                                                                      (1, 8192, 128, "bf16", 32, 8)}
    assert {c.sparsity for c in pre if c.mask == "random"} == {50, 75, 90, 95}
    assert {c.mask for c in pre} == {"dense", "causal", "random", "sliding_window", "document"}
    assert cases[0].label == "B1 S32k D128 bf16 non-causal dense" and cases[1].sparsity == 90
    seen: set = set()
    for c in pre:  # every group starts with its dense reference
        assert c.group in seen or c.reference
        seen.add(c.group)
    dec = [c for c in cases if c.kind == "decode"]
    assert {(c.S, c.Sq, c.B, c.BK) for c in dec} == {(S, q, 1, 64) for S in (32768, 65536) for q in (1, 4)}
    assert [c.S for c in cases if c.kind == "mask_build"] == [32768]
    assert cases.index(next(c for c in cases if c.kind == "mask_build")) < cases.index(
        next(c for c in pre if c.S == 8192))


def test_full_cases_cover_targets():
    s = C.settings_from_args(C.build_parser().parse_args([]))
    pre = [c for c in s.cases() if c.kind == "prefill"]
    assert {c.S for c in pre} == {4096, 8192, 16384, 32768, 65536}
    assert {c.D for c in pre} == {64, 128} and {c.dtype for c in pre} == {"bf16", "fp16"}
    assert all(1 <= c.B <= 8 and c.Hq == 32 and c.Hkv == 8 for c in pre)
    assert all(C.estimate_gb(c) < 70 for c in s.cases())
    assert s.flex == "all"


def test_cli_parsing():
    a = C.build_parser().parse_args(["--shapes", "2x16k", "8x4096", "--sparsity", "90", "--parts", "prefill",
                                     "--causal", "no", "--masks", "random", "--directions", "bwd", "--dtype", "bf16",
                                     "--head-dims", "128"])
    s = C.settings_from_args(a)
    assert s.shapes == ((2, 16384), (8, 4096)) and s.directions == ("bwd",)
    labels = [c.label for c in s.cases()]
    assert labels[:4] == ["B2 S16k D128 bf16 non-causal dense", "B2 S16k D128 bf16 non-causal random 90%",
                          "B8 S4k D128 bf16 non-causal dense", "B8 S4k D128 bf16 non-causal random 90%"]
    assert len(labels) == 4 and all(c.kind == "prefill" for c in s.cases())
    with pytest.raises(SystemExit):
        C.build_parser().parse_args(["--shapes", "32k"])
    assert C.estimate_gb(C.Prefill(8, 65536, 128, "bf16", False, "dense", 0)) > 40


def test_dry_run_lists_cases_without_gpu(capsys):
    assert A.main(["--quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "29 cases" in out and "B1 S32k D128 bf16 non-causal random 90%" in out and "decode B1 S64k Sq4" in out


def test_hbm_peak_table():
    assert C.hbm_peak_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert C.hbm_peak_gbps("NVIDIA H100 PCIe") == 2000.0
    assert C.hbm_peak_gbps("NVIDIA GH200 480GB") == 4000.0
    assert C.hbm_peak_gbps("NVIDIA H200") == 4800.0 and C.hbm_peak_gbps(None) is None


# ------------------------------------------------------------------------------------------ the runner on CPU


def _runner(monkeypatch, **kw):
    calls = []

    def fake_time(self, fn, cuda_graph=False):
        (fn if callable(fn) else fn[0])()
        calls.append(cuda_graph)
        return Timing(median_ms=1.0, p20_ms=0.9, p80_ms=1.1, mode="cudagraph" if cuda_graph else "events",
                      samples=5)

    monkeypatch.setattr(A.Runner, "_time", fake_time)
    args = C.build_parser().parse_args(["--quick", "--flex", "none", "--sdpa-backends", "flash", "cudnn"])
    s = C.settings_from_args(args)
    return A.Runner(FAKE_API, s, hbm_peak=3350.0, device=torch.device("cpu"), **kw), calls


def test_runner_prefill_group_on_cpu(monkeypatch):
    r, calls = _runner(monkeypatch)
    rows = []
    for mask, sp in (("dense", 0), ("random", 75), ("document", None)):
        rows += r.run_prefill(C.Prefill(1, 512, 32, "bf16", False, mask, sp, Hq=4, Hkv=2))
    assert r.failures == []
    ours = [x for x in rows if x["impl"] == "sparse_triton"]
    assert [x["status"] for x in ours] == ["ok"] * 9 and all(x["rel_err"] < 1e-2 for x in ours)
    assert all(x["config"] == "fake-config" for x in ours)
    dense_fwd = next(x for x in ours if x["mask"] == "dense" and x["direction"] == "fwd")
    assert dense_fwd["speedup_vs_own_dense"] == 1.0 and dense_fwd["block_sparsity"] == 0.0
    sparse = next(x for x in ours if x["mask"] == "random" and x["direction"] == "bwd")
    assert sparse["block_sparsity"] == pytest.approx(75.0) and sparse["own_dense_ms"] == 1.0
    assert sparse["pct_ideal"] == pytest.approx(25.0) and sparse["flops"] == 2.5 * 4 * 32 * sparse["pairs"]
    assert sparse["bwd_rel_err"] < 2e-2
    sdpa = {(x["impl"], x["direction"]): x for x in rows if x["impl"].startswith("sdpa")}
    assert sdpa[("sdpa_flash", "fwd")]["status"] == "ok" and sdpa[("sdpa_flash", "fwd")]["rel_err"] < 1e-2
    assert sdpa[("sdpa_cudnn", "fwd")]["status"] == "unavailable" and sdpa[("sdpa_cudnn", "fwd")]["note"]
    assert sparse["speedup_vs_sdpa"] == 1.0 and sparse["sdpa_best"] == "flash"
    json.dumps(rows)


def test_runner_causal_group_decode_and_build_on_cpu(monkeypatch):
    r, calls = _runner(monkeypatch)
    rows = []
    for mask, sp in (("causal", 0), ("random", 50), ("sliding_window", None)):
        rows += r.run_prefill(C.Prefill(1, 512, 32, "fp16", True, mask, sp, Hq=4, Hkv=2))
    assert r.failures == [] and all(x["status"] == "ok" for x in rows if x["impl"] == "sparse_triton")
    rows = r.run_decode(C.Decode(2, 1024, 4, 32, "bf16", 64, Hq=4, Hkv=2))
    ours = rows[0]
    assert r.failures == [] and ours["status"] == "ok" and ours["mask_builder"] == "from_dense(topk)"
    assert ours["kept_blocks"] == 2 and ours["bytes"] == 2 * 2 * 2 * 64 * 32 * 2 * 2 + 2 * 2 * 4 * 4 * 32 * 2
    assert ours["pct_hbm"] == pytest.approx(100 * ours["gbps"] / 3350.0) and calls[-1] is True
    build = r.run_build(C.MaskBuild(1024, Hq=4))
    assert build[0]["status"] == "ok" and build[0]["ms"] == 1.0
    rows_all = build + [{"kind": "prefill", "impl": "sparse_triton", "status": "ok", "direction": "fwd",
                         "mask": "random", "sparsity": 90, "causal": False, "S": 1024, "ms": 40.0, "case": "x"}]
    C.link_builds(rows_all)
    assert build[0]["pct_of_attention"] == pytest.approx(2.5)
    assert C.summary(rows_all)


def test_runner_marks_a_wrong_op(monkeypatch):
    r, _ = _runner(monkeypatch)
    r.api = A.Api(FakeBlockMask, lambda q, k, v, bm, **kw: fake_attention(q, k, v, bm, **kw) * 1.1, None)
    rows = r.run_prefill(C.Prefill(1, 256, 32, "bf16", False, "random", 50, Hq=4, Hkv=2))
    ours = [x for x in rows if x["impl"] == "sparse_triton"]
    assert {x["status"] for x in ours} == {"wrong"} and all(x["ms"] is None for x in ours)
    assert len(r.failures) == 3


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_add_causal_matches_causal_attention():
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    from torch.nn.attention.flex_attention import flex_attention

    n = 4
    ones = torch.ones(1, 1, n, n, dtype=torch.bool)
    num, idx = _lists(ones)
    empty = torch.zeros_like(num)
    fbm = FlexBlockMask.from_kv_blocks(empty, idx, num, idx, BLOCK_SIZE=(128, 128), seq_lengths=(512, 512))
    causal = C.flex_add_causal(fbm)
    q, k, v = (torch.randn(1, 2, 512, 16) for _ in range(3))
    got = flex_attention(q, k, v, block_mask=causal)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(got, want, atol=1e-5)
    assert causal.full_kv_num_blocks[0, 0].tolist() == [0, 1, 2, 3] and causal.kv_num_blocks[0, 0].tolist() == [1] * 4


# ------------------------------------------------------------------------------------------ plot spec


def test_plot_spec_and_plots(tmp_path):
    spec = C.PLOT.to_json()
    assert spec["curves"][0]["label"] == "ideal 1/(1-s)"
    assert spec["curves"][0]["points"][90] == pytest.approx([90.0, 10.0])
    assert [s["name"] for s in spec["also"]] == ["vs-sdpa", "decode"]
    rows = []
    for d in ("fwd", "bwd", "fwdbwd"):
        for sp, x in ((0.0, 1.0), (50.0, 1.9), (90.0, 8.0)):
            rows.append({"kind": "prefill", "impl": "sparse_triton", "status": "ok", "direction": d,
                         "shape": "B1 S32k D128 bf16", "family": "random", "attn": "non-causal",
                         "block_sparsity": sp, "speedup_vs_own_dense": x, "speedup_vs_sdpa": x * 0.9})
        rows.append({**rows[-1], "impl": "flex"})
    rows += [{"kind": "decode", "impl": "sparse_triton", "status": "ok", "direction": "fwd", "S": S,
              "shape": "B1 D128 bf16", "queries": "Sq=1", "kv_block": "BK=64", "speedup_vs_sdpa": 8.5}
             for S in (32768, 65536)]
    doc = {"suite": "attention", "env": {}, "plot": spec, "complete": True, "rows": rows}
    panels = perf_plot.select_series(rows, spec)
    assert set(panels) == {("fwd", "B1 S32k D128 bf16"), ("bwd", "B1 S32k D128 bf16")}
    assert panels[("fwd", "B1 S32k D128 bf16")][("random", "non-causal")] == [(0.0, 1.0), (50.0, 1.9), (90.0, 8.0)]
    assert set(perf_plot.select_series(rows, spec["also"][1])) == {("B1 D128 bf16",)}
    pytest.importorskip("matplotlib")
    path = tmp_path / "gpu" / "attention.json"
    path.parent.mkdir()
    path.write_text(json.dumps(doc))
    pngs = perf_plot.plot_file_all(path)
    assert [p.name for p in pngs] == ["attention.png", "attention-vs-sdpa.png", "attention-decode.png"]
    assert all(p.stat().st_size > 0 for p in pngs)
