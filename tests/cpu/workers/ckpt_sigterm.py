"""A stand-in training loop for the stop-signal test: steps of 50 ms until a stop is agreed,
then a checkpoint and exit 0.

usage: ckpt_sigterm.py OUT_DIR
Each rank writes its pid to OUT_DIR/pid_{rank}; rank 0 writes the step it reached to
OUT_DIR/progress. The test sends SIGTERM to one rank only: every rank must save at the same
step and exit cleanly.
"""

import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from tandem_core import distributed as D
from trainer.state.checkpoints import CheckpointManager
from trainer.state.signals import install_signal_handlers

MAX_STEPS = 2000  # 100 s: the test failed to signal


def main():
    out = Path(sys.argv[1])
    D.init_distributed()
    rank = dist.get_rank()
    stop = install_signal_handlers()
    mgr = CheckpointManager(out, max_to_keep=2)
    (out / f"pid_{rank}").write_text(str(os.getpid()))
    for step in range(1, MAX_STEPS + 1):
        time.sleep(0.05)  # the step's work
        if rank == 0:
            (out / "progress").write_text(str(step))
        if stop.agreed():
            mgr.save(step, {}, {"step": step, "rank": rank, "signal": stop.signal_name})
            print(
                f"rank {rank}: stopped by {stop.signal_name or 'a peer'} at step {step}", flush=True
            )
            D.destroy()
            return
    sys.exit(f"rank {rank}: no stop request in {MAX_STEPS} steps")


if __name__ == "__main__":
    main()
