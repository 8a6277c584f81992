"""Qwen3 (dense): a Llama with an RMSNorm over each head of q and k before RoPE
(megatron: `qk_layernorm`), no QKV bias, and a head_dim that need not be hidden / heads."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from archs import llama
from archs.base import ARCHS, Arch, Preset, Rule, SpecialTokens, WeightMap, refuse, register_preset
from tandem_core.model_args import ModelArgs

QK_NORM_MAP: WeightMap = {
    "decoder.layers.{i}.self_attention.q_layernorm.weight": Rule(
        "replicated", ("model.layers.{i}.self_attn.q_norm.weight",)
    ),
    "decoder.layers.{i}.self_attention.k_layernorm.weight": Rule(
        "replicated", ("model.layers.{i}.self_attn.k_norm.weight",)
    ),
}
"""The per-head norms: one [head_dim] weight each, the same on every TP rank."""

WEIGHT_MAP: WeightMap = {**llama.WEIGHT_MAP, **QK_NORM_MAP}


def check_attention(cfg: dict[str, Any]) -> None:
    """What Qwen3 and Qwen3-MoE share: full causal attention, no biases."""
    if cfg.get("attention_bias"):
        refuse(cfg, "attention_bias", "Qwen3 attention biases are not built into the model")
    if cfg.get("use_sliding_window"):
        refuse(cfg, "use_sliding_window", "sliding-window attention is not implemented")
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        refuse(cfg, "layer_types", "only full_attention layers are implemented")


def model_args(cfg: dict[str, Any]) -> ModelArgs:
    check_attention(cfg)
    return replace(llama.llama_args(cfg, "qwen3", qkv_bias=False), qk_norm=True)


def qwen3_hf_fields(args: ModelArgs, tokens: SpecialTokens) -> dict[str, Any]:
    # Qwen3 configs always name head_dim (it is 128 where hidden / heads is not).
    fields = llama.llama_hf_fields(args, tokens)
    fields.update(head_dim=args.kv_channels, attention_bias=False, use_sliding_window=False)
    return fields


def hf_config(args: ModelArgs, tokens: SpecialTokens):
    from transformers import Qwen3Config

    return Qwen3Config(**qwen3_hf_fields(args, tokens))


ARCHS.add("qwen3", Arch("qwen3", model_args, WEIGHT_MAP, hf_config))

# head_dim 32 with hidden 96 and 4 heads: q is 128 wide, so a head_dim taken from hidden / heads
# would fail the parity tests.
register_preset(
    Preset(
        "tiny_qwen3",
        llama.tiny_args(
            arch="qwen3", hidden_size=96, ffn_hidden_size=192, rope_theta=1e6, qk_norm=True
        ),
        "tiny",
    )
)
QWEN3_0P6B = ModelArgs(
    arch="qwen3",
    num_layers=28,
    hidden_size=1024,
    num_attention_heads=16,
    num_query_groups=8,
    ffn_hidden_size=3072,
    vocab_size=151936,
    kv_channels=128,
    max_position_embeddings=40960,
    rope_theta=1e6,
    tie_word_embeddings=True,
    qk_norm=True,
)
"""Qwen3-0.6B (0.6B parameters, head_dim 128 over hidden 1024 / 16 heads)."""
QWEN3_8B = ModelArgs(
    arch="qwen3",
    num_layers=36,
    hidden_size=4096,
    num_attention_heads=32,
    num_query_groups=8,
    ffn_hidden_size=12288,
    vocab_size=151936,
    kv_channels=128,
    max_position_embeddings=40960,
    rope_theta=1e6,
    qk_norm=True,
)
"""Qwen3-8B (8.2B parameters, untied embeddings)."""
register_preset(Preset("qwen3_0p6b", QWEN3_0P6B, "shape"))
register_preset(Preset("qwen3_8b", QWEN3_8B, "shape"))
