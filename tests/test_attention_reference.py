"""reference/attention.py: the block-sparse attention definition vs a row-by-row fp64 computation, GQA,
empty rows (o = 0, lse = -inf, finite gradients), and the analytic backward vs autograd."""

import math

import pytest
import torch

from sparse_triton.formats.block_mask import BlockMask
from sparse_triton.reference.attention import attention_bwd, attention_decode, attention_fwd, dense_attention


def row_by_row(q, k, v, allowed, scale):
    """fp64, softmax written out per (b, h): ``p = exp(s - max) * allowed``, ``o = p @ v / sum(p)``; rows with
    no allowed key are left at o = 0, lse = -inf. No -inf tricks, no shared code with the reference."""
    B, Hq, Sq, D = q.shape
    g = Hq // k.shape[1]
    allowed = allowed.expand(B, Hq, Sq, k.shape[2])
    o = torch.zeros(B, Hq, Sq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            a = allowed[b, h]
            rows = a.any(1)
            s = (q[b, h].double() @ k[b, h // g].double().T) * scale
            mx = torch.stack([s[i][a[i]].max() if rows[i] else s.new_zeros(()) for i in range(Sq)])
            p = torch.exp(s - mx[:, None]) * a
            den = p.sum(1)
            o[b, h, rows] = (p @ v[b, h // g].double())[rows] / den[rows, None]
            lse[b, h, rows] = (mx + torch.log(den))[rows]
    return o, lse


def masks(B, Hq, Sq, Skv):
    """Named masks for (Sq, Skv): block 32 x 64 or 64 x 64, broadcast B=1/H=1 and full B x Hq."""
    NQ, NKV = -(-Sq // 64), -(-Skv // 64)
    out = {
        "causal": lambda: BlockMask.causal((Sq, Skv), (32, 64)),
        "sliding-bidir": lambda: BlockMask.sliding_window((Sq, Skv), 40, 64, causal=False),
        "dense-BxH": lambda: BlockMask.from_dense(torch.rand(B, Hq, NQ, NKV) > 0.4, 64, seq_lens=(Sq, Skv)),
        "topk-H": lambda: BlockMask.topk(torch.randn(1, Hq, NQ, NKV), 2, block_size=64, seq_lens=(Sq, Skv),
                                         causal=True),
        "document-B": lambda: BlockMask.document(torch.sort(torch.randint(0, 3, (B, Sq))).values, 64, causal=True),
    }
    return out


CASES = [(2, 2, 2, 130, 130, 32), (1, 4, 2, 100, 150, 16), (2, 2, 1, 70, 40, 32)]
CIDS = ["B2-H2-130", "gqa-H4:2-100x150", "mqa-H2:1-70x40"]
FWD = [(c, cid, name) for c, cid in zip(CASES, CIDS)
       for name in ("causal", "sliding-bidir", "dense-BxH", "topk-H", "document-B") if name != "document-B" or
       c[3] == c[4]]


@pytest.mark.parametrize("case,name", [(c, n) for c, _, n in FWD], ids=[f"{n}-{cid}" for _, cid, n in FWD])
def test_fwd_matches_row_by_row(case, name):
    B, Hq, Hkv, Sq, Skv, D = case
    m = masks(B, Hq, Sq, Skv)[name]()
    q, k, v = (torch.randn(B, h, s, D, dtype=torch.float64) for h, s in ((Hq, Sq), (Hkv, Skv), (Hkv, Skv)))
    scale = 0.7 / math.sqrt(D)
    o, lse = attention_fwd(q, k, v, m, scale, causal=False)
    o_ref, lse_ref = row_by_row(q, k, v, m.element_mask(), scale)
    assert o.dtype == torch.float64 and lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lse_ref.float(), atol=1e-5, rtol=1e-6)
    od, lsed = attention_decode(q, k, v, m, scale, causal=False)
    assert torch.equal(od, o) and torch.equal(lsed, lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=str)
def test_fwd_low_precision_computes_in_fp32(dtype):
    B, H, S, D = 1, 2, 96, 32
    q, k, v = (torch.randn(B, H, S, D).to(dtype) for _ in range(3))
    m = BlockMask.causal(S, 32)
    o, lse = attention_fwd(q, k, v, m, None, causal=False)
    assert o.dtype == dtype and lse.dtype == torch.float32
    o_ref, lse_ref = row_by_row(q, k, v, m.element_mask(), 1 / math.sqrt(D))
    # computed in fp32 from the rounded inputs: the final cast to dtype (or fp32 rounding) is the only error
    tol = max(torch.finfo(dtype).eps, 2e-6)
    torch.testing.assert_close(o.double(), o_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)


def test_causal_flag_ands_into_the_mask_and_scale_default():
    S, D = 80, 16
    q, k, v = (torch.randn(1, 2, S, D, dtype=torch.float64) for _ in range(3))
    m = BlockMask.from_dense(torch.ones(3, 3, dtype=torch.bool), 32, seq_lens=(S, S))
    o, lse = attention_fwd(q, k, v, m, None, causal=True)
    o_ref, lse_ref = row_by_row(q, k, v, torch.ones(S, S, dtype=torch.bool).tril(), 1 / math.sqrt(D))
    torch.testing.assert_close(o, o_ref)
    # mask.causal alone gives the same answer
    o2, _ = attention_fwd(q, k, v, BlockMask.causal(S, 32), None, causal=False)
    torch.testing.assert_close(o2, o_ref)
    # no mask at all: dense attention
    o3, _ = attention_fwd(q, k, v, None, None, causal=False)
    torch.testing.assert_close(o3, row_by_row(q, k, v, torch.ones(S, S, dtype=torch.bool), 1 / math.sqrt(D))[0])


def empty_rows_mask():
    """Query block 1 (rows 32..63) has no kv block; rows of block 2 are empty under causal (kv block 2 only)."""
    tiles = torch.tensor([[True, False, False], [False, False, False], [False, False, True]])
    return BlockMask.from_dense(tiles, 32, seq_lens=(90, 90))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_empty_rows_zero_output_neg_inf_lse_finite_grads(dtype):
    m = empty_rows_mask()
    q, k, v = (torch.randn(1, 2, 90, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    o, lse = attention_fwd(q, k, v, m, 0.25, causal=False)
    assert torch.equal(o[:, :, 32:64], torch.zeros_like(o[:, :, 32:64]))
    assert torch.isneginf(lse[:, :, 32:64]).all() and torch.isfinite(lse[:, :, :32]).all()
    assert not o.isnan().any()
    do = torch.randn_like(o)
    grads = torch.autograd.grad((o * do).sum() + torch.where(lse.isfinite(), lse, 0).sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, m, 0.25, causal=False)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :, 32:64], torch.zeros_like(dq[:, :, 32:64]))
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype, dtype, dtype)


def test_all_rows_empty_and_zero_length():
    q = torch.randn(1, 1, 40, 8)
    m = BlockMask.from_dense(torch.zeros(2, 2, dtype=torch.bool), 32, seq_lens=(40, 40))
    o, lse = attention_fwd(q, q, q, m, None)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()
    k0 = torch.randn(1, 1, 0, 8)
    o, lse = attention_fwd(q, k0, k0, None, None)
    assert o.shape == q.shape and torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()
    dq, dk, dv = attention_bwd(torch.ones_like(q), q, k0, k0, o, lse, None, None)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == dv.shape == k0.shape


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Skv,D", CASES, ids=CIDS)
@pytest.mark.parametrize("name", ["causal", "sliding-bidir", "dense-BxH", "topk-H"])
def test_bwd_matches_autograd(B, Hq, Hkv, Sq, Skv, D, name):
    m = masks(B, Hq, Sq, Skv)[name]()
    q = torch.randn(B, Hq, Sq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Skv, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Skv, D, dtype=torch.float64, requires_grad=True)
    o, lse = attention_fwd(q, k, v, m, 0.3, causal=name == "sliding-bidir")
    do = torch.randn_like(o)
    expected = torch.autograd.grad(o, (q, k, v), do)
    got = attention_bwd(do, q, k, v, o, lse, m, 0.3, causal=name == "sliding-bidir")
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)


def test_bwd_gqa_sums_over_query_heads():
    q = torch.randn(1, 4, 33, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 33, 8, dtype=torch.float64)
    v = torch.randn(1, 1, 33, 8, dtype=torch.float64)
    do = torch.randn(1, 4, 33, 8, dtype=torch.float64)
    m = BlockMask.causal(33, 16)
    o, lse = attention_fwd(q, k, v, m, None)
    _, dk, dv = attention_bwd(do, q, k, v, o, lse, m, None)
    k4, v4 = k.expand(1, 4, 33, 8), v.expand(1, 4, 33, 8)
    _, dk4, dv4 = attention_bwd(do, q, k4, v4, o, lse, m, None)
    torch.testing.assert_close(dk, dk4.sum(1, keepdim=True))
    torch.testing.assert_close(dv, dv4.sum(1, keepdim=True))


def test_dense_attention_matches_sdpa():
    q, k, v = (torch.randn(2, 3, 20, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(20, 20) > 0.3
    mask[:, 0] = True
    o, lse = dense_attention(q, k, v, mask, 0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)
    torch.testing.assert_close(o, ref)
    assert lse.dtype == torch.float64


def test_errors_name_the_argument():
    q = torch.randn(1, 4, 32, 8)
    k = torch.randn(1, 3, 32, 8)
    with pytest.raises(ValueError, match=r"attention_fwd: q heads \(4\) must be a multiple of k/v heads \(3\)"):
        attention_fwd(q, k, k, None, None)
    with pytest.raises(ValueError, match="attention_fwd: q must be 4-D"):
        attention_fwd(q[0], k, k, None, None)
    with pytest.raises(ValueError, match="attention_fwd: k and v must have the same shape"):
        attention_fwd(q, q, q[:, :, :8], None, None)
    with pytest.raises(ValueError, match="attention_fwd: block_mask is for"):
        attention_fwd(q, q, q, BlockMask.causal(64, 32), None)
    with pytest.raises(ValueError, match="attention_bwd: do.shape"):
        attention_bwd(q[:, :2], q, q, q, q, None, None, None)
