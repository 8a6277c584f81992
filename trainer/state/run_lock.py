"""One run at a time in an output directory.

Two runs in one `trainer.output_dir` (the same command started twice, or a run started while an
earlier one still trains) would resume from each other's checkpoints, interleave their metrics,
and each rotation would delete the other's checkpoints. Rank 0 of every run holds an exclusive
`flock` on `output_dir/.tandem.lock` from before anything is built until the run ends; a
second run is refused, before it allocates anything, naming the first (pid, host, start). The
kernel drops the lock when its holder dies, kill -9 included, so no stale lock ever blocks a
resume. Where the filesystem has no working flock (some network mounts), the run says so once
and goes on unguarded.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tandem_core.errors import InputError

log = logging.getLogger(__name__)

LOCK_FILE = ".tandem.lock"


@contextmanager
def exclusive_output_dir(output_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold this run's lock on `output_dir` (created if missing) for the block, or raise
    InputError naming the run that holds it. `enabled=False` (ranks other than 0): nothing."""
    if not enabled:
        yield
        return
    root = Path(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        f = open(root / LOCK_FILE, "a+")  # never truncated before the lock is ours
    except OSError as e:
        raise InputError(f"trainer.output_dir={output_dir}: cannot be written: {e}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise InputError(
                f"trainer.output_dir={output_dir}: another run is using it ({_describe(f.read())});"
                " wait for it to end, stop it, or pick another trainer.output_dir"
            ) from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP: a filesystem without flock
            log.warning("%s: cannot lock it (%s); nothing stops a second run here", root, e)
            yield
            return
        f.seek(0)
        f.truncate()
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        f.write(json.dumps(holder))
        f.flush()
        yield  # closing the file (or the process ending, however) releases the lock


def _describe(text: str) -> str:
    if not text.strip():
        return "it is just starting"
    try:
        who = json.loads(text)
        return f"pid {who['pid']} on {who['host']}, started {who['started']}"
    except (ValueError, KeyError, TypeError):
        return "its details are unreadable"
