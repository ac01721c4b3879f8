"""nn/attention.py (BlockSparseAttention, pooled_block_scores) and nn/hf.py (the Llama swap)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from kit import assert_close_avg

from sparse_triton.formats.block_mask import BlockMask
from sparse_triton.nn.attention import BlockSparseAttention, forced_blocks, pooled_block_scores
from sparse_triton.ops.attention import block_sparse_attention
from sparse_triton.reference import block_scores as reference


def _qkv(B, Hq, Hkv, S, D, dtype, device, requires_grad=False):
    q = torch.randn(B, Hq, S, D, dtype=dtype, device=device, requires_grad=requires_grad)
    k = torch.randn(B, Hkv, S, D, dtype=dtype, device=device, requires_grad=requires_grad)
    v = torch.randn(B, Hkv, S, D, dtype=dtype, device=device, requires_grad=requires_grad)
    return q, k, v


def _sdpa(q, k, v, **kw):
    """Dense SDPA in fp32 (CPU SDPA has no fp16 GQA path worth comparing against)."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=q.shape[1] != k.shape[1], **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_full_mask_equals_sdpa(dtype, device):
    q, k, v = _qkv(1, 2, 1, 160, 32, dtype, device)  # ragged: 160 = 2 x 64 + 32
    mask = BlockMask.from_dense(torch.ones(3, 3, dtype=torch.bool, device=device), block_size=64,
                                seq_lens=(160, 160))
    attn = BlockSparseAttention.fixed(mask)
    o = attn(q, k, v)
    assert o.shape == q.shape and o.dtype == dtype
    assert_close_avg(o, _sdpa(q, k, v), dtype)


def test_causal_policy_equals_sdpa_is_causal_and_gradients_flow(device):
    q, k, v = _qkv(1, 2, 1, 144, 32, torch.float32, device, requires_grad=True)  # ragged: 2 x 64 + 16
    attn = BlockSparseAttention.causal(block_size=64)
    o = attn(q, k, v)
    ref = _sdpa(q, k, v, is_causal=True)
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=0)
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"d{name}")


def test_sliding_window_matches_masked_sdpa_and_caches_masks(device):
    q, k, v = _qkv(1, 2, 2, 200, 32, torch.float32, device)  # ragged: 3 x 64 + 8; the window cuts tiles
    attn = BlockSparseAttention.sliding_window(80, block_size=64)
    i = torch.arange(200, device=device)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 80)
    torch.testing.assert_close(attn(q, k, v), _sdpa(q, k, v, attn_mask=allowed), atol=2e-5, rtol=0)
    first = attn.block_mask_for(q, k)
    assert attn.block_mask_for(q, k) is first  # built once per (Sq, Skv, device)


def test_callable_policy_is_cached_per_shape(device):
    calls = []

    def build(sq, skv, dev):
        calls.append((sq, skv))
        return BlockMask.causal((sq, skv), block_size=64, device=dev)

    attn = BlockSparseAttention(build, causal=True)
    for S in (100, 100, 160, 100):
        q, k, v = _qkv(1, 1, 1, S, 32, torch.float32, device)
        attn(q, k, v)
    assert calls == [(100, 100), (160, 160)]
    assert "policy=callable" in repr(attn)


