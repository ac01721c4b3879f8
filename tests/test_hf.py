"""nn/hf.py with KV-cache decoding, and what nn/attention.py gives it: masks for queries at an offset
(bottom-right aligned), head-dim checks at swap time, pickling, bool arguments.

The decode-vs-prefill tests run the attention op's pure-torch reference on CPU (the interpreted decode
kernel costs ~0.3 s per call, a decode loop makes dozens); the kernel itself is checked on single calls
(``test_decode_step_runs_the_decode_kernel``) and on CUDA in the GPU tier, where nothing is patched.
"""

import copy
import inspect
import io
import pickle
import warnings

import pytest
import torch
from kit import tol

import sparse_triton.nn.attention as nn_attention
import sparse_triton.ops.attention as ops_attention
from sparse_triton.formats.block_mask import BlockMask
from sparse_triton.kernels import attention_decode as decode_kernel
from sparse_triton.nn.attention import BandMasks, BlockSparseAttention, band_rows_mask, mask_rows, pooled_block_scores
from sparse_triton.reference.attention import dense_attention

transformers = pytest.importorskip("transformers", reason="the HF swap needs transformers (the hf extra)")
LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM  # the slow import, once
from sparse_triton.nn.hf import ATTN_IMPLEMENTATION, swap_llama_attention  # noqa: E402

S, P = 140, 120  # full length; prompt length (decode steps 120..139 cross the kv block boundary at 128)
OURS = "sparse_triton_block_sparse attention"  # prefix of every fallback warning


def tiny_llama(device, **kw):
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, max_position_embeddings=256, attn_implementation="eager")
    cfg.update(kw)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(device).eval()


@pytest.fixture
def reference_on_cpu(device, monkeypatch):
    """On CPU, run the references of the attention op and of the pooled block scores instead of the
    interpreted kernels (same math, ~100x faster here)."""
    if device == "cpu":
        monkeypatch.setattr(ops_attention, "use_kernels", lambda t: False)
        monkeypatch.setattr(nn_attention, "use_kernels", lambda t: False)


def policies():
    return {
        "causal": BlockSparseAttention.causal(block_size=64),
        "sliding_window": BlockSparseAttention.sliding_window(40, block_size=64),
        # a mask for the full length, with element bitmasks (window edges), and the causal flag of the module
        "fixed": BlockSparseAttention.fixed(BlockMask.sliding_window(S, 50, block_size=64, causal=False), causal=True),
        # 3 kv blocks, budget 2 = the forced diagonal + sink: queries >= 128 skip kv block 1, in prefill and decode
        "dynamic_topk": BlockSparseAttention.dynamic_topk(k_blocks=2, block_size=64),
    }


