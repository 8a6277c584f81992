"""Fixtures for the NCCL suite: the CPU suite's torchrun launcher, run on CUDA devices."""

import importlib.util
from pathlib import Path

import pytest
import torch

_CPU_CONFTEST = Path(__file__).resolve().parents[1] / "cpu" / "conftest.py"
_spec = importlib.util.spec_from_file_location("tandem_cpu_conftest", _CPU_CONFTEST)
_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cpu)

GPUS = torch.cuda.device_count()


def needs_gpus(n: int):
    return pytest.mark.skipif(GPUS < n, reason=f"needs {n} CUDA GPUs, found {GPUS}")


needs_2_gpus = needs_gpus(2)


@pytest.fixture
def torchrun():
    return _cpu.run_torchrun


@pytest.fixture(scope="session")
def tiny_checkpoints():
    """Build the tiny checkpoints here, before any torchrun: built inside a process group,
    transformers writes the weights and config.json on global rank 0 only, so a cold cache
    won by another rank would hold a checkpoint without them."""
    from archs import ensure_tiny_checkpoint

    return {
        name: ensure_tiny_checkpoint(name)
        for name in ("tiny_llama", "tiny_llama_wide", "tiny_qwen3_moe")
    }
