"""The swap between training and generation is a context manager.

    with sharding_manager:
        prompts = sharding_manager.preprocess_data(prompts)   # training layout → rollout layout
        out = rollout.generate_sequences(prompts)
        out = sharding_manager.postprocess_data(out)          # rollout layout → training layout

`__enter__` makes the engine's weights equal to the trained ones and frees what training does
not need while generating; `__exit__` undoes it. A pair (trainer, engine) is one subclass;
a registry maps the rollout backend's name to its manager, so the trainer names neither.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
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


_MANAGERS: dict[str, Callable[..., BaseShardingManager]] = {}


def register_sharding_manager(rollout_name: str):
    """Decorator: the manager used with `rollout.name=<rollout_name>`."""

    def decorate(cls):
        if rollout_name in _MANAGERS:
            raise ValueError(f"sharding manager for {rollout_name!r} registered twice")
        _MANAGERS[rollout_name] = cls
        return cls

    return decorate


def get_sharding_manager(rollout_name: str) -> Callable[..., BaseShardingManager]:
    if rollout_name not in _MANAGERS:
        raise KeyError(
            f"no sharding manager for rollout {rollout_name!r}; "
            f"known: {', '.join(sorted(_MANAGERS))}"
        )
    return _MANAGERS[rollout_name]


class StaleWeightsError(RuntimeError):
    pass


def check_weights_synced(rollout_log_probs, actor_log_probs, response_mask, tol: float) -> float:
    """Stale-weights detector: the engine's log-probs of its own samples must equal the
    actor's on the same tokens. Returns the max abs difference; raises past `tol`."""
    mask = response_mask.bool()
    diff = (rollout_log_probs - actor_log_probs).abs()[mask]
    worst = float(diff.max()) if diff.numel() else 0.0
    if worst > tol:
        raise StaleWeightsError(
            f"rollout and actor log-probs differ by {worst:.3g} > {tol:g}: the engine's weights "
            "are not the trained ones (weight sync skipped or partial?)"
        )
    return worst
