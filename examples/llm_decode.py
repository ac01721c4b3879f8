"""LLM decoding with activation sparsity: tokens/s dense vs sparse for a Llama-3-8B-shaped model.

    pip install 'sparse-triton[hf]'
    python examples/llm_decode.py [--layers 2] [--sparsity 0,40,50,70,90] [--steps 100] [--device cuda] [--small]

1. builds a Llama from a ``LlamaConfig`` with Llama-3-8B layer shapes (hidden 4096, intermediate 14336,
   32 heads, 8 kv heads, vocab 128256), ``--layers`` decoder layers, random weights (nothing downloaded);
2. for each sparsity: calibrates one threshold per layer on random tokens (``calibrate_thresholds``)
   and sets them in the activation-sparse copy made once by ``st.sparsify`` (``ActSparseMLP`` for the
   MLPs, ``ActSparseLinear`` for the attention projections; ``lm_head`` stays dense);
3. correctness, on every device: the sparse model's logits against the dense model with the same
   masks applied (forward pre-hooks replacing each layer's input ``x`` by ``x * (|x| > t)``);
4. on a GPU (fp16, batch 1): the time of one decode step, the forward of one new token (no KV cache:
   the linear layers, which dominate decoding, without attention over a cache), captured in a CUDA
   graph and replayed ``--steps`` times between CUDA events; median of several runs, as tokens/s.
   The thresholds are updated in place, so the graphs are captured once.

On CPU (no GPU, or ``--device cpu``) the model is tiny (``--small``: hidden 256, intermediate 512,
vocab 1000) and only the correctness check runs: the CPU path is the pure-torch reference, so its
timings say nothing about the kernels.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

import sparse_triton as st
from sparse_triton.calibration import ActivationSparsity, activation_sparsity_report, calibrate_thresholds

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, head_dim=128, rope_theta=500000.0)
SMALL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=1000, head_dim=32)


def build(layers: int, small: bool, device: str, dtype: torch.dtype):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:  # pragma: no cover - message for users without the extra
        raise SystemExit("this example needs transformers: pip install 'sparse-triton[hf]'") from None
    cfg = LlamaConfig(**(SMALL if small else LLAMA3_8B), num_hidden_layers=layers, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: no 8B-shaped detour through host memory
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def set_thresholds(model, thresholds) -> None:
    """Copy calibrated thresholds into a sparsified model's layers (in place: captured graphs stay valid)."""
    for fqn, t in thresholds.items():
        model.get_submodule(fqn).set_threshold(t)


@torch.no_grad()
def masked_logits(model, thresholds, ids) -> torch.Tensor:
    """``model``'s logits with each thresholded layer's input ``x`` replaced by ``x * (|x| > t)``."""
    def hook(t):
        return lambda mod, args: (torch.where(args[0].float().abs() > t, args[0], 0.0),)

    handles = [model.get_submodule(fqn).register_forward_pre_hook(hook(t.to(ids.device)))
               for fqn, t in thresholds.items()]
    try:
        return model(ids).logits.float()
    finally:
        for h in handles:
            h.remove()


class GraphTimer:
    """One forward, captured in a CUDA graph; :meth:`ms` is the median time of a replay, in ms."""

    def __init__(self, fn, warmup: int = 3):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):  # also lets the tuner pick kernels, which it cannot do while capturing
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.out = fn()

    def ms(self, steps: int, repeats: int = 7) -> float:
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                self.graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / steps)
        return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Llama-3-8B has 32)")
    parser.add_argument("--sparsity", default="0,40,50,70,90", help="comma-separated percentages of inputs skipped")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100, help="decode steps per timing run (GPU)")
    parser.add_argument("--small", action="store_true", help="tiny shapes (the default on CPU)")
    parser.add_argument("--method", choices=("magnitude", "per_channel"), default="magnitude",
                        help="one threshold per layer (TEAL) or per input channel")
    args = parser.parse_args()
    sparsities = [float(s) / 100 for s in args.sparsity.split(",")]
    if any(not 0 <= s < 1 for s in sparsities):
        parser.error(f"--sparsity: percentages must be in [0, 100), got {args.sparsity}")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    small = args.small or not gpu
    dtype = torch.float16 if gpu else torch.float32

    dense = build(args.layers, small, device, dtype)
    cfg = dense.config
    gen = torch.Generator(device).manual_seed(1)
    calib = [torch.randint(0, cfg.vocab_size, (4, 128 if gpu else 32), device=device, generator=gen)]
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), device=device, generator=gen)
    step = prompt[:, -1:].clone()  # the decode step's static input: one token, batch 1

    th = {s: calibrate_thresholds(dense, calib, s, args.method) for s in sparsities}
    sparse = st.sparsify(copy.deepcopy(dense), ActivationSparsity.from_thresholds(th[sparsities[0]]))
    n_mlp = sum(type(m).__name__ == "ActSparseMLP" for m in sparse.modules())
    n_lin = sum(type(m).__name__ == "ActSparseLinear" for m in sparse.modules()) - 3 * n_mlp
    shape = "small" if small else "Llama-3-8B"
    print(f"{device.type} {str(dtype).removeprefix('torch.')}, {shape} shapes (hidden {cfg.hidden_size}, "
          f"intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}), {args.layers} layers: "
          f"{n_mlp} ActSparseMLP + {n_lin} ActSparseLinear, lm_head dense, {args.method} thresholds")

    timers = None
    if gpu:
        try:
            timers = {name: GraphTimer(lambda m=m: m(step, use_cache=False).logits)
                      for name, m in (("dense", dense), ("sparse", sparse))}
        except RuntimeError as e:  # pragma: no cover - depends on the transformers version
            print(f"CUDA-graph capture failed ({str(e).splitlines()[0]}); no timings")
    if not gpu:
        print("CPU: correctness only (the CPU path is the pure-torch reference; no timings)")
    if timers is not None:
        print(f"one decode step = one token through the model, batch 1, no KV cache; "
              f"median of 7 runs of {args.steps} graph replays")
        print(f"{'sparsity':>8} {'skipped':>8} {'dense tok/s':>12} {'sparse tok/s':>13} {'speedup':>8} "
              f"{'max |err|':>10} {'max |logit|':>11}")
    else:
        print(f"{'sparsity':>8} {'skipped':>8} {'max |err|':>10} {'max |logit|':>11}")

    for s in sparsities:
        set_thresholds(sparse, th[s])
        report = activation_sparsity_report(dense, [prompt], th[s])
        skipped = sum(report.values()) / len(report)
        want = masked_logits(dense, th[s], prompt)
        with torch.no_grad():
            got = sparse(prompt).logits.float()
        err, scale = (got - want).abs().max().item(), want.abs().max().item()
        row = f"{100 * s:>7.0f}% {100 * skipped:>7.1f}%"
        if timers is not None:
            d_ms, s_ms = timers["dense"].ms(args.steps), timers["sparse"].ms(args.steps)
            row += f" {1e3 / d_ms:>12.1f} {1e3 / s_ms:>13.1f} {d_ms / s_ms:>7.2f}x"
        print(f"{row} {err:>10.2e} {scale:>11.2f}")
    if gpu and args.layers < 8:
        lm = cfg.vocab_size * cfg.hidden_size
        layers = sum(p.numel() for p in dense.model.layers.parameters())
        print(f"note: the dense lm_head holds {100 * lm / (lm + layers):.0f} % of the weight bytes read per step "
              f"at --layers {args.layers}; --layers 32 gives the full model's proportions")


if __name__ == "__main__":
    main()
