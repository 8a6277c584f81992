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
    num_experts: int = 0
    """Routed experts of a mixture-of-experts layer; 0 = a dense model."""
    moe_ffn_hidden_size: int = 0
    """FFN width of one expert."""
    moe_router_topk: int = 0
    """Experts each token is routed to."""
    moe_norm_topk_prob: bool = True
    """Renormalise the top-k routing probabilities to sum to 1 (Qwen3-MoE's norm_topk_prob);
    False: the softmax over all experts, taken at the top k."""
    moe_layers: tuple[int, ...] = ()
    """1 where layer i is a mixture-of-experts layer, 0 where it is dense (one entry per layer);
    () with num_experts > 0: every layer."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def moe_layer_pattern(self) -> list[int]:
        """One 0/1 per layer (megatron's `moe_layer_freq` as a list)."""
        if not self.is_moe:
            return [0] * self.num_layers
        return list(self.moe_layers) if self.moe_layers else [1] * self.num_layers

    def padded_vocab_size(self, tp: int) -> int:
        """Vocab rounded up so every TP rank holds an equal slice (megatron's convention)."""
        multiple = VOCAB_PAD_MULTIPLE * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)
