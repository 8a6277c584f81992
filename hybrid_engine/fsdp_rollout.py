"""FSDP2 (training) ⇄ a rollout engine on the same ranks.

FSDP2 keeps each rank's shard of every parameter and unshards one layer at a time, so there
is no pipeline stage to gather and no gradient buffer to free. enter (BaseShardingManager's
order): the spent gradients are dropped and, when configured, the optimizer states go to host
memory; the engine wakes its weights; the sync walks the parameters under their HF names (the
model *is* a transformers model), each shard cast to the compute dtype (the engine's) and
gathered to a full tensor by `full_tensor()` just before it is written, so no rank holds a
second whole model.

The first sync streams them through the engine's loader, which re-slices each for the
engine's TP. Then, for an engine at TP 1 that exposes its parameters, it plans direct copies
(weight_loaders.plan_full_tensor_copies: each HF tensor's block of a packed engine parameter)
and keeps the plan only if every planned view equals what the loader wrote, on every rank;
later syncs copy each gathered tensor into its view, and the loader takes the rest.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from hybrid_engine.base import BaseShardingManager
from hybrid_engine.memory import OptimizerOffload
from tandem_core import cpu_compat
from weight_loaders import plan_full_tensor_copies

log = logging.getLogger(__name__)


class FSDPShardingManager(BaseShardingManager):
    def __init__(
        self,
        actor_worker,
        rollout,
        weight_bucket_mb: int | None = 256,
        offload_optimizer: bool = False,
        generation_seed: int = 0,
        sleep_level: int = 1,
    ):
        self.worker = actor_worker
        self.bucket_mb = weight_bucket_mb
        trained = actor_worker.optimizer is not None
        self.optimizer_offload = (
            OptimizerOffload(actor_worker.optimizer) if offload_optimizer and trained else None
        )
        self.weight_filter = None  # tests hook a filter in to simulate a partial sync
        self.direct: dict[str, torch.Tensor] | None = None  # HF name -> engine view
        self.by_loader = True  # some tensor has no view: the loader takes those
        super().__init__(rollout, generation_seed, sleep_level)

    def free_training_memory(self, undo: list) -> None:
        if self.worker.optimizer is not None:
            self.worker.zero_grad()  # the last step's grads are spent; the next step makes new
        if self.optimizer_offload is not None:
            self.optimizer_offload.offload()
            undo.append(self.optimizer_offload.reload)

    def sync_weights(self) -> None:
        if self.direct is None:
            self.rollout.load_weights(self.hf_weights())
            self.direct = self._plan_direct_copies()
            names = [name for name, _ in self.worker.model.named_parameters()]
            self.by_loader = any(name not in self.direct for name in names)
            return
        if not self.direct:
            self.rollout.load_weights(self.hf_weights())
            return

        @torch.no_grad()
        def copy_planned():  # gathers in step on every rank; yields what no view covers
            for name, full in self.hf_weights():
                view = self.direct.get(name)
                if view is None:
                    yield name, full
                else:
                    view.copy_(full)

        if self.by_loader:
            self.rollout.load_weights(copy_planned())
        else:
            for _ in copy_planned():
                pass

    def _plan_direct_copies(self) -> dict[str, torch.Tensor]:
        """HF name -> engine view, checked against what the loader just wrote (all ranks must
        agree, or every sync keeps streaming)."""
        engine = self.rollout.engine_parameters()
        if engine is None or engine.tp_size != 1:
            return {}
        shapes = {name: p.shape for name, p in self.worker.model.named_parameters()}
        plan = plan_full_tensor_copies(shapes, engine.params, engine.packed)
        mismatch = None
        with torch.no_grad():
            for name, full in self.hf_weights():
                view = plan.get(name)
                if view is not None and mismatch is None:
                    if not torch.equal(view, full.to(view.dtype)):
                        mismatch = name
        agreed = torch.tensor([0 if mismatch else 1], device=cpu_compat.device())
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if not agreed.item():
            log.warning(
                "direct weight copies disabled: %s differs from the engine's loader", mismatch
            )
            return {}
        return plan

    def hf_weights(self):
        """(HF name, full tensor), lazily; every rank walks it in step (each tensor's gather is
        a collective), a filter (tests) only after the gather."""
        # cast to the engine's dtype before the gather; buckets of shards, one collective each
        stream = self.worker.full_tensors(self.worker.compute_dtype, self.bucket_mb)
        if self.weight_filter is not None:
            stream = filter(self.weight_filter, stream)
        return stream

    def restore_training_memory(self) -> None:
        if self.optimizer_offload is not None:
            self.optimizer_offload.reload()
