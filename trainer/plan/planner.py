"""Memory planner: will this layout fit the GPUs? Answered before anything is built.

`plan_or_raise(cfg, world_size, gpu_memory_gb)` first runs every rule of the config check
(trainer/config_check.py), then estimates the memory one GPU needs in each phase of an iteration and
raises a PlanError naming the phase and its numbers when one exceeds the GPU. It is a pure
function of the typed config (the model's shape comes from the preset table or config.json).
`python -m trainer.plan <hydra overrides> [--world-size N] [--gpu-memory-gb G]` prints the
table; the trainer calls `plan_or_raise` at start.

Phases (the rank that needs most, per phase):
- training: actor weights, grads, Adam states and fp32 master weights of one PP stage's TP
  shard, plus the activations the pipeline schedule keeps in flight, plus the logits of one
  micro-batch's response rows on the last stage (or, when actor.log_prob_micro_batch_size
  needs more, one layer's activations and the logits of a forward-only micro-batch). The
  critic's state (PPO/GAE) and the reference weights stay resident beside it.
- swap: AllGatherPPModel gathers every PP stage's weights of this rank's TP shard while the
  training state (grads, optimizer) is still on the GPU (DESIGN's order: gather, then release).
- generation: the gathered weights stay while the engine runs: vLLM takes
  `rollout.gpu_memory_utilization` of the GPU for its weights at rollout TP, its workspace and
  the KV cache; the hf backend holds a whole model per rank and a KV cache for its batch.
Grads are off the GPU during generation (released on enter); optimizer states stay unless
actor.offload_optimizer; the engine sleeps during training (sleep mode frees its memory).

Units: GiB (2**30 bytes), as torch.cuda reports total memory: an "80 GB" H100 has 79.1 GiB.
All terms are estimates from shapes; small terms (norm statistics, RoPE tables, the softmax
log-sum-exp) are left out and covered by the reserve.

Where the parts live: terms.py holds the plan's data (Term, Phase, MemoryPlan, Layout), the
exact parameter counts and the terms the phases share; training.py the activations and the
training and swap phases; generation.py the generation phase, one memory model per rollout
backend (GENERATION_MODELS); this module the entry points; __main__.py the CLI.
"""

from __future__ import annotations

import archs
from tandem_core.config import ConfigError, TandemConfig
from tandem_core.model_args import ModelArgs
from trainer.config_check import check_config
from trainer.plan.generation import GENERATION_MODELS, generic_generation
from trainer.plan.terms import GIB, MemoryPlan, format_count, format_gpu, layout_of, total_params
from trainer.plan.training import swap_phase, training_phase

H100_80GB_GIB = 79.1
"""What torch.cuda reports for an 80 GB H100: the CLI's assumption when no GPU is visible."""


class PlanError(ConfigError):
    """A layout that does not fit the GPU; the message names the phase and its numbers."""


# ---- the entry points ------------------------------------------------------------------------
def plan_memory(
    cfg: TandemConfig,
    world_size: int,
    gpu_memory_gb: float | None = None,
    model_args: ModelArgs | None = None,
) -> MemoryPlan:
    """Validate the layout (ConfigError naming the key) and estimate each phase per GPU.

    gpu_memory_gb: GiB of one GPU (None: estimate only). model_args: the model's shape; None =
    the preset table or model.path's config.json. Pure: nothing is built or allocated.
    """
    model_args = model_args or archs.read_model_args(cfg.model)
    check_config(cfg, world_size, model_args)
    lay = layout_of(cfg, world_size, model_args)
    generation = GENERATION_MODELS.get(cfg.rollout.name, generic_generation)
    phases = (
        training_phase(cfg, lay),
        swap_phase(cfg, lay),
        generation(cfg, lay, gpu_memory_gb),
    )
    name = cfg.model.preset if cfg.model.path is None else cfg.model.path
    rtp = cfg.rollout.tensor_model_parallel_size
    header = (
        f"Memory plan: {name} ({format_count(total_params(model_args))} params, {cfg.model.dtype}),"
        f" world {world_size} = TP {lay.tp} × PP {lay.pp} × DP {lay.dp}"
        f"{' (SP)' if lay.sp else ''}{f' × VPP {lay.vpp}' if lay.vpp else ''};"
        f" rollout {cfg.rollout.name} TP {rtp}; sequences {lay.seq_len} tokens;"
        f" GPU {format_gpu(gpu_memory_gb)} GiB"
    )
    return MemoryPlan(header, phases, gpu_memory_gb)


def plan_or_raise(
    cfg: TandemConfig,
    world_size: int,
    gpu_memory_gb: float | None,
    model_args: ModelArgs | None = None,
) -> MemoryPlan:
    """plan_memory, then a PlanError listing every phase that does not fit ('<phase> phase:
    needs X GiB per GPU > Y GiB (...)'), each with the table after it."""
    plan = plan_memory(cfg, world_size, gpu_memory_gb, model_args)
    failures = plan.failures()
    if failures:
        raise PlanError("\n".join(failures) + "\n\n" + plan.table())
    return plan


MEASURED_PHASES = {
    "training": ("old_log_prob", "ref", "values", "update_critic", "update_actor"),
    "swap": ("swap_gather",),
    "generation": ("generate",),
}
"""Which of the trainer's timed phases (`memory/peak_gib/<name>` in metrics.jsonl) each planned
phase covers."""


def compare_with_run(plan: MemoryPlan, metrics: dict[int, dict[str, float]]) -> str:
    """The plan's per-phase totals beside the peaks a run measured (the highest over its steps
    and over the trainer phases each planned phase covers), as a table."""
    lines = [f"{'phase':<12}{'planned GiB':>12}{'measured GiB':>14}{'planned/measured':>18}   from"]
    for phase in plan.phases:
        keys = [f"memory/peak_gib/{name}" for name in MEASURED_PHASES[phase.name]]
        seen = [(m[k], k) for m in metrics.values() for k in keys if k in m]
        if not seen:
            lines.append(
                f"{phase.name:<12}{phase.total_gib:>12.2f}{'-':>14}{'-':>18}   (not measured)"
            )
            continue
        peak, key = max(seen)
        ratio = phase.total_gib / peak
        lines.append(
            f"{phase.name:<12}{phase.total_gib:>12.2f}{peak:>14.2f}{ratio:>17.2f}x   {key}"
        )
    return "\n".join(lines)


def detect_gpu_memory_gb() -> float | None:
    """GiB of GPU 0 as torch reports it; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB
