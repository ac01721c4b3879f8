"""Run a Hugging Face Llama model's attention through :class:`BlockSparseAttention`.

``swap_llama_attention(model, policy)`` registers the attention function ``"sparse_triton_block_sparse"``
in ``transformers.AttentionInterface`` (with the SDPA mask builder in ``AttentionMaskInterface``, so a
plain causal mask arrives as ``None`` and padding arrives as a bool mask), attaches a
``BlockSparseAttention`` to every ``LlamaAttention`` as ``sparse_attention`` and switches
``model.config._attn_implementation`` to it. The projections, RoPE and KV cache stay Hugging Face's;
only the ``softmax(q k^T) v`` core changes. k/v reach the op with their ``num_key_value_heads`` (GQA
native: never repeated). Needs ``transformers >= 4.53`` (``pip install sparse-triton[hf]``).

Prefill (as many queries as keys) runs the policy top-left aligned on the sequence. Decoding with a KV
cache (``model.generate``, or ``model(ids, cache / past_key_values=..., use_cache=True)`` one token at a
time) runs the same policy on the last ``Sq`` positions: query ``i`` sits at ``Skv - Sq + i``
(bottom-right, ``BlockSparseAttention(..., q_offset=Skv - Sq)``), so a step's output equals the
prefill output at that position (dynamic top-k: see :meth:`BlockSparseAttention.dynamic_topk`). With at
most 16 queries per step the op runs the split-kv decode kernel on CUDA.

Calls with an explicit attention mask run dense SDPA instead (``fallback="dense"``, with a warning) or
raise (``fallback="error"``): padding, a custom pattern, a static cache past its prefill, and chunks of
several tokens appended to a non-empty cache (Hugging Face builds a mask for those). The policy cannot
express them: the mask does not say where each query sits.

Head dims the kernels do not take are refused by ``swap_llama_attention``. A swapped model deep-copies,
pickles and ``torch.save``-s whole; unpickling it registers the attention function again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..kernels.attention import HEAD_DIMS
from .attention import BlockSparseAttention

ATTN_IMPLEMENTATION = "sparse_triton_block_sparse"
SUPPORTED_MODEL_TYPES = ("llama",)
_FALLBACKS = ("dense", "error")


def _register() -> None:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError("swap_llama_attention needs transformers >= 4.53 (pip install 'sparse-triton[hf]')") from e
    AttentionInterface.register(ATTN_IMPLEMENTATION, block_sparse_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


class Fallback(str):
    """The ``fallback`` setting a swapped attention layer holds (``"dense"`` or ``"error"``; compares as that
    string). Unpickling it registers the attention function, so ``torch.load`` of a swapped model runs in
    a fresh process."""

    def __reduce__(self):
        return _unpickle_fallback, (str(self),)


def _unpickle_fallback(value: str) -> Fallback:
    _register()
    return Fallback(value)


def _dense(module, query, key, value, attention_mask, scaling, is_causal, why: str) -> torch.Tensor:
    mode = getattr(module, "sparse_attention_fallback", "dense")
    if mode == "error":
        raise ValueError(f"sparse_triton_block_sparse attention: {why} is not supported by the block-sparse "
                         "policy; pass fallback='dense' to swap_llama_attention to run those calls with dense SDPA")
    warnings.warn(f"sparse_triton_block_sparse attention: {why}; running dense SDPA for this call", stacklevel=3)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(query.dtype)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling,
        is_causal=bool(is_causal and attention_mask is None and query.shape[2] > 1),
        enable_gqa=query.shape[1] != key.shape[1])


def block_sparse_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                   attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                   scaling: float | None = None, is_causal: bool | None = None,
                                   **kwargs) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: ``query [B, Hq, Sq, D]``, ``key``/``value [B, Hkv, Skv, D]``
    -> ``(attn_output [B, Sq, Hq, D], None)`` through ``module.sparse_attention``.

    Without a mask the queries are the last ``Sq`` of the ``Skv`` positions (``q_offset = Skv - Sq``:
    prefill when equal, decoding with a KV cache when fewer), except a multi-token prefill into an empty
    static cache (more keys than queries, Hugging Face passes no mask): its keys past ``Sq`` are unwritten
    and dropped, the queries start at 0."""
    attn = getattr(module, "sparse_attention", None)
    if not isinstance(attn, BlockSparseAttention):
        raise RuntimeError(f"sparse_triton_block_sparse attention: {type(module).__name__} has no "
                           "BlockSparseAttention; install it with sparse_triton.nn.hf.swap_llama_attention(model, ...)")
    if dropout:
        raise ValueError(f"sparse_triton_block_sparse attention: attention dropout ({dropout}) is not supported; "
                         "set config.attention_dropout = 0.0 or call model.eval()")
    for name in ("softcap", "sliding_window", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"sparse_triton_block_sparse attention: {name}={kwargs[name]!r} is not supported")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(is_causal)
    Sq, Skv = query.shape[2], key.shape[2]
    if attention_mask is not None:
        out = _dense(module, query, key, value, attention_mask, scaling, is_causal,
                     "an explicit attention mask (padding, a custom pattern, a static cache, or several new "
                     "tokens on a non-empty cache)")
    elif 1 < Sq < Skv and causal:
        # Hugging Face passes no mask here only for a prefill into an empty static cache.
        out = attn(query, key[:, :, :Sq], value[:, :, :Sq], causal=True, scale=scaling, q_offset=0)
    else:
        out = attn(query, key, value, causal=causal, scale=scaling, q_offset=Skv - Sq)
    return out.transpose(1, 2).contiguous(), None


