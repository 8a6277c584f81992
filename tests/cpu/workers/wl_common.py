"""Shared steps of the weight-loader workers: build a rank's megatron chunks for a layout, run
a forward-only pass through megatron's own schedule, and compute HF reference logits."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from tandem_core import cpu_compat
from tandem_core.config import ParallelConfig
from tandem_core.distributed import init_distributed, init_model_parallel
from tandem_core.models import build_gpt_model, build_transformer_config


def setup(tp: int, pp: int, vpp: int | None = None) -> ParallelConfig:
    init_distributed()
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    init_model_parallel(parallel)
    return parallel


def build_chunks(args, parallel: ParallelConfig):
    from megatron.core import parallel_state as mpu

    config = build_transformer_config(args, parallel, "float32")
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        chunks.append(
            build_gpt_model(
                args,
                config,
                layer_spec="sdpa",
                pre_process=mpu.is_pipeline_first_stage(
                    ignore_virtual=vpp is None, vp_stage=vp_stage
                ),
                post_process=mpu.is_pipeline_last_stage(
                    ignore_virtual=vpp is None, vp_stage=vp_stage
                ),
                vp_stage=vp_stage,
            ).eval()
        )
    return chunks, config


def megatron_logits(chunks, config, tokens: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """Full-vocab logits [n, s, vocab] on the last PP stage (None elsewhere); one micro-batch
    per sequence through megatron's forward-only schedule."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n, s = tokens.shape
    collected = []

    def forward_step(data_iterator, model):
        ids = next(data_iterator)
        pos = torch.arange(s).unsqueeze(0)
        out = model(ids, pos, None)

        def loss_func(output):
            collected.append(output.detach())
            return output.sum() * 0.0, {}

        return out, loss_func

    data = [iter(list(tokens.split(1))) for _ in chunks]
    with torch.no_grad(), cpu_compat.megatron_device_scope():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data if len(chunks) > 1 else data[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=n,
            seq_length=s,
            micro_batch_size=1,
            forward_only=True,
        )
    if not mpu.is_pipeline_last_stage():
        return None
    local = torch.cat(collected, dim=0)  # [n, s, V/tp], vocab-parallel
    group = mpu.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :vocab]


def read_all(hf_dir) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory's safetensors files."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def hf_logits(hf_dir, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits
