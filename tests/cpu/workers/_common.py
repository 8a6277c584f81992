"""Helpers for torchrun worker scripts (imported by path from tests/cpu/workers)."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys

import torch.distributed as dist


def write_result(payload: dict) -> None:
    """Rank 0 writes the worker's result for the pytest side to read."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.environ["TANDEM_RESULT"], "w") as f:
            json.dump(payload, f)


def exit_now() -> None:
    """End a worker that finished: its result is written and its process groups are done.
    Python's teardown would add vLLM's engine shutdown and a final garbage collection over
    torch's, megatron's and vLLM's objects, 3-7 s per process on a 2-core host (trainer.main
    ends the same way). The one child a worker may still have, megatron's checkpoint writer's
    Manager (workers that call dist_checkpointing directly), is stopped first: the teardown
    skipped here is what would have stopped it."""
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=10)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
