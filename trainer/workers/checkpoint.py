"""One megatron role's state (model chunks, optimizer, LR scheduler, a few counters) in and
out of a directory, through megatron's `dist_checkpointing` (torch_dist format, collective).

`ModelWorker.save_sharded` / `load_sharded` call these; the run's checkpoint directory, its
manifest and rotation are trainer/state/checkpoints.py's, which knows nothing of megatron.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.managers import SyncManager
from pathlib import Path

import torch
import torch.distributed as dist

from tandem_core import cpu_compat
from tandem_core.lifetime import die_with_parent, forked_children_die_with_us
from trainer.workers.optimizer import (
    init_empty_adam_state,
    load_scheduler_state,
    set_adam_kernel,
    torch_adams,
    untie_adam_steps,
)


def _chunk_key(i: int, n: int) -> str:
    # megatron's own naming: "model" for one chunk, "model0", "model1", ... for VPP.
    return "model" if n == 1 else f"model{i}"


def _sharded_state_dict(chunks, optimizer, scheduler, counters, sharding, is_loading) -> dict:
    from megatron.core.utils import unwrap_model

    metadata = {"distrib_optim_sharding_type": sharding, "chained_optim_avoid_prefix": True}
    chunks = unwrap_model(chunks)
    state = {
        _chunk_key(i, len(chunks)): c.sharded_state_dict(metadata=metadata)
        for i, c in enumerate(chunks)
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=metadata
        )
        state["scheduler"] = scheduler.state_dict()
    state["worker"] = counters
    return state


def writer_results_queue():
    """The results queue of megatron's checkpoint writer, from a Manager that dies with us.

    megatron's writer (`filesystem_async._get_write_results_queue`) spawns one
    multiprocessing Manager per process at the first save and keeps it for the whole run: a
    fresh interpreter that re-imports the launcher's `__main__` (~300 MB for trainer.main).
    Nothing stops it when this process is killed (kill -9, the OOM killer): it lives on as an
    orphan. The same spawned Manager, told to die with its parent, takes its place; megatron
    reuses whatever queue its module holds. (The kernel watches the thread that started it:
    saves run on the main thread.) The file writers megatron forks at every save
    (`write_preloaded_data_multiproc`) are told the same, through a fork hook."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    forked_children_die_with_us()

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(die_with_parent, (os.getpid(),))
        # the queue's proxy holds its manager, which lives as long as megatron's module does
        filesystem_async._results_queue = manager.Queue()
    return filesystem_async._results_queue


def save_megatron(
    path: Path, chunks, optimizer, scheduler, counters: dict, sharding: str = "dp_reshardable"
) -> None:
    """Model chunks (+ optimizer, scheduler) and plain `counters` into `path` (collective).

    `sharding` picks the distributed optimizer's format: dp_reshardable (Megatron-LM's default:
    no communication; megatron documents resharding over DP only) or fully_reshardable
    (gathered on DP rank 0; documented to reshard over TP/PP too). Only resuming with the same
    layout is tested here."""
    from megatron.core import dist_checkpointing

    if not dist.is_initialized() or dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    writer_results_queue()
    with cpu_compat.megatron_device_scope():
        state = _sharded_state_dict(chunks, optimizer, scheduler, counters, sharding, False)
        dist_checkpointing.save(state, str(path), sharded_strategy=("torch_dist", 1))


def load_megatron(
    path: Path, chunks, optimizer, scheduler, counters: dict, sharding: str = "dp_reshardable"
) -> dict:
    """Restore what `save_megatron` wrote into already-built chunks of the same layout; returns
    the saved counters (`counters` gives their keys)."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    # no_grad: in fp32 the distributed optimizer's main params are views of the model's.
    with cpu_compat.megatron_device_scope(), torch.no_grad():
        if optimizer is not None:
            # torch's load replaces the param groups with the saved ones, kernel flag included;
            # this run's flag wins, as its LR schedule does (load_scheduler_state)
            adams = torch_adams(optimizer)
            fused = all(g.get("fused", False) for a in adams for g in a.param_groups)
            init_empty_adam_state(optimizer)
        template = _sharded_state_dict(chunks, optimizer, scheduler, counters, sharding, True)
        state = dist_checkpointing.load(template, str(path))
        plain = unwrap_model(chunks)
        for i, c in enumerate(plain):
            c.load_state_dict(state[_chunk_key(i, len(plain))], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
            untie_adam_steps(optimizer)
            set_adam_kernel(optimizer, fused)
            load_scheduler_state(scheduler, state["scheduler"])
    return state["worker"]
