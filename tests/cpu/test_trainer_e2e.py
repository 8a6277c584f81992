"""The whole program, as users run it: `python -m trainer.main <overrides>` (torchrun for 2).

- a few steps of ppo and grpo for TP=2, PP=2 and DP=2 (HF rollout), and TP=2 with vLLM at
  rollout TP=2;
- kill -9 at a random point, restart: the resumed run's metrics equal an uninterrupted run's,
  bitwise (timings aside);
- SIGTERM: a complete checkpoint at the step reached, a clean exit.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "data.train_batch_size=4",
    "actor.ppo_mini_batch_size=4",
    "critic.ppo_mini_batch_size=4",
    "rollout.n=2",
    "rollout.response_length=8",
    "data.task_size=64",
    "data.val_batch_size=8",
    "trainer.test_freq=0",
    "trainer.save_freq=0",
]


def command(nproc: int, overrides: list[str]) -> list[str]:
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "trainer.main",
        ]
        if nproc > 1
        else [sys.executable, "-m", "trainer.main"]
    )
    return launcher + overrides


def env(cache) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TANDEM_CACHE": str(cache),
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def run(nproc, overrides, cache, timeout=600):
    proc = subprocess.run(
        command(nproc, overrides),
        cwd=REPO,
        env=env(cache),
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("timing_s/")}


CASES = {
    "grpo-tp2": ["algorithm=grpo", "parallel=tp2", "rollout=hf"],
    "grpo-pp2": ["algorithm=grpo", "parallel=pp2", "rollout=hf"],
    "grpo-dp2": ["algorithm=grpo", "parallel=single", "rollout=hf"],
    "ppo-tp2": ["algorithm=ppo", "parallel=tp2", "rollout=hf"],
    "ppo-pp2": ["algorithm=ppo", "parallel=pp2", "rollout=hf"],
    "ppo-dp2": ["algorithm=ppo", "parallel=single", "rollout=hf"],
    "grpo-tp2-vllm-tp2": [
        "algorithm=grpo",
        "parallel=tp2",
        "rollout=vllm",
        "rollout.tensor_model_parallel_size=2",
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_rank_runs(case, cache_dir, tmp_path):
    out = tmp_path / "run"
    run(2, CASES[case] + SMALL + ["trainer.total_steps=2", f"trainer.output_dir={out}"], cache_dir)
    metrics = read_metrics(out / "metrics.jsonl")
    assert sorted(metrics) == [1, 2]
    for step in metrics.values():
        assert math.isfinite(step["actor/pg_loss"]) and step["actor/grad_norm"] > 0
        assert 0 <= step["critic/score/mean"] <= 1
        if case.startswith("ppo"):
            assert math.isfinite(step["critic/vf_loss"])
    # the HF export at the end is a loadable checkpoint
    assert (out / "hf" / "step_2" / "config.json").exists()


def test_kill9_then_resume_equals_uninterrupted(cache_dir, tmp_path):
    overrides = ["rollout=hf", "trainer.total_steps=4", "trainer.save_freq=1"] + SMALL[:-1]
    straight = tmp_path / "straight"
    run(1, overrides + [f"trainer.output_dir={straight}"], cache_dir)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        command(1, overrides + [f"trainer.output_dir={killed}"]),
        cwd=REPO,
        env=env(cache_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_1" / "complete.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before a checkpoint"
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))  # somewhere in steps 2-3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run(1, overrides + [f"trainer.output_dir={killed}"], cache_dir)
    assert "resuming from" in resumed.stdout

    want, got = read_metrics(straight / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert comparable(got[step]) == comparable(want[step]), f"step {step} differs"


def test_sigterm_leaves_complete_checkpoint(cache_dir, tmp_path):
    out = tmp_path / "run"
    overrides = ["rollout=hf", "trainer.total_steps=50"] + SMALL + [f"trainer.output_dir={out}"]
    proc = subprocess.Popen(
        command(1, overrides),
        cwd=REPO,
        env=env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not read_metrics(out / "metrics.jsonl"):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-3000:]
    last = max(read_metrics(out / "metrics.jsonl"))
    assert last < 50
    assert (out / "checkpoints" / f"step_{last}" / "complete.json").exists(), stdout[-2000:]


@pytest.mark.parametrize("algorithm", ["rloo", "reinforce_pp", "dapo", "drgrpo", "gspo"])
def test_every_algorithm_runs(algorithm, cache_dir, tmp_path):
    """The rest of the family, one process, HF rollout: each preset's estimator, loss and
    (dapo) dynamic sampling run and log finite numbers."""
    out = tmp_path / "run"
    small = [o for o in SMALL if not o.startswith("rollout.n=")] + ["rollout.n=4"]
    run(
        1,
        [
            f"algorithm={algorithm}",
            "rollout=hf",
            "trainer.total_steps=2",
            f"trainer.output_dir={out}",
        ]
        + small,
        cache_dir,
    )
    metrics = read_metrics(out / "metrics.jsonl")
    assert sorted(metrics) == [1, 2]
    for step in metrics.values():
        assert math.isfinite(step["actor/pg_loss"]) and math.isfinite(
            step["critic/advantages/mean"]
        )
        if algorithm == "dapo":
            assert step["dapo/kept_groups"] >= 0


@pytest.mark.parametrize("rollout", ["hf", "vllm"])
def test_random_init_runs_synced(rollout, cache_dir, tmp_path):
    """model.random_init: megatron's own init, the engine started on dummy weights. The first
    sync must replace them (engine log-probs = actor's) and the reference must start equal to
    the actor (KL 0 at step 1); the swap's halves and the sync are timed."""
    out = tmp_path / "run"
    overrides = [
        "algorithm=grpo",
        f"rollout={rollout}",
        "model.random_init=true",
        "trainer.total_steps=2",
    ]
    run(1, overrides + SMALL + [f"trainer.output_dir={out}"], cache_dir)
    metrics = read_metrics(out / "metrics.jsonl")
    assert sorted(metrics) == [1, 2]
    assert metrics[1]["rollout/logprob_abs_diff"] < 1e-4
    assert metrics[1]["actor/kl_loss"] == 0.0
    for key in ("swap_enter", "swap_exit", "sync", "generate", "gen"):
        assert metrics[2][f"timing_s/{key}"] >= 0
    assert metrics[2]["timing_s/gen"] >= metrics[2]["timing_s/generate"]