def _attention_modules(model: nn.Module, where: str) -> list[tuple[str, nn.Module]]:
    """``(module path, LlamaAttention)`` of every attention layer of ``model``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        got = f"model_type={model_type!r}" if config is not None else f"a {type(model).__name__} without a config"
        raise TypeError(f"{where}: expected a Hugging Face Llama model (LlamaForCausalLM / LlamaModel, "
                        f"model_type in {SUPPORTED_MODEL_TYPES}), got {got}")
    from transformers.models.llama.modeling_llama import LlamaAttention

    mods = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, LlamaAttention)]
    if not mods:
        raise TypeError(f"{where}: {type(model).__name__} holds no LlamaAttention module")
    return mods


def _head_dim(module: nn.Module) -> int:
    D = getattr(module, "head_dim", None)
    if D is None:
        cfg = module.config
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(D)


def swap_llama_attention(model: nn.Module,
                         policy: BlockSparseAttention | Callable[[int], BlockSparseAttention],
                         *, fallback: str = "dense") -> nn.Module:
    """Make a Hugging Face Llama model (``LlamaForCausalLM``, ``LlamaModel``) attend through
    :class:`BlockSparseAttention`; in place, returns ``model``.

    ``policy``: one ``BlockSparseAttention`` shared by every layer, or a factory ``layer_idx ->
    BlockSparseAttention`` (e.g. denser early layers). The model's ``scaling`` (``head_dim ** -0.5``)
    and causal flag are passed per call; prefill and KV-cache decoding both run the policy (see the
    module docstring). ``fallback`` (``"dense"`` or ``"error"``): what calls with an explicit attention
    mask do. Raises ``ValueError`` naming the layer if its head dim is not one the kernels take
    (32, 64, 96, 128, 256), before changing anything. Undo with :func:`restore_attention`. The
    state_dict is unchanged (the attached modules hold no tensors).

    >>> from transformers import LlamaConfig, LlamaForCausalLM  # doctest: +SKIP
    >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # doctest: +SKIP
    >>> model = swap_llama_attention(LlamaForCausalLM(cfg).eval(),
    ...                              BlockSparseAttention.sliding_window(64, block_size=64))  # doctest: +SKIP
    >>> model(torch.randint(0, 128, (1, 160))).logits.shape  # doctest: +SKIP
    torch.Size([1, 160, 128])
    >>> model.generate(torch.randint(0, 128, (1, 16)), max_new_tokens=8).shape  # decode: same policy  # doctest: +SKIP
    torch.Size([1, 24])
    """
    where = "swap_llama_attention"
    if not isinstance(fallback, str) or fallback not in _FALLBACKS:
        raise ValueError(f"{where}: fallback must be one of {_FALLBACKS}, got {fallback!r}")
    if not isinstance(policy, BlockSparseAttention) and not callable(policy):
        raise TypeError(f"{where}: policy must be a BlockSparseAttention or a callable layer_idx -> "
                        f"BlockSparseAttention, got {type(policy).__name__}")
    mods = _attention_modules(model, where)
    for fqn, m in mods:
        D = _head_dim(m)
        if D not in HEAD_DIMS:
            raise ValueError(f"{where}: layer {getattr(m, 'layer_idx', '?')} ({fqn}) has head_dim={D}; the "
                             f"block-sparse attention kernels support head dims {HEAD_DIMS}")
    attns = []
    for i, (fqn, m) in enumerate(mods):
        layer_idx = getattr(m, "layer_idx", i)
        attn = policy if isinstance(policy, BlockSparseAttention) else policy(layer_idx)
        if not isinstance(attn, BlockSparseAttention):
            raise TypeError(f"{where}: the policy factory returned {type(attn).__name__} for layer {layer_idx} "
                            f"({fqn}), expected a BlockSparseAttention")
        attns.append(attn)
    _register()
    for (_, m), attn in zip(mods, attns):
        m.sparse_attention = attn
        m.sparse_attention_fallback = Fallback(fallback)
    if not hasattr(model, "_sparse_triton_previous_attn"):
        model._sparse_triton_previous_attn = model.config._attn_implementation
    _set_implementation(model, ATTN_IMPLEMENTATION)
    return model


def restore_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`swap_llama_attention`: the previous attention implementation, no attached modules."""
    previous = getattr(model, "_sparse_triton_previous_attn", None)
    if previous is None:
        raise ValueError("restore_attention: the model's attention was not swapped by swap_llama_attention")
    for _, m in _attention_modules(model, "restore_attention"):
        for name in ("sparse_attention", "sparse_attention_fallback"):
            if hasattr(m, name):
                delattr(m, name)
    _set_implementation(model, previous)
    del model._sparse_triton_previous_attn
    return model


def _set_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
