"""kernels/block_scores.py vs its reference twin vs a straightforward fp64 computation."""

import math

import pytest
import torch
from kit import assert_within_bound

from sparse_triton.kernels import block_scores as kernel
from sparse_triton.reference import block_scores as reference

DTYPES = [torch.float16, torch.float32]
# (B, Hq, Hkv, Sq, Skv, D, block_size): ragged lengths, GQA, BQ != BK, every head-dim family
CASES = [
    (1, 2, 1, 81, 81, 64, 32),
    (2, 1, 1, 64, 64, 32, 16),
    (1, 2, 2, 100, 49, 96, (64, 16)),
    (1, 4, 2, 33, 130, 128, (16, 128)),
    (1, 1, 1, 17, 17, 256, 32),
    (1, 2, 1, 1, 20, 64, 16),
]
IDS = [f"B{c[0]}Hq{c[1]}Hkv{c[2]}-{c[3]}x{c[4]}-D{c[5]}-bs{c[6]}" for c in CASES]


def _straightforward(q, k, bq, bk, scale, causal):
    """Block by block in fp64: the definition, written out."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    nq, nkv = math.ceil(Sq / bq), math.ceil(Skv / bk)
    out = torch.empty(B, Hq, nq, nkv, dtype=torch.float64)
    q, k = q.double().cpu(), k.double().cpu()
    for b in range(B):
        for h in range(Hq):
            for i in range(nq):
                qm = q[b, h, i * bq:(i + 1) * bq].mean(0)
                for j in range(nkv):
                    km = k[b, h // (Hq // Hkv), j * bk:(j + 1) * bk].mean(0)
                    above = j * bk > (i + 1) * bq - 1
                    out[b, h, i, j] = float("-inf") if causal and above else scale * (qm @ km)
    return out


def _bound(q, k, bq, bk, scale):
    """fp32 error bound: (pooling + dot reduction lengths) x eps x the sum of |terms|."""
    qa = reference.block_scores(q.abs().double().cpu(), k.abs().double().cpu(), (bq, bk), scale=1.0)
    return (bq + bk + q.shape[-1]) * 2.0 ** -23 * abs(scale) * qa + 1e-7


def _inputs(B, Hq, Hkv, Sq, Skv, D, dtype, device):
    q = torch.randn(B, Hq, Sq, D, dtype=dtype, device=device) + 0.5  # a mean away from zero: real scores
    k = torch.randn(B, Hkv, Skv, D, dtype=dtype, device=device) + 0.5
    return q, k


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Skv,D,bs", CASES, ids=IDS)
def test_kernel_matches_reference_and_fp64(B, Hq, Hkv, Sq, Skv, D, bs, dtype, causal, device):
    bq, bk = reference.block_sizes(bs)
    q, k = _inputs(B, Hq, Hkv, Sq, Skv, D, dtype, device)
    nq, nkv = math.ceil(Sq / bq), math.ceil(Skv / bk)
    out = torch.full((B, Hq, nq, nkv), float("nan"), device=device)  # an unwritten entry fails
    got = kernel.block_scores(q, k, bs, causal=causal, out=out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
    scale = D ** -0.5
    want = _straightforward(q, k, bq, bk, scale, causal)
    bound = _bound(q, k, bq, bk, scale)
    assert_within_bound(got, want, bound)
    ref = reference.block_scores(q.cpu(), k.cpu(), bs, causal=causal)
    assert ref.dtype == torch.float32
    assert_within_bound(ref, want, bound)
    assert torch.equal(reference.block_scores(q.double().cpu(), k.double().cpu(), bs, causal=causal).isneginf(),
                       want.isneginf())


def test_causal_entries_follow_the_block_rule(device):
    # BQ=32, BK=16, Sq=Skv=80: block (i, j) is -inf iff j * 16 > (i + 1) * 32 - 1, ragged last query block too
    q, k = _inputs(1, 1, 1, 80, 80, 32, torch.float32, device)
    s = kernel.block_scores(q, k, (32, 16), causal=True).cpu()[0, 0]
    i = torch.arange(3)[:, None]
    j = torch.arange(5)[None, :]
    assert torch.equal(s.isneginf(), j * 16 > (i + 1) * 32 - 1)
    assert s.isneginf().tolist()[2] == [False] * 5  # last query block (rows 64..79) reaches every kv block


def test_scale_and_strided_inputs(device):
    # [B, S, H, D] storage viewed as [B, H, S, D] (how attention modules hand q and k over)
    q = torch.randn(1, 50, 2, 64, device=device).transpose(1, 2)
    k = torch.randn(1, 50, 1, 64, device=device).transpose(1, 2)
    got = kernel.block_scores(q, k, 16, scale=0.5, causal=False)
    want = _straightforward(q, k, 16, 16, 0.5, False)
    assert_within_bound(got, want, _bound(q, k, 16, 16, 0.5))


@pytest.mark.parametrize("Sq,Skv", [(0, 32), (32, 0)])
def test_empty(Sq, Skv, device):
    q = torch.randn(1, 2, Sq, 32, device=device)
    k = torch.randn(1, 1, Skv, 32, device=device)
    got = kernel.block_scores(q, k, 16)
    assert got.shape == (1, 2, math.ceil(Sq / 16), math.ceil(Skv / 16))
    assert reference.block_scores(q.cpu(), k.cpu(), 16).shape == got.shape


def test_rejects_unsupported(device):
    q = torch.randn(1, 2, 32, 64, device=device)
    with pytest.raises(ValueError, match="BQ=8"):
        kernel.block_scores(q, q, 8)
    with pytest.raises(ValueError, match="head dim D=48"):
        kernel.block_scores(q[..., :48], q[..., :48], 16)
    with pytest.raises(ValueError, match="multiple of k heads"):
        kernel.block_scores(q, torch.randn(1, 3, 32, 64, device=device), 16)
    with pytest.raises(TypeError, match="share dtype"):
        kernel.block_scores(q, q.half(), 16)
    with pytest.raises(TypeError, match="float64"):
        kernel.block_scores(q.double(), q.double(), 16)
    with pytest.raises(ValueError, match="out must be"):
        kernel.block_scores(q, q, 16, out=torch.empty(1, 2, 2, 3, device=device))
    with pytest.raises(TypeError, match="block_size"):
        reference.block_scores(q, q, "16")


@pytest.mark.gpu
def test_bf16_on_gpu(device):
    q, k = _inputs(1, 4, 2, 300, 300, 128, torch.bfloat16, device)
    got = kernel.block_scores(q, k, 64, causal=True)
    want = _straightforward(q, k, 64, 64, 128 ** -0.5, True)
    assert_within_bound(got, want, _bound(q, k, 64, 64, 128 ** -0.5))
