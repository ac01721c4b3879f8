"""formats/block_mask.py: every builder vs its element-level definition, the layout invariants, no host
sync in the hot-path builders, validation errors, FlexAttention conversion, repr / sparsity / plot."""

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparse_triton.formats.block_mask as bm_mod
from sparse_triton.formats.block_mask import BlockMask, pack_bits, unpack_bits
from sparse_triton.reference.attention import attention_fwd

# (Sq, Skv, block_size): ragged, Sq != Skv, BQ != BK, exact multiples, a single block
SHAPES = [(200, 200, 64), (200, 150, 64), (100, 300, (32, 64)), (128, 128, 64), (16, 40, (16, 32)), (1, 1, 16)]
SIDS = [f"{a}x{b}-{c if isinstance(c, int) else 'x'.join(map(str, c))}" for a, b, c in SHAPES]


def grid(Sq, Skv):
    return torch.arange(Sq)[:, None], torch.arange(Skv)[None, :]


def bsz(block_size):
    return block_size if isinstance(block_size, tuple) else (block_size, block_size)


def upsample(tiles, Sq, Skv, BQ, BK):
    """Tile bool [..., NQ, NKV] -> element bool [..., Sq, Skv]."""
    return tiles.repeat_interleave(BQ, -2).repeat_interleave(BK, -1)[..., :Sq, :Skv]


def kind_of(cnt, idx):
    """Dense bool [B, H, N, M] of the first cnt entries of each index row, plain python loops."""
    out = torch.zeros(*idx.shape, dtype=torch.bool)
    for pos in torch.cartesian_prod(*[torch.arange(n) for n in cnt.shape]).reshape(-1, cnt.dim()).tolist():
        n = int(cnt[tuple(pos)])
        row = idx[tuple(pos)][:n].tolist()
        assert row == sorted(set(row)), f"not strictly ascending: {row}"
        assert all(0 <= j < idx.shape[-1] for j in row)
        for j in row:
            out[tuple(pos) + (j,)] = True
    return out


