"""Qwen2 (and Qwen2.5): a Llama with biases on q/k/v (megatron: `linear_qkv.bias`, interleaved
per query group like the weight); full attention only."""

from __future__ import annotations

from typing import Any

from archs import llama
from archs.base import ARCHS, Arch, Preset, Rule, SpecialTokens, WeightMap, refuse, register_preset
from tandem_core.model_args import ModelArgs

WEIGHT_MAP: WeightMap = {
    **llama.WEIGHT_MAP,
    "decoder.layers.{i}.self_attention.linear_qkv.bias": Rule(
        "qkv",
        (
            "model.layers.{i}.self_attn.q_proj.bias",
            "model.layers.{i}.self_attn.k_proj.bias",
            "model.layers.{i}.self_attn.v_proj.bias",
        ),
    ),
}


def model_args(cfg: dict[str, Any]) -> ModelArgs:
    # Tandem's attention is full causal attention everywhere.
    if cfg.get("use_sliding_window"):
        refuse(cfg, "use_sliding_window", "sliding-window attention is not implemented")
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        refuse(cfg, "layer_types", "only full_attention layers are implemented")
    return llama.llama_args(cfg, "qwen2", qkv_bias=True)


def hf_config(args: ModelArgs, tokens: SpecialTokens):
    from transformers import Qwen2Config

    return Qwen2Config(**llama.llama_hf_fields(args, tokens), use_sliding_window=False)


ARCHS.add("qwen2", Arch("qwen2", model_args, WEIGHT_MAP, hf_config))

register_preset(
    Preset(
        "tiny_qwen2",
        llama.tiny_args(arch="qwen2", tie_word_embeddings=True, rope_theta=1e6, qkv_bias=True),
        "tiny",
    )
)
QWEN2_0P5B = ModelArgs(
    arch="qwen2",
    num_layers=24,
    hidden_size=896,
    num_attention_heads=14,
    num_query_groups=2,
    ffn_hidden_size=4864,
    vocab_size=151936,
    kv_channels=64,
    max_position_embeddings=32768,
    rope_theta=1e6,
    tie_word_embeddings=True,
    qkv_bias=True,
)
"""Qwen2.5-0.5B (0.49B parameters): the 0.5B benchmark shape."""
register_preset(Preset("qwen2_0p5b", QWEN2_0P5B, "shape"))
