"""The passes every role shares (actor, critic, reference) under either training strategy.

`forward_per_token` (forward-only, per-token results for the whole batch) and
`update_over_mini_batches` (epochs × mini-batches of optimizer steps) are the two loops: the
data-parallel slicing, micro-batching, global loss normalisers and non-finite-step skipping
live only here. How micro-batches run through a model is the worker's (`TrainingWorker`):
megatron's pipeline schedules (trainer/workers/model.py) or a plain loop over an FSDP2 model
(trainer/workers/fsdp.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import record_function

from tandem_core import cpu_compat
from tandem_core import distributed as D
from tandem_core.model_args import ModelArgs
from tandem_core.protocol import Batch
from trainer.workers.sequences import (
    AlignedMicroBatch,
    align_micro_batches,
    first_fit_decreasing,
    pad_to_length,
    split_by_token_budget,
    split_for_context_parallel,
)

# [B, R] per-token fields that travel with each micro-batch into the loss functions.
PER_TOKEN_FIELDS = (
    "old_log_probs",
    "advantages",
    "ref_log_probs",
    "rollout_log_probs",
    "values",
    "returns",
)


LossFn = Callable[[AlignedMicroBatch, torch.Tensor], tuple[torch.Tensor, dict]]
"""`loss_fn(mb, output) -> (loss, outputs)`: output is the model's [b, R, ...] at the rows
that predict the response tokens; the loss is this micro-batch's share of the mini-batch's."""


class TrainingWorker(Protocol):
    """What the shared loops need of one role's model under a training strategy: megatron's
    `ModelWorker` (trainer/workers/model.py) or FSDP2's `FSDPWorker` (trainer/workers/fsdp.py).
    The loops own data-parallel slicing, micro-batching, loss normalisers, NaN skips and
    metrics; a worker owns how micro-batches run through its model and how it steps."""

    args: ModelArgs
    optimizer: object | None  # None: forward-only (a reference)
    routers: dict | None  # R3 routers (megatron MoE only)
    expert_load: object | None
    skipped_in_a_row: int

    def train(self, mode: bool = True) -> None: ...

    def micro_batch_rules(self) -> dict:
        """make_micro_batches' `seq_multiple`, `count_multiple`, `pack` (and a megatron
        worker's `context_parallel`) for this layout."""

    def run_micro_batches(
        self, micro_batches: list[AlignedMicroBatch], loss_fn: LossFn, forward_only: bool
    ) -> list[dict]:
        """Forward (and backward) every micro-batch; the loss functions' outputs (those of the
        last pipeline stage; empty elsewhere)."""

    def zero_grad(self) -> None: ...

    def optimizer_step(self) -> float:
        """Clip, step the optimizer and the LR schedule; the gradient norm before clipping."""

    @property
    def lr(self) -> float: ...


# ---- micro-batches ------------------------------------------------------------------------------
class SequenceTooLongError(ValueError):
    pass


def check_lengths(worker: TrainingWorker, batch: Batch) -> None:
    """Refuse rows longer than the model's positions before any forward: megatron's RoPE
    would silently extrapolate past them."""
    lengths = batch["attention_mask"].sum(-1)
    limit = worker.args.max_position_embeddings
    if len(batch) and int(lengths.max()) > limit:
        row = int(lengths.argmax())
        raise SequenceTooLongError(
            f"a sequence of {int(lengths[row])} tokens (row {row}) is longer than the model's "
            f"max length {limit} (max_position_embeddings); lower data.max_prompt_length or "
            "rollout.response_length"
        )


def dp_slice(batch: Batch) -> Batch:
    return batch.chunk(D.dp_size())[D.dp_rank()] if D.dp_size() > 1 else batch


