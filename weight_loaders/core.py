"""What every architecture module shares: the registry, the name-map types, config reading.

An architecture is a name map (data: megatron name pattern -> layout + HF name patterns, with
`{i}` the global layer number) plus a function from the HF config to `ModelArgs` that refuses
what Tandem cannot run. Architecture modules register themselves with `@register_arch`; nothing
here chooses by name substrings.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem_core.models import ModelArgs


class WeightLoaderError(ValueError):
    """A checkpoint or config that cannot be converted; the message names the tensor or key."""


@dataclass(frozen=True)
class Rule:
    """One megatron parameter: its layout (see `transforms.LAYOUTS`) and its HF tensor names."""

    layout: str
    hf: tuple[str, ...]


WeightMap = dict[str, Rule]


@dataclass(frozen=True)
class Arch:
    name: str
    weight_map: WeightMap
    model_args: Callable[[dict[str, Any]], ModelArgs]


ARCHS: dict[str, Arch] = {}


def register_arch(model_type: str, weight_map: WeightMap):
    """Decorator for `def model_args(hf_config: dict) -> ModelArgs` of one HF `model_type`."""

    def wrap(fn: Callable[[dict[str, Any]], ModelArgs]):
        ARCHS[model_type] = Arch(model_type, weight_map, fn)
        return fn

    return wrap


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise WeightLoaderError(
            f"unknown architecture {name!r}; Tandem converts: {', '.join(sorted(ARCHS))}"
        )
    return ARCHS[name]


# ---- HF config --------------------------------------------------------------------------------
def read_hf_config(hf_dir_or_config) -> dict[str, Any]:
    """config.json of a directory, a transformers config, or a dict, as a plain dict."""
    if isinstance(hf_dir_or_config, dict):
        return dict(hf_dir_or_config)
    if isinstance(hf_dir_or_config, str | os.PathLike):
        return json.loads((Path(hf_dir_or_config) / "config.json").read_text())
    return hf_dir_or_config.to_dict()  # a transformers PretrainedConfig


def model_args_from_hf(hf_dir_or_config) -> ModelArgs:
    """`ModelArgs` for an HF checkpoint, dispatched on `model_type`; unsupported features are
    refused with the config key named."""
    cfg = read_hf_config(hf_dir_or_config)
    if "model_type" not in cfg:
        raise WeightLoaderError("HF config has no `model_type`; cannot pick an architecture")
    return get_arch(cfg["model_type"]).model_args(cfg)


def refuse(cfg: dict[str, Any], key: str, why: str) -> None:
    raise WeightLoaderError(
        f"{cfg.get('model_type')}: config key `{key}`={cfg.get(key)!r} is not supported: {why}"
    )


def rope_theta(cfg: dict[str, Any]) -> float:
    """transformers 5 writes `rope_parameters`, older releases `rope_theta` + `rope_scaling`.
    Only plain RoPE is supported: megatron's rotary embedding here has no scaling variants."""
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


def llama_like_args(cfg: dict[str, Any], arch: str, qkv_bias: bool) -> ModelArgs:
    """The fields Llama, Qwen2 and Mistral configs share, with the common refusals."""
    if cfg.get("hidden_act", "silu") != "silu":
        refuse(cfg, "hidden_act", "the megatron models are built with SwiGLU (silu)")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return ModelArgs(
        arch=arch,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        kv_channels=head_dim,
        max_position_embeddings=cfg["max_position_embeddings"],
        rope_theta=rope_theta(cfg),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
    )


# ---- names ------------------------------------------------------------------------------------
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def split_layer(name: str) -> tuple[str, int | None]:
    """'decoder.layers.7.mlp.linear_fc2.weight' -> ('decoder.layers.{i}.mlp.linear_fc2.weight', 7)."""
    m = _LAYER.match(name)
    if m is None:
        return name, None
    return f"decoder.layers.{{i}}.{m.group(2)}", int(m.group(1))


def lookup(weight_map: WeightMap, megatron_name: str) -> tuple[Rule, list[str]]:
    """The rule for a megatron name (global layer numbering) and its concrete HF names."""
    pattern, layer = split_layer(megatron_name)
    if pattern not in weight_map:
        raise WeightLoaderError(
            f"megatron parameter {megatron_name!r} has no HF counterpart in this architecture"
        )
    rule = weight_map[pattern]
    return rule, [h.format(i=layer) for h in rule.hf]


def expected_hf_names(args: ModelArgs) -> Iterator[str]:
    """Every HF tensor name a checkpoint of `args` must hold (lm_head only when untied)."""
    for pattern, rule in get_arch(args.arch).weight_map.items():
        if pattern == "output_layer.weight" and args.tie_word_embeddings:
            continue
        layers = range(args.num_layers) if "{i}" in pattern else [None]
        for i in layers:
            for h in rule.hf:
                yield h.format(i=i)


# The weight map of the Llama family; qwen2 adds QKV biases, mistral uses it as is.
LLAMA_WEIGHT_MAP: WeightMap = {
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
