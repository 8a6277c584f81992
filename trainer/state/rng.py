"""This rank's random number streams, captured and restored for exact resume.

Python, numpy, torch CPU, torch CUDA (current device), megatron's tracker (dropout and init
streams), and any named generators (e.g. a rollout's own). `RNGState` is the stateful face the
run's checkpoint saves like any other component.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import torch

from tandem_core import cpu_compat


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """This rank's RNG streams: python, numpy, torch CPU, torch CUDA (current device), megatron's
    tracker (dropout/init streams), and any named generators (e.g. a rollout's own)."""
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "megatron": {
            k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()
        },
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if cpu_compat.cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict, generators: Mapping[str, torch.Generator] | None = None):
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["megatron"]:
        tensor_parallel.get_cuda_rng_tracker().set_states(
            {k: v.clone() for k, v in state["megatron"].items()}
        )
    if cpu_compat.cuda_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(
                f"the checkpoint has no RNG state for generator {name!r} "
                f"(it has {sorted(state['generators'])})"
            )
        g.set_state(state["generators"][name])


class RNGState:
    """The process's RNG streams as a checkpointable component (state_dict / load_state_dict)."""

    def state_dict(self) -> dict:
        return capture_rng_state()

    def load_state_dict(self, state: dict) -> None:
        restore_rng_state(state)
