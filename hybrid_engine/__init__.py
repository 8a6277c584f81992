"""The HybridEngine: the same ranks train and generate, swapped every iteration.

- `allgather_pp.AllGatherPPModel`: every pipeline stage's weights on every rank while generating.
- `base.BaseShardingManager`: the swap as a context manager.
- `megatron_rollout.MegatronShardingManager`: megatron ⇄ any rollout engine.
- `fsdp_rollout.FSDPShardingManager`: FSDP2 ⇄ any rollout engine.
"""

from hybrid_engine.allgather_pp import AllGatherPPModel
from hybrid_engine.base import BaseShardingManager, StaleWeightsError, check_weights_synced
from hybrid_engine.fsdp_rollout import FSDPShardingManager
from hybrid_engine.megatron_rollout import MegatronShardingManager

__all__ = [
    "AllGatherPPModel",
    "BaseShardingManager",
    "FSDPShardingManager",
    "MegatronShardingManager",
    "StaleWeightsError",
    "check_weights_synced",
]
