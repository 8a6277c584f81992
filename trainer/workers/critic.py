"""The critic: a value head (one output per position) on the policy's backbone, trained with
the clipped value loss `core_algos.compute_value_loss`.

Built by `build_model_worker(..., value_head=True)` (megatron: the backbone from the HF
checkpoint, megatron's output layer replaced by a replicated, zero-initialised `ValueHead`) or
`build_fsdp_worker(..., value_head=True)` (FSDP2: the transformers backbone and the same
zero-initialised head, trainer/workers/fsdp.py `ValueModel`).
The value of response token j is read at the position whose hidden state precedes it, which
is where the actor reads the log-prob of token j (`AlignedMicroBatch.response_index`), so
values, log-probs and advantages line up column for column. Micro-batching, data-parallel
slicing and global loss normalisers are the actor's own (`trainer/workers/passes.py`).
"""

from __future__ import annotations

import torch

from tandem_core.config import CriticConfig
from tandem_core.protocol import Batch
from trainer import core_algos
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


class ValueCritic:
    """compute_values + update_critic on a value-head model."""

    def __init__(self, worker: TrainingWorker, cfg: CriticConfig):
        self.worker, self.cfg = worker, cfg
        self.loss_agg_mode = cfg.loss_agg_mode
        self.max_tokens = cfg.max_tokens_per_microbatch if cfg.use_dynamic_bsz else None

    @staticmethod
    def _values(mb: AlignedMicroBatch, output: torch.Tensor) -> torch.Tensor:
        # output [b, R, 1] (under CP [1, N, 1], this rank's rows) → fp32 [b, R]; 0 on
        # response padding.
        return mask_response(rows_over_context_parallel(output[..., 0].float(), mb), mb)

    def compute_values(self, batch: Batch) -> Batch:
        """Batch with `values` [B, R] for the full batch."""
        out = forward_per_token(
            self.worker,
            batch,
            self.cfg.forward_micro_batch_size or self.cfg.micro_batch_size,
            self.max_tokens,
            lambda mb, o: {"values": self._values(mb, o)},
            ("values",),
        )
        return Batch.from_dict(out)

    def update_critic(self, batch: Batch) -> dict[str, float]:
        """Epochs over mini-batches of `ppo_mini_batch_size × n` sequences (global); needs
        `values` (at rollout time) and `returns`."""
        cfg = self.cfg
        plan = MiniBatching(
            mini_batch_size=cfg.ppo_mini_batch_size * int(batch.meta_info.get("n", 1)),
            micro_batch_size=cfg.micro_batch_size,
            epochs=cfg.ppo_epochs,
            max_tokens=self.max_tokens,
            max_nan_steps=cfg.max_nan_steps,
        )
        metrics = update_over_mini_batches(
            self.worker, batch, plan, self._value_loss_fn, ["vf_loss", "vf_clipfrac", "vpred_mean"]
        )
        return {f"critic/{k}": v for k, v in metrics.items()}

    def _value_loss_fn(self, global_tokens: float, global_seqs: float, n_micro: int):
        cliprange, mode = self.cfg.cliprange_value, self.loss_agg_mode

        def loss_fn(mb: AlignedMicroBatch, output: torch.Tensor):
            vpreds = self._values(mb, output)
            f = mb.fields
            vf_loss, clipfrac = core_algos.compute_value_loss(
                vpreds,
                f["returns"],
                f["values"],
                mb.response_mask,
                cliprange,
                mode,
                global_tokens=global_tokens,
                global_seqs=global_seqs,
            )
            # vf_loss is this micro-batch's share of the mini-batch loss; ×n_micro so the mean
            # over micro-batches reports the mini-batch loss.
            return vf_loss, {
                "loss": vf_loss.detach().clone(),
                "vf_loss": vf_loss.detach() * n_micro,
                "vf_clipfrac": clipfrac,
                "vpred_mean": core_algos.masked_mean(vpreds.detach(), mb.response_mask),
            }

        return loss_fn
