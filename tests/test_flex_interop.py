"""FlexAttention interop and BlockMask input checks.

``BlockMask.from_flex`` against torch's own semantics (``create_mask`` element by element, ``flex_attention``
outputs) for mask_mods from FlexAttention's and attention-gym's examples; bounded memory when many tiles
are partial; to_flex round trips; a FlexAttention BlockMask passed to the op; ``BlockMask.to`` argument
forms; ``check_bool`` and the bool arguments that use it.
"""

import warnings

import numpy as np
import pytest
import torch
from kit import assert_within_own_error

import sparse_triton as st
import sparse_triton.formats.block_mask as bm_mod
from sparse_triton.formats._checks import check_bool
from sparse_triton.formats.block_mask import BlockMask, check_block_mask

fa = pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no FlexAttention")

# ------------------------------------------------------------------------------------------ mask_mods
# Each case: (B, H, Sq, Skv, BLOCK_SIZE, mask_mod factory taking a generator). Shapes are ragged (Sq=200,
# Skv=333 end mid-block for 64 and 128) and B/H > 1 where the mask_mod reads b/h.


def _causal(g):
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    return causal


def _sliding_window(g):  # attention-gym generate_sliding_window: causal and within the window
    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= 70)
    return sliding


def _prefix_lm(g):  # per-batch prefix length (FlexAttention's prefix-LM example with a tensor)
    prefix = torch.tensor([37, 150])

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx <= prefix[b]) | (q_idx >= kv_idx)
    return prefix_lm


def _document(g):  # attention-gym document masking, batched: chained indexing doc[b][q]
    doc = torch.sort(torch.randint(0, 6, (2, 333), generator=g), dim=-1).values

    def document(b, h, q_idx, kv_idx):
        return doc[b][q_idx] == doc[b][kv_idx]
    return document


def _document_causal(g):
    doc = torch.sort(torch.randint(0, 4, (2, 333), generator=g), dim=-1).values

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[b][q_idx] == doc[b][kv_idx]) & (q_idx >= kv_idx)
    return document_causal


def _padding_lengths(g):  # FlexAttention's padding example: keys past each sequence's length masked
    lengths = torch.tensor([333, 141])

    def padding(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]
    return padding


def _padding_reduction(g):  # a reduction inside the mask_mod: per-element it sums one row of pad
    pad = torch.randint(0, 2, (2, 300), generator=g)

    def padding_sum(b, h, q_idx, kv_idx):
        return kv_idx < pad[b].sum()
    return padding_sum


