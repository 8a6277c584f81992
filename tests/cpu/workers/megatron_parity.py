"""Megatron GPTModel forward+backward on CPU for one parallel layout.

Every parameter is set from a deterministic function of its GLOBAL name and full shape, then
sliced for this rank (megatron's partition_dim), so all layouts hold the same model. The run
trains one step's worth of forward/backward through `get_forward_backward_func` (1F1B for PP)
with megatron's DDP and grad finalisation (which all-reduces SP norm grads), then gathers the
full gradients by global name and saves loss + grads for the test to compare across layouts.

With a world larger than TP×PP the rest is DP: each DP rank runs its own contiguous slice of
the micro-batches, and megatron's DDP averages the gradients over DP. Each micro-batch's loss
is divided by the TOTAL number of micro-batches, so loss and gradients equal one rank running
them all (megatron divides by its local count, DDP by DP: local count × DP = total).

usage: megatron_parity.py OUT.pt TP PP SP(0|1) [float32|bfloat16] [gqa|wide]
gqa (default): 4 heads / 2 KV groups, TP 1-2; wide: 8 heads / 8 KV groups, TP up to 8.
On GPUs (NCCL) the same worker runs in bf16 with fp32 grad reduction (tests/multigpu).
"""

import os
import sys
import zlib

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402

from tandem_core import cpu_compat  # noqa: E402
from tandem_core import distributed as D  # noqa: E402
from tandem_core.config import ParallelConfig  # noqa: E402
from tandem_core.model_args import ModelArgs
from tandem_core.models import build_gpt_model, build_transformer_config  # noqa: E402

ARGS = ModelArgs(
    "llama",
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=200,
    kv_channels=16,
    max_position_embeddings=64,
)
# For TP 4 and 8. The vocab is padded to a multiple of 128×TP, and the padded rows are real
# (random) logits here, so the vocab is 1024: the same padded size for every TP up to 8.
WIDE_ARGS = ModelArgs(
    "llama",
    num_layers=4,
    hidden_size=128,
    num_attention_heads=8,
    num_query_groups=8,
    ffn_hidden_size=256,
    vocab_size=1024,
    kv_channels=16,
    max_position_embeddings=64,
)
MODELS = {"gqa": ARGS, "wide": WIDE_ARGS}
MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 4, 2, 16


def global_name(name: str, layer_offset: int) -> str:
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers") + 1
        parts[i] = str(int(parts[i]) + layer_offset)
    return ".".join(parts)


def set_deterministic(param: torch.nn.Parameter, gname: str, full_shape) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(gname.encode()))
    if "norm" in gname:
        full = 1.0 + 0.1 * torch.randn(full_shape, generator=gen)
    else:
        full = 0.05 * torch.randn(full_shape, generator=gen)
    if getattr(param, "tensor_model_parallel", False):
        full = shard(gname, full, param.partition_dim)
    param.data.copy_(full)


def shard(gname: str, full: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's TP slice. linear_fc1 holds [gate; up] and each rank [gate_r; up_r]."""
    tp, r = D.tp_size(), D.tp_rank()
    if "linear_fc1" in gname:
        return torch.cat([half.chunk(tp, dim=dim)[r] for half in full.chunk(2, dim=dim)], dim=dim)
    return full.chunk(tp, dim=dim)[r]


def unshard(gname: str, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    if "linear_fc1" in gname:
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([torch.cat([h[i] for h in halves], dim=dim) for i in (0, 1)], dim=dim)
    return torch.cat(parts, dim=dim)


def full_shape_of(param) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= D.tp_size()
    return shape


def main():
    out_path, tp, pp, sp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4]))
    dtype = sys.argv[5] if len(sys.argv) > 5 else "float32"
    args = MODELS[sys.argv[6] if len(sys.argv) > 6 else "gqa"]
    torch.manual_seed(0)
    D.init_distributed()
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp
    )
    D.init_model_parallel(parallel)
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = build_transformer_config(args, parallel, dtype)
    config.finalize_model_grads_func = finalize_model_grads
    pre, post = D.pp_rank() == 0, D.pp_rank() == pp - 1
    model = build_gpt_model(args, config, layer_spec="sdpa", pre_process=pre, post_process=post)
    offset = get_transformer_layer_offset(config)
    for name, p in model.named_parameters():
        set_deterministic(p, global_name(name, offset), full_shape_of(p))
    with cpu_compat.megatron_device_scope():
        ddp = DistributedDataParallel(
            config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
        )

    gen = torch.Generator().manual_seed(123)
    tokens = torch.randint(
        0, args.vocab_size, (MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ + 1), generator=gen
    ).to(cpu_compat.device())
    dp = D.dp_size()
    assert MICRO_BATCHES % dp == 0, f"DP {dp} does not divide {MICRO_BATCHES} micro-batches"
    local = MICRO_BATCHES // dp
    mine = tokens[D.dp_rank() * local : (D.dp_rank() + 1) * local]
    batches = iter([(t[:, :-1], t[:, 1:]) for t in mine])

    def forward_step(data_iterator, model):
        ids, labels = next(data_iterator)
        pos = torch.arange(SEQ, device=ids.device).expand_as(ids)
        logits = model(ids, pos, None)  # [b, s, vocab/tp] on the last stage

        def loss_func(output):
            losses = vocab_parallel_cross_entropy(
                output.transpose(0, 1).contiguous().float(), labels.t().contiguous()
            )
            loss = losses.mean() / MICRO_BATCHES  # the mean over all micro-batches, summed
            return loss, {"loss": loss.detach().clone()}  # megatron divides `loss` in place

        return logits, loss_func

    with cpu_compat.megatron_device_scope():
        ddp.zero_grad_buffer()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=[ddp],
            num_microbatches=local,
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH_SIZE,
            forward_only=False,
        )
    loss = torch.tensor(
        sum(float(x["loss"]) for x in losses) if losses else 0.0, device=cpu_compat.device()
    )
    dist.all_reduce(loss, group=D.pp_group())  # only the last stage has it
    dist.all_reduce(loss, group=D.dp_group())  # each DP rank its slice's share

    # Full gradients by global name: all-gather TP shards, then collect stages on every rank.
    grads = {}
    for name, p in model.named_parameters():
        g = p.main_grad.detach().float().clone()
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g, group=D.tp_group())
            g = unshard(name, parts, p.partition_dim)
        grads[global_name(name, offset)] = g.cpu()
    stages = [None] * pp
    dist.all_gather_object(stages, grads, group=D.pp_group())
    merged = {k: v.cpu() for s in stages for k, v in s.items()}
    if dist.get_rank() == 0:
        torch.save({"loss": loss.cpu(), "grads": merged}, out_path)
    write_result({"loss": float(loss)})
    D.destroy()


if __name__ == "__main__":
    main()
    exit_now()
