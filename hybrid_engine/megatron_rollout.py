"""Megatron (training) ⇄ a rollout engine on the same ranks.

enter, in this order (STYLE habit 2, slime's ordering):
  1. AllGatherPPModel gathers every pipeline stage, so each rank holds the whole model (its
     training-TP shard);
  2. gradient buffers are freed; optimizer states go to host memory when configured; torch's
     allocator returns its cached blocks (training activations, the freed grads) to the device,
     else the engine's wake-up could not use that memory;
  3. the engine wakes its weights (not yet its KV cache), and the weights are synced. The first
     sync streams HF-named full tensors, gathered over training TP one tensor (or bucket) at a
     time and re-sliced by the engine's own loader for its TP, so no rank ever holds a second
     full model. It then plans direct copies (weight_loaders/direct_copy.py) for the tensors
     that map from megatron's shards onto the engine's parameters (all of them when the
     engine's TP divides training's, through bucketed gathers over training TP when it is
     smaller), and keeps the plan only if it reproduces what the loader wrote; later syncs
     are fused copies of those, and the stream for the rest;
  4. foreign stages are released right after the push (the engine has its own copy), and their
     memory returned to the device before the KV cache is allocated;
  5. the engine wakes its KV cache; the generation RNG state is switched in.
exit: the engine sleeps; the training RNG state returns; optimizer states and gradient buffers
come back. An exception inside `enter` rolls back what was done; `exit` always runs fully.

One class serves every engine: what differs between engines (whether the weights and the KV
cache wake apart, whether the engine exposes parameters for direct copies, what sleep frees)
is the rollout's own hooks (rollout/base.py).

The order, rollback, RNG and data layout are BaseShardingManager's (hybrid_engine/base.py).
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.distributed as dist

from hybrid_engine.allgather_pp import AllGatherPPModel
from hybrid_engine.base import BaseShardingManager
from hybrid_engine.memory import OptimizerOffload, release_grad_buffers, restore_grad_buffers
from rollout.base import EngineParameters
from tandem_core import cpu_compat
from tandem_core import distributed as D
from weight_loaders import (
    DirectCopies,
    plan_direct_copies,
    stream_hf_weights,
    with_every_expert,
)

log = logging.getLogger(__name__)


class MegatronShardingManager(BaseShardingManager):
    def __init__(
        self,
        actor_worker,
        rollout,
        weight_bucket_mb: int | None = None,
        offload_optimizer: bool = False,
        generation_seed: int = 0,
        sleep_level: int = 1,
    ):
        self.worker = actor_worker
        self.bucket_mb = weight_bucket_mb
        self.trained = actor_worker.optimizer is not None
        self.allgather = AllGatherPPModel(actor_worker.chunks, D.pp_group())
        self.optimizer_offload = (
            OptimizerOffload(actor_worker.optimizer) if offload_optimizer and self.trained else None
        )
        self.weight_filter = None  # tests hook a filter in to simulate a partial sync
        self.direct: DirectCopies | None = None  # planned at the first sync
        super().__init__(rollout, generation_seed, sleep_level)

    def free_training_memory(self, undo: list) -> None:
        with self.phase_timer("swap_gather"):
            self.allgather.gather()
        undo.append(self.allgather.release)
        if self.trained:
            release_grad_buffers(self.worker.chunks)
            undo.append(lambda: restore_grad_buffers(self.worker.chunks))
        if self.optimizer_offload is not None:
            self.optimizer_offload.offload()
            undo.append(self.optimizer_offload.reload)

    def after_sync(self) -> None:
        self.allgather.release()  # the engine has its own copy of the foreign stages

    def restore_training_memory(self) -> None:
        if self.optimizer_offload is not None:
            self.optimizer_offload.reload()
        if self.trained:
            restore_grad_buffers(self.worker.chunks)
        self.allgather.release()

    def sync_weights(self) -> None:
        """Make the engine's weights the trained ones (the engine's weights awake, the whole
        model gathered)."""
        if self.direct is None:
            self.rollout.load_weights(self.hf_weights())
            self.direct = self._plan_direct_copies()
            return
        keep = None if self.weight_filter is None else lambda name: self.weight_filter((name, None))
        self.direct.copy(keep)
        if self.direct.remaining:
            self.rollout.load_weights(self.hf_weights(set(self.direct.remaining)))

    def _plan_direct_copies(self) -> DirectCopies:
        """Planned right after the engine's own loader wrote every tensor, and kept only if each
        planned piece equals what that loader wrote, on every rank; else all goes by stream."""
        # An engine without writable parameters: nothing maps, every tensor goes by stream.
        engine = self.rollout.engine_parameters() or EngineParameters({}, {}, tp_size=0)
        named = list(self.allgather.named_parameters())
        plan = plan_direct_copies(
            named,
            self.worker.args,
            engine.params,
            engine.packed,
            D.tp_size(),
            engine.tp_size,
            tp_group=D.tp_group(),
            tp_rank=D.tp_rank(),
            bucket_mb=self.bucket_mb or 256,
            ep_size=D.ep_size(),
            ep_group=D.ep_group() if D.ep_size() > 1 else None,
            engine_ep=engine.expert_parallel,
        )
        mismatch = plan.first_mismatch()
        agreed = torch.tensor([0 if mismatch else 1], device=cpu_compat.device())
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if not agreed.item():
            if mismatch:
                log.warning(
                    "direct weight copies disabled: %s differs from the engine's loader", mismatch
                )
            plan = DirectCopies(remaining=[name for name, _ in named])
        return plan

    def hf_weights(self, names: set[str] | None = None):
        """The lazy HF-named stream of the whole model, or of the megatron tensors in `names`
        (TP gathered, bucketed when asked)."""
        named = self.allgather.named_parameters()
        if names is not None:
            named = ((n, t) for n, t in named if n in names)
        # Each EP rank holds a share of the experts; the engine gets all of them.
        named = with_every_expert(named, self.worker.args, D.ep_group())
        stream = stream_hf_weights(named, self.worker.args, D.tp_group(), self.bucket_mb)
        # Buckets are the unit an out-of-process transport ships; an in-process engine loads
        # pairs, so they are flattened again (still lazy: one bucket materialised at a time).
        if self.bucket_mb:
            stream = itertools.chain.from_iterable(stream)
        if self.weight_filter is not None:
            stream = filter(self.weight_filter, stream)
        return stream
