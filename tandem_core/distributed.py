"""Process-group set-up from torchrun or slurm, and megatron's model-parallel groups.

Every rank runs the same program. `init_distributed()` reads the launcher's environment
(torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR, or slurm's SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID with MASTER_ADDR from the job's first host), picks NCCL on GPUs and gloo on CPU,
and a single process without a launcher becomes a world of one.
`init_model_parallel(parallel)` then hands TP/PP/VPP/EP/CP to megatron's `parallel_state`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tandem_core import cpu_compat
from tandem_core.config import ParallelConfig


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or srun with the variables exported
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun, one task per GPU
        if "MASTER_ADDR" not in env:
            raise RuntimeError(
                "slurm launch without MASTER_ADDR: export it from "
                "`scontrol show hostnames $SLURM_JOB_NODELIST | head -n1` (see slurm/ppo_70b.sh)"
            )
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port())


def init_distributed(timeout_minutes: int = 30) -> LaunchEnv:
    """Initialise the default process group (idempotent)."""
    launch = read_launch_env()
    if dist.is_initialized():
        return launch
    for key, value in (
        ("RANK", launch.rank),
        ("WORLD_SIZE", launch.world_size),
        ("LOCAL_RANK", launch.local_rank),
        ("MASTER_ADDR", launch.master_addr),
        ("MASTER_PORT", launch.master_port),
    ):
        os.environ.setdefault(key, str(value))
    if cpu_compat.cuda_available():
        torch.cuda.set_device(launch.local_rank)
        backend = "nccl"
    else:
        cpu_compat.patch_cuda_runtime()
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    return launch


def init_model_parallel(parallel: ParallelConfig, seed: int = 1234) -> None:
    """megatron's TP/PP/VPP groups on top of the default group, and its RNG tracker."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    with cpu_compat.megatron_device_scope():
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
        )
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- small helpers every package uses --------------------------------------------------------
def tp_group():
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_group()


def pp_group():
    from megatron.core import parallel_state as mpu

    return mpu.get_pipeline_model_parallel_group()


def dp_group():
    from megatron.core import parallel_state as mpu

    return mpu.get_data_parallel_group()


def tp_rank() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_rank()


def tp_size() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_world_size()


def pp_rank() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_pipeline_model_parallel_rank()


def pp_size() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_pipeline_model_parallel_world_size()


def dp_rank() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_data_parallel_rank()


def ep_group():
    from megatron.core import parallel_state as mpu

    return mpu.get_expert_model_parallel_group()


def ep_rank() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_expert_model_parallel_rank()


def ep_size() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_expert_model_parallel_world_size()


def cp_group():
    from megatron.core import parallel_state as mpu

    return mpu.get_context_parallel_group()


def cp_rank() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_context_parallel_rank()


def cp_size() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_context_parallel_world_size()


def cp_chunks(cp: int, rank: int) -> tuple[int, int]:
    """Which of a sequence's 2·CP chunks CP rank `rank` holds: r and 2·CP-1-r (megatron's
    causal load balance: every rank one early and one late chunk). The one definition of the
    layout; the split, positions, attention and response rows all ask it."""
    return rank, 2 * cp - 1 - rank


def cp_local_positions(index: torch.Tensor, chunk: int, cp: int, rank: int):
    """Where sequence positions `index` sit in this CP rank's [chunk r | chunk 2·CP-1-r]
    slice: (local position, whether it is local)."""
    which, offset = index // chunk, index % chunk
    first, second = (which == g for g in cp_chunks(cp, rank))
    local = torch.where(second, chunk + offset, offset)
    return local, first | second


def dp_size() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_data_parallel_world_size()


# ---- collectives with gradients (context parallelism) -----------------------------------------
# Written by hand: torch.distributed.nn's all_gather backward emulates reduce-scatter on gloo
# with a scatter that names group ranks as global ones, which fails for any sub-group.
class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        parts = [torch.empty_like(tensor) for _ in range(group.size())]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        grad = grad.contiguous()
        if dist.get_backend(group) == "nccl":
            mine = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(mine, grad, group=group)
            return mine, None
        dist.all_reduce(grad, group=group)  # gloo has no reduce-scatter: sum all, keep ours
        return grad[group.rank()], None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_gather_with_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """[group size, *tensor.shape]: every rank's tensor; the backward sums each rank's grads
    back to the rank that sent it."""
    return _AllGather.apply(tensor, group)


def all_reduce_with_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """The sum over the group; the backward sums the grads alike."""
    return _AllReduce.apply(tensor, group)
