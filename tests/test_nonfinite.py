"""Non-finite values never cross a mask.

Block-sparse attention: a NaN or inf in ``k`` or ``v`` at a key a query cannot see (a tile not selected,
the causal diagonal, a bitmask bit, a document boundary, the kv tail) reaches neither that query's
``o``/``lse`` nor its ``dq``, nor ``dk``/``dv`` of keys it shares with no affected query; at a key the
query can see it reaches it as the dense formula over the allowed keys says. Checked for the CPU
reference (against a one-query-at-a-time oracle) and the interpreted prefill and decode kernels (against
the clean run and the reference).

Activation sparsity: an inf or NaN weight of an inactive input never reaches that row's output, on the
reference, the interpreted kernels (every inner-product form, split-K, N:M, gate/up) and the ops.

The attention ``scale`` must be finite.
"""

from __future__ import annotations

import pytest
import torch
from kit import assert_close, assert_close_avg, assert_close_lse

import sparse_triton as st
from sparse_triton.formats.nm import nm_compress
from sparse_triton.kernels import act_sparse as AK
from sparse_triton.kernels import attention as K
from sparse_triton.kernels import attention_decode as DK
from sparse_triton.ops import act_sparse as ops_act
from sparse_triton.reference import act_sparse as AR
from sparse_triton.reference import attention as R
from sparse_triton.reference._masked import masked_matmul

# NaN and inf arithmetic is the point here: numpy (the interpreter) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

NAN, INF = float("nan"), float("inf")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def _same_nonfinite(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """NaN, +inf and -inf in the same places."""
    got, want = got.cpu(), want.cpu()
    for name, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(f(got), f(want)), f"{what}: {name} in different places"


# ---------------------------------------------------------------------------------------------------
# attention: masks, poison and the oracle


def _prefill_masks(device):
    """name -> (BlockMask, Sq, Skv, op causal flag); 64 x 64 blocks, ragged lengths."""
    S = 130
    docs = torch.tensor([0] * 50 + [1] * 47 + [2] * 33)
    sel = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)  # 3 x 3 tiles, a ragged kv tail
    return {
        "causal": (st.BlockMask.causal(S, 64, device=device), S, S, False),
        "sliding_window": (st.BlockMask.sliding_window(S, 40, 64, device=device), S, S, False),
        "document": (st.BlockMask.document(docs.to(device), 64, causal=True), S, S, False),
        "random_tiles": (st.BlockMask.from_dense(sel.to(device), 64, (S, S)), S, S, False),
        # Sq < Skv under the op's causal flag: keys 70..99 are seen by no query (in a partial tile past
        # the last query, on the kv tail)
        "ragged_tail": (st.BlockMask.from_dense(torch.ones(2, 2, dtype=torch.bool, device=device), 64, (70, 100)),
                        70, 100, True),
    }


