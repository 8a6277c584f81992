"""A killed trainer leaves nothing running: its reward workers and what it forked die with it,
and torchrun's ranks end with torchrun (tandem_core/lifetime.py). Each check kills a small
parent process with SIGKILL, as kill -9 or the OOM killer would, and watches its helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
from conftest import left_running

REPO = Path(__file__).resolve().parents[2]


def kill_quietly(pids: list[int]) -> None:
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def run_and_get_pids(script: str, tmp_path: Path) -> list[int]:
    """Run `script` (which prints pids, then SIGKILLs itself); the pids it printed. Its output
    goes to a file: a pipe would stay open in the children it leaves behind."""
    out = tmp_path / "out.txt"
    with open(out, "w") as sink:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    assert proc.returncode == -9, out.read_text()[-3000:]
    return [int(p) for p in out.read_text().split()]


def test_reward_workers_exit_when_the_trainer_is_killed(tmp_path):
    # A forked child of the trainer holds copies of the workers' pipes, as megatron's forked
    # checkpoint writer did when it hung: the workers never see end-of-file on their stdin.
    workers_and_holder = run_and_get_pids(
        """
        import os, signal, time
        from trainer.rewards import RewardScorer

        scorer = RewardScorer("arith", num_workers=2)
        assert scorer.score([("the answer is 4", "4")])[0] == [1.0]
        holder = os.fork()
        if holder == 0:
            time.sleep(60)
            os._exit(0)
        print(*[w.proc.pid for w in scorer._workers], holder, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        tmp_path,
    )
    *workers, holder = workers_and_holder
    try:
        assert len(workers) == 2
        assert left_running(workers, 10) == [], "reward workers outlived the killed trainer"
        assert left_running([holder], 0) == [holder]  # the pipes stayed open the whole time
    finally:
        kill_quietly(workers_and_holder)


def test_forks_of_the_main_thread_die_with_the_process(tmp_path):
    main_and_thread_child = run_and_get_pids(
        """
        import multiprocessing, os, signal, threading, time
        from tandem_core.lifetime import forked_children_die_with_us

        forked_children_die_with_us()
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()  # as megatron's checkpoint writer forks its file writers

        def fork_here(out):
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            out.append(pid)

        from_thread = []
        thread = threading.Thread(target=fork_here, args=(from_thread,))
        thread.start()
        thread.join()
        print(child.pid, from_thread[0], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        tmp_path,
    )
    main_child, thread_child = main_and_thread_child
    try:
        assert left_running([main_child], 10) == [], "a fork of the main thread outlived it"
        # a fork of another thread is left alone: that thread ended long before the parent
        assert left_running([thread_child], 0) == [thread_child]
    finally:
        kill_quietly(main_and_thread_child)


def test_ranks_exit_when_torchrun_is_killed(tmp_path):
    """kill -9 of torchrun itself: its ranks (started as trainer.main starts them) end too,
    rather than training on without it."""
    script = tmp_path / "rank.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, time
            from tandem_core.lifetime import exit_with_torchrun

            exit_with_torchrun()
            with open({str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}", "w") as f:
                f.write(str(os.getpid()))
            time.sleep(60)
            """
        )
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    with open(tmp_path / "log.txt", "w") as log:
        agent = subprocess.Popen(
            [*launcher, "--nproc-per-node=2", str(script)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    pid_files = [tmp_path / "rank0", tmp_path / "rank1"]
    try:
        deadline = time.monotonic() + 60
        while not all(f.exists() and f.read_text() for f in pid_files):
            assert agent.poll() is None and time.monotonic() < deadline, (
                tmp_path / "log.txt"
            ).read_text()[-3000:]
            time.sleep(0.05)
        ranks = [int(f.read_text()) for f in pid_files]
        agent.kill()
        agent.wait()
        assert left_running(ranks, 10) == [], "ranks outlived their killed torchrun"
    finally:
        agent.kill()
        kill_quietly([int(f.read_text()) for f in pid_files if f.exists() and f.read_text()])
