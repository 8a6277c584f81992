"""One transformers model role (actor, reference, critic) on this rank under torch's FSDP2: the
second training strategy (`actor.strategy=fsdp2`, `critic.strategy=fsdp2`), for any `AutoModelForCausalLM` without a megatron
loader, with zero conversion. It runs the same passes as megatron's `ModelWorker`
(trainer/workers/passes.py `TrainingWorker`): the same micro-batches, losses, normalisers and
LR schedule; only the model, its sharding and its optimizer differ.

- Sharding: `fully_shard` on every decoder layer, then the root (embeddings, final norm, LM
  head), over the data-parallel group: parameters, grads and Adam states are sharded over DP;
  one layer is unsharded at a time in forward and backward.
- Precision: parameters (the optimizer's master weights) stay fp32; with model.dtype=bfloat16
  the forward runs in bf16 and gradients are reduced in fp32 (torch's MixedPrecisionPolicy).
- Optimizer: torch's AdamW with megatron's parameter groups (no weight decay on biases and
  1-D tensors) and megatron's `OptimizerParamScheduler`, so an FSDP2 run follows the same LR
  and weight-decay schedule as a megatron one; grad-norm clipping as megatron clips.
- Run state: `torch.distributed.checkpoint` (sharded, each rank writes its shards); HF export
  gathers full tensors to rank 0.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tandem_core import cpu_compat
from tandem_core import distributed as D
from tandem_core.config import OptimConfig
from tandem_core.model_args import ModelArgs
from trainer.workers.optimizer import build_scheduler
from trainer.workers.passes import LossFn
from trainer.workers.sequences import AlignedMicroBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ValueModel(nn.Module):
    """The critic: a transformers backbone and a zero-initialised scalar head per position (the
    megatron critic's `ValueHead`, tandem_core/models.py). Parameter names: `model.…` as in
    the causal LM's checkpoint, and `value_head.weight`."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.model = backbone
        self.value_head = nn.Linear(hidden_size, 1, bias=False)
        nn.init.zeros_(self.value_head.weight)
        self._no_split_modules = getattr(backbone, "_no_split_modules", None)

    def forward(self, input_ids, position_ids, use_cache=False):
        hidden = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache)
        return self.value_head(hidden.last_hidden_state)


