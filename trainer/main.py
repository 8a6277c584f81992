"""Tandem's entry point: `python -m trainer.main [hydra overrides]`, the same under torchrun or
srun. Order matters: config and plan are checked before any model is built or any device
memory is touched; then components are built; then the loop runs (trainer.ppo_trainer).

    python -m trainer.main algorithm=grpo model=smollm2_135m actor.optim.lr=1e-6
    torchrun --nproc-per-node 2 -m trainer.main parallel=tp2 rollout.tensor_model_parallel_size=2
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch.distributed as dist

from tandem_core import distributed as D
from tandem_core.config import TandemConfig, load_config, uses_critic


def resolve_model_dir(cfg: TandemConfig) -> Path:
    """The HF directory the run reads its config, tokenizer (and unless random, weights) from."""
    check_model_source(cfg)
    if cfg.model.path:
        return Path(cfg.model.path)
    from tandem_core.model_shapes import SHAPE_PRESETS

    preset = cfg.model.preset
    if preset == "smollm2_135m" and not cfg.model.random_init:
        from tandem_core.smollm2 import ensure_smollm2_checkpoint

        return ensure_smollm2_checkpoint()
    from tandem_core.tiny_models import ensure_shape_dir, ensure_tiny_checkpoint

    return ensure_shape_dir(preset) if preset in SHAPE_PRESETS else ensure_tiny_checkpoint(preset)


def check_model_source(cfg: TandemConfig) -> None:
    """ConfigError naming the key when the weights cannot come from anywhere (checked before
    any process group or device memory exists)."""
    from tandem_core.config import ConfigError
    from tandem_core.model_shapes import SHAPE_PRESETS
    from tandem_core.tiny_models import TINY_SPECS

    m = cfg.model
    if m.path:
        if not (Path(m.path) / "config.json").is_file():
            raise ConfigError(f"model.path: no HF checkpoint at {m.path} (config.json not found)")
        return
    buildable = {"smollm2_135m", *TINY_SPECS}
    if m.preset not in buildable and not (m.preset in SHAPE_PRESETS and m.random_init):
        raise ConfigError(
            f"model.preset: {m.preset!r} is a shape only (no local checkpoint builder): set"
            " model.path to its HF directory, or model.random_init=true for random weights"
        )


def prepare_data(cfg: TandemConfig, run_dir: Path) -> tuple[list[str], list[str]]:
    """The configured parquet files, or the built-in task written into the run directory."""
    if cfg.data.train_files:
        return list(cfg.data.train_files), list(cfg.data.val_files)
    from trainer.data import write_arith_task

    if cfg.data.task != "arith":
        raise ValueError(f"data.task={cfg.data.task!r}: the built-in generator knows 'arith'")
    if dist.get_rank() == 0:
        write_arith_task(
            run_dir / "data",
            cfg.data.task_size,
            cfg.data.task_size // 4,
            cfg.data.task_max_operand,
            seed=cfg.data.seed,
        )
    dist.barrier()
    return [str(run_dir / "data" / "arith_train.parquet")], [
        str(run_dir / "data" / "arith_val.parquet")
    ]


def build_components(cfg: TandemConfig, run_dir: Path):
    from transformers import AutoTokenizer

    import weight_loaders
    from hybrid_engine import get_sharding_manager
    from rollout import build_rollout
    from trainer import core_algos
    from trainer.actor import MegatronActor
    from trainer.checkpoint import CheckpointManager, install_signal_handlers
    from trainer.data import PromptLoader, RLDataset
    from trainer.megatron_worker import build_model_worker, copy_weights
    from trainer.ppo_trainer import Components
    from trainer.rewards import RewardScorer
    from trainer.tracking import Tracker

    hf_dir = resolve_model_dir(cfg)
    args = weight_loaders.model_args_from_hf(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    train_files, val_files = prepare_data(cfg, run_dir)
    data = cfg.data
    train_set = RLDataset(
        train_files, tokenizer, data.max_prompt_length, data.overlong_prompt, data.prompt_key
    )
    train_loader = PromptLoader(train_set, data.train_batch_size, data.shuffle, data.seed)
    val_loader = None
    if val_files and cfg.trainer.test_freq > 0:
        val_set = RLDataset(
            val_files, tokenizer, data.max_prompt_length, data.overlong_prompt, data.prompt_key
        )
        val_loader = PromptLoader(
            val_set, min(data.val_batch_size, len(val_set)), shuffle=False, drop_last=True
        )

    D.init_model_parallel(cfg.parallel, seed=cfg.trainer.seed)
    steps = cfg.trainer.total_steps * max(1, data.train_batch_size // cfg.actor.ppo_mini_batch_size)
    common = dict(parallel=cfg.parallel, dtype=cfg.model.dtype, layer_spec=cfg.model.layer_spec)
    weights_dir = None if cfg.model.random_init else hf_dir  # None: megatron's random init
    actor_worker = build_model_worker(
        args,
        weights_dir,
        optim=cfg.actor.optim,
        total_optimizer_steps=steps * cfg.actor.ppo_epochs,
        **common,
    )
    actor = MegatronActor(actor_worker, cfg.actor, temperature=cfg.rollout.temperature)
    ref = None
    if cfg.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward:
        from trainer.reference import MegatronReference

        ref_worker = build_model_worker(args, weights_dir, **common)
        if weights_dir is None:
            copy_weights(actor_worker, ref_worker)  # the reference starts where the actor does
        ref = MegatronReference(
            ref_worker,
            cfg.actor,
            cfg.ref,
            temperature=cfg.rollout.temperature,
        )
    critic = None
    if uses_critic(cfg.algorithm):
        from trainer.critic import MegatronCritic

        critic_worker = build_model_worker(
            args,
            weights_dir,
            optim=cfg.critic.optim,
            value_head=True,
            total_optimizer_steps=steps * cfg.critic.ppo_epochs,
            **common,
        )
        critic = MegatronCritic(critic_worker, cfg.critic)

    max_len = data.max_prompt_length + cfg.rollout.response_length
    rollout_cfg = cfg.rollout
    if cfg.model.random_init:  # no weights on disk: the engine gets them from the first sync
        rollout_cfg = replace(rollout_cfg, load_format="dummy")
    rollout = build_rollout(rollout_cfg, hf_dir, dtype=cfg.model.dtype, max_model_len=max_len)
    manager = get_sharding_manager(cfg.rollout.name)(
        actor_worker,
        rollout,
        weight_bucket_mb=cfg.rollout.weight_bucket_mb,
        offload_optimizer=cfg.actor.offload_optimizer,
        generation_seed=cfg.rollout.seed,
        sleep_level=cfg.rollout.sleep_level,
    )
    alg = cfg.algorithm
    kl_ctrl = (
        core_algos.AdaptiveKLController(alg.kl_coef, alg.kl_target, alg.kl_horizon)
        if alg.kl_ctrl_type == "adaptive"
        else core_algos.FixedKLController(alg.kl_coef)
    )
    checkpoints = CheckpointManager(run_dir, cfg.trainer.max_ckpt_to_keep)
    tracker = Tracker(
        cfg.logger.backends, cfg.logger.project, cfg.logger.experiment, run_dir, asdict(cfg)
    )
    workers = {"actor": actor_worker}
    if critic is not None:
        workers["critic"] = critic.worker

    def export_hf(step: int):
        return checkpoints.export_hf(step, actor_worker, hf_dir)

    parts = Components(
        actor,
        ref,
        critic,
        rollout,
        manager,
        RewardScorer.from_config(cfg.reward),
        tokenizer,
        train_loader,
        val_loader,
        kl_ctrl,
        checkpoints,
        tracker,
        install_signal_handlers(),
        export_hf,
    )
    return parts, workers


def fit(cfg: TandemConfig, run_dir: Path) -> dict:
    """Build, resume if a checkpoint exists, run `trainer.total_steps` iterations."""
    from trainer.checkpoint import capture_rng_state, restore_rng_state
    from trainer.ppo_trainer import RLTrainer

    parts, workers = build_components(cfg, run_dir)
    trainer = RLTrainer(cfg, parts)
    rank0 = dist.get_rank() == 0

    def save():
        state = {
            "trainer": trainer.state_dict(),
            "rng": capture_rng_state(),
            "sharding_manager": parts.sharding_manager.state_dict(),
        }
        parts.checkpoints.save(trainer.step_no, workers, state)

    latest = parts.checkpoints.latest_complete() if cfg.trainer.resume else None
    if latest is not None:
        step, path = latest
        state = parts.checkpoints.load(path, workers)
        trainer.load_state_dict(state["trainer"])
        restore_rng_state(state["rng"])
        parts.sharding_manager.load_state_dict(state["sharding_manager"])
        if rank0:
            print(f"[tandem] resuming from {path} (step {step})", flush=True)

    history = []
    try:
        if trainer.step_no == 0 and parts.val_loader is not None:
            parts.tracker.log(trainer.validate(), step=0)
        while trainer.step_no < cfg.trainer.total_steps:
            metrics = trainer.step()
            step = trainer.step_no
            t = cfg.trainer
            if parts.val_loader is not None and t.test_freq and step % t.test_freq == 0:
                metrics.update(trainer.validate())
            parts.tracker.log(metrics, step=step)
            history.append(metrics)
            last = step == t.total_steps
            stop = parts.signals.agreed()
            if (last and t.save_at_end) or stop or (t.save_freq and step % t.save_freq == 0):
                save()
            if t.hf_export_freq and step % t.hf_export_freq == 0 and not last:
                parts.export_hf(step)
            if stop:
                if rank0:
                    print(
                        f"[tandem] {parts.signals.signal_name or 'signal'}: checkpoint at step "
                        f"{step} written, exiting",
                        flush=True,
                    )
                return {"history": history, "stopped": True}
        if trainer.step_no == cfg.trainer.total_steps and cfg.trainer.save_at_end:
            parts.export_hf(trainer.step_no)
        if rank0 and len(history) > 1:
            first, last = history[0], history[-1]
            print(
                f"[tandem] reward (critic/score/mean): step {first['training/global_step']} "
                f"{first['critic/score/mean']:.3f} -> step {last['training/global_step']} "
                f"{last['critic/score/mean']:.3f}",
                flush=True,
            )
    finally:
        parts.tracker.close()
        parts.scorer.close()
    return {"history": history, "stopped": False}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    launch = D.read_launch_env()
    cfg = load_config(argv, world_size=launch.world_size)  # fails before anything is built
    check_model_source(cfg)
    from trainer.plan import detect_gpu_memory_gb, plan_or_raise

    plan = plan_or_raise(cfg, launch.world_size, detect_gpu_memory_gb())
    D.init_distributed()
    run_dir = Path(cfg.trainer.output_dir)
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(plan.table(), flush=True)
    fit(cfg, run_dir)
    # No destroy_process_group here: the in-process vLLM engine tears its own groups down at
    # exit and fails if the default group is already gone; process exit releases gloo/NCCL.
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
