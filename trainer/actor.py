"""The actor (and the reference policy): log-probs and the PPO update on megatron-core.

Every rank passes the same full batch; each data-parallel rank takes its slice, runs it
through megatron's schedule, and results are gathered back, so callers never see the layout.
The loss is `core_algos.POLICY_LOSSES[actor.policy_loss]` (+ KL loss, - entropy bonus) on
log-probs computed from vocab-parallel logits by `trainer.logprobs`.
"""

from __future__ import annotations

import torch

from tandem_core import distributed as D
from tandem_core.config import ActorConfig
from tandem_core.protocol import Batch
from trainer import core_algos
from trainer.logprobs import vocab_parallel_logprobs
from trainer.megatron_worker import (
    ModelWorker,
    broadcast_from_last_stage,
    gather_over_dp,
    reduce_metrics,
    run_micro_batches,
    train_step,
)
from trainer.sequences import (
    AlignedMicroBatch,
    align_micro_batch,
    gather_response,
    pad_to_length,
    split_by_token_budget,
)

PER_TOKEN_FIELDS = ("old_log_probs", "advantages", "ref_log_probs", "rollout_log_probs",
                    "values", "returns")


def dp_slice(batch: Batch) -> Batch:
    return batch.chunk(D.dp_size())[D.dp_rank()] if D.dp_size() > 1 else batch


