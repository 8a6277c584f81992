"""The swap between training and generation is a context manager.

    with sharding_manager:
        prompts = sharding_manager.preprocess_data(prompts)   # training layout → rollout layout
        out = rollout.generate_sequences(prompts)
        out = sharding_manager.postprocess_data(out)          # rollout layout → training layout

`__enter__` makes the engine's weights equal to the trained ones and frees what training does
not need while generating; `__exit__` undoes it. One subclass per training strategy
(megatron_rollout.py); the engines' differences are the rollout's hooks, not subclasses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext

from tandem_core.protocol import Batch


class BaseShardingManager(ABC):
    @staticmethod
    def phase_timer(name: str) -> AbstractContextManager:
        """`with self.phase_timer(name):` wraps the sub-steps of `__enter__` (swap_gather,
        sync); the trainer replaces it with its own timer (wall time and peak GPU memory)."""
        return nullcontext()

    @abstractmethod
    def __enter__(self) -> BaseShardingManager: ...

    @abstractmethod
    def __exit__(self, exc_type, exc, tb) -> bool | None: ...

    def preprocess_data(self, batch: Batch) -> Batch:
        return batch

    def postprocess_data(self, batch: Batch) -> Batch:
        return batch


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
