"""The rollout contract and its registry.

A backend is a class with one abstract method, `generate_sequences(batch) -> batch`
(DESIGN.md "Contracts"), registered under a name with `@register_rollout("name")`. The trainer
only ever calls `rollout.build_rollout(cfg.rollout, model_path, ...)`, so adding a backend
never touches trainer code.

The other methods (`wake_up`, `sleep`, `load_weights`, `engine_parameters`) are plain hooks that
a ShardingManager calls around generation. They are not abstract: an engine with nothing to
free sleeps as a no-op, and one that exposes no parameters gets every sync through
`load_weights`. `load_weights` has no default because an engine whose weights silently stay
stale is the worst failure an RL loop can have.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem_core.config import RolloutConfig
from tandem_core.protocol import Batch
from tandem_core.registry import Registry


@dataclass(frozen=True)
class EngineParameters:
    """This rank's engine parameters, for weight syncs that write them in place."""

    params: dict[str, torch.Tensor]
    """By HF name, except fused modules, which appear under their own name (`qkv_proj`)."""
    packed: dict[str, list[str]]
    """Fused module -> the HF modules it stacks, in row order (vLLM's packed_modules_mapping)."""
    tp_size: int
    expert_parallel: bool = False
    """The engine splits each MoE layer's experts over its TP ranks, whole (vLLM's expert
    parallelism): this rank's stacks hold some experts, named in `params` by global id."""


def experts_by_name(
    params: dict[str, torch.Tensor], expert_ids: dict[str, list[int]] | None = None
) -> dict[str, torch.Tensor]:
    """Engines stack a MoE layer's experts as `torch.nn.Linear` holds each: vLLM's
    `….experts[.routed_experts].w13_weight` and transformers' `….experts.gate_up_proj`
    [E, 2I, H] (each expert's gate rows, then its up rows), vLLM's `….w2_weight` and
    transformers' `….experts.down_proj` [E, H, I]. Adds expert e's pieces under the HF
    per-expert names, as views into those stacks: `….experts.{e}.gate_up_proj.weight` (the
    packed [gate_proj, up_proj]) and `….experts.{e}.down_proj.weight`, so that direct copies
    can plan them like any packed parameter. `expert_ids`: a stack's global expert ids, for
    stacks that hold only some of the layer's experts (the engine's expert parallelism); the
    others hold every expert in order."""
    out = dict(params)
    for name, stacked in params.items():
        # vLLM >= 0.24 keeps them in the MoE runner's `routed_experts` module
        kinds = "w13_weight|w2_weight|gate_up_proj|down_proj"
        stack = re.fullmatch(rf"(.*)\.experts\.(?:routed_experts\.)?({kinds})", name)
        if stack is None or stacked.dim() != 3:
            continue
        prefix, kind = stack.groups()
        member = "gate_up_proj" if kind in ("w13_weight", "gate_up_proj") else "down_proj"
        ids = (expert_ids or {}).get(name) or range(stacked.shape[0])
        for e, piece in zip(ids, stacked, strict=True):
            out[f"{prefix}.experts.{e}.{member}.weight"] = piece
    return out


class BaseRollout(ABC):
    supports_tensor_parallel: bool = False
    """True when rollout TP > 1 works (the conformance suite then also runs TP=2)."""

    tp_size: int = 1
    """Ranks in this rank's rollout TP group; they must all receive the same prompts."""
    dp_rank: int = 0
    """This rank's index among rollout data-parallel groups (world // tp_size of them)."""
    dp_size: int = 1

    @abstractmethod
    def generate_sequences(self, prompts: Batch) -> Batch:
        """Left-padded prompts in, prompts ++ responses out (see rollout/assemble.py)."""

    # ---- hooks for the sharding manager (not abstract on purpose, see module docstring) ----
    def wake_up(self, tags: list[str] | None = None) -> None:  # noqa: B027 (optional hook)
        """Re-allocate what `sleep` freed; tags (`weights`, `kv_cache`) wake a part only."""

    def sleep(self, level: int = 1) -> None:  # noqa: B027 (optional hook)
        """Free memory between generations (1: caches; 2: caches and weights)."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Make the engine's weights equal to these HF-named tensors (full, unsharded)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load weights in place")

    def engine_parameters(self) -> EngineParameters | None:
        """The engine's own parameters, when copies into them are a valid weight update and the
        tensors stay the same across sleep and wake (syncs after the first then copy straight
        into them; see weight_loaders/direct_copy.py). None: every sync uses `load_weights`."""
        return None


RolloutBuilder = Callable[..., BaseRollout]
ROLLOUTS = Registry("rollout backend")
"""rollout.name -> backend class (or factory); the conformance suite runs every entry."""


def register_rollout(name: str) -> Callable[[RolloutBuilder], RolloutBuilder]:
    """Class (or factory) decorator: `rollout.name=<name>` builds it."""
    return ROLLOUTS.register(name)


def build_engine(
    cfg: RolloutConfig,
    model_path: str | Path,
    *,
    dtype: str = "float32",
    max_model_len: int | None = None,
    routed_experts: bool = False,
) -> BaseRollout:
    """The backend named by `cfg.name`, loaded from an HF checkpoint directory (what
    `rollout.build_rollout` builds, before any multi-turn wrapping).

    `max_model_len` bounds prompt + response tokens (None: the checkpoint's
    max_position_embeddings). `routed_experts`: outputs carry a `routed_experts` column (MoE
    models; the experts each token was routed to, for routing replay). Call it on every rank,
    after `init_distributed()`.
    """
    extra = {"routed_experts": True} if routed_experts else {}
    return ROLLOUTS[cfg.name](
        cfg, Path(model_path), dtype=dtype, max_model_len=max_model_len, **extra
    )
