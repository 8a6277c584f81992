"""Megatron chunks -> an HF directory that transformers and vLLM load as is.

Every rank streams its own chunks (the TP gathers are collectives, so all TP ranks take part);
the TP-rank-0 / DP-rank-0 rank of each PP stage writes that stage's tensors to its own
safetensors file. After a barrier, global rank 0 writes `model.safetensors.index.json` from the
files' headers and copies config and tokenizer files from the source checkpoint. No rank ever
holds more than its stage.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from archs import ARCHS, model_args_from_hf
from tandem_core.model_args import ModelArgs
from weight_loaders.hf_import import SafetensorsCheckpoint
from weight_loaders.names import WeightLoaderError, expected_hf_names
from weight_loaders.stream import iter_hf_tensors, megatron_named_params, with_every_expert

# Files of the source directory that are weights (rewritten here), not config or tokenizer.
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".gguf",
    ".safetensors.index.json",
    ".bin.index.json",
)


def source_stacks_experts(hf_source_dir: Path, args: ModelArgs) -> bool:
    """Whether the source checkpoint holds its experts stacked (then the export does too, so a
    round trip gives the same files; hub checkpoints and a weightless source name experts one
    by one)."""
    fused_name = ARCHS[args.arch].fused_name
    if fused_name is None:
        return False
    stacked = {w[0] for n in expected_hf_names(args) if (w := fused_name(n)) is not None}
    try:
        with ExitStack() as stack:
            names = SafetensorsCheckpoint(hf_source_dir, stack).names()
    except WeightLoaderError:  # no weights (model.random_init)
        return False
    return bool(stacked & names)


def stack_experts(tensors: dict[str, torch.Tensor], fused_name) -> dict[str, torch.Tensor]:
    """Per-expert tensors stacked ([E, rows, cols], gate and up rows one after the other), for
    an architecture that has such a layout (`fused_name`)."""
    out, stacks = {}, {}
    for name, tensor in tensors.items():
        where = fused_name(name)
        if where is None:
            out[name] = tensor
        else:
            fused, expert, half = where
            stacks.setdefault(fused, {})[(expert, half)] = tensor
    for fused, parts in stacks.items():
        experts = sorted({e for e, _ in parts})
        halves = sorted({h for _, h in parts})
        out[fused] = torch.stack([torch.cat([parts[(e, h)] for h in halves]) for e in experts])
    return out


def shard_file_name(pp_rank: int, pp_size: int) -> str:
    return f"model-{pp_rank + 1:05d}-of-{pp_size:05d}.safetensors"


def write_index(out_dir: Path, pp_size: int) -> None:
    """model.safetensors.index.json from the headers of the `pp_size` shard files."""
    weight_map, total = {}, 0
    for file in (out_dir / shard_file_name(r, pp_size) for r in range(pp_size)):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                total += numel * torch.empty(0, dtype=_dtype(sl.get_dtype())).element_size()
                weight_map[name] = file.name
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[name]


def copy_non_weight_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, dst / f.name)


def export_megatron_to_hf(
    model_chunks: list, args: ModelArgs, config, out_dir, hf_source_dir
) -> Path:
    """Write this model as an HF directory (safetensors shards + index + config + tokenizer).

    Collective over all ranks. `hf_source_dir` supplies config.json and the tokenizer; its
    config must describe `args` (a model of another shape would be mislabelled)."""
    from megatron.core import parallel_state as mpu

    source_args = model_args_from_hf(hf_source_dir)
    if source_args != args:
        diff = {
            k: (v, getattr(args, k))
            for k, v in asdict(source_args).items()
            if getattr(args, k) != v
        }
        raise WeightLoaderError(
            f"{hf_source_dir}/config.json disagrees with the model being "
            f"exported (field: (config, model)): {diff}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_data_parallel_rank() == 0
    pp_size = mpu.get_pipeline_model_parallel_world_size()
    tensors = {}
    named = with_every_expert(
        megatron_named_params(model_chunks, config), args, mpu.get_expert_model_parallel_group()
    )
    for hf_name, tensor in iter_hf_tensors(named, args, mpu.get_tensor_model_parallel_group()):
        if writer:
            tensors[hf_name] = tensor.detach().to("cpu", copy=True).contiguous()
    if writer:
        if source_stacks_experts(Path(hf_source_dir), args):
            tensors = stack_experts(tensors, ARCHS[args.arch].fused_name)
        pp_rank = mpu.get_pipeline_model_parallel_rank()
        save_file(tensors, out / shard_file_name(pp_rank, pp_size), metadata={"format": "pt"})
    del tensors
    if dist.is_initialized():
        dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_index(out, pp_size)
        copy_non_weight_files(Path(hf_source_dir), out)
    if dist.is_initialized():
        dist.barrier()
    return out
