"""The HybridEngine: the same ranks train and generate, swapped every iteration.

- `allgather_pp.AllGatherPPModel`: every pipeline stage's weights on every rank while generating.
- `base.BaseShardingManager`: the swap as a context manager; a registry by rollout name.
- `megatron_rollout`: megatron ⇄ vLLM and megatron ⇄ HF managers.
"""

from hybrid_engine import megatron_rollout  # noqa: F401  (registers the managers)
from hybrid_engine.allgather_pp import AllGatherPPModel
from hybrid_engine.base import BaseShardingManager, get_sharding_manager, register_sharding_manager

__all__ = [
    "AllGatherPPModel",
    "BaseShardingManager",
    "get_sharding_manager",
    "register_sharding_manager",
]