def _cache_kw(model, cache) -> dict:
    """``cache=`` (transformers >= 5.x) or ``past_key_values=`` (older), whichever this version takes."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def _ours(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith(OURS)]


def _record_calls(attn: BlockSparseAttention) -> list:
    calls = []
    attn.register_forward_hook(lambda mod, args, kwargs, out: calls.append(
        (args[0].shape[2], args[1].shape[2], kwargs.get("q_offset"))), with_kwargs=True)
    return calls


# ---------------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("name", list(policies()))
def test_kv_cache_decode_matches_prefill(name, device, reference_on_cpu):
    dense = tiny_llama(device)
    ids = torch.randint(0, 128, (1, S), device=device)
    policy = policies()[name]
    model = swap_llama_attention(copy.deepcopy(dense), policy)
    calls = _record_calls(policy)
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        want = model(ids).logits[:, P - 1:S - 1]  # prefill over the whole sequence: the reference
        out = model(ids[:, :P], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(P, S - 1):
            out = model(ids[:, t:t + 1], use_cache=True, **_cache_kw(model, _cache_of(out)))
            steps.append(out.logits[:, -1])
        dense_logits = dense(ids).logits[:, P - 1:S - 1]
    got = torch.stack(steps, 1)
    assert _ours(record) == []  # no dense fallback
    decode_calls = [c for c in calls if c[0] == 1]
    assert len(decode_calls) == 2 * (S - 1 - P) and all(q_off == skv - 1 for _, skv, q_off in decode_calls)
    t = tol(torch.float32)
    torch.testing.assert_close(got, want, rtol=t.rtol, atol=t.own_atol)
    if name == "causal":
        torch.testing.assert_close(got, dense_logits, rtol=t.rtol, atol=t.own_atol)
    else:  # sparse: a dense fallback would give the dense model's logits
        assert (got - dense_logits).abs().max() > 1000 * t.own_atol


def test_generate_runs_the_policy(device, reference_on_cpu):
    dense = tiny_llama(device)
    prompt = torch.randint(0, 128, (1, P), device=device)
    model = swap_llama_attention(copy.deepcopy(dense), BlockSparseAttention.sliding_window(40, block_size=64))
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        seq = out.sequences
        want = model(seq).logits[:, P - 1:-1]
        dense_logits = dense(seq).logits[:, P - 1:-1]
    assert _ours(record) == []
    got = torch.stack(out.logits, 1)
    t = tol(torch.float32)
    torch.testing.assert_close(got, want, rtol=t.rtol, atol=t.own_atol)
    assert (got - dense_logits).abs().max() > 1000 * t.own_atol


def test_multi_token_chunk_on_a_cache_keeps_the_documented_fallback(device, reference_on_cpu):
    # Hugging Face hands several new tokens on a non-empty cache an explicit mask: dense SDPA, with a warning.
    model = swap_llama_attention(tiny_llama(device), BlockSparseAttention.causal(block_size=64))
    ids = torch.randint(0, 128, (1, 70), device=device)
    with torch.no_grad():
        out = model(ids[:, :64], use_cache=True)
        with pytest.warns(UserWarning, match="explicit attention mask .*several new tokens on a non-empty cache"):
            model(ids[:, 64:], use_cache=True, **_cache_kw(model, _cache_of(out)))


def test_decode_step_runs_the_decode_kernel(device):
    # One call each, without the reference patch: CUDA runs the compiled decode kernel, CPU the interpreted one.
    Skv = 150
    q = torch.randn(1, 4, 1, 32, device=device)
    k, v = torch.randn(2, 1, 2, Skv, 32, device=device).unbind(0)
    for attn in (BlockSparseAttention.sliding_window(40, block_size=64),
                 BlockSparseAttention.dynamic_topk(k_blocks=2, block_size=64)):
        mask = attn.block_mask_for(q, k, q_offset=Skv - 1)
        assert decode_kernel.supported(q, k, mask) is None
        o = attn(q, k, v, q_offset=Skv - 1)
        want, _ = dense_attention(q.double(), k.double(), v.double(), mask.element_mask())
        torch.testing.assert_close(o.double(), want, rtol=tol(torch.float32).own_atol / 2,
                                   atol=tol(torch.float32).own_atol)
    i = torch.arange(Skv, device=device)
    assert torch.equal(BlockSparseAttention.sliding_window(40, block_size=64).block_mask_for(
        q, k, q_offset=Skv - 1).element_mask()[0, 0, 0], i > Skv - 1 - 40)


# ---------------------------------------------------------------------------------------------------- masks


def _band(S_, lo, hi, device):
    i = torch.arange(S_, device=device)
    d = i[:, None] - i[None, :]
    m = torch.ones(S_, S_, dtype=torch.bool, device=device)
    if lo is not None:
        m &= d >= lo
    if hi is not None:
        m &= d <= hi
    return m


@pytest.mark.parametrize("lo, hi", [(0, None), (0, 0), (0, 70), (-5, 5), (None, None), (3, None)],
                         ids=["causal", "diagonal", "window", "two-sided", "full", "strict-causal"])
def test_band_rows_equal_the_rows_of_the_full_rule(lo, hi, device):
    for Skv in (1, 63, 65, 130, 200):
        for Sq in (1, 3, 16, 17, 40):
            if Sq > Skv:
                continue
            want = _band(Skv, lo, hi, device)[Skv - Sq:]
            for bs in ((16, 64), (16, 16), (64, 64), (16, 128), (64, 32)):
                m = band_rows_mask(Skv - Sq, Sq, Skv, bs, lo, hi, device)
                assert m.seq_lens == (Sq, Skv) and not m.causal
                assert torch.equal(m.element_mask()[0, 0], want), (Skv, Sq, bs)
                # full tiles are never masked by the kernels: each must be wholly allowed and in bounds
                BQ, BK = bs
                for i in range(m.shape[2]):
                    for j in m.full_kv_indices[0, 0, i, :m.full_kv_num_blocks[0, 0, i]].tolist():
                        assert (j + 1) * BK <= Skv
                        assert want[i * BQ:(i + 1) * BQ, j * BK:(j + 1) * BK].all()


def test_fixed_mask_rows_and_custom_builders(device):
    full = BlockMask.document(torch.tensor([0] * 50 + [1] * 90 + [2] * 60, device=device), block_size=64,
                              causal=True)
    E = full.element_mask()[0, 0]
    for Sq, Skv in ((1, 200), (1, 129), (4, 150), (30, 100), (100, 100)):
        off = Skv - Sq
        rows = mask_rows(full, off, Sq, Skv, 16 if Sq <= 16 else 64, causal=False)
        assert torch.equal(rows.element_mask()[0, 0], E[off:Skv, :Skv])
    with pytest.raises(ValueError, match=r"seq_lens=\(200, 200\)"):
        mask_rows(full, 200, 1, 201, 16, causal=False)

    # a builder without rows(): its mask for the leading square, those rows; with rows(): that method
    built = []

    def builder(sq, skv, dev):
        built.append((sq, skv))
        return BlockMask.sliding_window((sq, skv), 30, block_size=64, device=dev)

    q, k = torch.randn(1, 2, 1, 32, device=device), torch.randn(1, 1, 90, 32, device=device)
    got = BlockSparseAttention(builder).block_mask_for(q, k, q_offset=89)
    assert built == [(90, 90)]
    assert torch.equal(got.element_mask()[0, 0, 0], _band(90, 0, 29, device)[89])

    class WithRows(BandMasks):
        def rows(self, *args, **kw):
            built.append("rows")
            return super().rows(*args, **kw)

    BlockSparseAttention(WithRows(30, 64), causal=True).block_mask_for(q, k, q_offset=89)
    assert built[-1] == "rows"


@pytest.mark.parametrize("BK", [64, 128])
@pytest.mark.parametrize("name", ["causal", "sliding_window", "fixed", "dynamic_topk"])
def test_decode_masks_take_the_decode_kernel(name, BK, device, reference_on_cpu):
    Skv = 1000
    full = BlockMask.local_global(1024, 1, 1, block_size=BK, causal=True)
    attn = {"causal": BlockSparseAttention.causal(block_size=BK),
            "sliding_window": BlockSparseAttention.sliding_window(300, block_size=BK),
            "fixed": BlockSparseAttention.fixed(full),
            "dynamic_topk": BlockSparseAttention.dynamic_topk(k_blocks=3, block_size=BK)}[name]
    i = torch.arange(Skv, device=device)
    for Sq in (1, 4):
        q = torch.randn(2, 8, Sq, 64, device=device)
        k = torch.randn(2, 2, Skv, 64, device=device)
        mask = attn.block_mask_for(q, k, q_offset=Skv - Sq)
        assert decode_kernel.supported(q, k, mask) is None, decode_kernel.supported(q, k, mask)
        assert mask.block_size == (16, BK) and mask.shape[2] == 1 and not mask.causal
        e = mask.element_mask()
        for r in range(Sq):
            p = Skv - Sq + r  # the query's position: bottom-right aligned
            if name == "causal":
                want = i <= p
            elif name == "sliding_window":
                want = (i <= p) & (i > p - 300)
            elif name == "fixed":
                want = full.element_mask()[0, 0, p, :Skv].to(device)
            else:  # the scores pick the rest; causal, the diagonal and the sink are rules
                assert not e[..., r, p + 1:].any() and e[..., r, p].all() and e[..., r, 0].all()
                continue
            assert torch.equal(e[0, 0, r], want), (Sq, r)


def test_band_decode_masks_cost_no_more_bitmasks_as_the_cache_grows(device):
    # O(Skv / BK) tiles and a fixed number of bitmask tiles: a 100x longer cache adds no bitmasks.
    attn = BlockSparseAttention.sliding_window(300, block_size=128)
    counts = []
    for Skv in (1000, 100_000):
        q, k = torch.randn(1, 2, 1, 64, device=device), torch.empty(1, 1, Skv, 64, device=device)
        mask = attn.block_mask_for(q, k, q_offset=Skv - 1)
        counts.append(mask.partial_bits.shape[0])
        assert mask.to_dense().sum().item() <= 4  # keys Skv-300 .. Skv-1: at most 4 kv blocks of 128
    assert counts[0] == counts[1] <= 5


def test_dynamic_topk_decode_picks_like_prefill_where_the_forced_blocks_decide(device, reference_on_cpu):
    # budget 2 = diagonal + sink: the step's choice equals prefill's, whatever the scores
    attn = BlockSparseAttention.dynamic_topk(k_blocks=2, block_size=64)
    q, k = torch.randn(1, 2, 200, 32, device=device), torch.randn(1, 1, 200, 32, device=device)
    full = attn.block_mask_for(q, k).element_mask()
    for p in (0, 63, 64, 130, 199):
        rows = attn.block_mask_for(q[:, :, p:p + 1], k[:, :, :p + 1], q_offset=p).element_mask()
        assert torch.equal(rows[..., 0, :], full[..., p, :p + 1]), p


# ---------------------------------------------------------------------------------------------------- swap


def test_swap_refuses_head_dims_the_kernels_do_not_take(device):
    model = tiny_llama(device, num_attention_heads=2, num_key_value_heads=1, head_dim=48)
    with pytest.raises(ValueError, match=r"layer 0 \(model\.layers\.0\.self_attn\) has head_dim=48.*"
                                         r"\(32, 64, 96, 128, 256\)"):
        swap_llama_attention(model, BlockSparseAttention.causal(block_size=64))
    assert model.config._attn_implementation == "eager"  # refused before changing anything
    assert not any(hasattr(m, "sparse_attention") for m in model.modules())


def _roundtrip(obj, how: str):
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    if how == "deepcopy":
        return copy.deepcopy(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
@pytest.mark.parametrize("name", list(policies()))
def test_policies_pickle_copy_and_save(name, how, device, reference_on_cpu):
    attn = policies()[name]
    q, k, v = torch.randn(1, 2, S, 32, device=device), *torch.randn(2, 1, 1, S, 32, device=device).unbind(0)
    want = attn(q, k, v)
    assert bool(attn._masks) == (name != "dynamic_topk")  # a cached mask (top-k builds one per call)
    again = _roundtrip(attn, how)
    assert not again._masks and repr(again) == repr(attn)
    assert torch.equal(again(q, k, v), want)
    assert torch.equal(again(q[:, :, -1:], k, v, q_offset=S - 1), attn(q[:, :, -1:], k, v, q_offset=S - 1))


@pytest.mark.parametrize("name", list(policies()))
def test_policies_on_the_meta_device(name):
    attn = policies()[name].to("meta")
    assert repr(attn).startswith(f"BlockSparseAttention(policy={name}")
    q, k = torch.empty(1, 4, S, 32, device="meta"), torch.empty(1, 2, S, 32, device="meta")
    assert attn(q, k, k).shape == q.shape and attn(q, k, k).is_meta
    assert attn(q[:, :, -1:], k, k, q_offset=S - 1).shape == (1, 4, 1, 32)


def test_swapped_model_deepcopies_pickles_and_reloads(device, reference_on_cpu, monkeypatch):
    model = swap_llama_attention(tiny_llama(device), BlockSparseAttention.sliding_window(40, block_size=64))
    ids = torch.randint(0, 128, (1, 100), device=device)
    with torch.no_grad():
        want = model(ids).logits
        for how in ("deepcopy", "pickle"):
            torch.testing.assert_close(_roundtrip(model, how)(ids).logits, want, rtol=0, atol=0)
        # as in a fresh process: the attention function is not registered until the model is unpickled
        from transformers import AttentionInterface

        monkeypatch.delitem(AttentionInterface._global_mapping, ATTN_IMPLEMENTATION)
        loaded = _roundtrip(model, "torch.save")
        assert ATTN_IMPLEMENTATION in AttentionInterface._global_mapping
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- bools


@pytest.mark.parametrize("call, name", [
    (lambda: BlockSparseAttention(causal=1), "causal"),
    (lambda: BlockSparseAttention.fixed(BlockMask.causal(64, block_size=64), causal="yes"), "causal"),
    (lambda: BlockSparseAttention.sliding_window(32, causal=1), "causal"),
    (lambda: BlockSparseAttention.dynamic_topk(2, causal=None), "causal"),
    (lambda: BlockSparseAttention.dynamic_topk(2, always_keep_diagonal=1), "always_keep_diagonal"),
    (lambda: BlockSparseAttention.dynamic_topk(2, keep_first_block=0), "keep_first_block"),
    (lambda: BandMasks(32, causal=torch.tensor(True)), "causal"),
    (lambda: BlockSparseAttention.causal(block_size=64)(*torch.randn(3, 1, 1, 64, 32).unbind(0), causal=1), "causal"),
    (lambda: BlockSparseAttention.causal(block_size=64).block_mask_for(
        *torch.randn(2, 1, 1, 64, 32).unbind(0), causal=0), "causal"),
    (lambda: pooled_block_scores(*torch.randn(2, 1, 1, 64, 32).unbind(0), causal=1), "causal"),
], ids=["init", "fixed", "sliding_window", "topk-causal", "topk-diagonal", "topk-first", "BandMasks", "forward",
        "block_mask_for", "pooled_block_scores"])
def test_bool_arguments_reject_non_bools(call, name):
    with pytest.raises(TypeError, match=rf"{name} must be a bool"):
        call()


def test_bad_q_offset():
    attn = BlockSparseAttention.causal(block_size=64)
    q = torch.randn(1, 1, 1, 32)
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="q_offset must be a non-negative int"):
            attn(q, q, q, q_offset=bad)