@pytest.mark.parametrize("keep", [True, False], ids=["forced", "plain"])
def test_dynamic_topk_equals_op_on_hand_built_mask(keep, device):
    B, Hq, Hkv, S, D, bs = 1, 2, 1, 224, 32, 64  # 4 x 4 tiles, the last row and column ragged (32)
    nb = -(-S // bs)
    kb = 3 if keep else 2  # with the diagonal and the sink forced, one block is left to the scores
    q, k, v = _qkv(B, Hq, Hkv, S, D, torch.float32, device)
    attn = BlockSparseAttention.dynamic_topk(k_blocks=kb, block_size=bs, always_keep_diagonal=keep,
                                             keep_first_block=keep)
    o = attn(q, k, v)
    scores = reference.block_scores(q.cpu(), k.cpu(), bs, causal=True).to(device)
    if keep:
        i = torch.arange(nb, device=device)
        forced = (i[:, None] == i[None, :]) | (i[None, :] == 0)
        scores = scores.masked_fill(forced, float("inf"))
    mask = BlockMask.topk(scores, kb, block_size=bs, seq_lens=(S, S), causal=True)
    assert torch.equal(attn.block_mask_for(q, k).to_dense(), mask.to_dense())
    assert mask.to_dense().shape == (B, Hq, nb, nb)
    torch.testing.assert_close(o, block_sparse_attention(q, k, v, mask, causal=True), atol=1e-6, rtol=0)
    assert mask.sparsity() > 0.4  # of the 16 tiles: 1 + 2 + 2 * kb computed


def test_dynamic_topk_density_and_gradients(device):
    q, k, v = _qkv(1, 2, 2, 160, 32, torch.float32, device, requires_grad=True)  # 3 kv blocks, last ragged
    attn = BlockSparseAttention.dynamic_topk(density=0.5, block_size=64, causal=False, keep_first_block=False)
    assert attn.block_mask_for(q, k).to_dense().sum(-1).unique().tolist() == [2]  # ceil(0.5 * 3)
    attn(q, k, v).square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_forced_blocks():
    f = forced_blocks(3, 6, 32, 16, diagonal=True, first=True, device="cpu")
    assert f.int().tolist() == [[1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0], [1, 0, 0, 0, 1, 1]]
    assert forced_blocks(2, 2, 16, 16, diagonal=False, first=False, device="cpu") is None


def test_pooled_block_scores_dispatch(device):
    q, k, _ = _qkv(1, 2, 1, 40, 32, torch.float32, device)
    want = reference.block_scores(q.cpu(), k.cpu(), 16, causal=True)
    torch.testing.assert_close(pooled_block_scores(q, k, 16, causal=True).cpu(), want, atol=1e-6, rtol=0)
    q48, k48 = q[..., :24].contiguous(), k[..., :24].contiguous()  # D=24: no kernel, the reference runs
    torch.testing.assert_close(pooled_block_scores(q48, k48, 16).cpu(),
                               reference.block_scores(q48.cpu(), k48.cpu(), 16), atol=1e-6, rtol=0)


def test_scale_override_and_repr(device):
    q, k, v = _qkv(1, 1, 1, 100, 32, torch.float32, device)  # ragged: 64 + 36
    attn = BlockSparseAttention.causal(block_size=64, scale=0.1)
    torch.testing.assert_close(attn(q, k, v), _sdpa(q, k, v, is_causal=True, scale=0.1), atol=2e-5, rtol=0)
    torch.testing.assert_close(attn(q, k, v, scale=0.3), _sdpa(q, k, v, is_causal=True, scale=0.3), atol=2e-5, rtol=0)
    full = BlockSparseAttention.fixed(BlockMask.from_dense(torch.ones(2, 2, dtype=torch.bool), block_size=64,
                                                           seq_lens=(100, 100)))
    torch.testing.assert_close(full(q, k, v, causal=True), _sdpa(q, k, v, is_causal=True), atol=2e-5, rtol=0)
    assert repr(attn) == "BlockSparseAttention(policy=causal, block_size=64, causal=True, scale=0.1)"
    assert list(attn.state_dict()) == []


def test_errors(device):
    with pytest.raises(ValueError, match="exactly one of k_blocks and density"):
        BlockSparseAttention.dynamic_topk(k_blocks=2, density=0.5)
    with pytest.raises(ValueError, match="density"):
        BlockSparseAttention.dynamic_topk(density=1.5)
    with pytest.raises(TypeError, match="BlockMask"):
        BlockSparseAttention.fixed(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="block_mask must be"):
        BlockSparseAttention(block_mask=3)
    attn = BlockSparseAttention(lambda sq, skv, dev: None)
    q, k, v = _qkv(1, 1, 1, 100, 32, torch.float32, device)
    with pytest.raises(TypeError, match="returned NoneType"):
        attn(q, k, v)
    fixed = BlockSparseAttention.fixed(BlockMask.causal(128, block_size=64))
    with pytest.raises(ValueError, match="seq_lens"):
        fixed(q, k, v)
    with pytest.raises(ValueError, match="decode-only"):  # blocks of 32: decode only, not a 100-query prefill
        BlockSparseAttention.causal(block_size=32)(q, k, v)


# -- Hugging Face Llama swap ----------------------------------------------------------------------------


def _tiny_llama(device):
    transformers = pytest.importorskip("transformers", reason="the HF swap needs transformers (the hf extra)")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=256, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device).eval()


