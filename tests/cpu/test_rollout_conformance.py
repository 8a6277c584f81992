"""The rollout conformance suite: the definition of done for a generation backend.

Parametrised over every backend in the registry (a backend that registers itself is picked up
with no change here), at rollout TP=1 and, where the backend supports it, TP=2; always two
ranks, so TP=1 also runs two independent engines on different prompts (rollout DP=2).
The checks themselves live in workers/rollout_conformance.py (one engine start per case):
shapes/dtypes, left/right padding, masks and positions, EOS, n>1 ordering, greedy equal to
transformers, log-probs equal to transformers (<=1e-4, fp32), mixed lengths, the max-tokens
boundary, bad input, sleep/wake and in-place weight loading.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rollout import registered_rollouts

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "workers" / "rollout_conformance.py"


@pytest.fixture
def torchrun():
    """conftest's launcher, but with `--standalone`.

    conftest passes `--master_port 0`, with which torch 2.13's agent hands the workers
    MASTER_PORT=0 and init_process_group waits forever on 2 ranks. Drop this fixture once
    conftest launches with `--standalone` (or a real free port).
    """

    def run(worker: str, nproc: int, *args: str, timeout: int = 600) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            env = {
                **os.environ,
                "TANDEM_RESULT": str(result),
                "OMP_NUM_THREADS": "1",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            }
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(nproc),
                str(WORKER.parent / worker),
                *args,
            ]
            # Own session, so a timeout ends the workers too, not only torchrun.
            proc = subprocess.Popen(
                cmd,
                env=env,
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
                pytest.fail(
                    f"{worker} timed out after {timeout}s\n{stdout[-6000:]}\n{stderr[-6000:]}"
                )
            if proc.returncode != 0:
                pytest.fail(
                    f"{worker} ({nproc} ranks) exited {proc.returncode}\n"
                    f"{stdout[-6000:]}\n{stderr[-6000:]}"
                )
            return json.loads(result.read_text())

    return run


def _cases():
    for name, builder in sorted(registered_rollouts().items()):
        tps = (1, 2) if getattr(builder, "supports_tensor_parallel", False) else (1,)
        for tp in tps:
            yield pytest.param(name, tp, id=f"{name}-tp{tp}")


@pytest.mark.parametrize("backend,tp", list(_cases()))
def test_rollout_conformance(backend, tp, tiny_ckpt, torchrun):
    # tiny_qwen2: qkv bias and tied embeddings, the less forgiving layout.
    result = torchrun("rollout_conformance.py", 2, backend, str(tp), str(tiny_ckpt("tiny_qwen2")))
    for key in ("greedy_logp_maxdiff", "sampled_logp_maxdiff", "updated_logp_maxdiff"):
        assert result[key] <= 1e-4, (key, result[key])
    assert result["eos_step"] >= 1  # EOS was checked mid-response, not only at step 0
