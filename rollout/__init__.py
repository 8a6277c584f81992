"""Pluggable generation: `build_rollout(cfg.rollout, model_path)` returns the backend that
`cfg.rollout.name` names. Importing this package registers the built-in backends; their
engines (vLLM, transformers) are imported only when one is built."""

from rollout import hf_rollout, vllm_rollout  # noqa: F401  (registration side effect)
from rollout.base import (
    ROLLOUTS,
    BaseRollout,
    EngineParameters,
    build_rollout,
    register_rollout,
)
from rollout.sampling import SAMPLING_KEY, SamplingSettings, resolve_sampling

__all__ = [
    "BaseRollout",
    "EngineParameters",
    "SAMPLING_KEY",
    "SamplingSettings",
    "ROLLOUTS",
    "build_rollout",
    "register_rollout",
    "resolve_sampling",
]
