"""Run a Hugging Face Llama model's attention through :class:`BlockSparseAttention`.

``swap_llama_attention(model, policy)`` registers the attention function ``"sparse_triton_block_sparse"``
in ``transformers.AttentionInterface`` (with the SDPA mask builder in ``AttentionMaskInterface``, so a
plain causal mask arrives as ``None`` and padding arrives as a bool mask), attaches a
``BlockSparseAttention`` to every ``LlamaAttention`` as ``sparse_attention`` and switches
``model.config._attn_implementation`` to it. The projections, RoPE and KV cache stay Hugging Face's;
only the ``softmax(q k^T) v`` core changes. k/v reach the op with their ``num_key_value_heads`` (GQA
native: never repeated). Needs ``transformers >= 4.53`` (``pip install sparse-triton[hf]``).

Calls the block-sparse policy cannot express run dense SDPA instead (``fallback="dense"``, with a
warning) or raise (``fallback="error"``): a padding / custom attention mask, and decoding with a KV
cache (fewer queries than keys: the policy's masks are top-left aligned, decode is bottom-right).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

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
    -> ``(attn_output [B, Sq, Hq, D], None)`` through ``module.sparse_attention``."""
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
    Sq, Skv = query.shape[2], key.shape[2]
    if attention_mask is not None:
        out = _dense(module, query, key, value, attention_mask, scaling, is_causal,
                     "an explicit attention mask (padding or a custom pattern)")
    elif Sq > 1 and Skv >= Sq and is_causal:
        # Skv > Sq without a mask: prefill into an empty static cache, whose tail keys no query may see.
        key, value = key[:, :, :Sq], value[:, :, :Sq]
        out = attn(query, key, value, causal=True, scale=scaling)
    elif Sq == Skv:
        out = attn(query, key, value, causal=bool(is_causal) and Sq > 1, scale=scaling)
    else:
        out = _dense(module, query, key, value, None, scaling, is_causal,
                     f"{Sq} queries against {Skv} cached keys (decoding)")
    return out.transpose(1, 2).contiguous(), None


def _attention_modules(model: nn.Module, where: str) -> list[nn.Module]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        got = f"model_type={model_type!r}" if config is not None else f"a {type(model).__name__} without a config"
        raise TypeError(f"{where}: expected a Hugging Face Llama model (LlamaForCausalLM / LlamaModel, "
                        f"model_type in {SUPPORTED_MODEL_TYPES}), got {got}")
    from transformers.models.llama.modeling_llama import LlamaAttention

    mods = [m for m in model.modules() if isinstance(m, LlamaAttention)]
    if not mods:
        raise TypeError(f"{where}: {type(model).__name__} holds no LlamaAttention module")
    return mods


def swap_llama_attention(model: nn.Module,
                         policy: BlockSparseAttention | Callable[[int], BlockSparseAttention],
                         *, fallback: str = "dense") -> nn.Module:
    """Make a Hugging Face Llama model (``LlamaForCausalLM``, ``LlamaModel``) attend through
    :class:`BlockSparseAttention`; in place, returns ``model``.

    ``policy``: one ``BlockSparseAttention`` shared by every layer, or a factory ``layer_idx ->
    BlockSparseAttention`` (e.g. denser early layers). The model's ``scaling`` (``head_dim ** -0.5``)
    and causal flag are passed per call. ``fallback`` (``"dense"`` or ``"error"``): what calls the
    policy cannot express do, see the module docstring. Undo with :func:`restore_attention`. The
    state_dict is unchanged (the attached modules hold no tensors).

    >>> from transformers import LlamaConfig, LlamaForCausalLM  # doctest: +SKIP
    >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # doctest: +SKIP
    >>> model = swap_llama_attention(LlamaForCausalLM(cfg).eval(),
    ...                              BlockSparseAttention.sliding_window(64, block_size=64))  # doctest: +SKIP
    >>> model(torch.randint(0, 128, (1, 160))).logits.shape  # doctest: +SKIP
    torch.Size([1, 160, 128])
    """
    where = "swap_llama_attention"
    if fallback not in _FALLBACKS:
        raise ValueError(f"{where}: fallback must be one of {_FALLBACKS}, got {fallback!r}")
    if not isinstance(policy, BlockSparseAttention) and not callable(policy):
        raise TypeError(f"{where}: policy must be a BlockSparseAttention or a callable layer_idx -> "
                        f"BlockSparseAttention, got {type(policy).__name__}")
    mods = _attention_modules(model, where)
    _register()
    for i, m in enumerate(mods):
        layer_idx = getattr(m, "layer_idx", i)
        attn = policy if isinstance(policy, BlockSparseAttention) else policy(layer_idx)
        if not isinstance(attn, BlockSparseAttention):
            raise TypeError(f"{where}: the policy factory returned {type(attn).__name__} for layer {layer_idx}, "
                            "expected a BlockSparseAttention")
        m.sparse_attention = attn
        m.sparse_attention_fallback = fallback
    if not hasattr(model, "_sparse_triton_previous_attn"):
        model._sparse_triton_previous_attn = model.config._attn_implementation
    _set_implementation(model, ATTN_IMPLEMENTATION)
    return model


def restore_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`swap_llama_attention`: the previous attention implementation, no attached modules."""
    previous = getattr(model, "_sparse_triton_previous_attn", None)
    if previous is None:
        raise ValueError("restore_attention: the model's attention was not swapped by swap_llama_attention")
    for m in _attention_modules(model, "restore_attention"):
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