def check_layout(m: BlockMask):
    """The invariants of the spec's layout table, checked the slow and obvious way."""
    B, H, NQ, NKV = m.shape
    (BQ, BK), (Sq, Skv) = m.block_size, m.seq_lens
    assert (NQ, NKV) == (-(-Sq // BQ), -(-Skv // BK))
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices"):
        t = getattr(m, name)
        assert t.dtype == torch.int32 and t.is_contiguous() and t.device == m.device, name
    assert m.q_indices.shape == m.full_q_indices.shape == (B, H, NKV, NQ)
    part, full = kind_of(m.kv_num_blocks, m.kv_indices), kind_of(m.full_kv_num_blocks, m.full_kv_indices)
    assert not (part & full).any()
    assert torch.equal(kind_of(m.q_num_blocks, m.q_indices), part.transpose(-1, -2))
    assert torch.equal(kind_of(m.full_q_num_blocks, m.full_q_indices), full.transpose(-1, -2))
    assert torch.equal(m.to_dense(), part | full)
    # padding stays in range (a kernel that over-reads gets a real block)
    for t, n in ((m.kv_indices, NKV), (m.full_kv_indices, NKV), (m.q_indices, NQ), (m.full_q_indices, NQ)):
        assert t.numel() == 0 or (int(t.min()) >= 0 and int(t.max()) < n)
    assert (m.partial_bits is None) == (m.kv_bits_slot is None) == (m.q_bits_slot is None)
    if m.partial_bits is not None:
        P = m.partial_bits.shape[0]
        assert m.partial_bits.shape == (P, BQ, -(-BK // 32)) and m.partial_bits.dtype == torch.int32
        slot = torch.full((B, H, NQ, NKV), -1, dtype=torch.int32)
        slot_t = torch.full((B, H, NKV, NQ), -1, dtype=torch.int32)
        for b in range(B):
            for h in range(H):
                for i in range(NQ):
                    for e in range(int(m.kv_num_blocks[b, h, i])):
                        slot[b, h, i, m.kv_indices[b, h, i, e]] = m.kv_bits_slot[b, h, i, e]
                for j in range(NKV):
                    for e in range(int(m.q_num_blocks[b, h, j])):
                        slot_t[b, h, j, m.q_indices[b, h, j, e]] = m.q_bits_slot[b, h, j, e]
        assert torch.equal(slot, slot_t.transpose(-1, -2))
        assert int(slot.min()) >= -1 and int(slot.max()) < P
    # full tiles never straddle the kv tail or (causal) the diagonal
    q0 = torch.arange(NQ)[:, None] * BQ
    k1 = torch.arange(NKV)[None, :] * BK + BK - 1
    bad = (k1 >= Skv) | ((k1 > q0) if m.causal else torch.zeros((), dtype=torch.bool))
    assert not (full & bad).any()


def rebuilt(m: BlockMask) -> BlockMask:
    """The public constructor on m's row lists, validated."""
    return BlockMask(m.kv_num_blocks, m.kv_indices, m.full_kv_num_blocks, m.full_kv_indices, block_size=m.block_size,
                     seq_lens=m.seq_lens, causal=m.causal, partial_bits=m.partial_bits, kv_bits_slot=m.kv_bits_slot)


def check(m: BlockMask, expected: torch.Tensor):
    check_layout(m)
    B, H = m.shape[:2]
    assert m.element_mask().shape == (B, H, *m.seq_lens)
    assert torch.equal(m.element_mask(), expected.expand(B, H, *m.seq_lens))
    r = rebuilt(m)
    assert torch.equal(r.element_mask(), m.element_mask())
    for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices", "q_bits_slot"):
        a, b = getattr(r, name), getattr(m, name)
        assert (a is None and b is None) or torch.equal(a, b), name


# ------------------------------------------------------------------------------------------ builders


@pytest.mark.parametrize("Sq,Skv,bs", SHAPES, ids=SIDS)
def test_from_dense(Sq, Skv, bs):
    BQ, BK = bsz(bs)
    NQ, NKV = -(-Sq // BQ), -(-Skv // BK)
    mask = torch.rand(2, 3, NQ, NKV) > 0.5
    mask[0, 0] = False
    mask[1, 2] = True
    m = BlockMask.from_dense(mask, bs, seq_lens=(Sq, Skv))
    check(m, upsample(mask, Sq, Skv, BQ, BK))
    assert m.partial_bits is None and not m.causal
    # only the kv-tail column is partial
    tail = Skv % BK != 0
    assert torch.equal(kind_of(m.kv_num_blocks, m.kv_indices)[..., :-1], torch.zeros_like(mask[..., :-1]))
    assert torch.equal(kind_of(m.kv_num_blocks, m.kv_indices)[..., -1], mask[..., -1] & tail)


def test_from_dense_2d_and_defaults():
    mask = torch.tensor([[True, False, True], [False, False, False]])
    m = BlockMask.from_dense(mask, block_size=(16, 32))
    assert m.shape == (1, 1, 2, 3) and m.seq_lens == (32, 96) and m.block_size == (16, 32)
    assert m.full_kv_num_blocks.tolist() == [[[2, 0]]] and m.full_kv_indices[0, 0, 0, :2].tolist() == [0, 2]
    assert m.full_q_num_blocks.tolist() == [[[1, 0, 1]]]
    check(m, upsample(mask, 32, 96, 16, 32)[None, None])


@pytest.mark.parametrize("Sq,Skv,bs", SHAPES, ids=SIDS)
def test_causal(Sq, Skv, bs):
    q, k = grid(Sq, Skv)
    m = BlockMask.causal((Sq, Skv), bs)
    assert m.causal and m.partial_bits is None
    check(m, k <= q)


@pytest.mark.parametrize("Sq,Skv,bs", SHAPES, ids=SIDS)
@pytest.mark.parametrize("window", [1, 50, 64, 300])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_sliding_window(Sq, Skv, bs, window, causal):
    q, k = grid(Sq, Skv)
    m = BlockMask.sliding_window((Sq, Skv), window, bs, causal=causal)
    assert m.causal == causal
    check(m, ((q - window < k) & (k <= q)) if causal else ((q - k).abs() < window))


def test_sliding_window_uses_causal_flag_on_the_diagonal():
    m = BlockMask.sliding_window(256, 64, 64)
    # diagonal tiles need no bitmask (the causal flag says it all); only the sub-diagonal ones carry one
    slots = [[int(m.kv_bits_slot[0, 0, i, e]) for e in range(int(m.kv_num_blocks[0, 0, i]))] for i in range(4)]
    assert slots[0] == [-1] and all(s[-1] == -1 and s[0] >= 0 for s in slots[1:])
    assert m.partial_bits.shape[0] == 1  # the three sub-diagonal tiles share one deduplicated bitmask


def lg_tiles(NQ, NKV, BQ, BK, local, glob):
    out = torch.zeros(NQ, NKV, dtype=torch.bool)
    for i in range(NQ):
        for j in range(NKV):
            out[i, j] = abs(j - i * BQ // BK) <= local or j < glob or i < glob
    return out


@pytest.mark.parametrize("Sq,Skv,bs", SHAPES, ids=SIDS)
@pytest.mark.parametrize("local,glob", [(0, 0), (1, 1), (0, 2)])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_local_global(Sq, Skv, bs, local, glob, causal):
    BQ, BK = bsz(bs)
    tiles = lg_tiles(-(-Sq // BQ), -(-Skv // BK), BQ, BK, local, glob)
    q, k = grid(Sq, Skv)
    m = BlockMask.local_global((Sq, Skv), local, glob, bs, causal=causal)
    check(m, upsample(tiles, Sq, Skv, BQ, BK) & ((k <= q) if causal else True))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_local_global_random(causal):
    S, B, local, glob, r = 640, 64, 1, 1, 2
    base = lg_tiles(10, 10, B, B, local, glob)
    if causal:
        base &= torch.ones(10, 10, dtype=torch.bool).tril()
    g = torch.Generator().manual_seed(3)
    m = BlockMask.local_global(S, local, glob, B, causal=causal, random_blocks=r, generator=g)
    check_layout(m)
    tiles = m.to_dense()[0, 0]
    assert (tiles >= base).all()
    cand = (~base) & (torch.ones(10, 10, dtype=torch.bool).tril() if causal else True)
    assert torch.equal((tiles & ~base).sum(1), torch.clamp(cand.sum(1), max=r))
    again = BlockMask.local_global(S, local, glob, B, causal=causal, random_blocks=r,
                                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.to_dense(), m.to_dense())


@pytest.mark.parametrize("S,bs", [(200, 64), (128, 32), (100, (32, 64))], ids=["200-64", "128-32", "100-32x64"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", ["sorted", "unsorted-batched"])
def test_document(S, bs, causal, kind):
    if kind == "sorted":
        ids = torch.sort(torch.randint(0, 5, (S,))).values
    else:
        ids = torch.randint(0, 3, (2, S)).to(torch.int32)
    m = BlockMask.document(ids, bs, causal=causal)
    ids2 = ids.reshape(-1, S)
    q, k = grid(S, S)
    expected = (ids2[:, :, None] == ids2[:, None, :]) & ((k <= q) if causal else True)
    assert m.shape[:2] == (ids2.shape[0], 1)
    check(m, expected[:, None])


def topk_expected(scores, k, BQ, BK, Sq, causal):
    B, H, NQ, NKV = scores.shape
    out = torch.zeros(B, H, NQ, NKV, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(NQ):
                qmax = min((i + 1) * BQ, Sq) - 1
                cand = [(float(scores[b, h, i, j]), j) for j in range(NKV)
                        if scores[b, h, i, j] == scores[b, h, i, j] and scores[b, h, i, j] != float("-inf")
                        and (not causal or j * BK <= qmax)]
                for _, j in sorted(cand, key=lambda t: (-t[0], t[1]))[:k]:
                    out[b, h, i, j] = True
    return out


@pytest.mark.parametrize("Sq,Skv,bs", SHAPES, ids=SIDS)
@pytest.mark.parametrize("k", [0, 1, 2, 100])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_topk(Sq, Skv, bs, k, causal):
    BQ, BK = bsz(bs)
    NQ, NKV = -(-Sq // BQ), -(-Skv // BK)
    scores = torch.randint(0, 3, (2, 1, NQ, NKV)).float()  # many ties
    scores[0, 0, 0, -1] = float("nan")
    scores[1, 0, -1, :2] = float("-inf")
    scores[1, 0, 0, 0] = float("inf")
    m = BlockMask.topk(scores, k, block_size=bs, seq_lens=(Sq, Skv), causal=causal)
    tiles = topk_expected(scores, k, BQ, BK, Sq, causal)
    assert torch.equal(m.to_dense(), tiles)
    q, kk = grid(Sq, Skv)
    check(m, upsample(tiles, Sq, Skv, BQ, BK) & ((kk <= q) if causal else True))


def test_topk_ties_go_to_lower_index():
    m = BlockMask.topk(torch.zeros(1, 1, 1, 6), 3, block_size=16)
    assert m.full_kv_indices[0, 0, 0, :3].tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------ no host sync


class NoHostSync(TorchDispatchMode):
    BANNED = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
              "aten::unique_dim", "aten::unique_consecutive"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.BANNED:
            raise AssertionError(f"host sync: {func._schema.name}")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_mode_catches_syncs():
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        torch.ones(3).sum().item()
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        torch.ones(3).nonzero()


def test_from_dense_and_topk_no_host_sync():
    mask = torch.rand(1, 4, 8, 8) > 0.5
    scores = torch.randn(2, 1, 8, 8)
    with NoHostSync():
        a = BlockMask.from_dense(mask, 32, seq_lens=(250, 230))
        b = BlockMask.topk(scores, 3, block_size=32, causal=True)
        c = BlockMask.causal(250, 32)
        a.expand(1, 4)
    check_layout(a)
    check_layout(b)
    check_layout(c)


# ------------------------------------------------------------------------------------------ validation


def good_lists():
    m = BlockMask.sliding_window(200, 70, 64)
    return dict(kv_num_blocks=m.kv_num_blocks.clone(), kv_indices=m.kv_indices.clone(),
                full_kv_num_blocks=m.full_kv_num_blocks.clone(), full_kv_indices=m.full_kv_indices.clone(),
                block_size=64, seq_lens=(200, 200), causal=True, partial_bits=m.partial_bits.clone(),
                kv_bits_slot=m.kv_bits_slot.clone())


def make(**changes):
    kw = good_lists()
    kw.update(changes)
    args = [kw.pop(n) for n in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")]
    return BlockMask(*args, **kw)


def edit(name, fn):
    t = good_lists()[name]
    fn(t)
    return {name: t}


def test_constructor_accepts_good_and_int64():
    kw = good_lists()
    m = make(kv_num_blocks=kw["kv_num_blocks"].long(), kv_indices=kw["kv_indices"].long())
    assert m.kv_indices.dtype == torch.int32
    ref = BlockMask.sliding_window(200, 70, 64)
    assert torch.equal(m.element_mask(), ref.element_mask())


def test_constructor_broadcasts_full_and_partial():
    cnt, idx = torch.ones(1, 1, 2, dtype=torch.int32), torch.tensor([[[[1, 0], [1, 0]]]], dtype=torch.int32)
    fcnt = torch.tensor([[[1, 0]], [[0, 0]]], dtype=torch.int32)  # B=2, H=1
    fidx = torch.zeros(2, 1, 2, 2, dtype=torch.int32)
    m = BlockMask(cnt, idx, fcnt, fidx, block_size=16)
    assert m.shape == (2, 1, 2, 2)
    assert m.to_dense().int().tolist() == [[[[1, 1], [0, 1]]], [[[0, 1], [0, 1]]]]
    check_layout(m)


BAD = [
    ("count-range", lambda: edit("kv_num_blocks", lambda t: t.__setitem__((0, 0, 0), 5)), ValueError,
     r"kv_num_blocks must be in \[0, NKV=4\]"),
    ("count-negative", lambda: edit("full_kv_num_blocks", lambda t: t.__setitem__((0, 0, 0), -1)), ValueError,
     r"full_kv_num_blocks must be in"),
    ("index-range", lambda: edit("kv_indices", lambda t: t.__setitem__((0, 0, 1, 0), 4)), ValueError,
     r"kv_indices entries must be in \[0, NKV=4\)"),
    ("unsorted", lambda: edit("kv_indices", lambda t: t.__setitem__((0, 0, 1, slice(0, 2)), torch.tensor([1, 0]))),
     ValueError, "strictly ascending"),
    ("duplicate", lambda: edit("kv_indices", lambda t: t.__setitem__((0, 0, 1, slice(0, 2)), torch.tensor([1, 1]))),
     ValueError, "strictly ascending"),
    ("full-and-partial", lambda: {"full_kv_num_blocks": torch.tensor([[[0, 1, 0, 1]]], dtype=torch.int32),
                                  "full_kv_indices": torch.tensor([[[[0] * 4, [1] * 4, [0] * 4, [3] * 4]]])},
     ValueError, "both the full and the partial"),
    ("slot-range", lambda: edit("kv_bits_slot", lambda t: t.__setitem__((0, 0, 1, 0), 7)), ValueError,
     r"kv_bits_slot entries must be in \[-1, P=3\)"),
    ("slot-negative", lambda: edit("kv_bits_slot", lambda t: t.__setitem__((0, 0, 1, 0), -2)), ValueError,
     "kv_bits_slot entries"),
    ("bits-shape", lambda: {"partial_bits": torch.zeros(1, 64, 3, dtype=torch.int32)}, ValueError,
     r"partial_bits must be \[P, BQ=64, ceil\(BK/32\)=2\]"),
    ("bits-alone", lambda: {"kv_bits_slot": None}, ValueError, "partial_bits and kv_bits_slot"),
    ("full-alone", lambda: {"full_kv_indices": None}, ValueError, "full_kv_num_blocks and full_kv_indices"),
    ("float-index", lambda: {"kv_indices": torch.zeros(1, 1, 4, 4)}, TypeError, "kv_indices must be an integer"),
    ("bool-count", lambda: {"kv_num_blocks": torch.zeros(1, 1, 4, dtype=torch.bool)}, TypeError,
     "kv_num_blocks must be an integer"),
    ("not-tensor", lambda: {"kv_num_blocks": [1, 2]}, TypeError, "kv_num_blocks must be a torch.Tensor"),
    ("ndim", lambda: {"kv_indices": torch.zeros(4, 4, dtype=torch.int32)}, ValueError, "kv_indices must be 4-D"),
    ("count-shape", lambda: {"kv_num_blocks": torch.zeros(1, 1, 3, dtype=torch.int32)}, ValueError,
     r"kv_num_blocks.shape=\(1, 1, 3\) must equal"),
    ("full-shape", lambda: {"full_kv_num_blocks": torch.zeros(1, 1, 4, dtype=torch.int32),
                            "full_kv_indices": torch.zeros(1, 1, 4, 5, dtype=torch.int32)}, ValueError,
     "full_kv_indices.shape"),
    ("slot-shape", lambda: {"kv_bits_slot": torch.zeros(1, 1, 4, 3, dtype=torch.int32)}, ValueError,
     "kv_bits_slot.shape"),
    ("block-size-zero", lambda: {"block_size": 0}, ValueError, "block_size must be >= 1"),
    ("block-size-float", lambda: {"block_size": 64.0}, TypeError, "block_size must be an int"),
    ("block-size-triple", lambda: {"block_size": (64, 64, 64)}, ValueError, r"\(BQ, BK\) pair"),
    ("seq-lens", lambda: {"seq_lens": (300, 200)}, ValueError, r"seq_lens=\(300, 200\).*NQ=5"),
    ("seq-lens-negative", lambda: {"seq_lens": (-1, 200)}, ValueError, "seq_lens must be >= 0"),
    ("causal-type", lambda: {"causal": 1}, TypeError, "causal must be a bool"),
]


@pytest.mark.parametrize("changes,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_constructor_rejects(changes, exc, match):
    with pytest.raises(exc, match=match):
        make(**changes())


def test_builders_reject_bad_arguments():
    with pytest.raises(TypeError, match="BlockMask.from_dense: mask must be a bool"):
        BlockMask.from_dense(torch.ones(2, 2))
    with pytest.raises(ValueError, match="BlockMask.from_dense: mask must be 2-D"):
        BlockMask.from_dense(torch.ones(2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"BlockMask.from_dense: seq_lens=\(100, 64\)"):
        BlockMask.from_dense(torch.ones(2, 2, dtype=torch.bool), 32, seq_lens=(100, 64))
    with pytest.raises(ValueError, match="BlockMask.sliding_window: window must be >= 1"):
        BlockMask.sliding_window(64, 0)
    with pytest.raises(TypeError, match="BlockMask.causal: seq_len must be an int"):
        BlockMask.causal(64.0)
    with pytest.raises(TypeError, match="BlockMask.topk: block_scores must be a floating-point"):
        BlockMask.topk(torch.ones(2, 2, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="BlockMask.topk: k must be >= 0"):
        BlockMask.topk(torch.ones(2, 2), -1)
    with pytest.raises(TypeError, match="BlockMask.document: document_ids must be an integer"):
        BlockMask.document(torch.ones(8))
    with pytest.raises(ValueError, match="BlockMask.local_global: local_blocks must be >= 0"):
        BlockMask.local_global(64, -1, 0, 16)
    with pytest.raises(TypeError, match="BlockMask.from_flex: flex_block_mask must be"):
        BlockMask.from_flex(BlockMask.causal(64, 16))


# ------------------------------------------------------------------------------------------ flex


def _flex():
    return pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no FlexAttention")


@pytest.mark.parametrize("name", ["causal-ragged", "sliding", "document", "dense-tail", "topk-causal-B2"])
def test_flex_round_trip(name):
    _flex()
    ids = torch.sort(torch.randint(0, 4, (200,))).values
    m = {
        "causal-ragged": lambda: BlockMask.causal((200, 150), (32, 64)),
        "sliding": lambda: BlockMask.sliding_window(200, 40, 64, causal=False),
        "document": lambda: BlockMask.document(ids, 64, causal=True),
        "dense-tail": lambda: BlockMask.from_dense(torch.rand(1, 2, 4, 3) > 0.4, 64, seq_lens=(200, 150)),
        "topk-causal-B2": lambda: BlockMask.topk(torch.randn(2, 2, 4, 4), 2, block_size=64, causal=True,
                                                 seq_lens=(200, 200)),
    }[name]()
    f = m.to_flex()
    assert tuple(f.BLOCK_SIZE) == m.block_size and tuple(f.seq_lengths) == m.seq_lens
    back = BlockMask.from_flex(f)
    check_layout(back)
    assert torch.equal(back.element_mask(), m.element_mask())
    assert torch.equal(back.to_dense(), m.to_dense())


def test_from_flex_evaluates_mask_mod():
    fa = _flex()

    def mask_mod(b, h, q, k):
        return ((q - k) % 3 == 0) | (k <= q)

    f = fa.create_block_mask(mask_mod, 1, 1, 200, 136, device="cpu", BLOCK_SIZE=(32, 64))
    m = BlockMask.from_flex(f)
    check_layout(m)
    q, k = grid(200, 136)
    assert torch.equal(m.element_mask()[0, 0], mask_mod(0, 0, q, k))
    assert m.partial_bits is not None and m.partial_bits.shape[0] < int(m.kv_num_blocks.sum())  # deduplicated


def test_from_flex_mask_mod_with_python_control_flow():
    fa = _flex()
    lengths = torch.tensor([100, 60])

    def mask_mod(b, h, q, k):  # indexes a captured tensor with b: fine broadcast or vmapped
        return (k < lengths[b]) & (q >= k)

    f = fa.create_block_mask(mask_mod, 2, 1, 128, 128, device="cpu", BLOCK_SIZE=32)
    m = BlockMask.from_flex(f)
    q, k = grid(128, 128)
    expected = torch.stack([(k < n) & (q >= k) for n in (100, 60)])[:, None]
    assert torch.equal(m.element_mask(), expected)


@pytest.mark.parametrize("name", ["document-causal", "sliding-gqa", "topk"])
def test_flex_attention_matches_reference(name):
    fa = _flex()
    torch.manual_seed(0)
    S, D = 200, 32
    ids = torch.sort(torch.randint(0, 3, (S,))).values
    m = {
        "document-causal": lambda: BlockMask.document(ids, 64, causal=True),
        "sliding-gqa": lambda: BlockMask.sliding_window(S, 50, 64, causal=True),
        "topk": lambda: BlockMask.topk(torch.randn(1, 2, 4, 4), 2, block_size=64, seq_lens=(S, S), causal=True),
    }[name]()
    Hkv = 1 if name == "sliding-gqa" else 2
    q, k, v = torch.randn(1, 2, S, D), torch.randn(1, Hkv, S, D), torch.randn(1, Hkv, S, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            o = fa.flex_attention(q, k, v, block_mask=m.to_flex(), enable_gqa=Hkv != 2)
        except Exception as e:  # pragma: no cover - depends on the torch build
            pytest.skip(f"flex_attention does not run eagerly on CPU in this torch: {e}")
    ref, _ = attention_fwd(q, k, v, m, None)
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=2e-5)


def test_flex_missing_raises_runtime_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "torch.nn.attention" and args and args[2] and "flex_attention" in args[2]:
            raise ImportError("no flex")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match="BlockMask.to_flex: this torch .* has no"):
        BlockMask.causal(64, 16).to_flex()


# ------------------------------------------------------------------------------------------ views


def test_bits_round_trip():
    a = torch.rand(3, 5, 70) > 0.5
    a[0, 0, 31] = True  # the sign bit of word 0
    bits = pack_bits(a)
    assert bits.shape == (3, 5, 3) and bits.dtype == torch.int32
    assert torch.equal(unpack_bits(bits, 70), a)
    assert pack_bits(torch.tensor([[True] + [False] * 30 + [True]])).tolist() == [[-(2**31) + 1]]


def test_repr_and_sparsity():
    m = BlockMask.causal(256, 64)
    assert m.sparsity() == pytest.approx(6 / 16)
    assert repr(m) == ("BlockMask(shape=(1, 1, 4, 4), block_size=(64, 64), seq_lens=(256, 256), causal=True, "
                       "sparsity=37.50%)")
    s = BlockMask.sliding_window(256, 64, 64)
    assert repr(s).endswith("sparsity=56.25%, bitmasks=1)")
    assert BlockMask.from_dense(torch.zeros(2, 3, dtype=torch.bool)).sparsity() == 1.0
    assert BlockMask.from_dense(torch.ones(2, 3, dtype=torch.bool)).sparsity() == 0.0


def test_empty_sequences():
    m = BlockMask.from_dense(torch.zeros(1, 1, 0, 3, dtype=torch.bool), 16, seq_lens=(0, 40))
    assert m.shape == (1, 1, 0, 3) and m.sparsity() == 0.0 and m.element_mask().shape == (1, 1, 0, 40)
    check_layout(m)
    c = BlockMask.causal((0, 0), 16)
    assert c.element_mask().shape == (1, 1, 0, 0)


def test_plot_returns_axes():
    mpl = pytest.importorskip("matplotlib", reason="matplotlib not installed")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    ax = BlockMask.sliding_window(512, 100, 64).plot()
    assert isinstance(ax, mpl.axes.Axes) and "sparse" in ax.get_title()
    fig, ax2 = plt.subplots()
    assert BlockMask.from_dense(torch.rand(2, 2, 4, 4) > 0.5, 16).plot(b=1, h=1, ax=ax2) is ax2
    plt.close("all")


def test_to_device_moves_everything():
    m = BlockMask.sliding_window(200, 40, 64).to("meta")
    assert m.device.type == "meta"
    for name in BlockMask._TENSORS:
        t = getattr(m, name)
        assert t is None or t.device.type == "meta", name
    assert m.block_size == (64, 64) and m.seq_lens == (200, 200) and m.causal


def test_check_compatible_and_expand():
    m = BlockMask.from_dense(torch.rand(1, 2, 4, 3) > 0.5, 32, seq_lens=(128, 90))
    m.check_compatible("op", 3, 2, 128, 90)
    with pytest.raises(ValueError, match=r"op: block_mask was built for seq_lens=\(128, 90\)"):
        m.check_compatible("op", 3, 2, 128, 96)
    with pytest.raises(ValueError, match="op: block_mask has H=2 heads, expected 1 or the 4 query heads"):
        m.check_compatible("op", 3, 4, 128, 90)
    b = BlockMask.from_dense(torch.rand(2, 1, 4, 3) > 0.5, 32, seq_lens=(128, 90))
    with pytest.raises(ValueError, match="op: block_mask has B=2, expected 1 or the batch size 3"):
        b.check_compatible("op", 3, 8, 128, 90)
    e = m.expand(3, 2)
    assert e.kv_indices.shape == (3, 2, 4, 3) and e.kv_indices.stride(0) == 0
    assert e.q_indices.shape == (3, 2, 3, 4) and e.kv_bits_slot is None
    assert torch.equal(e.full_kv_indices[2], m.full_kv_indices[0])
    with pytest.raises(ValueError, match="BlockMask.expand"):
        m.expand(3, 4)


def test_module_has_no_triton_import():
    src = open(bm_mod.__file__).read()
    assert "import triton" not in src and "from triton" not in src
