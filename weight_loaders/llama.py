"""Llama (and SmolLM2, which is a Llama): the shared Llama weight map, no biases."""

from __future__ import annotations

from weight_loaders.core import LLAMA_WEIGHT_MAP, llama_like_args, refuse, register_arch


@register_arch("llama", LLAMA_WEIGHT_MAP)
def model_args(cfg):
    # The megatron models are built with add_bias_linear=False: a bias would be dropped.
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            refuse(cfg, key, "Llama biases are not built into Tandem's megatron model")
    return llama_like_args(cfg, "llama", qkv_bias=False)
