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
needs_2_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs, found {GPUS}")


@pytest.fixture
def torchrun():
    return _cpu.run_torchrun