def test_hf_swap_all_blocks_matches_eager_and_sparse_changes_logits(device):
    from sparse_triton.nn.hf import ATTN_IMPLEMENTATION, restore_attention, swap_llama_attention

    dense = _tiny_llama(device)
    ids = torch.randint(0, 128, (1, 160), device=device)  # 3 blocks of 64, the last ragged
    with torch.no_grad():
        want = dense(ids).logits
        model = swap_llama_attention(copy.deepcopy(dense), BlockSparseAttention.causal(block_size=64))
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION
        assert model.state_dict().keys() == dense.state_dict().keys()
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)
        swap_llama_attention(model, lambda layer: BlockSparseAttention.sliding_window(64, block_size=64))
        sparse = model(ids).logits
        torch.testing.assert_close(sparse[:, :64], want[:, :64], atol=1e-4, rtol=1e-4)  # window covers them
        assert (sparse[:, 64:] - want[:, 64:]).abs().max() > 1e-2
        restore_attention(model)
        assert model.config._attn_implementation == "eager"
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_hf_swap_padding_and_decode_fallbacks(device):
    from sparse_triton.nn.hf import swap_llama_attention

    dense = _tiny_llama(device)
    ids = torch.randint(0, 128, (2, 100), device=device)
    pad = torch.ones(2, 100, dtype=torch.long, device=device)
    pad[1, :5] = 0  # left padding
    model = swap_llama_attention(copy.deepcopy(dense), BlockSparseAttention.causal(block_size=64), fallback="error")
    with torch.no_grad():
        with pytest.raises(ValueError, match="attention mask"):
            model(ids, attention_mask=pad)
        swap_llama_attention(model, BlockSparseAttention.causal(block_size=64))  # fallback="dense"
        with pytest.warns(UserWarning, match="dense SDPA"):
            got = model(ids, attention_mask=pad).logits
        want = dense(ids, attention_mask=pad).logits
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[1, 5:], want[1, 5:], atol=1e-4, rtol=1e-4)
        # one decode step with a KV cache: 1 query against 100 cached keys, on the sparse path (no fallback)
        out = model(ids[:1], use_cache=True)
        nxt = torch.randint(0, 128, (1, 1), device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            step = model(nxt, past_key_values=out.past_key_values).logits
        full = dense(torch.cat([ids[:1], nxt], 1)).logits[:, -1:]
        torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


def test_hf_swap_rejects_non_llama():
    transformers = pytest.importorskip("transformers", reason="the HF swap needs transformers (the hf extra)")
    from sparse_triton.nn.hf import swap_llama_attention

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    policy = BlockSparseAttention.causal(block_size=64)
    with pytest.raises(TypeError, match="model_type='gpt2'"):
        swap_llama_attention(gpt2, policy)
    with pytest.raises(TypeError, match="without a config"):
        swap_llama_attention(torch.nn.Linear(4, 4), policy)
    with pytest.raises(ValueError, match="fallback"):
        swap_llama_attention(gpt2, policy, fallback="ignore")
