"""Block-sparse attention in a Hugging Face Llama: swap the attention core, compare with the dense model.

    pip install 'sparse-triton[hf]'
    python examples/block_sparse_llama.py [--policy topk|sliding] [--seq 1024] [--block 64|128] [--dtype fp16]
                                          [--new-tokens 16]

1. builds a small Llama from a ``LlamaConfig`` (random weights, nothing downloaded);
2. ``swap_llama_attention(model, BlockSparseAttention.causal(...))``: every tile on or below the
   diagonal (0 % sparse against dense causal attention): the logits must match the dense model's;
3. swaps in a sparse policy: dynamic top-k (per query block, the kv blocks with the highest pooled
   ``q . k`` block scores, plus the diagonal block and the first block as an attention sink) or a
   sliding window, and prints how many causal tiles it skips and how far the logits move;
4. generates ``--new-tokens`` tokens with a KV cache under the same policy (each step's queries sit at
   the end of the cache; on CUDA the split-kv decode kernel runs them) and compares each step's logits
   with a prefill over the generated sequence (equal for the sliding window; dynamic top-k scores a
   step's own query where prefill pools a query block, so its choices may differ).

CUDA runs the Triton kernels; CPU runs the pure-torch reference path (slower, same numbers).
"""

from __future__ import annotations

import argparse
import copy

import torch

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError as e:  # pragma: no cover - message for users without the extra
    raise SystemExit("this example needs transformers: pip install 'sparse-triton[hf]'") from e

from sparse_triton.nn.attention import BlockSparseAttention
from sparse_triton.nn.hf import swap_llama_attention

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build(device, dtype) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def record_masks(policy: BlockSparseAttention) -> list:
    """Keep the masks the policy builds for prefill calls (recomputed in a forward hook, for reporting only)."""
    masks = []

    def hook(mod, args, kwargs, out):
        if args[0].shape[2] == args[1].shape[2] > 1:
            masks.append(mod.block_mask_for(args[0], args[1], kwargs.get("causal")).to_dense())

    policy.register_forward_hook(hook, with_kwargs=True)
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", choices=("topk", "sliding"), default="topk")
    parser.add_argument("--seq", type=int, default=None, help="tokens (default 1024 on CUDA, 512 on CPU)")
    parser.add_argument("--block", type=int, choices=(64, 128), default=64,
                        help="mask block size (prefill takes blocks of 64 or 128)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate with the KV cache")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    seq = args.seq or (1024 if device == "cuda" else 512)

    dense = build(device, dtype)
    ids = torch.randint(0, dense.config.vocab_size, (1, seq), device=device)
    with torch.no_grad():
        want = dense(ids).logits.float()

        full = swap_llama_attention(copy.deepcopy(dense), BlockSparseAttention.causal(block_size=args.block))
        got = full(ids).logits.float()
        print(f"{device} {args.dtype}, {seq} tokens, blocks of {args.block}")
        print(f"all causal tiles (0 % sparse): max |logits - dense| = {(got - want).abs().max().item():.2e}")

        if args.policy == "topk":
            policy = BlockSparseAttention.dynamic_topk(k_blocks=4, block_size=args.block)
            name = "dynamic top-4 blocks (+ diagonal, attention sink)"
        else:
            policy = BlockSparseAttention.sliding_window(4 * args.block, block_size=args.block)
            name = f"sliding window of {4 * args.block} tokens"
        masks = record_masks(policy)
        sparse = swap_llama_attention(copy.deepcopy(dense), policy)
        out = sparse(ids).logits.float()

        prompt = ids[:, :seq - args.new_tokens]
        gen = sparse.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)
        steps = torch.stack(gen.logits, 1).float()
        prefill = sparse(gen.sequences).logits[:, prompt.shape[1] - 1:-1].float()

    nq = -(-seq // args.block)
    causal_tiles = nq * (nq + 1) // 2
    computed = torch.stack([m.float().sum((-1, -2)).mean() for m in masks]).mean().item()
    agree = (out.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"{name}: {computed:.0f} of {causal_tiles} causal tiles per head "
          f"({100 * (1 - computed / causal_tiles):.1f} % sparse)")
    print(f"  max |logits - dense| = {(out - want).abs().max().item():.2e}, next-token agreement {100 * agree:.1f} %")
    note = " (top-k scores each step's own query, prefill a block's mean: choices may differ)" \
        if args.policy == "topk" else ""
    print(f"generate {args.new_tokens} tokens with the KV cache, same policy: max |step logits - prefill logits| = "
          f"{(steps - prefill).abs().max().item():.2e}{note}")


if __name__ == "__main__":
    main()
