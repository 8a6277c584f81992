"""slurm/ppo_70b.sh on one machine: stand-in sbatch/srun/scontrol (tests/cpu/fake_slurm) first on
PATH make a two-"node" job whose hosts are both localhost; the ranks rendezvous over gloo.

The script is not told it is faked: it reads slurm's environment, asks scontrol for the hosts,
runs the planner, then srun. Only the interpreter (PYTHON) is swapped in the launch-plumbing
tests, for one that runs a small real entry point (init_distributed + a collective) in place of
trainer.main; the end-to-end test runs trainer.main itself.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "ppo_70b.sh"
FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"

TINY = [  # a tiny GRPO run that fits two CPU ranks (the script's 70B defaults come first)
    "model=tiny_llama",
    "model.path=null",
    "parallel=single",
    "rollout=hf",
    "data.max_prompt_length=64",
    "rollout.response_length=16",
    "data.train_batch_size=4",
    "rollout.n=2",
    "actor.ppo_mini_batch_size=2",
    "actor.micro_batch_size=2",
    "data.task_size=64",
    "trainer.test_freq=0",
]

ENTRY = """
import json, os, sys
import torch, torch.distributed as dist
from trainer.config_check import load_config
from tandem_core.distributed import init_distributed

launch = init_distributed()
cfg = load_config(sys.argv[1:], world_size=launch.world_size)
x = torch.tensor([float(launch.rank + 1)])
dist.all_reduce(x)
env = {k: os.environ.get(k) for k in ("SLURM_PROCID", "SLURM_NODEID", "MASTER_ADDR", "MASTER_PORT")}
print("ENTRY", json.dumps(dict(rank=launch.rank, world=launch.world_size, sum=x.item(),
      output_dir=cfg.trainer.output_dir, steps=cfg.trainer.total_steps, **env)), flush=True)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stand_in_python(tmp_path: Path, entry: str) -> Path:
    """An interpreter that runs `entry` (python code) for `-m trainer.main`, else python itself."""
    (tmp_path / "entry.py").write_text(entry)
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/bin/bash\n"
        'if [[ "$1" == -m && "$2" == trainer.main ]]; then shift 2;'
        f' exec {sys.executable} {tmp_path / "entry.py"} "$@"; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def job_env(tmp_path: Path, job_id: int, python: str | Path = sys.executable, **extra) -> dict:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))
    }
    env.update(
        PATH=f"{FAKE_SLURM}{os.pathsep}{env['PATH']}",
        PYTHON=str(python),
        PYTHONPATH=str(REPO),
        RUN_ROOT=str(tmp_path / "runs"),
        FAKE_SLURM_JOB_ID=str(job_id),
        FAKE_SLURM_LOG=str(tmp_path / "slurm_calls.log"),
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        PYTHONWARNINGS="ignore",
        **extra,
    )
    return env


def sbatch(env: dict, *overrides: str, nodes: int = 2, timeout: int = 120):
    cmd = ["sbatch", f"--nodes={nodes}", "--ntasks-per-node=1", str(SCRIPT), *overrides]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def entry_records(log: Path) -> list[dict]:
    import json

    lines = [line for line in log.read_text().splitlines() if "ENTRY " in line]
    return sorted(
        (json.loads(line.split("ENTRY ", 1)[1]) for line in lines), key=lambda r: r["rank"]
    )