def make_micro_batches(
    batch: Batch,
    micro_batch_size: int,
    max_tokens: int | None,
    seq_multiple: int,
    count_multiple: int = 1,
    with_routing: bool = False,
    pack: bool = False,
    context_parallel: tuple[int, int] = (1, 0),
    one_length: bool = False,
) -> list[AlignedMicroBatch]:
    """Fixed-size micro-batches, or token-budget ones when max_tokens is set.

    `with_routing`: the micro-batches carry the batch's `routed_experts` (R3). `pack`: each
    micro-batch is its rows packed into one (sequences.pack_rows), and a token budget counts
    real tokens, not rows × the longest. `context_parallel` (CP size, rank): each micro-batch
    cut to this rank's two chunks of every row (sequences.split_for_context_parallel).

    `count_multiple`: megatron's interleaved (VPP) schedule needs the number of micro-batches
    to be a multiple of PP; when it is not, rows are re-cut into that many near-equal groups.
    `one_length`: every micro-batch padded to the longest (one activation shape between
    pipeline stages), before any CP split so each rank's chunks stay whole-row chunks.
    """
    order = None
    if max_tokens is None:
        groups = [
            range(i, min(i + micro_batch_size, len(batch)))
            for i in range(0, len(batch), micro_batch_size)
        ]
    elif pack:  # bins filled first-fit-decreasing; the rows re-ordered bin after bin
        bins = first_fit_decreasing(batch["attention_mask"].sum(-1).tolist(), max_tokens)
        order = [row for b in bins for row in b]
        batch = batch.index(order) if order != sorted(order) else batch
        starts = [0, *itertools.accumulate(len(b) for b in bins)]
        groups = [range(a, b) for a, b in itertools.pairwise(starts)]
    else:
        groups = split_by_token_budget(batch["attention_mask"].sum(-1).tolist(), max_tokens)
    if len(groups) % count_multiple:
        count = -(-len(groups) // count_multiple) * count_multiple
        if count > len(batch):
            raise ValueError(
                f"{len(batch)} rows cannot form a multiple of {count_multiple} "
                "micro-batches (interleaved pipeline schedule)"
            )
        groups = [range(t[0], t[-1] + 1) for t in torch.arange(len(batch)).tensor_split(count)]
    cp, cp_rank = context_parallel
    out = align_micro_batches(
        batch["input_ids"],
        batch["attention_mask"],
        batch["response_mask"],
        {k: batch[k] for k in PER_TOKEN_FIELDS if k in batch},
        groups,
        seq_multiple * (2 * cp if cp > 1 else 1),
        device=cpu_compat.device(),
        routing=batch["routed_experts"] if with_routing else None,
        pack=pack,
    )
    if count_multiple > 1 or one_length:
        # megatron's interleaved schedule assumes one activation shape for all micro-batches;
        # so does a pipeline of packed rows (the padding is a packed sequence of its own).
        longest = max(mb.input_ids.shape[1] for mb in out)
        out = [pad_to_length(mb, longest) for mb in out]
    if cp > 1:
        out = [split_for_context_parallel(mb, cp, cp_rank) for mb in out]
    return MicroBatches(out, order)


class MicroBatches(list):
    """The micro-batches of a batch, and `order`: the batch's rows in the order they hold them
    (None: the batch's own order)."""

    def __init__(self, micro_batches, order: list[int] | None = None):
        super().__init__(micro_batches)
        self.order = order

    def restore_order(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-row results in micro-batch order -> the batch's order."""
        if self.order is None:
            return rows
        back = torch.empty(len(self.order), dtype=torch.long)
        back[torch.tensor(self.order)] = torch.arange(len(self.order))
        return rows[back.to(rows.device)]


def micro_batch_layout(worker: TrainingWorker, batch: Batch) -> dict:
    """Micro-batch shape rules of the worker's layout (megatron's SP: seq % TP; VPP: count %
    PP), and whether they carry routing to replay (a worker built for it, a batch that has
    it)."""
    replay = worker.routers is not None
    if replay and "routed_experts" not in batch:
        raise ValueError(
            "actor.router_replay: the batch has no routed_experts (the rollout engine must"
            " return them)"
        )
    return {**worker.micro_batch_rules(), "with_routing": replay}


def broadcast_from_last_stage(tensor: torch.Tensor | None, shape, dtype) -> torch.Tensor:
    """Results computed on the last PP stage, on every PP rank."""
    from megatron.core import parallel_state as mpu

    if D.pp_size() == 1:
        return tensor
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype, device=cpu_compat.device())
    dist.broadcast(tensor, src=mpu.get_pipeline_model_parallel_last_rank(), group=D.pp_group())
    return tensor


def gather_over_dp(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized per-DP-rank results in DP rank order."""
    if D.dp_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(D.dp_size())]
    dist.all_gather(parts, tensor.contiguous(), group=D.dp_group())
    return torch.cat(parts)


class NonFiniteLossError(RuntimeError):
    pass


def train_step(worker: TrainingWorker, micro_batches, loss_fn: LossFn, max_nan_steps: int):
    """One optimizer step over a mini-batch's micro-batches.

    A non-finite loss on any rank skips the step on every rank (grads zeroed, counted);
    `max_nan_steps` skips in a row abort the run. Returns (outputs, grad_norm, skipped).
    """
    worker.train(True)
    with record_function("tandem.zero_grad"):  # the phases benchmarks/host_gaps.py names
        worker.zero_grad()
    with record_function("tandem.forward_backward"):
        outputs = worker.run_micro_batches(micro_batches, loss_fn, forward_only=False)
    with record_function("tandem.check_finite"):
        bad = torch.zeros(1, device=cpu_compat.device())
        for out in outputs:
            if not torch.isfinite(out["loss"]).all():
                bad.fill_(1.0)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        any_nonfinite = bad.item() > 0
    if any_nonfinite:
        worker.skipped_in_a_row += 1
        worker.zero_grad()
        if worker.skipped_in_a_row >= max_nan_steps:
            raise NonFiniteLossError(
                f"non-finite loss in {worker.skipped_in_a_row} consecutive steps "
                f"(max_nan_steps={max_nan_steps}); aborting. Lower the learning rate or "
                "check the data/rewards."
            )
        return outputs, float("nan"), True
    worker.skipped_in_a_row = 0
    with record_function("tandem.optimizer_step"):
        return outputs, worker.optimizer_step(), False


def reduce_metrics(outputs: list[dict], keys: list[str]) -> dict[str, float]:
    """Mean of each metric over micro-batches (last stage), shared with every rank."""
    values = torch.zeros(len(keys) + 1, dtype=torch.float64, device=cpu_compat.device())
    for out in outputs:
        for i, k in enumerate(keys):
            values[i] += float(out[k])
        values[-1] += 1
    if D.pp_size() > 1:
        dist.all_reduce(values, group=D.pp_group())  # only the last stage has outputs
    if D.dp_size() > 1:
        dist.all_reduce(values, group=D.dp_group())
    count = max(values[-1].item(), 1.0)
    return {k: values[i].item() / count for i, k in enumerate(keys)}


# ---- the loops every role shares -------------------------------------------------------------
PerTokenFn = Callable[[AlignedMicroBatch, torch.Tensor], dict[str, torch.Tensor]]


@torch.no_grad()
def forward_per_token(
    worker: TrainingWorker,
    batch: Batch,
    micro_batch_size: int,
    max_tokens: int | None,
    fn: PerTokenFn,
    keys: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """Forward-only pass over the full batch (the same on every rank).

    `fn(mb, output)` turns the last stage's model output into {key: [b, R]} fp32 tensors;
    returns {key: [B, R]} for the whole batch on every rank.
    """
    check_lengths(worker, batch)
    worker.train(False)
    local = dp_slice(batch)
    layout = micro_batch_layout(worker, local)
    mbs = make_micro_batches(local, micro_batch_size, max_tokens, **layout)

    def loss_fn(mb, output):
        return output.new_zeros(()), fn(mb, output)

    outputs = worker.run_micro_batches(mbs, loss_fn, forward_only=True)
    shape = (len(local), batch["responses"].shape[1])
    result = {}
    for key in keys:
        # Each micro-batch's response columns were trimmed: pad them back to the batch's R.
        mine = [F.pad(o[key], (0, shape[1] - o[key].shape[1])) for o in outputs]
        mine = mbs.restore_order(torch.cat(mine)) if mine else None
        result[key] = gather_over_dp(broadcast_from_last_stage(mine, shape, torch.float32)).cpu()
    return result


@dataclass(frozen=True)
class MiniBatching:
    """How an update walks a batch (the actor's and the critic's settings map onto this)."""

    mini_batch_size: int
    """Sequences per optimizer step, global over data-parallel ranks."""
    micro_batch_size: int
    """Sequences per forward/backward on each rank (when max_tokens is None)."""
    epochs: int = 1
    """Passes over the batch."""
    max_tokens: int | None = None
    """Token budget of a dynamic micro-batch; None = fixed micro_batch_size."""
    max_nan_steps: int = 3
    """Consecutive non-finite steps that abort the run."""


# make_loss_fn(global_tokens, global_seqs, n_micro) -> LossFn for one mini-batch.
MakeLossFn = Callable[[float, float, int], LossFn]


def update_over_mini_batches(
    worker: TrainingWorker,
    batch: Batch,
    plan: MiniBatching,
    make_loss_fn: MakeLossFn,
    metric_keys: list[str],
) -> dict[str, float]:
    """Epochs × mini-batches of optimizer steps; returns each metric's mean over steps
    (plus grad_norm, skipped_steps, lr)."""
    if worker.optimizer is None:
        raise RuntimeError("an update on a model built without an optimizer (reference)")
    check_lengths(worker, batch)
    metrics: dict[str, list[float]] = {}
    for _ in range(plan.epochs):
        for mini in batch.split(plan.mini_batch_size):
            # Global normalisers: DDP averages grads over DP, so each rank divides its sums by
            # (mini-batch total / DP) to get the mini-batch mean exactly. A mini-batch of empty
            # responses has no token: its loss is 0, not 0/0.
            tokens = max(mini["response_mask"].sum().item(), 1) / D.dp_size()
            seqs = len(mini) / D.dp_size()
            local = dp_slice(mini)
            layout = micro_batch_layout(worker, local)
            with record_function("tandem.micro_batches"):
                mbs = make_micro_batches(local, plan.micro_batch_size, plan.max_tokens, **layout)
            loss_fn = make_loss_fn(tokens, seqs, len(mbs))
            outputs, grad_norm, skipped = train_step(worker, mbs, loss_fn, plan.max_nan_steps)
            with record_function("tandem.metrics"):
                step = reduce_metrics(outputs, metric_keys)
            step.update(
                grad_norm=grad_norm,
                skipped_steps=float(skipped),
                lr=worker.lr,
            )
            for k, v in step.items():
                metrics.setdefault(k, []).append(v)
    averaged = {k: sum(v) / len(v) for k, v in metrics.items()}
    if worker.expert_load is not None:  # over the whole update (every mini-batch and epoch)
        averaged.update(worker.expert_load.metrics())
    return averaged
