"""Block-sparse attention: the prefill kernels (forward, dQ, dK/dV) and the public op against an fp64
reference, every mask family, ragged lengths, empty rows, GQA, causal flags, compile and opcheck.

CPU tier: kernels run under Triton's interpreter at small shapes (B * H <= 2 per kv head group, S <= 256).
"""

from __future__ import annotations

import math

import pytest
import torch
from kit import assert_within_own_error, tf32

import sparse_triton as st
from sparse_triton.kernels import attention as K
from sparse_triton.reference import attention as R

INF = float("inf")


def _qkv(B, Hq, Hkv, Sq, Skv, D, dtype, device, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=g).to(device, dtype)
    return q, k, v


def _masks(Sq: int, Skv: int, bs: int, device):
    """name -> (BlockMask, op causal flag), one per mask family; every one leaves some rows with keys."""
    g = torch.Generator().manual_seed(1)
    nq, nk = math.ceil(Sq / bs), math.ceil(Skv / bs)
    rand = torch.rand(1, 2, nq, nk, generator=g) > 0.4
    rand[..., 0, :] = False  # query block 0 reads nothing: o = 0, lse = -inf
    scores = torch.randn(1, 1, nq, nk, generator=g)
    docs = torch.tensor([0] * (Sq // 3) + [1] * (Sq // 3 + 5) + [2] * (Sq - 2 * (Sq // 3) - 5))
    out = {
        "random": (st.BlockMask.from_dense(rand.to(device), bs, (Sq, Skv)), False),
        "random+op_causal": (st.BlockMask.from_dense(rand.to(device), bs, (Sq, Skv)), True),
        "topk": (st.BlockMask.topk(scores.to(device), 2, block_size=bs, seq_lens=(Sq, Skv)), False),
    }
    if Sq == Skv:
        out["causal"] = (st.BlockMask.causal(Sq, bs, device=device), False)
        out["sliding_window"] = (st.BlockMask.sliding_window(Sq, 45, bs, device=device), False)
        out["window_noncausal"] = (st.BlockMask.sliding_window(Sq, 40, bs, causal=False, device=device), False)
        out["document_causal"] = (st.BlockMask.document(docs.to(device), bs, causal=True), False)
    return out



def _run(q, k, v, bm, causal, dtype):
    """Kernel forward + backward against the fp64 reference and PyTorch's own ``dtype`` computation."""
    D = q.shape[-1]
    scale = D ** -0.5
    o, lse = K.attention_fwd(q, k, v, bm, scale, causal)
    do = torch.randn_like(o)
    dq, dk, dv = K.attention_bwd(do, q, k, v, o, lse, bm, scale, causal)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = R.attention_fwd(q64, k64, v64, bm, scale, causal)
    rdq, rdk, rdv = R.attention_bwd(do.double(), q64, k64, v64, ro, rl, bm, scale, causal)
    # PyTorch's own error: the same dense masked attention computed in ``dtype``
    allowed = R.effective_element_mask(bm, causal, *q.shape[:3], k.shape[2], q.device)
    qo, ko, vo = (t.detach().clone().requires_grad_() for t in (q, k, v))
    G = q.shape[1] // k.shape[1]
    own_o, _ = R.dense_attention(qo, ko.repeat_interleave(G, 1), vo.repeat_interleave(G, 1), allowed, scale)
    own_o.backward(do)

    assert_within_own_error(o, ro, own_o, dtype, "o")
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin), "lse is -inf exactly where a query has no allowed key"
    assert (lse[~fin] == -INF).all() and (o[~fin] == 0).all()
    assert (lse[fin].double() - rl[fin]).abs().max().item() <= 1e-4 * max(1.0, rl[fin].abs().max().item())
    assert_within_own_error(dq, rdq, qo.grad, dtype, "dq")
    assert_within_own_error(dk, rdk, ko.grad, dtype, "dk")
    assert_within_own_error(dv, rdv, vo.grad, dtype, "dv")
    for t in (o, dq, dk, dv):
        assert torch.isfinite(t).all()
    return o, lse


@pytest.mark.parametrize("mask_name", ["random", "random+op_causal", "topk", "causal", "sliding_window",
                                       "window_noncausal", "document_causal"])
def test_kernels_match_reference_per_mask(mask_name, device):
    # ragged S (not a multiple of the block), GQA 2:1, every mask family
    S, D, bs = 200, 64, 64
    bm, causal = _masks(S, S, bs, device)[mask_name]
    q, k, v = _qkv(1, 2, 1, S, S, D, torch.float32, device)
    _run(q, k, v, bm, causal, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("D", [32, 64])
def test_dtypes_and_head_dims(dtype, D, device):
    S = 130
    q, k, v = _qkv(1, 1, 1, S, S, D, dtype, device, gen_seed=D)
    _run(q, k, v, st.BlockMask.causal(S, 64, device=device), False, dtype)


def test_cross_attention_lengths_differ(device):
    # Sq != Skv, ragged both, non-square mask blocks (64 x 128) with 64 x 64 tiles: a tile is half a block
    Sq, Skv = 100, 300
    g = torch.Generator().manual_seed(3)
    sel = torch.rand(1, 1, 2, 3, generator=g) > 0.3
    sel[0, 0, 1, 2] = True
    bm = st.BlockMask.from_dense(sel.to(device), (64, 128), (Sq, Skv))
    q, k, v = _qkv(1, 2, 2, Sq, Skv, 32, torch.float32, device)
    _run(q, k, v, bm, False, torch.float32)


def test_mqa_and_per_head_masks(device):
    # 2 query heads on 1 kv head (MQA), a different mask per query head, batch 2 with a batch-1 mask
    S = 128
    g = torch.Generator().manual_seed(4)
    sel = torch.rand(1, 2, 2, 2, generator=g) > 0.5
    sel[0, 0] = True
    bm = st.BlockMask.from_dense(sel.to(device), 64, (S, S))
    q, k, v = _qkv(2, 2, 1, S, S, 32, torch.float32, device)
    _run(q, k, v, bm, True, torch.float32)


def test_all_blocks_masked_gives_zero_not_nan(device):
    S = 96
    bm = st.BlockMask.from_dense(torch.zeros(1, 1, 2, 2, dtype=torch.bool, device=device), 64, (S, S))
    q, k, v = _qkv(1, 1, 1, S, S, 32, torch.float32, device)
    o, lse = K.attention_fwd(q, k, v, bm, 0.2, False)
    assert (o == 0).all() and (lse == -INF).all()
    dq, dk, dv = K.attention_bwd(torch.randn_like(o), q, k, v, o, lse, bm, 0.2, False)
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def test_hand_made_full_blocks_on_tail_and_diagonal(device):
    # A hand-made mask that marks the ragged tail block and the diagonal blocks *full* while the op asks
    # for causal: the kernels' per-tile checks must still mask them.
    S, nb = 150, 3
    full_cnt = torch.full((1, 1, nb), nb, dtype=torch.int32)
    full_idx = torch.arange(nb, dtype=torch.int32).expand(1, 1, nb, nb).contiguous()
    bm = st.BlockMask(torch.zeros(1, 1, nb, dtype=torch.int32), torch.zeros(1, 1, nb, nb, dtype=torch.int32),
                      full_cnt, full_idx, block_size=64, seq_lens=(S, S)).to(device)
    q, k, v = _qkv(1, 1, 1, S, S, 32, torch.float32, device)
    _run(q, k, v, bm, True, torch.float32)
    _run(q, k, v, bm, False, torch.float32)


def test_outputs_fully_written(device):
    # o and lse come from torch.empty: a tile the kernel forgot would hold garbage; poison the allocator
    S = 128
    torch.full((1 << 16,), float("nan"), device=device)  # recycled memory is NaN on the caching allocator
    q, k, v = _qkv(1, 2, 2, S, S, 32, torch.float32, device)
    bm = st.BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool, device=device), 64, (S, S))
    o, lse = K.attention_fwd(q, k, v, bm, 0.1, False)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()


