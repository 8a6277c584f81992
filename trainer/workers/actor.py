"""The actor (and the reference policy): log-probs and the PPO update, under either training
strategy (a megatron `ModelWorker` or an FSDP2 `FSDPWorker`: trainer/workers/passes.py
`TrainingWorker`).

Every rank passes the same full batch; each data-parallel rank takes its slice, runs it
through its worker (megatron's schedule, or FSDP2's plain loop), and results are gathered
back, so callers never see the layout.
The loss is `core_algos.POLICY_LOSSES[actor.policy_loss]` (+ KL loss, - entropy bonus) on
log-probs computed from vocab-parallel logits by `trainer/workers/logprobs.py`.
"""

from __future__ import annotations

import functools

import torch

from tandem_core import distributed as D
from tandem_core.config import ActorConfig
from tandem_core.protocol import Batch
from trainer import core_algos
from trainer.workers.logprobs import vocab_parallel_logprobs
from trainer.workers.passes import (
    MiniBatching,
    TrainingWorker,
    forward_per_token,
    update_over_mini_batches,
)
from trainer.workers.sequences import (
    AlignedMicroBatch,
    mask_response,
    rows_over_context_parallel,
)


class PolicyActor:
    """compute_log_prob + update_policy for a trained policy; a reference is the same class
    built without an optimizer (`update_policy` then refuses)."""

    def __init__(self, worker: TrainingWorker, cfg: ActorConfig, temperature: float = 1.0):
        self.worker, self.cfg, self.temperature = worker, cfg, temperature

    # ---- log-probs ------------------------------------------------------------------------
    def _logprobs(self, mb: AlignedMicroBatch, logits: torch.Tensor, with_entropy: bool):
        # under CP the logits are this rank's response rows only ([1, N, v/tp])
        rows = mb.local_response_rows
        labels = mb.labels if rows is None else mb.labels[rows][None]
        logp, entropy = vocab_parallel_logprobs(
            logits,
            labels,
            self.worker.args.vocab_size,
            D.tp_group(),
            D.tp_rank(),
            temperature=self.temperature,
            with_entropy=with_entropy,
        )
        logp = mask_response(rows_over_context_parallel(logp, mb), mb)
        if entropy is not None:
            entropy = mask_response(rows_over_context_parallel(entropy, mb), mb)
        return logp, entropy

    def compute_log_prob(self, batch: Batch, calculate_entropy: bool = False) -> Batch:
        """Batch with `log_probs` [B, R] (and `entropy`) for the full batch."""
        cfg = self.cfg
        keys = ("log_probs", "entropy") if calculate_entropy else ("log_probs",)

        def per_token(mb, logits):
            logp, ent = self._logprobs(mb, logits, with_entropy=calculate_entropy)
            return {"log_probs": logp, "entropy": ent} if calculate_entropy else {"log_probs": logp}

        return Batch.from_dict(
            forward_per_token(
                self.worker,
                batch,
                cfg.log_prob_micro_batch_size or cfg.micro_batch_size,
                cfg.max_tokens_per_microbatch if cfg.use_dynamic_bsz else None,
                per_token,
                keys,
            )
        )

    # ---- update ---------------------------------------------------------------------------
    def update_policy(self, batch: Batch) -> dict[str, float]:
        """PPO epochs over mini-batches of `ppo_mini_batch_size × n` sequences (global).

        A batch without `old_log_probs` is one on-policy optimizer step (the trainer skipped
        their pass, `actor.old_log_prob_pass=auto`): the loss takes the update's own log-probs,
        detached, as the old ones (ratio 1, the same gradient), and the update reports the
        entropy and the train/rollout gap that pass would have."""
        cfg = self.cfg
        plan = MiniBatching(
            mini_batch_size=cfg.ppo_mini_batch_size * int(batch.meta_info.get("n", 1)),
            micro_batch_size=cfg.micro_batch_size,
            epochs=cfg.ppo_epochs,
            max_tokens=cfg.max_tokens_per_microbatch if cfg.use_dynamic_bsz else None,
            max_nan_steps=cfg.max_nan_steps,
        )
        on_policy = "old_log_probs" not in batch
        if on_policy and (plan.epochs > 1 or len(batch) > plan.mini_batch_size):
            raise ValueError(
                "update_policy: the batch has no old_log_probs, and they are the update's own "
                f"only for one optimizer step ({plan.epochs} epochs of {len(batch)} rows in "
                f"mini-batches of {plan.mini_batch_size})"
            )
        keys = ["pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower", "kl_loss"]
        if cfg.entropy_coeff or on_policy:
            keys.append("entropy")
        if on_policy and "rollout_log_probs" in batch:
            keys.append("rollout_gap")
        metrics = update_over_mini_batches(
            self.worker, batch, plan, functools.partial(self._policy_loss_fn, on_policy), keys
        )
        out = {f"actor/{k}": v for k, v in metrics.items() if k != "rollout_gap"}
        if "rollout_gap" in metrics:  # the name the trainer logs it under from the old pass
            out["rollout/logprob_abs_diff"] = metrics["rollout_gap"]
        return out

    def _policy_loss_fn(
        self, on_policy: bool, global_tokens: float, global_seqs: float, n_micro: int
    ):
        """The loss of one mini-batch's micro-batches (update_over_mini_batches' make_loss_fn,
        once `on_policy` is bound): with `on_policy` the old log-probs are the update's own,
        detached, and the entropy and the train/rollout gap are reported as token means."""
        cfg = self.cfg
        policy_loss = core_algos.POLICY_LOSSES[cfg.policy_loss]
        norm = dict(global_tokens=global_tokens, global_seqs=global_seqs)

        def token_mean(x, mb):  # a share of the mini-batch's token mean, as the losses are
            return core_algos.agg_loss(x.detach(), mb.response_mask, "token-mean", **norm)

        def loss_fn(mb: AlignedMicroBatch, logits):
            # Entropy when it is in the loss, or to log it in place of the old-log-prob pass's
            # (the same fused read of the logits; no backward through it unless in the loss).
            with_entropy = bool(cfg.entropy_coeff) or on_policy
            logp, entropy = self._logprobs(mb, logits, with_entropy=with_entropy)
            f = mb.fields
            pg_loss, pg_metrics = policy_loss(
                logp.detach() if on_policy else f["old_log_probs"],
                logp,
                f["advantages"],
                mb.response_mask,
                clip_ratio_low=cfg.clip_ratio_low,
                clip_ratio_high=cfg.clip_ratio_high,
                clip_ratio_c=cfg.clip_ratio_c,
                loss_agg_mode=cfg.loss_agg_mode,
                rollout_log_probs=f.get("rollout_log_probs"),
                rollout_is_threshold=cfg.rollout_is_threshold,
                **norm,
            )
            loss = pg_loss
            if cfg.entropy_coeff:
                ent = core_algos.agg_loss(entropy, mb.response_mask, cfg.loss_agg_mode, **norm)
                loss = loss - cfg.entropy_coeff * ent
            kl_loss = torch.zeros(())
            if cfg.use_kl_loss:
                kl = core_algos.kl_penalty(logp, f["ref_log_probs"], cfg.kl_loss_type)
                kl_loss = core_algos.agg_loss(kl, mb.response_mask, cfg.loss_agg_mode, **norm)
                loss = loss + cfg.kl_loss_coef * kl_loss
            # Shares of the mini-batch sum; ×n_micro so the mean over micro-batches reports it.
            out = {
                "loss": loss.detach().clone(),
                "pg_loss": pg_loss.detach() * n_micro,
                "kl_loss": kl_loss.detach() * n_micro,
            }
            if cfg.entropy_coeff:
                out["entropy"] = ent.detach() * n_micro
            elif on_policy:
                out["entropy"] = token_mean(entropy, mb) * n_micro
            if on_policy and "rollout_log_probs" in f:
                gap = (logp - f["rollout_log_probs"]).abs()
                out["rollout_gap"] = token_mean(gap, mb) * n_micro
            out.update({k: v.detach() for k, v in pg_metrics.items()})
            return loss, out

        return loss_fn
