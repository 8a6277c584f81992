"""One megatron-core model role (actor, critic, reference): its chunks, optimizer, and the
forward/backward plumbing through megatron's own pipeline schedules.

`build_model_worker` builds this rank's model chunks (one per VPP stage) from an HF checkpoint
through the weight loaders, wraps them in megatron's DDP and builds megatron's optimizer and
LR scheduler when the role trains. `run_micro_batches` feeds aligned micro-batches to
`get_forward_backward_func()` (1F1B / interleaved VPP / no-pipelining, chosen by megatron) and
hands each micro-batch's output to a loss function on the last stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tandem_core import cpu_compat
from tandem_core import distributed as D
from tandem_core.config import OptimConfig, ParallelConfig
from tandem_core.models import ModelArgs, build_gpt_model, build_transformer_config
from trainer.sequences import AlignedMicroBatch


@dataclass
class ModelWorker:
    args: ModelArgs
    config: object  # megatron TransformerConfig
    chunks: list  # DDP-wrapped GPTModel chunks (plain chunks when not trained)
    optimizer: object | None = None
    scheduler: object | None = None
    offloaded: bool = False
    _skipped_in_a_row: int = field(default=0)

    @property
    def is_last_stage(self) -> bool:
        from megatron.core import parallel_state as mpu

        return mpu.is_pipeline_last_stage(ignore_virtual=True)

    def train(self, mode: bool = True):
        for c in self.chunks:
            c.train(mode)


def build_model_chunks(args: ModelArgs, config, layer_spec: str, value_head: bool) -> list:
    from megatron.core import parallel_state as mpu

    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp in range(vpp):
        vp_stage = vp if vpp > 1 else None
        pre = mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunks.append(build_gpt_model(args, config, layer_spec, pre, post, vp_stage, value_head))
    return chunks


def build_model_worker(
    args: ModelArgs,
    hf_dir,
    parallel: ParallelConfig,
    dtype: str = "float32",
    layer_spec: str = "sdpa",
    value_head: bool = False,
    optim: OptimConfig | None = None,
    total_optimizer_steps: int = 1,
) -> ModelWorker:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    import weight_loaders

    config = build_transformer_config(args, parallel, dtype)
    config.finalize_model_grads_func = finalize_model_grads
    chunks = build_model_chunks(args, config, layer_spec, value_head)
    weight_loaders.load_hf_into_megatron(chunks, hf_dir, args, config)
    if optim is None:
        for c in chunks:
            c.requires_grad_(False)
            c.eval()
        return ModelWorker(args, config, chunks)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_grad_reduce=False,
    )
    with cpu_compat.megatron_device_scope():
        chunks = [
            DistributedDataParallel(config, ddp_config, c, disable_bucketing=(i > 0))
            for i, c in enumerate(chunks)
        ]
        optimizer, scheduler = build_optimizer(chunks, config, optim, parallel,
                                               total_optimizer_steps)
    return ModelWorker(args, config, chunks, optimizer, scheduler)


def build_optimizer(chunks, config, optim: OptimConfig, parallel: ParallelConfig, total_steps):
    """megatron's optimizer (distributed when configured) and OptimizerParamScheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    decay_steps = optim.lr_decay_steps or max(total_steps, optim.lr_warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


LossFn = Callable[[AlignedMicroBatch, torch.Tensor], tuple[torch.Tensor, dict]]


def run_micro_batches(
    worker: ModelWorker,
    micro_batches: list[AlignedMicroBatch],
    loss_fn: LossFn,
    forward_only: bool,
) -> list[dict]:
    """Forward (and backward) every micro-batch through megatron's schedule.

    `loss_fn(mb, output)` runs on the last pipeline stage with the model output [b, s, ...];
    it returns (loss, outputs). Megatron divides each micro-batch loss by the number of
    micro-batches; loss functions here already return their share of the mini-batch loss
    (global normalisers), so that division is undone. Returns the outputs dicts (last stage
    only; empty elsewhere).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n = len(micro_batches)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb.input_ids, mb.position_ids, None)

        def loss_func(out):
            loss, extra = loss_fn(mb, out)
            return loss * n, extra

        return output, loss_func

    seq = max(mb.input_ids.shape[1] for mb in micro_batches)
    mbs = max(mb.input_ids.shape[0] for mb in micro_batches)
    with cpu_compat.megatron_device_scope():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro_batches) for _ in worker.chunks],
            model=worker.chunks,
            num_microbatches=n,
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )


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


def train_step(worker: ModelWorker, micro_batches, loss_fn: LossFn, max_nan_steps: int):
    """One optimizer step over a mini-batch's micro-batches.

    A non-finite loss on any rank skips the step on every rank (grads zeroed, counted);
    `max_nan_steps` skips in a row abort the run. Returns (outputs, grad_norm, skipped).
    """
    for c in worker.chunks:
        c.zero_grad_buffer()
    worker.optimizer.zero_grad()
    outputs = run_micro_batches(worker, micro_batches, loss_fn, forward_only=False)
    bad = torch.zeros(1, device=cpu_compat.device())
    for out in outputs:
        if not torch.isfinite(out["loss"]).all():
            bad.fill_(1.0)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        worker._skipped_in_a_row += 1
        for c in worker.chunks:
            c.zero_grad_buffer()
        if worker._skipped_in_a_row >= max_nan_steps:
            raise NonFiniteLossError(
                f"non-finite loss in {worker._skipped_in_a_row} consecutive steps "
                f"(actor.max_nan_steps={max_nan_steps}); aborting. Lower the learning rate or "
                "check the data/rewards."
            )
        return outputs, float("nan"), True
    worker._skipped_in_a_row = 0
    with cpu_compat.megatron_device_scope():
        _, grad_norm, _ = worker.optimizer.step()
    worker.scheduler.step(increment=1)
    return outputs, float(grad_norm) if grad_norm is not None else 0.0, False


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
