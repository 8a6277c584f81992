"""Tandem's entry point: `python -m trainer.main [hydra overrides]`, the same under torchrun or
srun. Order matters: the config is checked (every name, every rule) and the memory planned
before any process group, model or engine exists; then the parts are built (trainer/build.py);
then the loop runs (trainer/loop.py).

    python -m trainer.main algorithm=grpo model=smollm2_135m actor.optim.lr=1e-6
    torchrun --nproc-per-node 2 -m trainer.main parallel=tp2 rollout.tensor_model_parallel_size=2
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

PROG = "python -m trainer.main"
USAGE = f"""usage: {PROG} [--help] [--cfg job] [--debug] [key=value ...]
       torchrun --nproc-per-node N -m trainer.main [key=value ...]

RL post-training (PPO and the GRPO family) on megatron-core with rollouts on the same GPUs.
Overrides are hydra's: `group=option` picks a file of a config group, `a.b.c=value` sets a key.

{{groups}}
sections, each overridable key by key: model parallel rollout data algorithm actor critic ref
  reward logger trainer (every key and its meaning: tandem_core/config.py)

options:
  --help       this text
  --cfg job    print the composed, typed config for the overrides given, and exit
  --debug      show the traceback of a refused input (also: TANDEM_DEBUG=1)

A bad config exits with status 2 and one line per problem, the key first, before anything is
built. To check a layout and its GPU memory without running: python -m trainer.plan [overrides]
"""


def main(argv: list[str] | None = None) -> int:
    from tandem_core.config import ConfigError
    from tandem_core.errors import InputError, RunFailure
    from trainer import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = cli.debug_requested(argv)
    if cli.take_flag(argv, "--help", "-h"):
        print(USAGE.format(groups=cli.groups_help()))
        return 0
    try:
        if "--cfg" in argv:
            return print_config(argv)
        unknown = [a for a in argv if a.startswith("-")]
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown option (see --help)")
        return run(argv)
    except InputError as err:  # config, data, model directory, checkpoints: the user's to fix
        if debug:
            raise
        return cli.report_bad_input(PROG, err)
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handler was installed
        if debug:
            raise
        return cli.report_interrupted(PROG)
    except RunFailure as err:  # a save that failed (disk full, read-only): said in one line
        if debug:
            raise
        return cli.report_failure(PROG, err)


def print_config(argv: list[str]) -> int:
    """hydra's `--cfg job` convention: the composed config, typed against the schema."""
    from tandem_core.config import ConfigError, compose_config, to_structured

    i = argv.index("--cfg")
    what = argv[i + 1] if i + 1 < len(argv) else None
    if what != "job":
        raise ConfigError(f"--cfg: {what!r} is not supported; use --cfg job")
    overrides = argv[:i] + argv[i + 2 :]
    cfg = to_structured(compose_config(overrides))
    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
    return 0


def run(overrides: list[str]) -> int:
    import archs
    from tandem_core import distributed as D
    from trainer import cli
    from trainer.config_check import load_config
    from trainer.plan import detect_gpu_memory_gb, plan_or_raise
    from trainer.preflight import check_inputs
    from trainer.state.run_lock import exclusive_output_dir

    launch = D.read_launch_env()
    cfg = load_config(overrides, world_size=launch.world_size)  # every name and rule
    model_args = archs.read_model_args(cfg.model)
    archs.check_model_source(cfg.model)
    resume_step = check_inputs(cfg, launch.world_size, model_args)  # what the config names
    plan = plan_or_raise(cfg, launch.world_size, detect_gpu_memory_gb(), model_args)
    t = cfg.trainer
    if resume_step is not None and resume_step >= t.total_steps:
        if cli.is_first_rank():
            print(
                f"[tandem] {t.output_dir} holds a checkpoint at step {resume_step}, and"
                f" trainer.total_steps={t.total_steps}: nothing to train (raise"
                " trainer.total_steps to go on)",
                flush=True,
            )
        return 0

    with exclusive_output_dir(t.output_dir, enabled=cli.is_first_rank()):  # one run at a time
        return train(cfg, plan, model_args)


def train(cfg, plan, model_args) -> int:
    """The run proper, its inputs checked: process groups, models, the engine, the loop."""
    import torch.distributed as dist

    from tandem_core import distributed as D
    from tandem_core.lifetime import exit_with_torchrun, forked_children_die_with_us
    from trainer.build import build_components
    from trainer.loop import fit
    from trainer.preflight import discard_checkpoints

    # A kill -9 runs no cleanup: what this process forks (megatron's checkpoint file writers)
    # dies with it, and a rank whose torchrun was killed ends rather than training on.
    forked_children_die_with_us()
    exit_with_torchrun()
    t = cfg.trainer
    D.init_distributed()
    run_dir = Path(t.output_dir)
    if dist.get_rank() == 0:
        if t.resume == "never" and t.discard_checkpoints:
            discard_checkpoints(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        print(plan.table(), flush=True)
    dist.barrier()
    fit(cfg, build_components(cfg, run_dir, model_args))
    # No destroy_process_group here: the in-process vLLM engine tears its own groups down at
    # exit and fails if the default group is already gone; process exit releases gloo/NCCL.
    return 0


if __name__ == "__main__":
    from trainer.cli import exit_without_teardown

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    exit_without_teardown(main())