def make_micro_batches(batch: Batch, micro_batch_size: int, max_tokens: int | None,
                       seq_multiple: int, count_multiple: int = 1) -> list[AlignedMicroBatch]:
    """Fixed-size micro-batches, or token-budget ones when max_tokens is set.

    `count_multiple`: megatron's interleaved (VPP) schedule needs the number of micro-batches
    to be a multiple of PP; when it is not, rows are re-cut into that many near-equal groups.
    """
    mask = batch["attention_mask"]
    if max_tokens is None:
        groups = [list(range(i, min(i + micro_batch_size, len(batch))))
                  for i in range(0, len(batch), micro_batch_size)]
    else:
        groups = split_by_token_budget(mask.sum(-1).tolist(), max_tokens)
    if len(groups) % count_multiple:
        count = -(-len(groups) // count_multiple) * count_multiple
        if count > len(batch):
            raise ValueError(f"{len(batch)} rows cannot form a multiple of {count_multiple} "
                             "micro-batches (interleaved pipeline schedule)")
        groups = [t.tolist() for t in torch.arange(len(batch)).tensor_split(count)]
    out = []
    for rows in groups:
        sub = batch.index(rows)
        fields = {k: sub[k] for k in PER_TOKEN_FIELDS if k in sub}
        out.append(align_micro_batch(sub["input_ids"], sub["attention_mask"],
                                     sub["response_mask"], fields, seq_multiple))
    if count_multiple > 1:
        # megatron's interleaved schedule assumes one activation shape for all micro-batches.
        longest = max(mb.input_ids.shape[1] for mb in out)
        out = [pad_to_length(mb, longest) for mb in out]
    return out


def _layout(worker: ModelWorker) -> dict:
    """Micro-batch shape rules of the parallel layout (SP: seq % TP; VPP: count % PP)."""
    return {"seq_multiple": D.tp_size() if worker.config.sequence_parallel else 1,
            "count_multiple": D.pp_size() if len(worker.chunks) > 1 else 1}


class MegatronActor:
    """compute_log_prob + update_policy for a trained policy; a reference is the same class
    built without an optimizer (`update_policy` then refuses)."""

    def __init__(self, worker: ModelWorker, cfg: ActorConfig, temperature: float = 1.0):
        self.worker, self.cfg, self.temperature = worker, cfg, temperature

    # ---- log-probs ------------------------------------------------------------------------
    def _logprobs(self, mb: AlignedMicroBatch, logits: torch.Tensor):
        logp, entropy = vocab_parallel_logprobs(
            logits, mb.labels, self.worker.args.vocab_size, D.tp_group(), D.tp_rank(),
            temperature=self.temperature,
        )
        return gather_response(logp, mb), gather_response(entropy, mb)

    @torch.no_grad()
    def compute_log_prob(self, batch: Batch, calculate_entropy: bool = False) -> Batch:
        """Batch with `log_probs` [B, R] (and `entropy`) for the full batch."""
        worker = self.worker
        worker.train(False)
        local = dp_slice(batch)
        budget = self.cfg.max_tokens_per_microbatch if self.cfg.use_dynamic_bsz else None
        mbs = make_micro_batches(local, self.cfg.micro_batch_size, budget, **_layout(worker))

        def loss_fn(mb, logits):
            logp, ent = self._logprobs(mb, logits)
            return logp.new_zeros(()), {"log_probs": logp, "entropy": ent}

        outputs = run_micro_batches(worker, mbs, loss_fn, forward_only=True)
        R = batch["responses"].shape[1]
        shape, dtype = (len(local), R), torch.float32
        logp = torch.cat([o["log_probs"] for o in outputs]) if outputs else None
        ent = torch.cat([o["entropy"] for o in outputs]) if outputs else None
        result = {"log_probs": gather_over_dp(broadcast_from_last_stage(logp, shape, dtype))}
        if calculate_entropy:
            result["entropy"] = gather_over_dp(broadcast_from_last_stage(ent, shape, dtype))
        worker.train(True)
        return Batch.from_dict(result)

    # ---- update ---------------------------------------------------------------------------
    def update_policy(self, batch: Batch) -> dict[str, float]:
        """PPO epochs over mini-batches of `ppo_mini_batch_size × n` sequences (global)."""
        if self.worker.optimizer is None:
            raise RuntimeError("update_policy on a model built without an optimizer (reference)")
        cfg = self.cfg
        n = int(batch.meta_info.get("n", 1))
        mini_global = cfg.ppo_mini_batch_size * n
        budget = cfg.max_tokens_per_microbatch if cfg.use_dynamic_bsz else None
        metrics: dict[str, list[float]] = {}
        for _ in range(cfg.ppo_epochs):
            for mini in batch.split(mini_global):
                # Global normalisers: DDP averages grads over DP, so each rank divides its
                # sums by (mini-batch total / DP) to get the mini-batch mean exactly.
                tokens = mini["response_mask"].sum().item() / D.dp_size()
                seqs = len(mini) / D.dp_size()
                mbs = make_micro_batches(dp_slice(mini), cfg.micro_batch_size, budget,
                                         **_layout(self.worker))
                loss_fn = self._policy_loss_fn(tokens, seqs, len(mbs))
                outputs, grad_norm, skipped = train_step(self.worker, mbs, loss_fn,
                                                         cfg.max_nan_steps)
                step = reduce_metrics(outputs, ["pg_loss", "pg_clipfrac", "ppo_kl",
                                                "pg_clipfrac_lower", "entropy", "kl_loss"])
                step.update(grad_norm=grad_norm, skipped_steps=float(skipped),
                            lr=self.worker.optimizer.param_groups[0]["lr"])
                for k, v in step.items():
                    metrics.setdefault(k, []).append(v)
        return {f"actor/{k}": sum(v) / len(v) for k, v in metrics.items()}

    def _policy_loss_fn(self, global_tokens: float, global_seqs: float, n_micro: int):
        cfg = self.cfg
        policy_loss = core_algos.POLICY_LOSSES[cfg.policy_loss]
        norm = dict(global_tokens=global_tokens, global_seqs=global_seqs)

        def loss_fn(mb: AlignedMicroBatch, logits):
            logp, entropy = self._logprobs(mb, logits)
            f = mb.fields
            pg_loss, pg_metrics = policy_loss(
                f["old_log_probs"], logp, f["advantages"], mb.response_mask,
                clip_ratio_low=cfg.clip_ratio_low, clip_ratio_high=cfg.clip_ratio_high,
                clip_ratio_c=cfg.clip_ratio_c, loss_agg_mode=cfg.loss_agg_mode,
                rollout_log_probs=f.get("rollout_log_probs"),
                rollout_is_threshold=cfg.rollout_is_threshold, **norm,
            )
            loss = pg_loss
            ent = core_algos.agg_loss(entropy, mb.response_mask, cfg.loss_agg_mode, **norm)
            if cfg.entropy_coeff:
                loss = loss - cfg.entropy_coeff * ent
            kl_loss = torch.zeros(())
            if cfg.use_kl_loss:
                kl = core_algos.kl_penalty(logp, f["ref_log_probs"], cfg.kl_loss_type)
                kl_loss = core_algos.agg_loss(kl, mb.response_mask, cfg.loss_agg_mode, **norm)
                loss = loss + cfg.kl_loss_coef * kl_loss
            # Shares of the mini-batch sum; ×n_micro so the mean over micro-batches reports it.
            out = {"loss": loss.detach().clone(), "pg_loss": pg_loss.detach() * n_micro,
                   "entropy": ent.detach() * n_micro, "kl_loss": kl_loss.detach() * n_micro}
            out.update({k: v.detach() for k, v in pg_metrics.items()})
            return loss, out

        return loss_fn
