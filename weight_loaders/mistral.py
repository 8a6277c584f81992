"""Mistral: the Llama weight map; a sliding window shorter than the context is refused,
because Tandem's attention is full causal attention and would silently attend further."""

from __future__ import annotations

from weight_loaders.core import LLAMA_WEIGHT_MAP, llama_like_args, refuse, register_arch


@register_arch("mistral", LLAMA_WEIGHT_MAP)
def model_args(cfg):
    window = cfg.get("sliding_window")
    if window is not None and window < cfg["max_position_embeddings"]:
        refuse(
            cfg,
            "sliding_window",
            f"a window shorter than max_position_embeddings="
            f"{cfg['max_position_embeddings']} needs sliding-window attention",
        )
    return llama_like_args(cfg, "mistral", qkv_bias=False)
