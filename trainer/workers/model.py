"""One megatron-core model role (actor, critic, reference) on this rank: its model chunks (one
per VPP stage, this rank's TP/PP shard), and when it trains, megatron's DDP, optimizer and LR
scheduler. `build_model_worker` builds it from an HF checkpoint through the weight loaders (or
megatron's random init). The passes that run it are trainer/workers/passes.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

import archs
import weight_loaders
from tandem_core import cpu_compat
from tandem_core import distributed as D
from tandem_core.config import OptimConfig, ParallelConfig
from tandem_core.model_args import ModelArgs
from tandem_core.models import build_gpt_model, build_transformer_config, compile_dense_layers
from tandem_core.moe import ExpertLoad, moe_routers, replay_routing
from trainer.workers.checkpoint import load_megatron, save_megatron
from trainer.workers.optimizer import build_optimizer
from trainer.workers.passes import LossFn
from trainer.workers.sequences import AlignedMicroBatch


@dataclass(frozen=True)
class MoESettings:
    """How a role builds and trains mixture-of-experts layers (model.moe_* in the config)."""

    experts: str = "grouped"
    """grouped (tandem_core/moe.py) | sequential (megatron's SequentialMLP)."""
    dispatcher: str = "device"
    """device (tandem_core/moe.py: no host synchronisation at EP 1) | megatron (its own)."""
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    router_replay: bool = False
    """R3: the routers take the experts a batch's `routed_experts` column names (the rollout
    engine's choices) instead of their own top-k; gates stay training's softmax, so gradients
    reach the router (megatron's RouterReplay)."""


@dataclass
class ModelWorker:
    args: ModelArgs
    config: object  # megatron TransformerConfig
    chunks: list  # DDP-wrapped GPTModel chunks (plain chunks when not trained)
    optimizer: object | None = None
    scheduler: object | None = None
    offloaded: bool = False
    routers: dict | None = None
    """Under routing replay: id(chunk) -> that chunk's MoE routers (None: no replay)."""
    expert_load: ExpertLoad | None = None
    """A trained MoE model's per-layer expert load (the update's `moe/max_load` metrics)."""
    skipped_in_a_row: int = 0
    """Consecutive optimizer steps skipped for a non-finite loss (train_step)."""
    pack_sequences: bool = False
    """Micro-batches packed into one row each (model.pack_sequences), attention kept within
    each sequence (tandem_core/models.py `packed_attention`)."""

    @property
    def is_last_stage(self) -> bool:
        from megatron.core import parallel_state as mpu

        return mpu.is_pipeline_last_stage(ignore_virtual=True)

    def train(self, mode: bool = True):
        """Train or eval mode for the next pass. Each pass sets the mode it needs; switching
        walks every module (~1 ms of host time for 24 layers), so an unchanged mode is kept."""
        for c in self.chunks:
            if c.training != mode:
                c.train(mode)

    # ---- what the shared passes call (trainer/workers/passes.py TrainingWorker) -------------
    def micro_batch_rules(self) -> dict:
        """SP wants sequence lengths divisible by TP; the interleaved (VPP) schedule a number
        of micro-batches divisible by PP; packed rows under PP one length."""
        return {
            "seq_multiple": D.tp_size() if self.config.sequence_parallel else 1,
            "count_multiple": D.pp_size() if len(self.chunks) > 1 else 1,
            "pack": self.pack_sequences,
            "context_parallel": (D.cp_size(), D.cp_rank()),
            "one_length": self.pack_sequences and D.pp_size() > 1,
        }

    def run_micro_batches(
        self, micro_batches: list[AlignedMicroBatch], loss_fn: LossFn, forward_only: bool
    ) -> list[dict]:
        """Through megatron's schedule (1F1B / interleaved VPP / no pipelining, megatron's
        choice); `loss_fn` runs on the last stage. Megatron divides each micro-batch loss by
        the number of micro-batches (and multiplies it by CP); loss functions here already
        return their share of the mini-batch loss (global normalisers), so both are undone."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        n, cp = len(micro_batches), D.cp_size()

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            if self.routers is not None:
                replay_routing(self.routers[id(model)], mb.routing, self.config.sequence_parallel)
            # The last stage's output: [b, R, ...] at the response rows (ResponseRowsGPTModel).
            with record_function("tandem.forward"):  # the phases benchmarks/host_gaps.py names
                output = model(
                    mb.input_ids,
                    mb.position_ids,
                    None,
                    response_index=mb.response_index,
                    packed_seq_params=packed_seq_params(mb),
                )

            def loss_func(out):
                with record_function("tandem.loss"):
                    loss, extra = loss_fn(mb, out)
                # megatron scales each rank's loss by CP (its CP ranks hold partial losses);
                # here every CP rank computes the whole loss (per-token results summed over CP)
                return loss * n / cp, extra

            return output, loss_func

        # megatron's schedule takes the whole sequence's length (it divides by CP itself)
        seq = max(mb.input_ids.shape[1] for mb in micro_batches) * D.cp_size()
        mbs = max(mb.input_ids.shape[0] for mb in micro_batches)
        with cpu_compat.megatron_device_scope():
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=[iter(micro_batches) for _ in self.chunks],
                model=self.chunks,
                num_microbatches=n,
                seq_length=seq,
                micro_batch_size=mbs,
                forward_only=forward_only,
            )

    def zero_grad(self) -> None:
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()

    def optimizer_step(self) -> float:
        with cpu_compat.megatron_device_scope():
            _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return float(grad_norm) if grad_norm is not None else 0.0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- run state (trainer/state/checkpoints.py calls these, collectively) ----------------
    def save_sharded(self, path: Path) -> None:
        if self.offloaded:
            raise RuntimeError("save a worker while its weights are on the device (not offloaded)")
        counters = {"skipped_in_a_row": self.skipped_in_a_row}
        save_megatron(path, self.chunks, self.optimizer, self.scheduler, counters)

    def load_sharded(self, path: Path) -> None:
        counters = {"skipped_in_a_row": self.skipped_in_a_row}
        saved = load_megatron(path, self.chunks, self.optimizer, self.scheduler, counters)
        self.skipped_in_a_row = int(saved["skipped_in_a_row"])

    def export_hf(self, out_dir: Path, hf_source_dir) -> None:
        """This model as an HF directory (collective); config and tokenizer from the source."""
        weight_loaders.export_megatron_to_hf(
            self.chunks, self.args, self.config, out_dir, hf_source_dir
        )


def build_model_chunks(
    args: ModelArgs,
    config,
    layer_spec: str,
    value_head: bool,
    experts: str = "grouped",
    dispatcher: str = "device",
) -> list:
    from megatron.core import parallel_state as mpu

    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp in range(vpp):
        vp_stage = vp if vpp > 1 else None
        pre = mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunks.append(
            build_gpt_model(
                args, config, layer_spec, pre, post, vp_stage, value_head, experts, dispatcher
            )
        )
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
    moe: MoESettings | None = None,
    pack_sequences: bool = False,
    activation_checkpointing: bool = False,
    compile_layers: bool = False,
) -> ModelWorker:
    """`compile_layers`: on CUDA, each dense decoder layer's forward through torch.compile
    (tandem_core.models.compile_dense_layers)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    archs.require_megatron(args)  # one line naming the model, before anything is built
    moe = moe or MoESettings()
    config = build_transformer_config(
        args, parallel, dtype, moe.aux_loss_coeff, moe.z_loss_coeff, activation_checkpointing
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.moe_enable_routing_replay = moe.router_replay
    chunks = build_model_chunks(args, config, layer_spec, value_head, moe.experts, moe.dispatcher)
    if hf_dir is not None:  # else: megatron's own random init (model.random_init)
        weight_loaders.load_hf_into_megatron(chunks, hf_dir, args, config)
    if compile_layers and cpu_compat.cuda_available():
        compile_dense_layers(chunks)
    if optim is None:
        for c in chunks:
            c.requires_grad_(False)
            c.eval()
        return ModelWorker(
            args,
            config,
            chunks,
            routers=_replayed_routers(chunks, moe),
            pack_sequences=pack_sequences,
        )

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
        optimizer, scheduler = build_optimizer(
            chunks, config, optim, parallel, total_optimizer_steps
        )
    routers = _replayed_routers(chunks, moe)
    load = None
    if args.is_moe:
        load = ExpertLoad(chunks, args.num_layers, args.num_experts, parallel.sequence_parallel)
    return ModelWorker(
        args,
        config,
        chunks,
        optimizer,
        scheduler,
        routers=routers,
        expert_load=load,
        pack_sequences=pack_sequences,
    )


def packed_seq_params(mb: AlignedMicroBatch):
    """megatron's THD description of a packed micro-batch (None for a padded one)."""
    if mb.cu_seqlens is None:
        return None
    from megatron.core import parallel_state as mpu

    from tandem_core.models import PositionedPackedSeqParams

    longest = mb.max_seqlen
    return PositionedPackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=mb.cu_seqlens,
        cu_seqlens_kv=mb.cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
        cp_group=mpu.get_context_parallel_group(),
        positions=mb.position_ids[0],  # RoPE positions (a CP rank: of its two chunks)
    )


def _replayed_routers(chunks: list, moe: MoESettings) -> dict | None:
    """id(chunk) -> its MoE routers, the objects megatron's schedule hands to forward_step."""
    if not moe.router_replay:
        return None
    return {id(c): moe_routers(c) for c in chunks}


def copy_weights(src: ModelWorker, dst: ModelWorker) -> None:
    """dst's parameters := src's, name by name (same model, same layout on this rank)."""
    dst_params = dict(weight_loaders.megatron_named_params(dst.chunks))
    with torch.no_grad():
        for name, p in weight_loaders.megatron_named_params(src.chunks):
            dst_params[name].copy_(p)
