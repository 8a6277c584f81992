"""Pluggable generation: `build_rollout(cfg.rollout, model_path)` returns the backend that
`cfg.rollout.name` names, wrapped in the multi-turn agent loop when `cfg.rollout.multi_turn`
says so. Importing this package registers the built-in backends; their engines (vLLM,
transformers) are imported only when one is built."""

from __future__ import annotations

from pathlib import Path

from rollout import hf_rollout, vllm_rollout  # noqa: F401  (registration side effect)
from rollout.base import (
    ROLLOUTS,
    BaseRollout,
    EngineParameters,
    build_engine,
    register_rollout,
)
from rollout.multi_turn import build_agent_loop
from rollout.sampling import SAMPLING_KEY, SamplingSettings, resolve_sampling
from tandem_core.config import RolloutConfig


def build_rollout(
    cfg: RolloutConfig,
    model_path: str | Path,
    *,
    dtype: str = "float32",
    max_model_len: int | None = None,
    routed_experts: bool = False,
) -> BaseRollout:
    """The engine (`build_engine`: backend, dtype, length bound, routed experts) and, with
    `cfg.multi_turn.enable`, the `AgentLoop` around it. Call it on every rank, after
    `init_distributed()`."""
    engine = build_engine(
        cfg, model_path, dtype=dtype, max_model_len=max_model_len, routed_experts=routed_experts
    )
    if not cfg.multi_turn.enable:
        return engine
    return build_agent_loop(engine, cfg, Path(model_path), max_model_len)


__all__ = [
    "BaseRollout",
    "EngineParameters",
    "SAMPLING_KEY",
    "SamplingSettings",
    "ROLLOUTS",
    "build_engine",
    "build_rollout",
    "register_rollout",
    "resolve_sampling",
]
