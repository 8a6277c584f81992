"""Mistral: the Llama layout. A sliding window shorter than the context is refused: Tandem's
attention is full causal attention and would silently attend further."""

from __future__ import annotations

from typing import Any

from archs import llama
from archs.base import ARCHS, Arch, Preset, SpecialTokens, refuse, register_preset
from tandem_core.model_args import ModelArgs


def model_args(cfg: dict[str, Any]) -> ModelArgs:
    window = cfg.get("sliding_window")
    if window is not None and window < cfg["max_position_embeddings"]:
        refuse(
            cfg,
            "sliding_window",
            f"a window shorter than max_position_embeddings="
            f"{cfg['max_position_embeddings']} needs sliding-window attention",
        )
    return llama.llama_args(cfg, "mistral", qkv_bias=False)


def hf_config(args: ModelArgs, tokens: SpecialTokens):
    from transformers import MistralConfig

    # A window as long as the context is the same as no window: supported.
    return MistralConfig(**llama.llama_hf_fields(args, tokens), sliding_window=None)


ARCHS.add("mistral", Arch("mistral", model_args, llama.WEIGHT_MAP, hf_config))

register_preset(Preset("tiny_mistral", llama.tiny_args(arch="mistral"), "tiny"))
