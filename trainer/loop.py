"""The RL loop: generate → score → log-probs → advantages → updates → log → checkpoint.

Every rank runs this same loop (SPMD). Every rank holds the whole (small) batch of token ids
and masks; the actor, critic and sharding manager slice and gather it for their own layouts.
`RLTrainer.step` is one iteration, the algorithm; `fit` is the run around it (resume,
validation, logging, checkpoints, HF exports, stop signals). Everything they call is built
once by trainer/build.py; what each part must offer is trainer/roles.py.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_engine.base import BaseShardingManager, check_weights_synced
from rollout import BaseRollout
from rollout.multi_turn import conversation_metrics
from tandem_core.config import TandemConfig
from tandem_core.protocol import Batch
from trainer import core_algos
from trainer.roles import Actor, Critic, KLController, PromptSource, Reference, Scorer
from trainer.state.checkpoints import CheckpointManager, CheckpointRefused, ShardedState
from trainer.state.rng import RNGState
from trainer.state.signals import StopRequest
from trainer.tracking import DevicePeakMemory, Tracker, timed


@dataclass
class Components:
    """Everything the loop uses, built by trainer/build.py."""

    actor: Actor
    ref: Reference | None
    critic: Critic | None
    rollout: BaseRollout
    sharding_manager: BaseShardingManager
    scorer: Scorer
    tokenizer: object
    train_loader: PromptSource
    val_loader: PromptSource | None
    kl_ctrl: KLController
    checkpoints: CheckpointManager
    tracker: Tracker
    signals: StopRequest
    sharded: dict[str, ShardedState]
    """The roles whose own state a checkpoint holds (actor, critic), by name."""
    export_hf: Callable[[Path], None]
    """Writes the actor as an HF directory into the path given (collective)."""


class RLTrainer:
    def __init__(self, cfg: TandemConfig, parts: Components):
        self.cfg, self.p = cfg, parts
        self.step_no = 0
        self.timing: dict[str, float] = {}
        self.memory = DevicePeakMemory()
        self.old_log_prob_pass = old_log_probs_needed(cfg)
        parts.sharding_manager.phase_timer = self.timer  # swap_gather, sync inside swap_enter

    @contextmanager
    def timer(self, name: str):
        """Wall time (summed over repeats within a step) and peak GPU memory of a phase."""
        with timed(name, self.timing), self.memory.phase(name):
            yield

    @contextmanager
    def swapped(self):
        """The HybridEngine swap around generation (DESIGN step 2): `with manager:`, with the
        two halves timed and measured apart (the swap's share of an iteration is reported)."""
        manager = self.p.sharding_manager
        with self.timer("swap_enter"):
            manager.__enter__()
        try:
            yield manager
        finally:
            with self.timer("swap_exit"):
                manager.__exit__(None, None, None)

    # ---- one iteration -------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        p = self.p
        self.timing = {}
        self.memory.peaks_gib()  # drop what validation measured since the last step
        metrics: dict[str, float] = {}
        with self.timer("step"):
            with self.timer("gen"):
                batch, gen_metrics = self.generate_training_batch()
            metrics.update(gen_metrics)
            if self.old_log_prob_pass:  # else they are the update's own (old_log_probs_needed)
                with self.timer("old_log_prob"):
                    metrics.update(self.compute_old_log_probs(batch))
            if p.ref is not None:
                with self.timer("ref"):
                    batch["ref_log_probs"] = p.ref.compute_ref_log_prob(batch)["ref_log_probs"]
            if p.critic is not None:
                with self.timer("values"):
                    batch["values"] = p.critic.compute_values(batch)["values"]
            with self.timer("adv"):
                metrics.update(self.compute_advantages(batch))
            if p.critic is not None:
                with self.timer("update_critic"):
                    metrics.update(p.critic.update_critic(batch))
            with self.timer("update_actor"):
                metrics.update(p.actor.update_policy(batch))
        self.step_no += 1
        metrics.update(self.timing)
        metrics.update(self.memory.peaks_gib())
        metrics.update(_length_metrics(batch))
        metrics.update(conversation_metrics(batch))
        metrics["training/global_step"] = self.step_no
        return metrics

    def compute_old_log_probs(self, batch: Batch) -> dict[str, float]:
        """The actor's log-probs of the rollouts before any update, into the batch; their
        entropy and their gap to the engine's (and, with trainer.debug_check_weight_sync, a
        gap too large to be numerics is an error: the sync left weights behind)."""
        old = self.p.actor.compute_log_prob(batch, calculate_entropy=True)
        batch["old_log_probs"] = old["log_probs"]
        mask = batch["response_mask"]
        if self.cfg.trainer.debug_check_weight_sync:
            check_weights_synced(batch["rollout_log_probs"], old["log_probs"], mask, tol=1e-3)
        return {
            "actor/entropy": _masked_mean(old["entropy"], mask),
            "rollout/logprob_abs_diff": _masked_mean(
                (batch["rollout_log_probs"] - old["log_probs"]).abs(), mask
            ),
        }

    def generate_training_batch(self) -> tuple[Batch, dict[str, float]]:
        """Prompts → samples with scores; DAPO's dynamic sampling drops groups whose rewards
        are all equal (no signal) and refills from new prompts."""
        cfg, p = self.cfg, self.p
        informative: list[Batch] = []  # groups whose rewards differ
        fillers: list[Batch] = []  # all-equal groups: zero advantage, used only to fill up
        n_groups, want = 0, cfg.data.train_batch_size
        rounds = cfg.algorithm.max_refill_rounds if cfg.algorithm.dynamic_sampling else 1
        metrics: dict[str, float] = {}
        for r in range(rounds):
            prompts = p.train_loader.next_batch()
            prompts.meta_info["sampling"] = {
                "n": cfg.rollout.n,
                "seed": cfg.rollout.seed + 1000 * self.step_no + r,
            }
            gen = self.generate(prompts)
            scores, reward_metrics = self.score(gen)
            gen["token_level_scores"] = scores
            if r == 0:
                metrics.update(reward_metrics)
            if not cfg.algorithm.dynamic_sampling:
                informative.append(gen)
                break
            keep = _informative_groups(gen, scores.sum(-1))
            informative.append(gen.index(keep))
            fillers.append(gen.index(sorted(set(range(len(gen))) - set(keep))))
            n_groups += len(keep) // cfg.rollout.n
            if n_groups >= want:
                break
        if cfg.algorithm.dynamic_sampling:
            metrics["dapo/kept_groups"] = float(min(n_groups, want))
        # Whole groups, informative first; the batch keeps its configured size either way.
        batch = Batch.concat(informative + fillers).index(slice(0, want * cfg.rollout.n))
        batch.meta_info["n"] = cfg.rollout.n
        return batch, metrics

    def generate(self, prompts: Batch) -> Batch:
        with self.swapped() as manager, self.timer("generate"):
            local = manager.preprocess_data(prompts)
            out = self.p.rollout.generate_sequences(local)
            return manager.postprocess_data(out)

    def score(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Rewards on rank 0 (user functions may time out differently per rank), shared."""
        if dist.get_rank() == 0:
            scores, metrics = self.p.scorer.score_batch(batch, self.p.tokenizer)
            payload = [scores, metrics]
        else:
            payload = [None, None]
        dist.broadcast_object_list(payload, src=0)
        scores, metrics = payload
        metrics["critic/score/mean"] = float(scores.sum(-1).mean())
        return scores.to(batch["responses"].device), metrics

    def compute_advantages(self, batch: Batch) -> dict[str, float]:
        cfg, alg = self.cfg, self.cfg.algorithm
        metrics = {}
        rewards = batch["token_level_scores"]
        if alg.use_kl_in_reward:
            rewards, kl = core_algos.apply_kl_penalty(
                rewards,
                batch["old_log_probs"],
                batch["ref_log_probs"],
                batch["response_mask"],
                self.p.kl_ctrl.value,
                alg.kl_penalty,
            )
            self.p.kl_ctrl.update(float(kl), n_steps=cfg.data.train_batch_size)
            metrics["actor/reward_kl_penalty"] = float(kl)
            metrics["actor/reward_kl_penalty_coeff"] = float(self.p.kl_ctrl.value)
        adv, ret = core_algos.ADV_ESTIMATORS[alg.adv_estimator](
            rewards,
            batch["response_mask"],
            index=batch["uid"],
            values=batch["values"] if "values" in batch else None,
            gamma=alg.gamma,
            lam=alg.lam,
            norm_adv_by_std_in_grpo=alg.norm_adv_by_std_in_grpo,
        )
        batch["token_level_rewards"], batch["advantages"], batch["returns"] = rewards, adv, ret
        mask = batch["response_mask"]
        metrics["critic/rewards/mean"] = float(rewards.sum(-1).mean())
        metrics["critic/advantages/mean"] = _masked_mean(adv, mask)
        metrics["critic/returns/mean"] = _masked_mean(ret, mask)
        return metrics

    # ---- validation --------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Greedy generation over the validation split; mean score and exact accuracy."""
        if self.p.val_loader is None:
            return {}
        scores, conversations = [], []
        for prompts in self.p.val_loader:
            prompts.meta_info["sampling"] = {"n": 1, "do_sample": False}
            gen = self.generate(prompts)
            s, _ = self.score(gen)
            scores.append(s.sum(-1))
            conversations.append(conversation_metrics(gen))
        total = torch.cat(scores)
        metrics = {
            "val/score": float(total.mean()),
            "val/accuracy": float((total >= 1.0).float().mean()),
        }
        for key in conversations[0]:  # multi-turn: tool calls per sample, ... (equal batches)
            metrics[f"val/{key}"] = sum(c[key] for c in conversations) / len(conversations)
        return metrics

    # ---- the run -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step_no,
            "train_loader": self.p.train_loader.state_dict(),
            "kl_ctrl": self.p.kl_ctrl.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_no = state["step"]
        self.p.train_loader.load_state_dict(state["train_loader"])
        self.p.kl_ctrl.load_state_dict(state["kl_ctrl"])


def old_log_probs_needed(cfg: TandemConfig) -> bool:
    """Whether an iteration runs the forward-only pass for the old log-probs.

    Not when the rollouts make exactly one optimizer step and nothing reads the old log-probs
    before it (`actor.old_log_prob_pass=auto`): the update's forward runs the same weights on
    the same tokens, so the ratio to the old policy is 1 and its gradient that of the detached
    log-probs (TRL's GRPOTrainer skips it the same way when it is not correcting for vLLM).
    One forward-only pass over the batch saved (BENCHMARKS.md, beside the peers)."""
    actor, alg = cfg.actor, cfg.algorithm
    one_step = actor.ppo_epochs == 1 and actor.ppo_mini_batch_size >= cfg.data.train_batch_size
    read_before_update = alg.use_kl_in_reward or cfg.trainer.debug_check_weight_sync
    return actor.old_log_prob_pass == "always" or not one_step or read_before_update


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(core_algos.masked_mean(x.float(), mask.float()))


def _length_metrics(batch: Batch) -> dict[str, float]:
    lengths = batch["response_mask"].sum(-1).float()
    R = batch["responses"].shape[1]
    return {
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/clip_ratio": float((lengths >= R).float().mean()),
    }


def _informative_groups(batch: Batch, seq_scores: torch.Tensor) -> list[int]:
    """Row indices of groups (same uid) whose scores are not all equal."""
    uids = batch["uid"]
    rows: dict[str, list[int]] = {}
    for i, u in enumerate(uids):
        rows.setdefault(u, []).append(i)
    keep = []
    for members in rows.values():
        s = seq_scores[members]
        if float(s.max() - s.min()) > 0:
            keep.extend(members)
    return sorted(keep) if keep else []


# ---- the run -----------------------------------------------------------------------------------
def fit(cfg: TandemConfig, parts: Components) -> dict:
    """Resume if a checkpoint exists, run `trainer.total_steps` iterations: after each, validate,
    log, checkpoint and export as configured, and stop cleanly at a signal."""
    trainer = RLTrainer(cfg, parts)
    t = cfg.trainer
    rank0 = dist.get_rank() == 0
    # Every component whose state an exact resume needs (the rollout's generation RNG lives
    # in the sharding manager); the sharded roles write their own directories.
    stateful = {"trainer": trainer, "rng": RNGState(), "sharding_manager": parts.sharding_manager}

    def save():
        state = {name: part.state_dict() for name, part in stateful.items()}
        parts.checkpoints.save(trainer.step_no, parts.sharded, state)

    def export(step: int):
        parts.checkpoints.export_hf(step, parts.export_hf)

    latest, skipped = (None, []) if t.resume == "never" else parts.checkpoints.latest_complete()
    if latest is None and (skipped or t.resume == "must"):
        # The pre-launch check (trainer/preflight.py) saw a complete checkpoint by its marker
        # and sizes; here the checksums say none can be trusted. Never start over silently.
        listed = "; ".join(f"{path.name}: {problem}" for path, problem in skipped) or "none"
        raise CheckpointRefused(
            f"trainer.resume: no checkpoint in {parts.checkpoints.root} passes verification"
            f" ({listed}); to start over set trainer.resume=never"
            " trainer.discard_checkpoints=true"
        )
    if latest is not None:
        step, path = latest
        state = parts.checkpoints.load(path, parts.sharded)
        for name, part in stateful.items():
            part.load_state_dict(state[name])
        if rank0:
            print(f"[tandem] resuming from {path} (step {step})", flush=True)

    history = []
    try:
        if trainer.step_no == 0 and parts.val_loader is not None:
            parts.tracker.log(trainer.validate(), step=0)
        while trainer.step_no < t.total_steps:
            metrics = trainer.step()
            step = trainer.step_no
            if parts.val_loader is not None and t.test_freq and step % t.test_freq == 0:
                metrics.update(trainer.validate())
            parts.tracker.log(metrics, step=step)
            history.append(metrics)
            last = step == t.total_steps
            stop = parts.signals.agreed()
            if (last and t.save_at_end) or stop or (t.save_freq and step % t.save_freq == 0):
                save()
            if t.hf_export_freq and step % t.hf_export_freq == 0 and not last:
                export(step)
            if stop:
                if rank0:
                    print(
                        f"[tandem] {parts.signals.signal_name or 'signal'}: checkpoint at step "
                        f"{step} written, exiting",
                        flush=True,
                    )
                return {"history": history, "stopped": True}
        if trainer.step_no == t.total_steps and t.save_at_end:
            export(trainer.step_no)
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
