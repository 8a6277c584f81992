"""The stop signals that ask the run for a checkpoint at the next step boundary.

SIGTERM and SIGUSR1 (slurm's pre-emption and time-limit warnings) and a first Ctrl-C (SIGINT)
set a flag the loop reads once per step; it then checkpoints and exits with status 0. A second
Ctrl-C ends the process at once (status 130), without a traceback, and kills the processes it
started.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys

import torch
import torch.distributed as dist

from tandem_core import cpu_compat
from tandem_core.errors import EXIT_INTERRUPTED


class StopRequest:
    """The flag the signals set. The loop checks it once per step, at a point where every rank
    is, saves, and exits cleanly."""

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self.previous: dict[int, object] = {}
        """The handlers this one replaced, by signal (uninstall puts them back)."""

    def handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            print("\n[tandem] second Ctrl-C: exiting now, without a checkpoint", file=sys.stderr)
            sys.stderr.flush()
            kill_child_processes()
            os._exit(EXIT_INTERRUPTED)  # at once: no unwinding through engine threads
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print(
                "\n[tandem] Ctrl-C: stopping after this step with a checkpoint"
                " (Ctrl-C again to quit at once)",
                file=sys.stderr,
                flush=True,
            )

    def agreed(self) -> bool:
        """Whether any rank was signalled (collective): the signal may reach ranks at
        different steps, the checkpoint must be taken by all at the same one."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=cpu_compat.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()


def kill_child_processes() -> None:
    """SIGKILL every process this one started: megatron's checkpoint writers and the
    multiprocessing Manager its async writer keeps for the whole run, the reward workers.
    os._exit skips the shutdown that would stop them, and an orphan lives on, holding the
    launcher's output pipe open and printing a traceback when it finds its parent gone.
    /proc lists a child as soon as it is forked (multiprocessing's own list only once its
    start() returns); multiprocessing's list is the fallback where there is no /proc."""
    pids = set()
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(pid) for pid in f.read().split())
    except OSError:
        pids.update(child.pid for child in multiprocessing.active_children())
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # already gone
            pass


def install_signal_handlers(
    signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT),
) -> StopRequest:
    """Route `signals` to a StopRequest flag (main thread only, as Python requires)."""
    stop = StopRequest()
    for signum in signals:
        stop.previous[signum] = signal.signal(signum, stop.handle)
    return stop
