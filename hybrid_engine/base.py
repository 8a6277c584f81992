"""The swap between training and generation is a context manager.

    with sharding_manager:
        prompts = sharding_manager.preprocess_data(prompts)   # training layout → rollout layout
        out = rollout.generate_sequences(prompts)
        out = sharding_manager.postprocess_data(out)          # rollout layout → training layout

`__enter__` makes the engine's weights equal to the trained ones and frees what training does
not need while generating; `__exit__` undoes it. The swap's order, rollback, RNG and data
layout are `BaseShardingManager`'s; one subclass per training strategy says how its memory is
freed and its weights synced (megatron_rollout.py, fsdp_rollout.py); the engines' differences
are the rollout's hooks, not subclasses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist

from hybrid_engine.memory import return_cached_memory
from tandem_core.protocol import Batch


class BaseShardingManager(ABC):
    """The swap every training strategy shares; a strategy's subclass says how training frees
    its memory and how its weights reach the engine.

    enter: training frees what generation does not need (`free_training_memory`, which
    registers how to undo each step), torch's cached blocks go back to the device, the engine
    wakes its weights, the weights are synced (`sync_weights`), the strategy drops what the
    sync needed (`after_sync`), the engine wakes its KV cache and the generation RNG state is
    switched in. An exception inside enter rolls back what was done.
    exit: the engine sleeps, the training RNG state returns, training's memory comes back
    (`restore_training_memory`); exit always runs fully.

    Data: every rank holds the full prompt batch; `preprocess_data` hands each rollout
    data-parallel group its slice (all ranks of a rollout TP group the same prompts), and
    `postprocess_data` gathers the groups' outputs back into the full batch on every rank."""

    def __init__(self, rollout, generation_seed: int = 0, sleep_level: int = 1):
        self.rollout = rollout
        self.sleep_level = sleep_level
        self._gen_rng = _rng_state_from_seed(generation_seed)
        self._train_rng = None
        self._pad = 0
        # Outside the block the engine sleeps, from the start: training's first step gets the
        # memory the engine took at start-up, and the first enter is like every later one.
        self.rollout.sleep(level=self.sleep_level)

    @staticmethod
    def phase_timer(name: str) -> AbstractContextManager:
        """`with self.phase_timer(name):` wraps the sub-steps of `__enter__` (swap_gather,
        sync); the trainer replaces it with its own timer (wall time and peak GPU memory)."""
        return nullcontext()

    # ---- what a strategy provides -----------------------------------------------------------
    @abstractmethod
    def free_training_memory(self, undo: list) -> None:
        """Free what generation does not need; append to `undo` how to restore each step."""

    @abstractmethod
    def sync_weights(self) -> None:
        """Make the engine's weights the trained ones (the engine's weights awake)."""

    def after_sync(self) -> None:  # noqa: B027 (optional hook)
        """Drop what only the sync needed (e.g. gathered pipeline stages)."""

    @abstractmethod
    def restore_training_memory(self) -> None:
        """Undo `free_training_memory` (exit)."""

    # ---- the swap ---------------------------------------------------------------------------
    def __enter__(self):
        undo = []
        try:
            return_cached_memory()  # training's activations, cached: not a swap cost
            self.free_training_memory(undo)
            return_cached_memory()
            self.wake_weights()
            undo.append(lambda: self.rollout.sleep(level=self.sleep_level))
            with self.phase_timer("sync"):
                self.sync_weights()
            self.after_sync()
            return_cached_memory()
            self.wake_cache()
            self._train_rng = _get_rng_state()
            _set_rng_state(self._gen_rng)
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        self._gen_rng = _get_rng_state()
        _set_rng_state(self._train_rng)
        self.rollout.sleep(level=self.sleep_level)
        self.restore_training_memory()
        return False

    # Engines that can wake weights and KV cache separately get the weights pushed before the
    # KV cache is re-allocated (peak memory = weights + one bucket, not weights + cache).
    def wake_weights(self) -> None:
        self.rollout.wake_up(tags=["weights"])

    def wake_cache(self) -> None:
        self.rollout.wake_up(tags=["kv_cache"])

    def state_dict(self) -> dict:
        return {"generation_rng": self._gen_rng}

    def load_state_dict(self, state: dict) -> None:
        self._gen_rng = state["generation_rng"]

    # ---- data layout ------------------------------------------------------------------------
    def preprocess_data(self, batch: Batch) -> Batch:
        dp, rank = self.rollout.dp_size, self.rollout.dp_rank
        if dp == 1:
            return batch
        padded, self._pad = batch.pad_to_divisor(dp)
        self._padded_rows = len(padded)
        return padded.chunk(dp)[rank]

    def postprocess_data(self, batch: Batch) -> Batch:
        dp, tp = self.rollout.dp_size, self.rollout.tp_size
        if dp == 1:
            return batch
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, batch.to("cpu"))
        # Ranks of one rollout TP group hold the same outputs: keep the first of each group.
        full = Batch.concat([parts[g * tp] for g in range(dp)])
        n = len(full) // self._padded_rows  # samples per prompt
        return full.unpad(self._pad * n)


# ---- RNG states (torch CPU and, when present, CUDA) ------------------------------------------
def _get_rng_state():
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def _rng_state_from_seed(seed: int):
    saved = _get_rng_state()
    torch.manual_seed(seed)
    state = _get_rng_state()
    _set_rng_state(saved)
    return state


class StaleWeightsError(RuntimeError):
    pass


def check_weights_synced(rollout_log_probs, actor_log_probs, response_mask, tol: float) -> float:
    """Stale-weights detector: the engine's log-probs of its own samples must equal the
    actor's on the same tokens. Returns the max abs difference; raises past `tol`."""
    mask = response_mask.bool()
    diff = (rollout_log_probs - actor_log_probs).abs()[mask]
    worst = float(diff.max()) if diff.numel() else 0.0
    if not worst <= tol:  # NaN too: an engine left half-loaded can produce it
        raise StaleWeightsError(
            f"rollout and actor log-probs differ by {worst:.3g} > {tol:g}: the engine's weights "
            "are not the trained ones (weight sync skipped or partial?)"
        )
    return worst