def _poison_keys(allowed: torch.Tensor, n: int = 4, later_half: bool = True) -> list[int]:
    """Keys (of the later half) seen by some query but not by all, fewest viewers first (late keys on ties),
    and one key seen by no query where there is one. ``allowed`` ``[..., Sq, Skv]`` (queries of every head)."""
    Skv = allowed.shape[-1]
    allowed = allowed.reshape(-1, Skv)
    views = allowed.sum(0)
    order = sorted(range(Skv // 2 if later_half else 0, Skv), key=lambda j: (int(views[j]), -j))
    keys = [j for j in order if 0 < views[j] < allowed.shape[0]][:n]
    keys += [j for j in order if views[j] == 0][:1]
    return keys


def _poison(k: torch.Tensor, v: torch.Tensor, keys: list[int]):
    """A NaN v row, a +inf and a -inf in v, a NaN k row and a +inf in k, at ``keys`` (cycled), every kv
    head. Returns the poisoned copies."""
    k, v = k.clone(), v.clone()
    spots = [("v", None, NAN), ("v", 3, INF), ("v", 5, -INF), ("k", None, NAN), ("k", 1, INF)]
    for i, (name, col, value) in enumerate(spots):
        t, j = (v if name == "v" else k), keys[i % len(keys)]
        if col is None:
            t[:, :, j] = value
        else:
            t[:, :, j, col] = value
    return k, v


def _affected(allowed: torch.Tensor, keys: list[int], G: int):
    """Bool ``[Hq, Sq]`` queries that see a poisoned key, and bool ``[Hkv, Skv]`` keys seen by no
    affected query of any query head of their group (their dk/dv must not change)."""
    hit = allowed[..., keys].any(-1)  # [Hq, Sq]
    touched = (allowed & hit[..., None]).any(-2)  # [Hq, Skv]
    clean_keys = ~touched.reshape(-1, G, touched.shape[-1]).any(1)
    return hit, clean_keys


def _oracle(q, k, v, allowed, scale):
    """``(o, lse)`` in fp64, one query at a time over its allowed keys only (the dense formula there)."""
    B, Hq, Sq, D = q.shape
    G = Hq // k.shape[1]
    o = torch.zeros(B, Hq, Sq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Sq), -INF, dtype=torch.float64)
    allowed = allowed.expand(B, Hq, Sq, k.shape[2]).cpu()
    for b in range(B):
        for h in range(Hq):
            for i in range(Sq):
                keys = allowed[b, h, i].nonzero().flatten()
                if len(keys):
                    s = (k[b, h // G, keys].double() @ q[b, h, i].double()) * scale
                    lse[b, h, i] = torch.logsumexp(s, 0)
                    o[b, h, i] = torch.softmax(s, 0) @ v[b, h // G, keys].double()
    return o, lse


def _qkv(Hq, Hkv, Sq, Skv, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, Sq, D, generator=g).to(device, dtype)
    k = torch.randn(1, Hkv, Skv, D, generator=g).to(device, dtype)
    v = torch.randn(1, Hkv, Skv, D, generator=g).to(device, dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------------
# attention: reference


@pytest.mark.parametrize("mask_name", list(_prefill_masks("cpu")))
def test_reference_matches_per_query_oracle(mask_name):
    """The reference's o/lse with inf/NaN in k and v equal the dense formula over each query's allowed keys."""
    bm, Sq, Skv, causal = _prefill_masks("cpu")[mask_name]
    q, k, v = _qkv(2, 1, Sq, Skv, 16, torch.float64, "cpu")
    allowed = R.effective_element_mask(bm, causal, 1, 2, Sq, Skv, "cpu")
    keys = _poison_keys(allowed[0, 0])
    k, v = _poison(k, v, keys)
    o, lse = R.attention_fwd(q, k, v, bm, 0.25, causal)
    oo, ol = _oracle(q, k, v, allowed, 0.25)
    _same_nonfinite(o, oo, "o")
    _same_nonfinite(lse, ol, "lse")
    fin = oo.isfinite()
    torch.testing.assert_close(o[fin], oo[fin], rtol=1e-12, atol=1e-12)
    assert_close_lse(lse, ol, torch.float32)  # lse comes back in fp32
    assert o.isnan().any() and o.isfinite().all(-1).any()  # the poison reached some rows, not all


@pytest.mark.parametrize("mask_name", list(_prefill_masks("cpu")))
def test_reference_masked_poison_changes_nothing_else(mask_name):
    """Forward and backward of the reference: the rows and keys the poison cannot reach are bit for bit
    those of the run with finite values there; dk/dv of a key seen by no query stay 0."""
    bm, Sq, Skv, causal = _prefill_masks("cpu")[mask_name]
    q, k, v = _qkv(2, 1, Sq, Skv, 16, torch.float32, "cpu")
    allowed = R.effective_element_mask(bm, causal, 1, 2, Sq, Skv, "cpu")
    keys = _poison_keys(allowed[0, 0])
    kp, vp = _poison(k, v, keys)
    hit, clean_keys = _affected(allowed[0].expand(2, Sq, Skv), keys, 2)
    do = torch.randn(1, 2, Sq, 16)
    o0, l0 = R.attention_fwd(q, k, v, bm, None, causal)
    g0 = R.attention_bwd(do, q, k, v, o0, l0, bm, None, causal)
    o1, l1 = R.attention_fwd(q, kp, vp, bm, None, causal)
    g1 = R.attention_bwd(do, q, kp, vp, o1, l1, bm, None, causal)
    # under causal, the latest queries see every key: no key's dk/dv is out of the poison's reach
    assert (~hit).any() and hit.any() and (clean_keys.any() or mask_name == "causal")
    for a, b in ((o1, o0), (l1, l0), (g1[0], g0[0])):
        assert torch.equal(a[0][~hit], b[0][~hit])
    for a, b in ((g1[1], g0[1]), (g1[2], g0[2])):
        assert torch.equal(a[0][clean_keys], b[0][clean_keys])
    unseen = [j for j in keys if not allowed[0, 0, :, j].any()]
    for j in unseen:
        assert (g1[1][..., j, :] == 0).all() and (g1[2][..., j, :] == 0).all()


def test_reference_decode_twin_and_dense_attention():
    """``attention_decode`` and ``dense_attention`` (the autograd path tests use) follow the same rule."""
    bm = st.BlockMask.causal((4, 40), (16, 16))
    q, k, v = _qkv(2, 1, 4, 40, 16, torch.float64, "cpu")
    allowed = R.effective_element_mask(bm, False, 1, 2, 4, 40, "cpu")
    kp, vp = _poison(k, v, [2, 3, 30, 39])  # keys 2, 3: seen by queries 2.. / 3; 30, 39: by none
    o, lse = R.attention_decode(q, kp, vp, bm, None)
    oo, ol = _oracle(q, kp, vp, allowed, 16 ** -0.5)
    _same_nonfinite(o, oo, "o")
    torch.testing.assert_close(o[oo.isfinite()], oo[oo.isfinite()])
    assert torch.equal(o[:, :, :2], R.attention_decode(q, k, v, bm, None)[0][:, :, :2])
    od, _ = R.dense_attention(q, kp.expand(1, 2, 40, 16), vp.expand(1, 2, 40, 16), allowed, 16 ** -0.5)
    _same_nonfinite(od, oo, "dense_attention o")


def test_masked_matmul_rule():
    a = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, -1.0], [0.5, 0.5, 0.0]])
    b = torch.tensor([[1.0, INF], [NAN, 2.0], [-INF, 1.0]])
    allowed = torch.tensor([[True, False, False], [False, True, True], [True, True, True]])
    got = masked_matmul(a, b, allowed)
    # row 0: only j = 0 -> [1, inf]; row 1: j = 1, 2 -> [NaN (3 * NaN), 6 - 1]; row 2: 0 * -inf is NaN
    want = torch.tensor([[1.0, INF], [NAN, 5.0], [NAN, INF]])
    _same_nonfinite(got, want, "masked_matmul")
    assert got[1, 1] == 5.0 and got[0, 0] == 1.0
    # +inf and -inf meeting in one sum: NaN, as in IEEE arithmetic
    both = masked_matmul(torch.tensor([[1.0, 1.0]]), torch.tensor([[INF], [-INF]]), torch.ones(1, 2, dtype=torch.bool))
    assert both.isnan().all()
    # a finite b takes the plain product
    assert torch.equal(masked_matmul(a, b.nan_to_num(0, 0, 0), allowed), (a * allowed) @ b.nan_to_num(0, 0, 0))


# ---------------------------------------------------------------------------------------------------
# attention: prefill kernels (interpreted)


def _kernel_vs_clean(q, k, v, bm, causal, keys, dtype):
    """Forward and backward kernels on clean and poisoned k/v: unaffected rows/keys equal the clean run,
    the rest has the reference's NaN/inf pattern (finite values close to it)."""
    Hq, Sq, Skv = q.shape[1], q.shape[2], k.shape[2]
    G = Hq // k.shape[1]
    scale = q.shape[-1] ** -0.5
    allowed = R.effective_element_mask(bm, causal, 1, Hq, Sq, Skv, q.device)[0].expand(Hq, Sq, Skv).cpu()
    kp, vp = _poison(k, v, keys)
    hit, clean_keys = _affected(allowed, keys, G)
    assert (~hit).any() and hit.any()
    do = torch.randn_like(q)
    o0, l0 = K.attention_fwd(q, k, v, bm, scale, causal)
    g0 = K.attention_bwd(do, q, k, v, o0, l0, bm, scale, causal)
    o1, l1 = K.attention_fwd(q, kp, vp, bm, scale, causal)
    g1 = K.attention_bwd(do, q, kp, vp, o1, l1, bm, scale, causal)
    # Rows the poison reached through 0 * inf in the fast pass run again in exact mode (other tiles: the
    # same values up to rounding); rows it never touched keep the fast pass's values bit for bit.
    assert_close_avg(o1[0][~hit], o0[0][~hit].double(), dtype, msg="o: a masked key's poison reached a row")
    assert_close_lse(l1[0][~hit], l0[0][~hit].double(), dtype)
    assert_close(g1[0][0][~hit], g0[0][0][~hit].double(), Skv, msg="dq: a masked key's poison reached a row")
    for got, clean, what in ((g1[1], g0[1], "dk"), (g1[2], g0[2], "dv")):  # (they read the rows' o and lse)
        assert_close(got[0][clean_keys], clean[0][clean_keys].double(), Sq, msg=f"{what}: poison reached another key")
    ro, rl = R.attention_fwd(q.double().cpu(), kp.double().cpu(), vp.double().cpu(), bm.to("cpu"), scale, causal)
    rg = R.attention_bwd(do.double().cpu(), q.double().cpu(), kp.double().cpu(), vp.double().cpu(), ro, rl,
                         bm.to("cpu"), scale, causal)
    _same_nonfinite(o1, ro, "o")
    _same_nonfinite(l1, rl, "lse")
    fin = ro.isfinite()
    assert_close_avg(o1.cpu()[fin], ro[fin], dtype)
    assert_close_lse(l1[l1.isfinite()], rl[l1.isfinite()], dtype)
    for got, want, what in zip(g1, rg, ("dq", "dk", "dv")):
        _same_nonfinite(got, want, what)
    assert o1.isnan().any()  # visible poison reached the rows that see it


SLOW = pytest.mark.slow  # the interpreter recomputes every row the poison leaked into, one row at a time
PREFILL_CASES = [pytest.param("ragged_tail", torch.float32, id="ragged_tail-fp32"),
                 pytest.param("ragged_tail", torch.float16, id="ragged_tail-fp16"),
                 pytest.param("causal", torch.float32, id="causal-fp32", marks=SLOW),
                 pytest.param("sliding_window", torch.float32, id="sliding_window-fp32", marks=SLOW),
                 pytest.param("sliding_window", torch.float16, id="sliding_window-fp16", marks=SLOW),
                 pytest.param("document", torch.float32, id="document-fp32", marks=SLOW),
                 pytest.param("random_tiles", torch.float16, id="random_tiles-fp16", marks=SLOW)]


@pytest.mark.parametrize("mask_name,dtype", PREFILL_CASES)
def test_prefill_kernels_masked_poison(mask_name, dtype, device):
    """Forward (o, lse) and backward (dq, dk, dv) kernels; GQA 2:1 under the document mask."""
    bm, Sq, Skv, causal = _prefill_masks(device)[mask_name]
    Hq = 2 if mask_name == "document" else 1
    q, k, v = _qkv(Hq, 1, Sq, Skv, 32, dtype, device, seed=1)
    allowed = R.effective_element_mask(bm, causal, 1, Hq, Sq, Skv, "cpu")
    _kernel_vs_clean(q, k, v, bm, causal, _poison_keys(allowed[0, 0]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_visible_inf_gives_inf(dtype, device):
    """An inf in v at a key a query can see makes that query's output inf in that column (as the formula:
    p > 0 times inf), on the prefill and the decode kernel; the other columns and rows stay finite."""
    S, D = 96, 32
    bm = st.BlockMask.sliding_window(S, 20, 64, device=device)
    q, k, v = _qkv(1, 1, S, S, D, dtype, device, seed=4)
    v[0, 0, 70, 3], v[0, 0, 75, 4] = INF, -INF
    o, _ = K.attention_fwd(q, k, v, bm, 0.2, False)
    ro, _ = R.attention_fwd(q.double().cpu(), k.double().cpu(), v.double().cpu(), bm.to("cpu"), 0.2)
    _same_nonfinite(o, ro, "o")
    assert o[0, 0, 70:90, 3].isposinf().all() and o[0, 0, 75:95, 4].isneginf().all()
    assert o[0, 0, :70].isfinite().all() and o[0, 0, :, 5:].isfinite().all()
    bd = st.BlockMask.sliding_window((4, 96), 94, (16, 32), causal=False)  # query i sees keys < i + 94
    o, _ = DK.attention_decode(q[:, :, :4], k, v, bd.to(device), 0.2, False, DK.DecodeConfig(BLOCK_N=16))
    ro, _ = R.attention_decode(q[:, :, :4].double().cpu(), k.double().cpu(), v.double().cpu(), bd, 0.2)
    _same_nonfinite(o, ro, "decode o")
    assert o[0, 0, :, 3].isposinf().all() and o[0, 0, :, 4].isneginf().all()


# ---------------------------------------------------------------------------------------------------
# attention: decode kernel (interpreted)


def _decode_masks(device):
    """name -> (BlockMask, Sq, Skv, BK); one query block of 16."""
    g = torch.Generator().manual_seed(2)
    Sq, Skv, BK = 4, 100, 16
    NKV = -(-Skv // BK)
    sel = torch.rand(1, 4, 1, NKV, generator=g) < 0.6  # a mask per query head: heads see different tiles
    sel[..., -1] = True
    bits = st.BlockMask.sliding_window((16, 112), 60, (16, BK), causal=False)
    return {
        "causal": (st.BlockMask.causal((Sq, Skv), (16, BK), device=device), Sq, Skv),
        "per_head_tiles_tail": (st.BlockMask.from_dense(sel, (16, BK), (Sq, Skv)).to(device), Sq, Skv),
        "bitmask": (bits.to(device), 16, 112),
    }


DECODE_CASES = [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}", marks=SLOW if name == "bitmask" else ())
                for name in ("causal", "per_head_tiles_tail", "bitmask") for dtype in (torch.float32, torch.float16)]


@pytest.mark.parametrize("mask_name,dtype", DECODE_CASES)
def test_decode_kernel_masked_poison(mask_name, dtype, device):
    bm, Sq, Skv = _decode_masks(device)[mask_name]
    Hq, Hkv, D = (2 if Sq > 8 else 4), 1, 32  # GQA packing: 4 heads x 4 queries, or 2 x 16
    q, k, v = _qkv(Hq, Hkv, Sq, Skv, D, dtype, device, seed=3)
    allowed = R.effective_element_mask(bm, False, 1, Hq, Sq, Skv, "cpu")[0].expand(Hq, Sq, Skv)
    keys = _poison_keys(allowed, later_half=False)
    kp, vp = _poison(k, v, keys)
    hit, _ = _affected(allowed, keys, Hq // Hkv)
    assert (~hit).any() and hit.any()
    cfg = DK.DecodeConfig(BLOCK_N=16, num_splits=3)  # splits and tiles that cut through the mask's blocks
    o0, l0 = DK.attention_decode(q, k, v, bm, None, False, cfg)
    o1, l1 = DK.attention_decode(q, kp, vp, bm, None, False, cfg)
    # a split that met a NaN reruns in exact mode: equal to the clean run up to the rounding of its order
    assert_close_avg(o1[0][~hit], o0[0][~hit].double(), dtype)
    assert_close_lse(l1[0][~hit], l0[0][~hit].double(), dtype)
    ro, rl = R.attention_decode(q.double().cpu(), kp.double().cpu(), vp.double().cpu(), bm.to("cpu"), None)
    _same_nonfinite(o1, ro, "o")
    _same_nonfinite(l1, rl, "lse")
    fin = ro.isfinite()
    assert_close_avg(o1.cpu()[fin], ro[fin], dtype)
    assert o1.isnan().any()


def test_decode_merge_ignores_empty_splits(device):
    """A split without keys (lse = -inf) adds nothing to the merge, whatever its workspace row holds."""
    splits, Sq, D = 3, 2, 32
    ws_o = torch.randn(1, splits, Sq, D, device=device)
    ws_l = torch.randn(1, splits, Sq, device=device)
    ws_l[0, 1] = -INF
    ws_o[0, 1] = NAN
    o = torch.empty(1, Sq, D, device=device)
    lse = torch.empty(1, Sq, device=device)
    # q, k, v and the mask feed only the recompute of a row that comes out NaN: none here
    DK._decode_merge_kernel[(1, D // DK.MERGE_BLOCK_D)](
        ws_o, ws_l, o, lse, ws_o, ws_o, ws_o, *(torch.zeros(1, dtype=torch.int32, device=device),) * 6,
        Sq, 1, D, splits, 1, 1, 4, 1.0, 0, 0, *(0,) * 15, BLOCK_Q=DK.DECODE_MAX_Q, BLOCK_D=DK.MERGE_BLOCK_D,
        FIX_N=DK.FIX_N, num_warps=1)
    w = torch.exp2(ws_l[0, [0, 2]] - ws_l[0, [0, 2]].max(0).values)  # [2, Sq]
    want = (w[..., None] * ws_o[0, [0, 2]]).sum(0) / w.sum(0)[:, None]
    assert_close(o[0], want, 2)


# ---------------------------------------------------------------------------------------------------
# attention: scale


@pytest.mark.parametrize("scale", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_nonfinite_scale_is_rejected(scale):
    q = k = v = torch.randn(1, 1, 64, 32)
    with pytest.raises(ValueError, match="block_sparse_attention: scale must be finite"):
        st.block_sparse_attention(q, k, v, st.BlockMask.causal(64, 64), scale=scale)


# ---------------------------------------------------------------------------------------------------
# activation sparsity


def _rows_oracle(x: torch.Tensor, w_t: torch.Tensor, t: float) -> torch.Tensor:
    """``y[i] = x[i, A_i] @ w_t[A_i]`` over row i's active inputs ``A_i`` only (fp64)."""
    x, w_t = x.double().cpu(), w_t.double().cpu()
    on = ~(x.abs() <= t)
    return torch.stack([x[i, on[i]] @ w_t[on[i]] for i in range(x.shape[0])])


def _act_case(M, K, N, dtype, device, seed=0):
    """x with rows of different active sets (threshold 0.6745: about half inactive) and a finite weight
    ``w_t [K, N]``. Returns ``(x, t, w_t, poison, clean)``: ``poison(w)`` a copy of a ``[K, ...]``
    tensor with inf, -inf and NaN in the rows of inputs active in some rows but not all (where M > 1)
    and in rows of inputs active in none; ``clean`` the rows where no poisoned input is active."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, -3:] *= 0.05  # inputs inactive in every row
    x = x.to(device, dtype)
    t = 0.6745
    on = AR.active(x, torch.tensor(t, device=device)).cpu()
    mixed = (on.any(0) & ~on.all(0)).nonzero().flatten()
    mixed = mixed[torch.argsort(on[:, mixed].sum(0), stable=True)][:3]  # seen by few rows: most stay clean
    dead = (~on.any(0)).nonzero().flatten()[:3]
    w_t = torch.randn(K, N, generator=g).to(device, dtype)

    def poison(w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        for i, c in enumerate(mixed.tolist()):
            w[c, 3 * i] = (INF, -INF, NAN)[i]
        w[dead.tolist()] = INF
        w[dead[:1].tolist()] = NAN
        return w

    clean = ~on[:, mixed].any(1)
    assert clean.any() and len(dead) and (M == 1 or (~clean).any())
    return x, t, w_t, poison, clean


def test_act_reference_rule():
    x, t, w_t, poison, clean = _act_case(6, 40, 24, torch.float64, "cpu")
    w_bad, tt = poison(w_t), torch.tensor(t)
    y = AR.act_sparse_matmul(x, w_bad.t(), tt)
    want = _rows_oracle(x, w_bad, t)
    _same_nonfinite(y, want, "y")
    torch.testing.assert_close(y[want.isfinite()], want[want.isfinite()])
    assert torch.equal(y[clean], AR.act_sparse_matmul(x, w_t.t(), tt)[clean])
    assert y.isinf().any() and y.isnan().any()
    # the N:M variant and the gated intermediate follow the same rule
    w_nm = nm_compress(w_t, 2, 4)
    w_nm_bad = st.NMTensor(poison(w_nm.values), w_nm.indices, w_nm.shape, 2, 4)
    _same_nonfinite(AR.act_sparse_nm_matmul(x, w_nm_bad, tt), _rows_oracle(x, w_nm_bad.to_dense(), t), "y (N:M)")
    h = AR.act_sparse_gate_up(x, w_bad.t(), w_t.t(), tt, "relu")
    assert torch.equal(h[clean], AR.act_sparse_gate_up(x, w_t.t(), w_t.t(), tt, "relu")[clean])


CFG = AK.ActSparseConfig
KERNEL_CONFIGS = {
    "gemv": CFG(BM=1, BN=64, BK=32),
    "sum4-split2": CFG(BM=4, BN=32, BK=16, SPLIT=2),
    "dot16-split2": CFG(BM=16, BN=64, BK=32, SPLIT=2, USE_DOT=True),
    "interpret": AK.INTERPRET_CONFIG,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", list(KERNEL_CONFIGS))
def test_act_kernel_mm_inactive_weights(cfg, dtype, device):
    """Rows sharing a tile read the weight rows of inputs active in any of them (the union rule): a
    poisoned row must still reach only the rows where its input is active."""
    cfg = KERNEL_CONFIGS[cfg]
    if cfg.USE_DOT and dtype == torch.float32:
        pytest.skip("tensor-core configs are fp16/bf16 only (the launcher rejects them for fp32)")
    M = 1 if cfg.BM == 1 else 6  # a GEMV config's tile holds one row: only inactive-everywhere rows apply
    x, t, w_t, poison, clean = _act_case(M, 48, 40, dtype, device, seed=1)
    w_bad, tt = poison(w_t), torch.tensor(t, device=device)
    y0 = AK.act_sparse_mm(x, w_t, tt, config=cfg)
    y = AK.act_sparse_mm(x, w_bad, tt, config=cfg)
    # a row the union rule leaked into is recomputed on its own: the clean run's values up to rounding
    assert_close(y[clean], y0[clean].double(), x.shape[1])
    want = _rows_oracle(x, w_bad, t)
    _same_nonfinite(y, want, "y")
    assert_close(y.cpu()[want.isfinite()], want[want.isfinite()], x.shape[1])


@pytest.mark.parametrize("cfg", ["sum4-split2", "interpret"])
def test_act_kernel_nm_inactive_weights(cfg, device):
    cfg = KERNEL_CONFIGS[cfg]
    n, m, N = 2, 4, 32
    x, t, w_t, poison, clean = _act_case(6, 48, N, torch.float32, device, seed=2)
    w_nm = nm_compress(w_t, n, m)
    bad_values = poison(w_nm.values)  # rows of the compressed W^T are input channels
    tt = torch.tensor(t, device=device)
    y0 = AK.act_sparse_nm_mm(x, w_nm.values, w_nm.indices, n, m, N, tt, config=cfg)
    y = AK.act_sparse_nm_mm(x, bad_values, w_nm.indices, n, m, N, tt, config=cfg)
    assert_close(y[clean], y0[clean].double(), x.shape[1])
    want = _rows_oracle(x, st.NMTensor(bad_values, w_nm.indices, w_nm.shape, n, m).to_dense(), t)
    _same_nonfinite(y, want, "y")
    assert (~want.isfinite()).any()


@pytest.mark.parametrize("cfg", ["sum4-split2", "dot16-split2", "interpret"])
def test_act_kernel_gate_up_inactive_weights(cfg, device):
    cfg = KERNEL_CONFIGS[cfg]
    dtype = torch.float16 if cfg.USE_DOT else torch.float32
    x, t, w_t, poison, clean = _act_case(6, 48, 32, dtype, device, seed=3)
    w_bad, tt = poison(w_t), torch.tensor(t, device=device)
    h0 = AK.act_sparse_gate_up(x, w_t, w_t, tt, "relu", config=cfg)
    # h = relu(g) * u: an error in g is scaled by u and the other way round
    scale = AR.act_sparse_matmul(x.double(), w_t.double().t(), tt).abs().max().item()
    for wg, wu in ((w_t, w_bad), (w_bad, w_t)):  # poison in the up projection, then in the gate
        h = AK.act_sparse_gate_up(x, wg, wu, tt, "relu", config=cfg)
        assert_close(h[clean], h0[clean].double(), x.shape[1], scale=scale)
        want = AR.act_sparse_gate_up(x.double().cpu(), wg.double().t().cpu(), wu.double().t().cpu(), tt.cpu(),
                                     "relu")
        _same_nonfinite(h, want, "h")


def test_act_ops_follow_the_rule(device):
    """The ops on the CPU tier (interpreted kernels up to 64 rows; the reference for float64): linear and
    the fused MLP, with inf/NaN weights of inputs inactive in the rows checked."""
    x, t, w_t, poison, clean = _act_case(5, 64, 48, torch.float32, device, seed=5)
    w_bad = poison(w_t)
    y = st.act_sparse_linear(x, w_bad.t(), t)
    assert_close(y[clean], st.act_sparse_linear(x, w_t.t(), t)[clean].double(), x.shape[1])
    _same_nonfinite(y, _rows_oracle(x, w_bad, t), "act_sparse_linear")
    y64 = st.act_sparse_linear(x.double(), w_bad.t().double(), t)  # float64 runs the reference
    _same_nonfinite(y64, _rows_oracle(x, w_bad, t), "act_sparse_linear fp64")
    # The MLP: poison in the w_gate / w_up columns of inputs inactive in every row, and in the w_down
    # columns of intermediates inactive in every row.
    H, I_, t_mid = 64, 48, 0.3
    g = torch.Generator().manual_seed(6)
    wg, wu = (torch.randn(I_, H, generator=g).to(device) / 8 for _ in range(2))
    wd = torch.randn(H, I_, generator=g).to(device)
    wg, wu, wd = (ops_act.input_major(w) for w in (wg, wu, wd))  # the kernels' layout (else: dense, below)
    off_in = ~AR.active(x, torch.tensor(t)).cpu().any(0)
    h = AR.act_sparse_gate_up(x, wg, wu, torch.tensor(t), "silu")
    off_mid = ~AR.active(h, torch.tensor(t_mid)).cpu().any(0)
    assert off_in.any() and off_mid.any()
    wg_bad, wu_bad, wd_bad = (ops_act.input_major(w.clone()) for w in (wg, wu, wd))
    wg_bad[:, off_in] = INF
    wu_bad[:, off_in] = NAN
    wd_bad[:, off_mid] = NAN
    y0 = st.act_sparse_mlp(x, wg, wu, wd, t, t_mid, "silu")
    y1 = st.act_sparse_mlp(x, wg_bad, wu_bad, wd_bad, t, t_mid, "silu")
    assert_close(y1, y0.double(), I_, scale=max(1.0, h.abs().max().item()))  # products h * w_down


@pytest.mark.parametrize("rows", [5, 70], ids=["row-major", "past-64-rows"])
def test_act_dense_path_follows_the_rule(rows, device):
    """The masked dense product (a weight not stored input-major; more rows than the kernels take) follows
    the same rule: ``F.linear(x * (|x| > t), W)`` would be NaN in every row here (``0 * inf``)."""
    x, t, w_t, poison, clean = _act_case(rows, 64, 48, torch.float32, device, seed=5)
    w_bad = poison(w_t).t().contiguous()  # [N, K] row-major: not input-major
    formula = torch.nn.functional.linear(AR.masked(x, torch.tensor(t, device=device)), w_bad)
    assert formula.isnan().all()
    want = AR.act_sparse_matmul(x.double(), w_bad.double(), torch.tensor(t))
    for w in (w_bad, ops_act.input_major(w_bad)):
        y = st.act_sparse_linear(x, w, t)
        _same_nonfinite(y, want, "dense")
        assert y[clean].isfinite().all()
        fin = want.isfinite()
        assert_close(y[fin], want[fin], 64)


def test_act_fix_up_runs_only_for_weights_not_known_finite(device, monkeypatch):
    """A weight found finite (once per version) skips the kernels' fix-up launch; a write that bumps the
    version, or clear_weight_cache after a ``.data`` write, brings it back."""
    from sparse_triton.kernels import act_sparse as K
    from sparse_triton.ops import _prepared

    launches = []
    real = K._fix
    monkeypatch.setattr(K, "_fix", lambda *a, **k: (launches.append(1), real(*a, **k))[1])
    x, t, w_t, poison, clean = _act_case(5, 64, 48, torch.float32, device, seed=5)
    w = ops_act.input_major(w_t.t().contiguous())
    assert K.INTERPRET_CONFIG.BM > 1  # multi-row tiles: the union rule, where a leak can be
    y = st.act_sparse_linear(x, w, t)
    assert launches == []  # finite weight: no fix-up
    want = AR.act_sparse_matmul(x.double(), w.double(), torch.tensor(t))
    assert_close(y, want, 64)
    with torch.no_grad():
        w.copy_(poison(w_t).t())  # in place: a new version
    y = st.act_sparse_linear(x, w, t)
    assert launches, "the fix-up must run for a weight holding inf/NaN"
    _same_nonfinite(y, AR.act_sparse_matmul(x.double(), w.double(), torch.tensor(t)), "after a poisoning write")
    with torch.no_grad():
        w.copy_(w_t.t())
    launches.clear()
    st.act_sparse_linear(x, w, t)
    assert launches == []
    w.data.copy_(poison(w_t).t())  # invisible to the version counter: the documented clear_weight_cache
    _prepared.clear_weight_cache(w)
    _same_nonfinite(st.act_sparse_linear(x, w, t), AR.act_sparse_matmul(x.double(), w.double(), torch.tensor(t)),
                    "after clear_weight_cache")
    assert launches
