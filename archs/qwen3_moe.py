"""Qwen3-MoE: Qwen3's attention (per-head q/k norms) with mixture-of-experts MLPs: a router
(softmax, top-k, optionally renormalised: `norm_topk_prob`), no shared experts, and dense
Llama MLPs on the layers `mlp_only_layers` / `decoder_sparse_step` leave dense.

Experts are named one by one in the weight map (`experts.{e}.gate_proj`, the layout of the
checkpoints on the hub); the fused 3-D layout transformers 5 saves (`experts.gate_up_proj`
[E, 2·ffn, hidden] holding [gate; up] per expert, `experts.down_proj` [E, hidden, ffn]) is
described by `fused_expert_name`, which the importer (either layout) and the exporter (the
fused one, what transformers 5 writes) use.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from archs import llama, qwen3
from archs.base import ARCHS, Arch, Preset, Rule, SpecialTokens, WeightMap, refuse, register_preset
from tandem_core.model_args import ModelArgs

_DENSE_MLP = {
    pattern: replace(rule, on="dense")
    for pattern, rule in llama.WEIGHT_MAP.items()
    if ".mlp." in pattern
}
WEIGHT_MAP: WeightMap = {
    **{p: r for p, r in qwen3.WEIGHT_MAP.items() if ".mlp." not in p},
    **_DENSE_MLP,
    "decoder.layers.{i}.mlp.router.weight": Rule(
        "replicated", ("model.layers.{i}.mlp.gate.weight",), on="moe"
    ),
    "decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight": Rule(
        "gate_up",
        (
            "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
            "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
        ),
        on="moe",
    ),
    "decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight": Rule(
        "row", ("model.layers.{i}.mlp.experts.{e}.down_proj.weight",), on="moe"
    ),
}


def moe_layers(cfg: dict[str, Any], experts: int) -> tuple[int, ...]:
    """transformers' rule: a layer is sparse unless listed in mlp_only_layers, every
    decoder_sparse_step-th layer (1-based)."""
    dense = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step") or 1
    return tuple(
        int(experts > 0 and i not in dense and (i + 1) % step == 0)
        for i in range(cfg["num_hidden_layers"])
    )


def model_args(cfg: dict[str, Any]) -> ModelArgs:
    qwen3.check_attention(cfg)
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    if cfg.get("shared_expert_intermediate_size"):
        refuse(cfg, "shared_expert_intermediate_size", "Qwen3-MoE has no shared experts")
    base = llama.llama_args(cfg, "qwen3_moe", qkv_bias=False)
    return replace(
        base,
        qk_norm=True,
        num_experts=experts,
        moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        moe_router_topk=cfg["num_experts_per_tok"],
        moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=moe_layers(cfg, experts),
    )


def hf_config(args: ModelArgs, tokens: SpecialTokens):
    from transformers import Qwen3MoeConfig

    pattern = args.moe_layer_pattern()
    return Qwen3MoeConfig(
        **qwen3.qwen3_hf_fields(args, tokens),
        num_experts=args.num_experts,
        moe_intermediate_size=args.moe_ffn_hidden_size,
        num_experts_per_tok=args.moe_router_topk,
        norm_topk_prob=args.moe_norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i, moe in enumerate(pattern) if not moe],
    )


# ---- the fused expert layout of transformers 5 -------------------------------------------------
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fused_expert_name(name: str) -> tuple[str, int, int] | None:
    """A per-expert HF name -> (the fused tensor that holds it, expert, half): half 0 or 1 of
    `gate_up_proj` (gate, up) or -1 for all of `down_proj`'s entry. None for other names."""
    m = _PER_EXPERT.match(name)
    if m is None:
        return None
    prefix, expert, kind = m.group(1), int(m.group(2)), m.group(3)
    if kind == "down_proj":
        return f"{prefix}.down_proj", expert, -1
    return f"{prefix}.gate_up_proj", expert, 0 if kind == "gate_proj" else 1


ARCHS.add("qwen3_moe", Arch("qwen3_moe", model_args, WEIGHT_MAP, hf_config, fused_expert_name))

# 8 experts of FFN 64, top-2, renormalised; layer 2 of 4 dense (mlp_only_layers), so both kinds
# of layer and their boundary are exercised; q/k norms and head_dim as tiny_qwen3.
TINY_QWEN3_MOE = llama.tiny_args(
    arch="qwen3_moe",
    hidden_size=96,
    ffn_hidden_size=192,
    rope_theta=1e6,
    qk_norm=True,
    num_experts=8,
    moe_ffn_hidden_size=64,
    moe_router_topk=2,
    moe_norm_topk_prob=True,
    moe_layers=(1, 1, 0, 1),
)
register_preset(Preset("tiny_qwen3_moe", TINY_QWEN3_MOE, "tiny"))
# Qwen3-30B-A3B's routing at the tiny shape: 128 experts of FFN 32, top-8, renormalised, every
# layer sparse. Expert numbers run past one digit on every EP rank up to EP 8 (at EP 2, rank 1
# holds 64-127), which tiny_qwen3_moe's 8 experts never do: the EP-gathered weight sync pairs
# ranks' experts by position and once lost step here (hybrid_engine/allgather_pp.py).
register_preset(
    Preset(
        "tiny_qwen3_moe_128e",
        replace(
            TINY_QWEN3_MOE,
            num_experts=128,
            moe_ffn_hidden_size=32,
            moe_router_topk=8,
            moe_layers=(1, 1, 1, 1),
        ),
        "tiny",
    )
)

QWEN3_30B_A3B = ModelArgs(
    arch="qwen3_moe",
    num_layers=48,
    hidden_size=2048,
    num_attention_heads=32,
    num_query_groups=4,
    ffn_hidden_size=6144,
    vocab_size=151936,
    kv_channels=128,
    max_position_embeddings=40960,
    rope_theta=1e6,
    qk_norm=True,
    num_experts=128,
    moe_ffn_hidden_size=768,
    moe_router_topk=8,
    moe_norm_topk_prob=True,
)
"""Qwen3-30B-A3B (30.5B parameters, 3.3B active: 128 experts, top-8, every layer sparse)."""
register_preset(Preset("qwen3_30b_a3b", QWEN3_30B_A3B, "shape"))
