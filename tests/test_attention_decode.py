"""kernels/attention_decode.py (split-kv decode) vs the fp64 reference: GQA/MQA packing, per-head masks,
ragged kv, full / partial / bitmask blocks, causal, empty rows, split counts, strided inputs, errors."""

import math

import pytest
import torch
from kit import assert_close_avg, assert_close_lse

from sparse_triton.formats.block_mask import BlockMask, pack_bits
from sparse_triton.kernels import attention_decode as kernel
from sparse_triton.reference import attention as reference

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors: an output or workspace row the kernels forget to
    write shows up as NaN."""
    empty = torch.empty

    def filled(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", filled)


def qkv(B, Hq, Hkv, Sq, Skv, D, dtype, device):
    q = torch.randn(B, Hq, Sq, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Skv, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Skv, D, dtype=dtype, device=device)
    return q, k, v


def bits_mask(B, H, Sq, Skv, BK, device, causal=False, density=0.6, empty_row=None):
    """Random tiles, each full, partial without bitmask, or partial with a random bitmask (slots shared);
    ``empty_row``: that query has no allowed key in any bitmask (and the mask has no full tiles)."""
    BQ, NKV = 16, -(-Skv // BK)
    g = torch.Generator().manual_seed(1)
    kind = torch.randint(0, 4, (B, H, NKV), generator=g)  # 0 none, 1 full, 2 partial, 3 partial + bits
    if empty_row is not None:
        kind = torch.where(kind == 0, 0, 3)
    kind[..., -1] = torch.where(kind[..., -1] == 1, 2, kind[..., -1])  # the kv tail is never full
    P = 3
    allowed = torch.rand(P, BQ, BK, generator=g) < density
    if empty_row is not None:
        allowed[:, empty_row] = False
    bits = pack_bits(allowed)
    pos = torch.arange(NKV)

    def lists(sel):
        cnt = sel.sum(-1, dtype=torch.int32)
        idx = torch.sort(torch.where(sel, pos, NKV + pos), -1).values.clamp(max=NKV - 1).to(torch.int32)
        return cnt[..., None], idx[..., None, :]

    cnt, idx = lists(kind >= 2)
    fcnt, fidx = lists(kind == 1)
    kind_at = torch.gather(kind, -1, idx[..., 0, :].long())
    slot = torch.where(kind_at == 3, torch.randint(0, P, idx.shape[:2] + (NKV,), generator=g), -1)
    slot = slot[..., None, :].to(torch.int32)
    m = BlockMask(cnt, idx, fcnt, fidx, block_size=(BQ, BK), seq_lens=(Sq, Skv), causal=causal,
                  partial_bits=bits, kv_bits_slot=slot)
    return m.to(device)


def make_mask(name, B, H, Sq, Skv, BK, device):
    NKV = -(-Skv // BK)
    g = torch.Generator().manual_seed(2)
    if name == "random":
        return BlockMask.from_dense(torch.rand(B, H, 1, NKV, generator=g) < 0.5, (16, BK), (Sq, Skv)).to(device)
    if name == "all":
        return BlockMask.from_dense(torch.ones(1, 1, 1, NKV, dtype=torch.bool), (16, BK), (Sq, Skv)).to(device)
    if name == "causal":
        return BlockMask.causal((Sq, Skv), (16, BK), device=device)
    if name == "bits":
        return bits_mask(B, H, Sq, Skv, BK, device)
    if name == "bits-causal":
        return bits_mask(B, H, Sq, Skv, BK, device, causal=True)
    raise KeyError(name)


def check(q, k, v, m, causal=False, scale=None, config=None):
    o, lse = kernel.attention_decode(q, k, v, m, scale, causal, config)
    ro, rlse = reference.attention_decode(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                          None if m is None else m.to("cpu"), scale, causal)
    assert o.dtype == q.dtype and o.shape == q.shape and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert not o.isnan().any() and not lse.isnan().any()
    assert_close_avg(o, ro, q.dtype)
    assert_close_lse(lse, rlse, q.dtype)  # -inf exactly where a row has no key
    return o, lse


# (Hq, Hkv, Sq, Skv, D, BK): GQA packing (4 or 2 heads x Sq rows), MHA, MQA, ragged kv, 16..64 rows.
SHAPES = [
    pytest.param(4, 1, 1, 200, 64, 64, id="gqa4:1-q1-kv200-bk64"),
    pytest.param(4, 2, 4, 100, 32, 16, id="gqa4:2-q4-kv100-bk16"),
    pytest.param(4, 1, 16, 100, 32, 32, id="mqa4:1-q16-kv100-bk32"),
    pytest.param(2, 2, 16, 130, 64, 128, id="mha2-q16-kv130-bk128"),
    pytest.param(2, 1, 4, 200, 64, 64, id="mqa2:1-q4-kv200-bk64"),
]
MASKS = ["random", "all", "causal", "bits", "bits-causal"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("Hq,Hkv,Sq,Skv,D,BK", SHAPES)
def test_matches_reference(Hq, Hkv, Sq, Skv, D, BK, name, dtype, device, nan_empty):
    q, k, v = qkv(1, Hq, Hkv, Sq, Skv, D, dtype, device)
    check(q, k, v, make_mask(name, 1, 1, Sq, Skv, BK, device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,mb,mh", [("random", 2, 2), ("bits", 2, 2), ("bits", 1, 1)],
                         ids=["random-BxH", "bits-BxH", "bits-broadcast"])
def test_batch_and_per_head_masks(name, mb, mh, dtype, device, nan_empty):
    """B == 2 with a mask per batch and per query head (H == Hq: one query head per program, GQA 2:1),
    and with a mask broadcast over both (stride-0 lists)."""
    B, Hq, Hkv, Sq, Skv, D, BK = 2, 2, 1, 3, 150, 32, 32
    q, k, v = qkv(B, Hq, Hkv, Sq, Skv, D, dtype, device)
    m = make_mask(name, mb, mh, Sq, Skv, BK, device)
    assert m.shape[:2] == (mb, mh)
    check(q, k, v, m)


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_without_blocks(dtype, device, nan_empty):
    """Head 1 selects no kv block: o == 0 and lse == -inf there, the other head is unaffected."""
    Hq, Sq, Skv, D, BK = 2, 4, 100, 32, 16
    NKV = -(-Skv // BK)
    sel = torch.zeros(1, Hq, 1, NKV, dtype=torch.bool)
    sel[0, 0, 0, ::2] = True
    m = BlockMask.from_dense(sel, (16, BK), (Sq, Skv)).to(device)
    q, k, v = qkv(1, Hq, 1, Sq, Skv, D, dtype, device)
    o, lse = check(q, k, v, m)
    assert torch.equal(o[:, 1], torch.zeros_like(o[:, 1]))
    assert torch.equal(lse[:, 1], torch.full_like(lse[:, 1], float("-inf")))


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_mask_and_empty_bit_row(dtype, device, nan_empty):
    """No kv block at all; and a bitmask row with no key set (query 2 alone is empty)."""
    Hq, Sq, Skv, D, BK = 4, 4, 64, 32, 32
    q, k, v = qkv(1, Hq, 2, Sq, Skv, D, dtype, device)
    m = BlockMask.from_dense(torch.zeros(1, 1, 1, 2, dtype=torch.bool), (16, BK), (Sq, Skv)).to(device)
    o, lse = check(q, k, v, m)
    assert not o.any() and bool((lse == float("-inf")).all())
    m = bits_mask(1, 1, Sq, Skv, BK, device, empty_row=2)
    o, lse = check(q, k, v, m)
    assert not o[:, :, 2].any() and bool((lse[:, :, 2] == float("-inf")).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_blocks_on_the_tail_and_diagonal(dtype, device, nan_empty):
    """Full lists holding the kv-tail block and (op causal on a non-causal mask) diagonal blocks: the
    kernel's scalar test must mask them."""
    Hq, Sq, Skv, D, BK = 2, 8, 100, 32, 32
    NKV = -(-Skv // BK)
    full = torch.arange(NKV, dtype=torch.int32).view(1, 1, 1, NKV)
    m = BlockMask(torch.zeros(1, 1, 1, dtype=torch.int32), torch.zeros_like(full), torch.full((1, 1, 1), NKV),
                  full, block_size=(16, BK), seq_lens=(Sq, Skv)).to(device)
    q, k, v = qkv(1, Hq, 1, Sq, Skv, D, dtype, device)
    check(q, k, v, m)
    check(q, k, v, m, causal=True)


@pytest.mark.parametrize("splits", [1, 2, 3, 6])
def test_split_counts_agree(splits, device, nan_empty):
    """Any number of splits gives the reference's result (fp32 tolerance). The mask selects fewer tiles
    than the upper bound the split count is capped by, so with 6 splits some have no work (lse = -inf)."""
    Hq, Sq, Skv, D, BK = 4, 2, 180, 32, 16
    q, k, v = qkv(1, Hq, 1, Sq, Skv, D, torch.float32, device)
    check(q, k, v, make_mask("bits", 1, 1, Sq, Skv, BK, device), config=kernel.DecodeConfig(BLOCK_N=32,
                                                                                           num_splits=splits))


@pytest.mark.parametrize("D,causal", [(96, False), (32, True)], ids=["D96-dense", "D32-causal"])
def test_strided_inputs_scale_and_dense(D, causal, device, nan_empty):
    """k/v as [B, S, H, D] views, q as a transposed view, a misaligned base (copied), an explicit scale;
    ``block_mask=None`` (every key; op causal) and D = 96 (a 128 tile with a D mask)."""
    B, Hq, Hkv, Sq, Skv = 1, 4, 2, 3, 70
    q = torch.randn(B, Sq, Hq, D, device=device).transpose(1, 2)
    k = torch.randn(B, Skv, Hkv, D, device=device).transpose(1, 2)
    v = torch.randn(B * Skv * Hkv * D + 1, device=device)[1:].view(B, Skv, Hkv, D).transpose(1, 2)
    check(q, k, v, None, causal=causal, scale=0.3)


def test_pick_splits():
    cfg = kernel.DecodeConfig()
    assert kernel.pick_splits(programs=8, max_tiles=512, cfg=cfg, sms=132) == 33  # 8 x 33 >= 2 per SM
    assert kernel.pick_splits(programs=8, max_tiles=6, cfg=cfg, sms=132) == 3  # >= 2 tiles per split
    assert kernel.pick_splits(programs=1, max_tiles=10**6, cfg=cfg, sms=132) == cfg.max_splits
    assert kernel.pick_splits(programs=1024, max_tiles=512, cfg=cfg, sms=132) == 1
    assert kernel.pick_splits(programs=1, max_tiles=0, cfg=cfg) == 1
    assert kernel.pick_splits(programs=1, max_tiles=4, cfg=kernel.DecodeConfig(num_splits=16)) == 4


def test_supported_and_errors(device):
    q, k, v = qkv(1, 2, 1, 4, 64, 32, torch.float32, device)
    m = BlockMask.causal((4, 64), (16, 32), device=device)
    assert kernel.supported(q, k, m) is None and kernel.supported(q, k, None) is None
    assert kernel.DECODE_MAX_Q == 16

    def bad(match, q=q, k=k, v=v, m=m):
        with pytest.raises(ValueError, match=match):
            kernel.attention_decode(q, k, v, m, None)

    q17 = torch.randn(1, 2, 17, 32, device=device)
    bad(r"Sq=17 .*DECODE_MAX_Q=16", q=q17, m=BlockMask.causal((17, 64), (32, 32), device=device))
    bad("BK=8 is not one of", m=BlockMask.causal((4, 64), (16, 8), device=device))
    bad("BK=256 is not one of", m=BlockMask.causal((4, 256), (16, 256), device=device),
        k=torch.randn(1, 1, 256, 32, device=device), v=torch.randn(1, 1, 256, 32, device=device))
    q48, k48 = torch.randn(1, 2, 4, 48, device=device), torch.randn(1, 1, 64, 48, device=device)
    bad("head dim D=48", q=q48, k=k48, v=k48)
    bad(r"k.dtype=torch.float16 differs from q.dtype=torch.float32", k=k.half(), v=v.half())
    bad("v .* must match k", v=v.half())
    bad("k is on meta", k=k.to("meta"), v=v.to("meta"))
    bad("NQ=2 query blocks", m=BlockMask.causal((4, 64), (2, 32), device=device))
    bad(r"seq_lens=\(4, 96\)", m=BlockMask.causal((4, 96), (16, 32), device=device))
    bad("block_mask is for B=1, H=3", m=BlockMask.from_dense(torch.ones(1, 3, 1, 2, dtype=torch.bool), (16, 32),
                                                             (4, 64)).to(device))
    bad("q must be a 4-D tensor", q=q[0])
    bad("Hq % Hkv", k=torch.randn(1, 3, 64, 32, device=device), v=torch.randn(1, 3, 64, 32, device=device))
    bad("lacks kv_num_blocks", m=object())
    # The op layer asks supported() first: the same reasons, no raise.
    assert "DECODE_MAX_Q" in kernel.supported(q17, k, BlockMask.causal((17, 64), (32, 32), device=device))
    assert "BK=8" in kernel.supported(q, k, BlockMask.causal((4, 64), (16, 8), device=device))
    assert "head dim" in kernel.supported(q48, k48, None)
    assert "NQ=2" in kernel.supported(q, k, BlockMask.causal((4, 64), (2, 32), device=device))
    with pytest.raises(ValueError, match="BLOCK_N=8"):
        kernel.attention_decode(q, k, v, m, None, config=kernel.DecodeConfig(BLOCK_N=8))


def test_empty_sizes(device):
    q, k, v = qkv(1, 2, 1, 0, 64, 32, torch.float32, device)
    o, lse = kernel.attention_decode(q, k, v, None, None)
    assert o.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)
    q, k, v = qkv(1, 2, 1, 3, 0, 32, torch.float32, device)
    o, lse = kernel.attention_decode(q, k, v, None, None)
    assert not o.any() and bool((lse == float("-inf")).all())


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
def test_bf16_gpu(D, device):
    """bf16 (computed wrongly by the interpreter): GPU tier only."""
    q, k, v = qkv(2, 8, 2, 1, 1000, D, torch.bfloat16, device)
    NKV = -(-1000 // 64)
    sel = torch.rand(2, 1, 1, NKV) < 0.5
    check(q, k, v, BlockMask.from_dense(sel, (16, 64), (1, 1000)).to(device), scale=1 / math.sqrt(D))
