"""Helper processes that never outlive the process they serve.

A trainer killed with kill -9 (or by the OOM killer, or a scheduler's preemption) runs no
cleanup, so whatever it started must notice on its own. Three kinds of helper do:

- a multiprocessing child that dies by the kernel's hand (`die_with_parent`): the checkpoint
  writer's Manager (trainer/workers/checkpoint.py);
- a child forked from the main thread once `forked_children_die_with_us()` has run: megatron's
  checkpoint writer forks its file writers at every save, and such a fork also holds copies of
  every pipe the trainer had open, so a fork left hanging kept the reward workers below from
  ever reading end-of-file;
- a plain interpreter that polls for its parent (`exit_when_orphaned`): the reward workers,
  which any thread of the trainer may start, where the kernel's rule (below) would misfire.

The trainer's ranks themselves watch torchrun (`exit_with_torchrun`): a kill -9 of torchrun
runs none of its cleanup, and its ranks would train on without it, holding their GPUs and
writing checkpoints into an output directory the next run may already be using.

The first two are Linux only (prctl); elsewhere those helpers outlive a killed parent, as
they always did. The polling works on any POSIX system.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

PR_SET_PDEATHSIG = 1


def _prctl():
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return prctl


def die_with_parent(parent_pid: int, prctl=None) -> None:
    """In a child: the kernel SIGKILLs it when its parent dies. The kernel watches the parent's
    *thread* that started the child, not its process: only for children started by a thread
    that lives as long as the parent (its main thread)."""
    prctl = prctl or _prctl()
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the call above
        os._exit(0)


_registered = False


def forked_children_die_with_us() -> None:
    """From now on every child this process forks from its main thread (multiprocessing's fork
    context, `os.fork`) is killed when this process dies. Forks from other threads are left as
    they are, since their thread may end before them. Children started by exec (subprocess,
    multiprocessing's spawn) never run these hooks."""
    global _registered
    if _registered:  # called before every checkpoint save: once is enough
        return
    _registered = True
    prctl = _prctl()
    if prctl is None:
        return
    # Resolved here, in the parent: a dlopen right after a fork of a threaded process can
    # deadlock on a lock another thread held at the fork.
    forking: dict[str, int | bool] = {}

    def before() -> None:
        forking["parent"] = os.getpid()
        forking["main"] = threading.current_thread() is threading.main_thread()

    def after_in_child() -> None:
        if forking.get("main"):
            die_with_parent(int(forking["parent"]), prctl)

    os.register_at_fork(before=before, after_in_child=after_in_child)


def exit_when_orphaned(
    parent_pid: int, poll_s: float = 0.5, message: str | None = None, code: int = 0
) -> None:
    """A daemon thread that ends this process (`os._exit(code)`, after `message` on stderr)
    once `parent_pid` is no longer its parent. Needs no help from the kernel or the parent,
    whichever thread of it started us."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        if message:
            os.write(2, f"{message}\n".encode())
        os._exit(code)

    threading.Thread(target=watch, name="exit-when-orphaned", daemon=True).start()


def exit_with_torchrun() -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set; its agent started this rank), end this rank,
    status 1, when the agent dies. Elsewhere nothing: srun's ranks die with their job step,
    and a plain `nohup python -m trainer.main &` must outlive the shell that started it."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    agent = os.getppid()
    rank = os.environ.get("RANK", "?")
    message = f"[tandem] rank {rank}: torchrun (pid {agent}) is gone; this rank exits too"
    exit_when_orphaned(agent, message=message, code=1)
