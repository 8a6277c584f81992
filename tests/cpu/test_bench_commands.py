"""The GPU benchmark sets' training commands, checked on CPU: a misspelt key or a layout Tandem
refuses would otherwise surface only on a GPU machine. And bench_grpo's side-by-side run of
routing replay on and off, end to end on a tiny model (slow set)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_grpo, run_all
from trainer.config_check import load_config

REPO = Path(__file__).resolve().parents[2]


def test_the_two_gpu_grpo_run_is_a_config_tandem_accepts(monkeypatch):
    from rollout import vllm_compat

    monkeypatch.setattr(vllm_compat, "returns_routed_experts", lambda: True)  # CUDA vLLM's
    argv = run_all.GPU2_SET["grpo"]
    nproc = int(argv[argv.index("--nproc") + 1])
    key, _, values = argv[argv.index("--compare") + 1].partition("=")
    overrides = argv[argv.index("--") + 1 :]
    for value in values.split(","):
        cfg = load_config([*overrides, f"{key}={value}", *bench_grpo.FIXED], world_size=nproc)
        assert cfg.parallel.expert_model_parallel_size == nproc
        assert cfg.model.preset == "qwen3_30b_a3b" and cfg.model.num_layers == 4
        assert cfg.actor.router_replay == (value == "true")
        assert cfg.trainer.save_freq == 0 and not cfg.trainer.save_at_end
        assert (cfg.data.train_batch_size, cfg.rollout.n, cfg.rollout.response_length) == (
            32,
            8,
            256,
        )
        assert cfg.rollout.name == "vllm"


@pytest.mark.slow  # two 2-rank GRPO runs of 3 steps (about two minutes)
def test_bench_grpo_shows_replay_narrowing_the_gap(tmp_path):
    """Qwen3-30B-A3B's routing at the tiny shape, bf16, the hf engine: the step-1 batch is the
    same under both values, and replaying the engine's experts narrows its log-prob gap."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "benchmarks.bench_grpo", "--nproc", "2", "--steps", "2"]
    cmd += ["--compare", "actor.router_replay=true,false", "--out", str(out), "--"]
    cmd += ["model=tiny_qwen3_moe", "model.preset=tiny_qwen3_moe_128e", "rollout=hf"]
    cmd += ["parallel.expert_model_parallel_size=2", "model.dtype=bfloat16"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from trainer.tracking import read_metrics

    gap = {
        v: read_metrics(out / v / "run0" / "metrics.jsonl")[1]["rollout/logprob_abs_diff"]
        for v in ("true", "false")
    }
    assert gap["true"] < 0.85 * gap["false"], gap
    assert "step-1 gap, actor.router_replay=true over false" in proc.stdout