# ---------------------------------------------------------------------------------------------------
# the public op


def test_op_forward_backward_and_lse(device):
    S, D = 160, 32
    bm = st.BlockMask.sliding_window(S, 70, 64, device=device)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, S, S, D, torch.float32, device))
    o, lse = st.block_sparse_attention(q, k, v, bm, return_lse=True)
    assert not lse.requires_grad
    o.square().sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = R.attention_fwd(q64, k64, v64, bm, D ** -0.5, False)
    ro.square().sum().backward()
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, rl.float(), atol=2e-5, rtol=2e-5)
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_op_scale_and_causal_flag(device):
    S, D = 128, 32
    bm = st.BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool, device=device), 64, (S, S))
    q, k, v = _qkv(1, 1, 1, S, S, D, torch.float32, device)
    o = st.block_sparse_attention(q, k, v, bm, scale=0.3, causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(o, want, atol=2e-5, rtol=2e-5)


def test_op_under_no_grad_and_inference_mode(device):
    S = 64
    bm = st.BlockMask.causal(S, 64, device=device)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 1, 1, S, S, 32, torch.float32, device))
    with torch.no_grad():
        a = st.block_sparse_attention(q, k, v, bm)
    with torch.inference_mode():
        b = st.block_sparse_attention(q, k, v, bm)
    assert not a.requires_grad
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_opcheck(device):
    S = 64
    bm = st.BlockMask.causal(S, 64, device=device)
    q, k, v = _qkv(1, 2, 1, S, S, 32, torch.float32, device)
    parts = bm._parts()
    torch.library.opcheck(torch.ops.sparse_triton.block_sparse_attention_fwd,
                          (q, k, v, parts, 64, 64, True, 0.2, False),
                          test_utils=("test_schema", "test_faketensor"))
    o, lse = torch.ops.sparse_triton.block_sparse_attention_fwd(q, k, v, parts, 64, 64, True, 0.2, False)
    torch.library.opcheck(torch.ops.sparse_triton.block_sparse_attention_bwd,
                          (torch.randn_like(o), q, k, v, o, lse, parts, 64, 64, True, 0.2, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph(device):
    S = 64
    bm = st.BlockMask.causal(S, 64, device=device)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, S, S, 32, torch.float32, device))

    def f(q, k, v):
        return st.block_sparse_attention(q, k, v, bm).sum()

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    (gq,) = torch.autograd.grad(compiled(q, k, v), q)
    (wq,) = torch.autograd.grad(f(q, k, v), q)
    torch.testing.assert_close(gq, wq, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------
# bad input


def _good(device):
    S = 64
    q, k, v = _qkv(1, 2, 1, S, S, 32, torch.float32, device)
    return q, k, v, st.BlockMask.causal(S, 64, device=device)


@pytest.mark.parametrize("case, exc, match", [
    ("rank", ValueError, "q must be 4-D"),
    ("head_dim", ValueError, "head dim mismatch"),
    ("gqa", ValueError, "not a multiple"),
    ("seq_lens", ValueError, "block_mask was built for seq_lens"),
    ("heads", ValueError, "block_mask has H=3"),
    ("block_size", ValueError, "block_size=\\(256, 256\\) is not supported"),
    ("block_size_odd", ValueError, "block_size=\\(48, 48\\) is not supported"),
    ("dtype", TypeError, "dtype mismatch"),
    ("mask_type", TypeError, "block_mask must be a sparse_triton.BlockMask"),
    ("unsupported_d", ValueError, "head dim D=48 is not supported"),
    ("kv_shape", ValueError, "k and v must have the same shape"),
])
def test_bad_input(case, exc, match, device):
    q, k, v, bm = _good(device)
    if case == "rank":
        q = q[0]
    elif case == "head_dim":
        k, v = k[..., :16], v[..., :16]
    elif case == "gqa":
        k, v = torch.cat([k, k], 1), torch.cat([v, v], 1)
        q = torch.cat([q, q[:, :1]], 1)
    elif case == "seq_lens":
        bm = st.BlockMask.causal(128, 64, device=device)
    elif case == "heads":
        bm = st.BlockMask.from_dense(torch.ones(1, 3, 1, 1, dtype=torch.bool, device=device), 64, (64, 64))
    elif case == "block_size":
        bm = st.BlockMask.causal(64, 256, device=device)
    elif case == "block_size_odd":
        bm = st.BlockMask.causal(64, 48, device=device)
    elif case == "dtype":
        k = k.half()
    elif case == "mask_type":
        bm = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    elif case == "unsupported_d":
        q, k, v = q[..., :48].contiguous(), k[..., :48].contiguous(), v[..., :48].contiguous()
        q, k, v = (torch.cat([t, t], -1)[..., :48] for t in (q, k, v))
    elif case == "kv_shape":
        v = v[:, :, :32]
    with pytest.raises(exc, match=match):
        st.block_sparse_attention(q, k, v, bm)


def test_device_mismatch_is_named():
    q, k, v, bm = _good("cpu")
    with pytest.raises(ValueError, match="device mismatch, block_mask is on meta"):
        st.block_sparse_attention(q, k, v, bm.to("meta"))


def test_unsupported_configs_are_reported():
    q = torch.zeros(1, 1, 4, 48)
    assert "head dim 48" in K.unsupported(q, st.BlockMask.causal(4, 64))
    assert "block_size" in K.unsupported(torch.zeros(1, 1, 4, 64), st.BlockMask.causal(4, 256))
    assert K.unsupported(torch.zeros(1, 1, 4, 64), st.BlockMask.causal(4, 64)) is None
    # fp32 at D = 256 needs TF32 (3xTF32 tiles of that width spill); fp16 does not
    with tf32(False):
        assert "without TF32" in K.unsupported(torch.zeros(1, 1, 4, 256), st.BlockMask.causal(4, 64))
    with tf32(True):
        assert K.unsupported(torch.zeros(1, 1, 4, 256), st.BlockMask.causal(4, 64)) is None
    assert K.unsupported(torch.zeros(1, 1, 4, 256, dtype=torch.float16), st.BlockMask.causal(4, 64)) is None


def test_decode_path_matches_prefill_path(device):
    # few queries (Sq = 4, GQA 4:2) over 300 keys: the op takes the split-kv decode kernel; the prefill
    # kernel on the same data and mask must agree
    from sparse_triton.kernels import attention_decode as DK
    from sparse_triton.ops import attention as ops_attention

    Sq, Skv, D = 4, 300, 32
    g = torch.Generator().manual_seed(5)
    sel = torch.rand(1, 1, 1, math.ceil(Skv / 64), generator=g) > 0.4
    sel[..., -1] = True
    bm = st.BlockMask.from_dense(sel.to(device), 64, (Sq, Skv))
    q, k, v = _qkv(1, 4, 2, Sq, Skv, D, torch.float32, device)
    assert ops_attention._path(q, k, bm) == "decode"
    o_dec, lse_dec = DK.attention_decode(q, k, v, bm, D ** -0.5, False)
    o_pre, lse_pre = K.attention_fwd(q, k, v, bm, D ** -0.5, False)
    torch.testing.assert_close(o_dec, o_pre, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse_dec, lse_pre, atol=2e-5, rtol=2e-5)
    o_op, lse_op = st.block_sparse_attention(q, k, v, bm, return_lse=True)
    torch.testing.assert_close(o_op, o_dec, atol=0, rtol=0)


def test_small_blocks_are_decode_only(device):
    # 16-key blocks: the op runs them through the decode kernel, and refuses prefill or training with them
    Sq, Skv, D = 2, 100, 32
    sel = torch.ones(1, 1, 1, math.ceil(Skv / 16), dtype=torch.bool, device=device)
    sel[..., 1] = False
    bm = st.BlockMask.from_dense(sel, (16, 16), (Sq, Skv))
    q, k, v = _qkv(1, 2, 1, Sq, Skv, D, torch.float32, device)
    o = st.block_sparse_attention(q, k, v, bm)
    want, _ = R.attention_fwd(q.double(), k.double(), v.double(), bm, D ** -0.5, False)
    torch.testing.assert_close(o.double(), want, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="decode-only"):
        st.block_sparse_attention(q.requires_grad_(), k, v, bm)
    big = st.BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool, device=device), (16, 16), (32, 32))
    q2, k2, v2 = _qkv(1, 1, 1, 32, 32, D, torch.float32, device)
    with pytest.raises(ValueError, match="decode-only"):
        st.block_sparse_attention(q2, k2, v2, big)


# ---------------------------------------------------------------------------------------------------
# GPU tier: bf16 (the interpreter computes it wrongly), compiled tiles at real block sizes, CUDA graphs


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("mask_name", ["random+op_causal", "sliding_window", "document_causal"])
def test_gpu_bf16_and_block_128(mask_name, D, device):
    S = 700
    bm, causal = _masks(S, S, 128, device)[mask_name]
    q, k, v = _qkv(2, 2, 1, S, S, D, torch.bfloat16, device)
    _run(q, k, v, bm, causal, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(device):
    S, D = 1024, 128
    bm = st.BlockMask.causal(S, 128, device=device)
    q, k, v = _qkv(1, 8, 2, S, S, D, torch.float16, device)
    dec_q = q[:, :, :4].contiguous()
    dec_mask = st.BlockMask.from_dense(torch.ones(1, 1, 1, S // 64, dtype=torch.bool, device=device), 64, (4, S))
    want = st.block_sparse_attention(q, k, v, bm)
    want_dec = st.block_sparse_attention(dec_q, k, v, dec_mask)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = st.block_sparse_attention(q, k, v, bm)
        got_dec = st.block_sparse_attention(dec_q, k, v, dec_mask)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got_dec, want_dec, atol=0, rtol=0)
