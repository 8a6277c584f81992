"""The stop signal that asks the run for a checkpoint at the next step boundary."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from tandem_core import cpu_compat


class StopRequest:
    """Set by SIGTERM/SIGUSR1 (slurm's pre-emption and time-limit warnings). The loop checks it
    once per step, at a point where every rank is, saves, and exits cleanly."""

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any rank was signalled (collective): the signal may reach ranks at
        different steps, the checkpoint must be taken by all at the same one."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=cpu_compat.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def install_signal_handlers(signals=(signal.SIGTERM, signal.SIGUSR1)) -> StopRequest:
    """Route `signals` to a StopRequest flag (main thread only, as Python requires)."""
    stop = StopRequest()
    for signum in signals:
        stop._previous[signum] = signal.signal(signum, stop._handle)
    return stop
