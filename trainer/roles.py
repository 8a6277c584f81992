"""What the loop needs of each part, as small Protocols: the loop (trainer/loop.py) calls only
these methods, whichever training strategy or backend built the part. A reader (and a type
checker) follows `p.actor.update_policy(batch)` from here to the class that runs it:

- Actor: trainer/workers/actor.py (`PolicyActor`), on a megatron or an FSDP2 worker
  (trainer/workers/model.py, trainer/workers/fsdp.py; the strategies: trainer/build.py)
- Reference: trainer/workers/reference.py (`ReferencePolicy`)
- Critic: trainer/workers/critic.py (`ValueCritic`)
- the rollout engine: rollout/base.py (`BaseRollout`, one abstract method) and its backends
- the swap: hybrid_engine/base.py (`BaseShardingManager`), hybrid_engine/megatron_rollout.py,
  hybrid_engine/fsdp_rollout.py
- Scorer: trainer/rewards.py (`RewardScorer`)
- PromptSource: trainer/data.py (`PromptLoader`)
- KLController: trainer/core_algos.py (`FixedKLController`, `AdaptiveKLController`)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from tandem_core.protocol import Batch


class Actor(Protocol):
    def compute_log_prob(self, batch: Batch, calculate_entropy: bool = False) -> Batch:
        """`log_probs` [B, R] (and `entropy`) of the batch's responses, on every rank."""

    def update_policy(self, batch: Batch) -> dict[str, float]:
        """PPO epochs over the batch's mini-batches; metrics under `actor/`."""


class Reference(Protocol):
    def compute_ref_log_prob(self, batch: Batch) -> Batch:
        """`ref_log_probs` [B, R] under the initial policy."""


class Critic(Protocol):
    def compute_values(self, batch: Batch) -> Batch:
        """`values` [B, R]."""

    def update_critic(self, batch: Batch) -> dict[str, float]:
        """Value-loss epochs over the batch's mini-batches; metrics under `critic/`."""


class Scorer(Protocol):
    def score_batch(self, batch: Batch, tokenizer) -> tuple[torch.Tensor, dict[str, float]]:
        """Token-level scores [B, R] (the reward on each response's last token) and metrics."""

    def close(self) -> None: ...


class PromptSource(Protocol):
    def next_batch(self) -> Batch: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class KLController(Protocol):
    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
