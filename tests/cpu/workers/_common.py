"""Helpers for torchrun worker scripts (imported by path from tests/cpu/workers)."""

from __future__ import annotations

import json
import os

import torch.distributed as dist


def write_result(payload: dict) -> None:
    """Rank 0 writes the worker's result for the pytest side to read."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.environ["TANDEM_RESULT"], "w") as f:
            json.dump(payload, f)


def exit_now() -> None:
    """End a worker that finished (its result written) as trainer.main ends a run."""
    from trainer.cli import exit_without_teardown

    exit_without_teardown(0)