@dataclass
class FSDPWorker:
    args: ModelArgs
    model: nn.Module  # the FSDP2-sharded transformers causal LM
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object | None = None  # megatron's OptimizerParamScheduler
    clip_grad: float = 1.0
    compute_dtype: torch.dtype = torch.float32  # model.dtype: the forward's (and an engine's)
    routers: dict | None = None  # routing replay is megatron's (MoE); never set here
    expert_load: object | None = None
    skipped_in_a_row: int = 0
    offloaded: bool = False
    logits_to_keep: bool = False  # the model's forward takes transformers' `logits_to_keep`

    def train(self, mode: bool = True) -> None:
        if self.model.training != mode:
            self.model.train(mode)

    # ---- what the shared passes call (trainer/workers/passes.py TrainingWorker) -------------
    def micro_batch_rules(self) -> dict:
        return {"seq_multiple": 1, "count_multiple": 1, "pack": False}

    def output_at_response(self, mb: AlignedMicroBatch) -> torch.Tensor:
        """[b, R, V] logits (a critic: [b, R, 1] values) at the rows that predict the response
        tokens. Rows are aligned (real tokens from position 0, padding after them), so plain
        causal attention without a mask sees only real tokens, as in the megatron path."""
        index, extra = mb.response_index, {}
        if self.logits_to_keep:
            # The LM head only over the span of positions that predict response tokens (half
            # a row or more of a [V = 128k] matmul and its logits, on an RL batch).
            first = int(index.min())
            keep = torch.arange(first, int(index.max()) + 1, device=index.device)
            index, extra = index - first, {"logits_to_keep": keep}
        out = self.model(
            input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False, **extra
        )
        out = out if torch.is_tensor(out) else out.logits
        rows = torch.arange(mb.input_ids.shape[0], device=mb.input_ids.device)[:, None]
        return out[rows, index]

    def run_micro_batches(
        self, micro_batches: list[AlignedMicroBatch], loss_fn: LossFn, forward_only: bool
    ) -> list[dict]:
        outputs = []
        for mb in micro_batches:
            with torch.set_grad_enabled(not forward_only):
                loss, extra = loss_fn(mb, self.output_at_response(mb))
                if not forward_only:
                    loss.backward()  # FSDP2 reduce-scatters the grads: the mean over DP
            outputs.append(extra)
        return outputs

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        # megatron's rule: clip by clip_grad / (norm + 1e-6) when that is below one (torch's).
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.scheduler.step(increment=1)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- weights ----------------------------------------------------------------------------
    def full_tensors(self, dtype: torch.dtype | None = None, bucket_mb: float | None = None):
        """(HF name, full tensor) of every parameter (collective: every rank walks the same
        order). Tied weights appear once, under the embedding's name. `dtype`: the dtype shards
        travel in over the gather (a bf16 engine: half the bytes moved); at DP 1 nothing
        travels and the tensors keep the training dtype. `bucket_mb`: shards are gathered in
        buckets of about that size (one collective each) instead of one by one."""
        named = self.model.named_parameters()
        world = dist.get_world_size(D.dp_group())
        if world == 1:
            # Each rank holds every parameter whole: the local tensors themselves, uncast (the
            # consumer's copy_ casts in the same kernel; DTensor's cast and full_tensor() cost
            # more host time per tensor than a copy of it on the device).
            for name, p in named:
                yield name, (p.to_local() if hasattr(p, "to_local") else p).detach()
            return
        if bucket_mb:
            yield from _gathered_in_buckets(named, dtype, int(bucket_mb * 2**20), D.dp_group())
            return
        for name, p in named:
            p = p.detach() if dtype is None else p.detach().to(dtype)
            yield name, p.full_tensor() if hasattr(p, "full_tensor") else p

    # ---- run state (trainer/state/checkpoints.py calls these, collectively) ----------------
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self.optimizer is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save_sharded(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        state = self._state()
        dcp.save(state, checkpoint_id=str(path))
        if dist.get_rank() == 0:  # small host state beside the shards
            extra = {"skipped_in_a_row": self.skipped_in_a_row}
            if self.scheduler is not None:
                extra["scheduler"] = self.scheduler.state_dict()
            torch.save(extra, Path(path) / "host_state.pt")
        dist.barrier()

    def load_sharded(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            self.model,
            self.optimizer or [],
            model_state_dict=state["model"],
            optim_state_dict=state.get("optim", {}),
        )
        extra = torch.load(Path(path) / "host_state.pt", weights_only=False)
        self.skipped_in_a_row = int(extra["skipped_in_a_row"])
        if self.scheduler is not None:
            from trainer.workers.optimizer import load_scheduler_state

            load_scheduler_state(self.scheduler, extra["scheduler"])

    def export_hf(self, out_dir: Path, hf_source_dir) -> None:
        """This model as an HF directory (collective): the full tensors, written by rank 0,
        with the source's config and tokenizer."""
        from safetensors.torch import save_file

        from weight_loaders.hf_export import copy_non_weight_files, shard_file_name, write_index

        out = Path(out_dir)
        writer = dist.get_rank() == 0
        tensors = {}
        for name, tensor in self.full_tensors():
            if writer:
                tensors[name] = tensor.detach().to("cpu", torch.float32, copy=True).contiguous()
        if writer:
            out.mkdir(parents=True, exist_ok=True)
            save_file(tensors, out / shard_file_name(0, 1), metadata={"format": "pt"})
            write_index(out, 1)
            copy_non_weight_files(Path(hf_source_dir), out)
        dist.barrier()


# Written by hand: FSDP2 gathers its own parameters per module for compute, but offers no
# public bucketed gather of arbitrary parameters to full tensors (DTensor.full_tensor is one
# collective per tensor).
def _gathered_in_buckets(named, dtype, bucket_bytes: int, group):
    """(name, full tensor) of FSDP2 parameters (dim-0 shards of torch.chunk sizes), one
    all_gather_into_tensor per bucket of shards. Each rank sends its shard padded to the
    largest shard's rows; a full tensor is the ranks' padded shards, concatenated and cut."""
    world = dist.get_world_size(group)
    items = []
    for name, p in named:
        local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()
        rows = -(-p.shape[0] // world)
        items.append((name, local, p.shape, (rows, *p.shape[1:])))
    dtype = dtype or items[0][1].dtype
    bucket, size = [], 0
    for item in items:
        numel = math.prod(item[3])
        if bucket and (size + numel) * dtype.itemsize > bucket_bytes:
            yield from _gather_bucket(bucket, size, world, group, dtype)
            bucket, size = [], 0
        bucket.append(item)
        size += numel
    if bucket:
        yield from _gather_bucket(bucket, size, world, group, dtype)


def _gather_bucket(bucket, size: int, world: int, group, dtype: torch.dtype):
    ref = bucket[0][1]
    send = torch.zeros(size, dtype=dtype, device=ref.device)  # copy_ into it casts
    offset = 0
    for _, local, _, padded in bucket:
        send[offset : offset + local.numel()].copy_(local.reshape(-1))
        offset += math.prod(padded)
    recv = torch.empty(world * size, dtype=ref.dtype, device=ref.device)
    dist.all_gather_into_tensor(recv, send, group=group)
    offset = 0
    for name, _, full_shape, padded in bucket:
        n = math.prod(padded)
        parts = [recv[r * size + offset : r * size + offset + n].view(padded) for r in range(world)]
        offset += n
        yield name, torch.cat(parts)[: full_shape[0]]


def build_fsdp_worker(
    args: ModelArgs,
    hf_dir,
    dtype: str = "float32",
    optim: OptimConfig | None = None,
    total_optimizer_steps: int = 1,
    activation_checkpointing: bool = False,
    param_offload: bool = False,
    value_head: bool = False,
    random_init: bool = False,
    compile_layers: bool = False,
) -> FSDPWorker:
    """The checkpoint in `hf_dir` as a transformers model (a causal LM, or with `value_head`
    its backbone under a `ValueModel`), sharded by FSDP2 over the data-parallel ranks
    (megatron's groups are initialised at TP = PP = 1, so D.dp_group() is every rank); with an
    optimizer when `optim` is given; `compile_layers`: each decoder layer's forward compiled
    (CUDA only). `random_init`: transformers' own init from the directory's
    config (model.random_init: shape presets, benchmarks), the same on every rank."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    auto = AutoModel if value_head else AutoModelForCausalLM
    if random_init:
        config = AutoConfig.from_pretrained(hf_dir)
        with torch.random.fork_rng(), torch.device(cpu_compat.device()):
            torch.manual_seed(0)
            model = auto.from_config(config, dtype=torch.float32)
    else:
        model = auto.from_pretrained(hf_dir, dtype=torch.float32)
    if value_head:
        model = ValueModel(model, args.hidden_size)
    model.to(cpu_compat.device())
    if activation_checkpointing:
        hf_model = model.model if value_head else model
        hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
    if compile_layers and cpu_compat.cuda_available():
        # Each decoder layer's forward through torch.compile (torchtitan's per-block compile):
        # norms, RoPE and the gated MLP fuse into a few kernels. The forward alone, so that
        # FSDP2's hooks around it stay eager and parameter names keep their HF form.
        for layer in _decoder_layers(model):
            layer.forward = torch.compile(layer.forward, dynamic=True)
    mesh = _dp_mesh()
    compute = DTYPES[dtype]
    shard = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32),
        offload_policy=CPUOffloadPolicy() if param_offload else None,
    )
    shard = {k: v for k, v in shard.items() if v is not None}
    for layer in _decoder_layers(model):
        fully_shard(layer, **shard)
    # The root (embeddings, final norm, LM head) reshards after forward too (FSDP2 keeps it
    # whole by default): a forward-only pass then leaves nothing unsharded while generating.
    fully_shard(model, reshard_after_forward=True, **shard)
    if optim is None:
        model.requires_grad_(False)
        model.eval()
        return FSDPWorker(args, model, compute_dtype=compute, logits_to_keep=keeps)
    optimizer = torch.optim.AdamW(
        _param_groups(model, optim.weight_decay),
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=optim.fused and cpu_compat.device().type == "cuda" and not param_offload,
    )
    scheduler = build_scheduler(optimizer, optim, total_optimizer_steps)
    return FSDPWorker(
        args,
        model,
        optimizer,
        scheduler,
        clip_grad=optim.clip_grad,
        compute_dtype=compute,
        logits_to_keep=keeps,
    )


def _dp_mesh():
    """A one-dimensional device mesh over megatron's data-parallel group."""
    from torch.distributed.device_mesh import DeviceMesh

    ranks = dist.get_process_group_ranks(D.dp_group())
    return DeviceMesh.from_group(D.dp_group(), cpu_compat.device().type, mesh=ranks)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one (transformers names them in
    `_no_split_modules`)."""
    kinds = {k for m in model.modules() for k in (getattr(m, "_no_split_modules", None) or [])}
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers named in _no_split_modules")
    return layers


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """megatron's default groups: biases and 1-D tensors (norms) without weight decay
    (`wd_mult` 0 is what megatron's scheduler reads when it sets each group's decay)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
    return [g for g in groups if g["params"]]


def copy_fsdp_weights(src: FSDPWorker, dst: FSDPWorker) -> None:
    """dst's parameters := src's (same model, same sharding): each rank copies its shards."""
    dst_params = dict(dst.model.named_parameters())
    with torch.no_grad():
        for name, p in src.model.named_parameters():
            dst_params[name].copy_(p)