# ---- static checks ----------------------------------------------------------------------------------
def test_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); not checked")
    proc = subprocess.run(
        ["shellcheck", "--severity=style", str(SCRIPT)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


def test_header_asks_for_what_the_issue_says():
    header = [line for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH")]
    for option in (
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--requeue",
        "--signal=B:USR1@120",
        "--time=",
    ):
        assert any(line.startswith(f"#SBATCH {option}") for line in header), option


# ---- the planner through the script ----------------------------------------------------------------
def test_plan_mode_checks_the_shipped_70b_job(tmp_path):
    """`slurm/ppo_70b.sh --plan`: the job's world (4 nodes × 8) and defaults, no slurm needed."""
    env = job_env(tmp_path, 1)
    ok = subprocess.run(
        ["bash", str(SCRIPT), "--plan", "--gpu-memory-gb", "79.1"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "world 32 = TP 8 × PP 4 × DP 1 (SP); rollout vllm TP 8" in ok.stdout
    assert ok.stdout.count(": fits") == 3


def test_a_refused_layout_fails_before_any_rank_starts(tmp_path):
    env = job_env(tmp_path, 7101, python=stand_in_python(tmp_path, ENTRY))
    proc = sbatch(env, *TINY, "parallel.pipeline_model_parallel_size=3")
    assert proc.returncode == 1
    assert "parallel.pipeline_model_parallel_size: 3 does not divide the model's 4 layers" in (
        proc.stderr
    )
    assert "the planner refused this layout" in proc.stderr
    logs = tmp_path / "runs" / "ppo_70b-7101" / "logs"
    assert (logs / "plan.0.txt").exists() and not (logs / "train.0.log").exists()


# ---- launch plumbing: rendezvous, ranks, run directory, requeue ----------------------------------
@pytest.mark.slow  # about 45 s of CI; the requeue and refusal tests stay in the fast set
def test_two_node_launch_rendezvous_and_run_directory(tmp_path):
    env = job_env(tmp_path, 7102, python=stand_in_python(tmp_path, ENTRY))
    proc = sbatch(env, *TINY, "trainer.total_steps=3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / "ppo_70b-7102"
    assert f"2 nodes, 2 ranks, rendezvous localhost:{env['MASTER_PORT']}" in proc.stdout
    assert "Memory plan: tiny_llama" in proc.stdout  # the planner ran on the batch host
    records = entry_records(run_dir / "logs" / "train.0.log")
    assert [(r["rank"], r["world"], r["SLURM_NODEID"]) for r in records] == [
        (0, 2, "0"),
        (1, 2, "1"),
    ]
    assert all(r["sum"] == 3.0 for r in records)  # a real gloo all_reduce across the "nodes"
    assert {r["MASTER_ADDR"] for r in records} == {"localhost"}
    # The caller's override wins over the script's default (500); output_dir is the run dir.
    assert {(r["steps"], r["output_dir"]) for r in records} == {(3, str(run_dir))}

    # A requeued attempt (same job id) lands in the same run directory, with its own logs.
    again = sbatch({**env, "SLURM_RESTART_COUNT": "1"}, *TINY, "trainer.total_steps=3")
    assert again.returncode == 0, again.stderr
    assert "attempt 1" in again.stdout
    assert {r["output_dir"] for r in entry_records(run_dir / "logs" / "train.1.log")} == {
        str(run_dir)
    }


def test_a_failing_rank_fails_the_job(tmp_path):
    crash = ENTRY.replace("dist.all_reduce(x)", "assert launch.rank != 1, 'rank 1 fails'")
    env = job_env(tmp_path, 7103, python=stand_in_python(tmp_path, crash))
    proc = sbatch(env, *TINY)
    assert proc.returncode != 0 and "srun exited with status" in proc.stdout
    log = (tmp_path / "runs" / "ppo_70b-7103" / "logs" / "train.0.log").read_text()
    assert re.search(r"^1: .*AssertionError: rank 1 fails", log, re.M), log


def test_usr1_before_the_time_limit_requeues_the_job(tmp_path):
    hold = "import time, sys\nprint('ENTRY-START', flush=True)\ntime.sleep(60)\n"
    env = job_env(tmp_path, 7104, python=stand_in_python(tmp_path, hold))
    proc = subprocess.Popen(
        ["sbatch", "--nodes=2", "--ntasks-per-node=1", str(SCRIPT), *TINY],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log = tmp_path / "runs" / "ppo_70b-7104" / "logs" / "train.0.log"
        deadline = time.time() + 90
        while not (log.exists() and log.read_text().count("ENTRY-START") == 2):
            assert time.time() < deadline and proc.poll() is None, "the ranks never started"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGUSR1)  # what slurm sends the batch shell 120 s before
        deadline = time.time() + 20
        calls = tmp_path / "slurm_calls.log"
        while not calls.exists():
            assert time.time() < deadline, "no scontrol requeue after USR1"
            time.sleep(0.2)
        assert calls.read_text() == "requeue 7104\n"
        assert proc.poll() is None  # the trap returned to waiting for srun
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
    assert "requeueing job 7104" in out


# ---- end to end with the real trainer ----------------------------------------------------------------
@pytest.mark.slow
def test_two_node_job_trains_to_completion(tmp_path):
    """trainer.main on two stand-in nodes (gloo), one step; then a requeued attempt resumes."""
    if not (REPO / "trainer" / "main.py").exists():
        pytest.skip("trainer/main.py is not written yet")
    env = job_env(tmp_path, 7105)
    proc = sbatch(env, *TINY, "trainer.total_steps=1", "trainer.save_freq=1", timeout=900)
    run_dir = tmp_path / "runs" / "ppo_70b-7105"
    log = run_dir / "logs" / "train.0.log"
    assert proc.returncode == 0, proc.stdout[-3000:] + (
        log.read_text()[-6000:] if log.exists() else ""
    )
    assert "srun exited with status 0" in proc.stdout
    text = log.read_text()
    assert any(line.startswith("0: ") for line in text.splitlines())
    written = sorted(p.name for p in run_dir.iterdir() if p.name != "logs")
    assert written, "the trainer wrote nothing into the run directory"

    again = sbatch(
        {**env, "SLURM_RESTART_COUNT": "1"},
        *TINY,
        "trainer.total_steps=2",
        "trainer.save_freq=1",
        timeout=900,
    )
    log1 = run_dir / "logs" / "train.1.log"
    assert again.returncode == 0, again.stdout[-3000:] + (
        log1.read_text()[-6000:] if log1.exists() else ""
    )
    assert "resum" in log1.read_text().lower()  # the trainer found the first attempt's checkpoint
