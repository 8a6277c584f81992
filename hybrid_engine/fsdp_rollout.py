"""FSDP2 (training) ⇄ a rollout engine on the same ranks.

FSDP2 keeps each rank's shard of every parameter and unshards one layer at a time, so there
is no pipeline stage to gather and no gradient buffer to free. enter (BaseShardingManager's
order): the gradients are dropped and, when configured, the optimizer states go to host
memory; the engine wakes its weights; the sync streams every parameter under its HF name
(the model *is* a transformers model), each gathered to a full tensor by `full_tensor()` just
before the engine's loader takes it, so no rank holds a second whole model. The engine's own
loader re-slices each tensor for the engine's TP.

Left out for now: direct copies into the engine's parameters (the megatron manager's plan
after the first sync). Every sync here goes through the engine's loader.
"""

from __future__ import annotations

from hybrid_engine.base import BaseShardingManager
from hybrid_engine.memory import OptimizerOffload


class FSDPShardingManager(BaseShardingManager):
    def __init__(
        self,
        actor_worker,
        rollout,
        offload_optimizer: bool = False,
        generation_seed: int = 0,
        sleep_level: int = 1,
    ):
        self.worker = actor_worker
        trained = actor_worker.optimizer is not None
        self.optimizer_offload = (
            OptimizerOffload(actor_worker.optimizer) if offload_optimizer and trained else None
        )
        self.weight_filter = None  # tests hook a filter in to simulate a partial sync
        super().__init__(rollout, generation_seed, sleep_level)

    def free_training_memory(self, undo: list) -> None:
        if self.worker.optimizer is not None:
            self.worker.zero_grad()  # the last step's grads are spent; the next step makes new
        if self.optimizer_offload is not None:
            self.optimizer_offload.offload()
            undo.append(self.optimizer_offload.reload)

    def sync_weights(self) -> None:
        self.rollout.load_weights(self.hf_weights())

    def hf_weights(self):
        """(HF name, full tensor), lazily; every rank walks it in step (each tensor's gather is
        a collective), a filter (tests) only after the gather."""
        stream = self.worker.full_tensors()
        if self.weight_filter is not None:
            stream = filter(self.weight_filter, stream)
        return stream

    def restore_training_memory(self) -> None:
        if self.optimizer_offload is not None:
            self.optimizer_offload.reload()
