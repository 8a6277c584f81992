"""`python -m trainer.plan <hydra overrides> [--world-size N] [--gpu-memory-gb G]
[--measured metrics.jsonl]`: check a layout and print the memory each phase needs per GPU.

A config that does not fit or does not check prints one line per problem (the key first),
without a traceback, and exits with status 2 (`--debug` or TANDEM_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tandem_core.config import ConfigError
from trainer import cli
from trainer.config_check import load_config
from trainer.plan.planner import (
    H100_80GB_GIB,
    compare_with_run,
    detect_gpu_memory_gb,
    plan_or_raise,
)
from trainer.tracking import read_metrics

PROG = "python -m trainer.plan"


def default_world_size() -> int:
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if key in os.environ:
            return int(os.environ[key])
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = cli.debug_requested(argv)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check a Tandem layout and estimate per-GPU memory in each phase.",
        epilog=cli.groups_help()
        + "\n\nA refused layout exits with status 2, one line per problem, the key first.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="hydra overrides, as given to trainer.main")
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks of the run (default: $WORLD_SIZE, $SLURM_NTASKS, or 1)",
    )
    parser.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help=f"GiB per GPU (default: GPU 0 here, else an H100's {H100_80GB_GIB})",
    )
    parser.add_argument(
        "--measured",
        default=None,
        help="a run's metrics.jsonl: print the plan beside the peak GPU memory it measured",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a refusal")
    args = parser.parse_intermixed_args(argv)  # overrides and options in any order
    world = args.world_size or default_world_size()
    gpu = args.gpu_memory_gb or detect_gpu_memory_gb()
    if gpu is None:
        print(
            f"(no GPU visible: planning for an 80 GB H100, {H100_80GB_GIB} GiB;"
            " pass --gpu-memory-gb)"
        )
        gpu = H100_80GB_GIB
    try:
        # World size is checked by plan_or_raise with the value given here, not the env's.
        cfg = load_config(args.overrides, world_size=world)
        plan = plan_or_raise(cfg, world, gpu)
    except ConfigError as err:
        if debug:
            raise
        return cli.report_bad_input(PROG, err)
    print(plan.table())
    if args.measured:
        print(compare_with_run(plan, read_metrics(args.measured)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
