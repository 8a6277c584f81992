"""What Tandem's two commands (`python -m trainer.main`, `python -m trainer.plan`) share:
`--help` that lists the config groups, and bad input answered like a tool: one line per problem
(the key first), exit status 2, no traceback (`--debug` or TANDEM_DEBUG=1 shows it). A failure
of the run's surroundings (tandem_core/errors.py `RunFailure`) is said the same way, status 1;
Ctrl-C before the loop runs ends with status 130 and no traceback. A finished process leaves
without Python's teardown (`exit_without_teardown`).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import NoReturn

from tandem_core.config import CONFIG_DIR
from tandem_core.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED

DEBUG_ENV = "TANDEM_DEBUG"


def config_groups() -> dict[str, list[str]]:
    """Each config group (a folder of configs/) and its options (the yaml files in it)."""
    return {
        group.name: sorted(p.stem for p in group.glob("*.yaml"))
        for group in sorted(CONFIG_DIR.iterdir())
        if group.is_dir()
    }


def groups_help() -> str:
    lines = ["config groups (pick an option with group=option; then override single keys):"]
    lines += [f"  {group}: {', '.join(options)}" for group, options in config_groups().items()]
    return "\n".join(lines)


def take_flag(argv: list[str], *flags: str) -> bool:
    """Remove `flags` from argv; whether any was there."""
    found = any(f in argv for f in flags)
    argv[:] = [a for a in argv if a not in flags]
    return found


def debug_requested(argv: list[str]) -> bool:
    """`--debug` (removed from argv) or TANDEM_DEBUG=1: let tracebacks through."""
    flag = take_flag(argv, "--debug")
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def is_first_rank() -> bool:
    """Rank 0 of a torchrun/srun launch (or a single process): the one that reports."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _say(prog: str, err: BaseException) -> None:
    if is_first_rank():
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"{prog}: error: {line}", file=sys.stderr)
        sys.stderr.flush()


def report_bad_input(prog: str, err: BaseException) -> int:
    """One line per problem on stderr (rank 0 only), the exit status for bad input."""
    _say(prog, err)
    return EXIT_BAD_INPUT


def report_failure(prog: str, err: BaseException) -> int:
    _say(prog, err)
    return EXIT_FAILURE


def report_interrupted(prog: str) -> int:
    if is_first_rank():
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def exit_without_teardown(code: int) -> NoReturn:
    """End a process whose work is closed (a run after fit's `finally`, a test worker after its
    result). Python's teardown would add vLLM's engine shutdown and a final garbage collection
    over torch's, megatron's and vLLM's objects, 3-7 s per process on a 2-core host, freeing only
    what the exit frees anyway. What it would also have stopped is stopped here: multiprocessing
    children such as the checkpoint writer's Manager."""
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=10)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
