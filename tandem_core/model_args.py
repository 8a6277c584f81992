"""`ModelArgs`: the one architecture-neutral description of a decoder-only transformer.

Every package reads a model's shape from here: the config check, the planner, the megatron
builder, the weight loaders. An architecture module (archs/) turns its HF config into one; no
other code reads an HF config. Plain data: importing it costs nothing (no megatron, no torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

VOCAB_PAD_MULTIPLE = 128
"""megatron pads the vocab to a multiple of this × TP, so every TP rank holds an equal slice."""


@dataclass(frozen=True)
class ModelArgs:
    """A decoder-only transformer's shape, as megatron builds it (read from an HF config)."""

    arch: str
    """The architecture module (archs/) that reads and writes its checkpoints."""
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """KV heads (GQA)."""
    ffn_hidden_size: int
    vocab_size: int
    kv_channels: int
    """Head dim."""
    max_position_embeddings: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    """RMSNorm over each head of q and k before RoPE (Qwen3)."""

    def padded_vocab_size(self, tp: int) -> int:
        """Vocab rounded up so every TP rank holds an equal slice (megatron's convention)."""
        multiple = VOCAB_PAD_MULTIPLE * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)