def _per_head(g):  # ALiBi-style per-head windows read through h
    window = torch.tensor([16, 90])

    def per_head(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= window[h]
    return per_head


def _natten(g):  # attention-gym's NATTEN mask: a 7 x 5 neighbourhood on a 16-wide canvas, clamped at edges
    W, Hc, KW, KH = 16, 13, 7, 5

    def natten(b, h, q_idx, kv_idx):
        qx, qy, kx, ky = q_idx % W, q_idx // W, kv_idx % W, kv_idx // W
        cx = qx.clamp(KW // 2, (W - 1) - KW // 2)
        cy = qy.clamp(KH // 2, (Hc - 1) - KH // 2)
        return ((cx - kx).abs() <= KW // 2) & ((cy - ky).abs() <= KH // 2)
    return natten


CASES = {
    "causal": (1, 1, 200, 333, 64, _causal),
    "sliding-window": (1, 1, 200, 333, (64, 128), _sliding_window),
    "prefix-lm-B2": (2, 1, 200, 333, 64, _prefix_lm),
    "document-B2": (2, 1, 200, 333, 64, _document),
    "document-causal-B2": (2, 1, 200, 333, 128, _document_causal),
    "padding-lengths-B2": (2, 1, 200, 333, 64, _padding_lengths),
    "padding-sum-B2": (2, 1, 200, 333, (128, 64), _padding_reduction),
    "per-head-H2": (1, 2, 200, 333, 64, _per_head),
    "natten": (1, 1, 208, 208, 64, _natten),
}


def _case(name, device):
    B, H, Sq, Skv, bs, make = CASES[name]
    mask_mod = make(torch.Generator().manual_seed(0))
    f = fa.create_block_mask(mask_mod, B, H, Sq, Skv, device=device, BLOCK_SIZE=bs)
    return B, H, Sq, Skv, mask_mod, f


@pytest.mark.parametrize("name", list(CASES))
def test_from_flex_element_mask_equals_create_mask(name, device):
    B, H, Sq, Skv, mask_mod, f = _case(name, device)
    m = BlockMask.from_flex(f)
    want = fa.create_mask(mask_mod, B, H, Sq, Skv, device=device)
    assert m.shape[:2] == (B, H) and m.seq_lens == (Sq, Skv)
    assert torch.equal(m.element_mask(), want)
    assert torch.equal(m.to_dense(), f.to_dense()[..., :m.shape[2], :m.shape[3]].bool())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name", ["sliding-window", "prefix-lm-B2", "document-causal-B2", "padding-sum-B2",
                                  "per-head-H2"])
def test_from_flex_attention_equals_flex_attention(name, device):
    B, H, Sq, Skv, mask_mod, f = _case(name, device)
    m = BlockMask.from_flex(f)
    D = 32
    q = torch.randn(B, H, Sq, D, device=device)
    k, v = torch.randn(B, H, Skv, D, device=device), torch.randn(B, H, Skv, D, device=device)
    want = fa.flex_attention(q.double(), k.double(), v.double(), block_mask=f)
    # PyTorch's own fp32 error for this masked attention (SDPA with the same element mask: cheaper than a
    # second eager flex_attention, the same rounding class)
    own = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=fa.create_mask(mask_mod, B, H, Sq, Skv,
                                                                                             device=device))
    got = st.block_sparse_attention(q, k, v, m)
    assert_within_own_error(got, want, own, torch.float32)


def test_from_flex_calls_mask_mod_on_0d_indices_only(device):
    """FlexAttention evaluates a mask_mod per element: every index it sees is a 0-d tensor (under vmap)."""
    seen = []

    def mask_mod(b, h, q_idx, kv_idx):
        seen.append((b.dim(), h.dim(), q_idx.dim(), kv_idx.dim()))
        return (q_idx - kv_idx).abs() <= 40

    f = fa.create_block_mask(mask_mod, 2, 2, 200, 333, device=device, BLOCK_SIZE=64)
    seen.clear()
    m = BlockMask.from_flex(f)
    assert seen and set(seen) == {(0, 0, 0, 0)}
    assert torch.equal(m.element_mask(), fa.create_mask(mask_mod, 2, 2, 200, 333, device=device))


def test_from_flex_memory_bounded_by_chunks(monkeypatch, device):
    """Many partial tiles + chained indexing: evaluated in chunks of at most _EVAL_ELEMS elements (never
    one B * H * Sq * Skv evaluation), each chunk within one batch element."""
    S, BS, B = 4096, 128, 2
    g = torch.Generator().manual_seed(0)
    doc = torch.sort(torch.randint(0, 300, (B, S), generator=g), dim=-1).values.to(device)

    def document(b, h, q_idx, kv_idx):
        return doc[b][q_idx] == doc[b][kv_idx]

    f = fa.create_block_mask(document, B, 1, S, S, device=device, BLOCK_SIZE=BS)
    n_partial = int(f.kv_num_blocks.sum())
    assert n_partial > 100  # many partial tiles

    calls, real = [], fa.create_mask

    def spy(mod_fn, B_, H_, Q_LEN, KV_LEN, device=None):
        calls.append(B_ * H_ * Q_LEN * KV_LEN)
        return real(mod_fn, B_, H_, Q_LEN, KV_LEN, device=device)

    monkeypatch.setattr(fa, "create_mask", spy)
    monkeypatch.setattr(bm_mod, "_EVAL_ELEMS", 32 * BS * BS)  # 32 tiles per chunk
    m = BlockMask.from_flex(f)
    assert calls and max(calls) <= 32 * BS * BS
    assert sum(calls) == n_partial * BS * BS  # each partial tile evaluated exactly once
    assert len(calls) >= -(-n_partial // 32)
    want = doc[:, None, :, None] == doc[:, None, None, :]
    assert torch.equal(m.element_mask(), want)


# ------------------------------------------------------------------------------------------ to_flex round trips


@pytest.mark.parametrize("name", ["from-flex-per-head-H2", "from-flex-document-B2", "document-causal-B2",
                                  "sliding-causal-ragged", "causal-ragged"])
def test_to_flex_round_trip(name, device):
    ids = torch.sort(torch.randint(0, 5, (2, 333)), dim=-1).values.to(device)
    m = {
        "from-flex-per-head-H2": lambda: BlockMask.from_flex(_case("per-head-H2", device)[-1]),
        "from-flex-document-B2": lambda: BlockMask.from_flex(_case("document-B2", device)[-1]),
        "document-causal-B2": lambda: BlockMask.document(ids, 64, causal=True),
        "sliding-causal-ragged": lambda: BlockMask.sliding_window((200, 333), 50, (64, 128), device=device),
        "causal-ragged": lambda: BlockMask.causal((200, 333), (128, 64), device=device),
    }[name]()
    if name != "causal-ragged":
        assert m.partial_bits is not None and m.partial_bits.shape[0] > 0  # bitmasks travel
    f = m.to_flex()
    (Bm, Hm), (Sq, Skv) = m.shape[:2], m.seq_lens
    # FlexAttention's own reading of the converted mask_mod (what its eager attention applies) ...
    flex_elems = fa.create_mask(f.mask_mod, Bm, Hm, Sq, Skv, device=device) & _flex_tiles(f, Sq, Skv)
    assert torch.equal(flex_elems, m.element_mask())
    # ... and back: the same elements and tiles
    back = BlockMask.from_flex(f)
    assert torch.equal(back.element_mask(), m.element_mask())
    assert torch.equal(back.to_dense(), m.to_dense())


def _flex_tiles(f, Sq, Skv):
    """Bool [B, H, Sq, Skv]: elements inside the tiles a FlexAttention BlockMask lists (full or partial)."""
    BQ, BK = f.BLOCK_SIZE
    tiles = f.to_dense().bool()
    return tiles.repeat_interleave(BQ, -2).repeat_interleave(BK, -1)[..., :Sq, :Skv]


# ------------------------------------------------------------------------------ FlexAttention mask to the op


def test_flex_block_mask_to_op_names_from_flex(device):
    f = fa.create_block_mask(_causal(None), 1, 1, 128, 128, device=device, BLOCK_SIZE=64)
    q = k = v = torch.randn(1, 2, 128, 32, device=device)
    with pytest.raises(TypeError, match=r"block_sparse_attention: block_mask is a FlexAttention BlockMask.*"
                                        r"st\.BlockMask\.from_flex\(block_mask\)"):
        st.block_sparse_attention(q, k, v, f)
    # the conversion it names works and gives FlexAttention's causal attention
    o = st.block_sparse_attention(q, k, v, st.BlockMask.from_flex(f))
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    own = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_within_own_error(o, want, own, torch.float32)


def test_check_block_mask_other_types():
    m = BlockMask.causal(64, 64)
    assert check_block_mask(m, "block_mask", "f") is m
    for bad in (None, torch.ones(1, 1, 1, 1, dtype=torch.bool), "causal"):
        with pytest.raises(TypeError, match=r"^f: block_mask must be a sparse_triton\.BlockMask, got "):
            check_block_mask(bad, "block_mask", "f")


# ------------------------------------------------------------------------------------------ BlockMask.to


@pytest.mark.parametrize("call", ["positional-fp16", "dtype-kw", "device-and-dtype", "int32-dtype", "tensor"])
def test_to_refuses_dtypes(call):
    m = BlockMask.sliding_window(200, 50, 64)
    fn = {
        "positional-fp16": lambda: m.to(torch.float16),
        "dtype-kw": lambda: m.to(dtype=torch.float32),
        "device-and-dtype": lambda: m.to("cpu", torch.half),
        "int32-dtype": lambda: m.to(dtype=torch.int32),
        "tensor": lambda: m.to(torch.zeros(1)),
    }[call]
    with pytest.raises(TypeError, match=r"BlockMask\.to: .*dtype"):
        fn()


@pytest.mark.parametrize("call", ["str", "torch.device", "device-kw", "non_blocking", "meta"])
def test_to_device_forms(call):
    m = BlockMask.sliding_window(200, 50, 64)
    out = {
        "str": lambda: m.to("cpu"),
        "torch.device": lambda: m.to(torch.device("cpu")),
        "device-kw": lambda: m.to(device="cpu"),
        "non_blocking": lambda: m.to("cpu", non_blocking=True),
        "meta": lambda: m.to("meta"),
    }[call]()
    want = "meta" if call == "meta" else "cpu"
    for name in BlockMask._TENSORS:
        t = getattr(out, name)
        assert t is None or (t.device.type == want and t.dtype in (torch.int32, torch.int8)), name
    if call != "meta":
        assert torch.equal(out.element_mask(), m.element_mask())
        assert (out.block_size, out.seq_lens, out.causal) == (m.block_size, m.seq_lens, m.causal)


def test_to_bad_devices():
    m = BlockMask.causal(64, 64)
    with pytest.raises(TypeError, match=r"BlockMask\.to: device must be"):
        m.to()
    with pytest.raises(TypeError, match=r"BlockMask\.to: device must be"):
        m.to(True)
    with pytest.raises(ValueError, match=r"BlockMask\.to: device='nowhere' is not a valid device"):
        m.to("nowhere")
    with pytest.raises(TypeError, match=r"BlockMask\.to: non_blocking must be a bool"):
        m.to("cpu", non_blocking=1)


# ------------------------------------------------------------------------------------------ bool arguments

NOT_BOOLS = [1, 0, "yes", None, torch.tensor(True), np.bool_(True)]
NOT_BOOL_IDS = ["int-1", "int-0", "str", "None", "tensor-0d-bool", "numpy-bool"]


def test_check_bool_accepts_only_python_bools():
    assert check_bool(True, "flag", "f") is True
    assert check_bool(False, "flag", "f") is False
    for bad in NOT_BOOLS:
        with pytest.raises(TypeError, match=r"^f: flag must be a bool \(True or False\), got "):
            check_bool(bad, "flag", "f")


@pytest.mark.parametrize("bad", NOT_BOOLS, ids=NOT_BOOL_IDS)
@pytest.mark.parametrize("where", ["sliding_window", "local_global", "document", "topk", "BlockMask",
                                   "BlockMask-validate"])
def test_block_mask_builders_refuse_non_bool(where, bad):
    call, name = {
        "sliding_window": (lambda: BlockMask.sliding_window(128, 32, 64, causal=bad), "causal"),
        "local_global": (lambda: BlockMask.local_global(128, 1, 1, 64, causal=bad), "causal"),
        "document": (lambda: BlockMask.document(torch.zeros(128, dtype=torch.long), 64, causal=bad), "causal"),
        "topk": (lambda: BlockMask.topk(torch.randn(2, 2), 1, block_size=64, causal=bad), "causal"),
        "BlockMask": (lambda: BlockMask(torch.ones(1, 1, 2, dtype=torch.int32),
                                        torch.zeros(1, 1, 2, 2, dtype=torch.int32), block_size=64,
                                        causal=bad), "causal"),
        "BlockMask-validate": (lambda: BlockMask(torch.ones(1, 1, 2, dtype=torch.int32),
                                                 torch.zeros(1, 1, 2, 2, dtype=torch.int32), block_size=64,
                                                 validate=bad), "validate"),
    }[where]
    prefix = "BlockMask" if where.startswith("BlockMask") else f"BlockMask.{where}"
    with pytest.raises(TypeError, match=rf"^{prefix}: {name} must be a bool"):
        call()


@pytest.mark.parametrize("bad", NOT_BOOLS, ids=NOT_BOOL_IDS)
@pytest.mark.parametrize("name", ["causal", "return_lse"])
def test_block_sparse_attention_refuses_non_bool(name, bad):
    q = k = v = torch.randn(1, 1, 64, 32)
    m = BlockMask.causal(64, 64)
    with pytest.raises(TypeError, match=rf"^block_sparse_attention: {name} must be a bool"):
        st.block_sparse_attention(q, k, v, m, **{name: bad})


def test_bool_arguments_still_work(device):
    q = k = v = torch.randn(1, 1, 64, 32, device=device)
    m = BlockMask.sliding_window(64, 16, 64, causal=False, device=device)
    o, lse = st.block_sparse_attention(q, k, v, m, causal=True, return_lse=True)
    assert o.shape == q.shape and lse.shape == (1, 1, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback or coercion warnings on the plain path
        assert BlockMask.topk(torch.randn(2, 2), 1, block_size=64, causal=False).causal is False


def test_attention_module_refuses_a_flex_mask_naming_from_flex():
    fbm = fa.create_block_mask(lambda b, h, q, k: q >= k, 1, 1, 128, 128, device="cpu", BLOCK_SIZE=64)
    for build in (st.nn.BlockSparseAttention, st.nn.BlockSparseAttention.fixed):
        with pytest.raises(TypeError, match=r"BlockMask\.from_flex"):
            build(fbm)
    # the conversion it names gives a working module
    attn = st.nn.BlockSparseAttention.fixed(st.BlockMask.from_flex(fbm))
    q = torch.randn(1, 1, 128, 32)
    assert attn(q, q, q).shape == q.shape
