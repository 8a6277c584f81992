"""Qwen2: the Llama weight map plus biases on q/k/v (megatron: `linear_qkv.bias`, interleaved
per query group like the weight)."""

from __future__ import annotations

from weight_loaders.core import LLAMA_WEIGHT_MAP, Rule, llama_like_args, refuse, register_arch

QWEN2_WEIGHT_MAP = {
    **LLAMA_WEIGHT_MAP,
    "decoder.layers.{i}.self_attention.linear_qkv.bias": Rule(
        "qkv",
        (
            "model.layers.{i}.self_attn.q_proj.bias",
            "model.layers.{i}.self_attn.k_proj.bias",
            "model.layers.{i}.self_attn.v_proj.bias",
        ),
    ),
}


@register_arch("qwen2", QWEN2_WEIGHT_MAP)
def model_args(cfg):
    # Tandem's attention is full causal attention everywhere.
    if cfg.get("use_sliding_window"):
        refuse(cfg, "use_sliding_window", "sliding-window attention is not implemented")
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        refuse(cfg, "layer_types", "only full_attention layers are implemented")
    return llama_like_args(cfg, "qwen2", qkv_bias=True)
