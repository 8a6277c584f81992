"""Every part of a run, built once from the checked config, in dependency order: model
directory and data first (they may be built into the cache or the run directory), then the
model-parallel groups, the megatron roles, the rollout engine and the swap between them, and
the run's bookkeeping. `build_components` returns what trainer/loop.py `fit` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch.distributed as dist
from transformers import AutoTokenizer

import archs
from hybrid_engine import FSDPShardingManager, MegatronShardingManager
from rollout import build_rollout
from rollout.multi_turn import build_tools
from tandem_core import distributed as D
from tandem_core.config import TandemConfig, uses_critic
from tandem_core.model_args import ModelArgs
from tandem_core.registry import Registry
from trainer import core_algos
from trainer.data import DataError, PromptLoader, RLDataset, write_arith_task
from trainer.loop import Components
from trainer.rewards import RewardScorer, ground_truth_types
from trainer.state.checkpoints import CheckpointManager, run_identity
from trainer.state.signals import install_signal_handlers
from trainer.tracking import Tracker
from trainer.workers.actor import PolicyActor
from trainer.workers.critic import ValueCritic
from trainer.workers.fsdp import build_fsdp_worker, copy_fsdp_weights
from trainer.workers.model import MoESettings, build_model_worker, copy_weights
from trainer.workers.reference import ReferencePolicy


def prepare_data(cfg: TandemConfig, run_dir: Path) -> tuple[list[str], list[str]]:
    """The configured parquet files, or the built-in task written into the run directory."""
    if cfg.data.train_files:
        return list(cfg.data.train_files), list(cfg.data.val_files)
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


def build_loaders(cfg: TandemConfig, run_dir: Path, tokenizer):
    train_files, val_files = prepare_data(cfg, run_dir)
    data = cfg.data
    truth = ground_truth_types(cfg.reward)

    multi_turn = cfg.rollout.multi_turn
    offered = build_tools(multi_turn) if multi_turn.enable and multi_turn.offer_tools else {}
    schemas = [tool.schema() for tool in offered.values()]

    def dataset(files):
        return RLDataset(
            files,
            tokenizer,
            data.max_prompt_length,
            data.overlong_prompt,
            data.prompt_key,
            truth,
            tools=schemas,
        )

    train_set = dataset(train_files)
    if len(train_set) < data.train_batch_size:
        dropped = f" ({train_set.num_filtered} longer than data.max_prompt_length dropped)"
        raise DataError(
            f"data.train_batch_size: {data.train_batch_size} is more than the {len(train_set)}"
            f" prompts of {', '.join(train_files)}{dropped if train_set.num_filtered else ''}"
        )
    train_loader = PromptLoader(train_set, data.train_batch_size, data.shuffle, data.seed)
    val_loader = None
    if val_files and cfg.trainer.test_freq > 0:
        val_set = dataset(val_files)
        val_loader = PromptLoader(
            val_set, min(data.val_batch_size, len(val_set)), shuffle=False, drop_last=True
        )
    return train_loader, val_loader


# ---- training strategies: how the policy (actor + reference) is built and swapped ----------
@dataclass
class PolicyModels:
    actor_worker: object  # a TrainingWorker (trainer/workers/passes.py)
    ref_worker: object | None
    sharding_manager: Callable  # rollout -> the strategy's BaseShardingManager


STRATEGIES = Registry("training strategy")
"""actor.strategy -> fn(cfg, args, hf_dir, optimizer steps) -> PolicyModels."""


def _needs_reference(cfg: TandemConfig) -> bool:
    return cfg.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward


def megatron_settings(cfg: TandemConfig) -> dict:
    """What every megatron role is built with (build_model_worker's keywords)."""
    m = cfg.model
    return dict(
        parallel=cfg.parallel,
        dtype=m.dtype,
        layer_spec=m.layer_spec,
        moe=MoESettings(
            experts=m.moe_experts,
            dispatcher=m.moe_dispatcher,
            aux_loss_coeff=m.moe_aux_loss_coeff,
            z_loss_coeff=m.moe_z_loss_coeff,
        ),
        pack_sequences=m.pack_sequences,
        compile_layers=bool(cfg.actor.compile_layers),  # megatron: off unless asked
    )


@STRATEGIES.register("megatron")
def megatron_policy(cfg: TandemConfig, args: ModelArgs, hf_dir: Path, steps: int):
    m, common = cfg.model, megatron_settings(cfg)
    weights_dir = None if m.random_init else hf_dir  # None: megatron's random init
    actor_worker = build_model_worker(
        args,
        weights_dir,
        optim=cfg.actor.optim,
        total_optimizer_steps=steps * cfg.actor.ppo_epochs,
        activation_checkpointing=cfg.actor.activation_checkpointing,
        **{**common, "moe": replace(common["moe"], router_replay=cfg.actor.router_replay)},
    )
    ref_worker = None
    if _needs_reference(cfg):
        ref_worker = build_model_worker(args, weights_dir, **common)
        if weights_dir is None:
            copy_weights(actor_worker, ref_worker)  # the reference starts where the actor does

    def manager(rollout):
        return MegatronShardingManager(
            actor_worker,
            rollout,
            weight_bucket_mb=cfg.rollout.weight_bucket_mb,
            offload_optimizer=cfg.actor.offload_optimizer,
            generation_seed=cfg.rollout.seed,
            sleep_level=cfg.rollout.sleep_level,
        )

    return PolicyModels(actor_worker, ref_worker, manager)


@STRATEGIES.register("fsdp2")
def fsdp2_policy(cfg: TandemConfig, args: ModelArgs, hf_dir: Path, steps: int):
    a, random_init = cfg.actor, cfg.model.random_init
    actor_worker = build_fsdp_worker(
        args,
        hf_dir,
        dtype=cfg.model.dtype,
        optim=a.optim,
        total_optimizer_steps=steps * a.ppo_epochs,
        activation_checkpointing=a.activation_checkpointing,
        param_offload=a.param_offload,
        random_init=random_init,
        compile_layers=a.compile_layers is not False,  # fsdp2: on unless turned off
    )
    ref_worker = None
    if _needs_reference(cfg):
        # ref.offload_params: FSDP2 keeps the shards in host memory and brings each layer in
        # for its forward (CPUOffloadPolicy), instead of moving the whole model around.
        ref_worker = build_fsdp_worker(
            args,
            hf_dir,
            dtype=cfg.model.dtype,
            param_offload=cfg.ref.offload_params,
            random_init=random_init,
        )
        if random_init:
            copy_fsdp_weights(actor_worker, ref_worker)  # the reference starts where the actor does

    def manager(rollout):
        return FSDPShardingManager(
            actor_worker,
            rollout,
            weight_bucket_mb=cfg.rollout.weight_bucket_mb or 256,
            offload_optimizer=a.offload_optimizer,
            generation_seed=cfg.rollout.seed,
            sleep_level=cfg.rollout.sleep_level,
        )

    return PolicyModels(actor_worker, ref_worker, manager)


def build_components(cfg: TandemConfig, run_dir: Path, args: ModelArgs) -> Components:
    """Every part of the run; `args` is the model's shape as the config check read it."""
    hf_dir = archs.model_dir(cfg.model)
    if archs.model_args_from_hf(hf_dir) != args:  # a preset's table against its built files
        raise RuntimeError(f"{hf_dir}/config.json disagrees with {args}")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    train_loader, val_loader = build_loaders(cfg, run_dir, tokenizer)

    D.init_model_parallel(cfg.parallel, seed=cfg.trainer.seed)
    steps = cfg.trainer.total_steps * max(
        1, cfg.data.train_batch_size // cfg.actor.ppo_mini_batch_size
    )
    policy = STRATEGIES[cfg.actor.strategy](cfg, args, hf_dir, steps)
    actor_worker = policy.actor_worker
    actor = PolicyActor(actor_worker, cfg.actor, temperature=cfg.rollout.temperature)
    sharded = {"actor": actor_worker}
    ref = None
    if policy.ref_worker is not None:
        ref_cfg = (
            cfg.ref if cfg.actor.strategy == "megatron" else replace(cfg.ref, offload_params=False)
        )
        ref = ReferencePolicy(
            policy.ref_worker, cfg.actor, ref_cfg, temperature=cfg.rollout.temperature
        )
    m, common = cfg.model, megatron_settings(cfg)
    weights_dir = None if cfg.model.random_init else hf_dir  # None: megatron's random init
    critic = None
    if uses_critic(cfg.algorithm):
        critic_steps = steps * cfg.critic.ppo_epochs
        if cfg.critic.strategy == "fsdp2":
            critic_worker = build_fsdp_worker(
                args,
                hf_dir,
                dtype=m.dtype,
                optim=cfg.critic.optim,
                total_optimizer_steps=critic_steps,
                value_head=True,
                random_init=m.random_init,
            )
        else:
            critic_worker = build_model_worker(
                args,
                weights_dir,
                optim=cfg.critic.optim,
                value_head=True,
                total_optimizer_steps=critic_steps,
                **common,
            )
        critic = ValueCritic(critic_worker, cfg.critic)
        sharded["critic"] = critic_worker

    max_len = cfg.data.max_prompt_length + cfg.rollout.response_length
    rollout_cfg = cfg.rollout
    if cfg.model.random_init:  # no weights on disk: the engine gets them from the first sync
        rollout_cfg = replace(rollout_cfg, load_format="dummy")
    rollout = build_rollout(
        rollout_cfg,
        hf_dir,
        dtype=cfg.model.dtype,
        max_model_len=max_len,
        routed_experts=cfg.actor.router_replay,
    )
    manager = policy.sharding_manager(rollout)
    alg = cfg.algorithm
    kl_ctrl = (
        core_algos.AdaptiveKLController(alg.kl_coef, alg.kl_target, alg.kl_horizon)
        if alg.kl_ctrl_type == "adaptive"
        else core_algos.FixedKLController(alg.kl_coef)
    )
    return Components(
        actor=actor,
        ref=ref,
        critic=critic,
        rollout=rollout,
        sharding_manager=manager,
        scorer=RewardScorer.from_config(cfg.reward),
        tokenizer=tokenizer,
        train_loader=train_loader,
        val_loader=val_loader,
        kl_ctrl=kl_ctrl,
        checkpoints=CheckpointManager(
            run_dir,
            cfg.trainer.max_ckpt_to_keep,
            identity=run_identity(cfg, args, dist.get_world_size()),
        ),
        tracker=Tracker(
            cfg.logger.backends, cfg.logger.project, cfg.logger.experiment, run_dir, asdict(cfg)
        ),
        signals=install_signal_handlers(),
        sharded=sharded,
        export_hf=lambda out: actor_worker.export_hf(out, hf_dir),
    )
