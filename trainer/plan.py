"""Memory planner: will this layout fit the GPUs? Answered before anything is built.

`plan_or_raise(cfg, world_size, gpu_memory_gb)` first runs every divisibility rule of
`validate_config`, then estimates the memory one GPU needs in each phase of an iteration and
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

Where the parts live: trainer/plan_model.py holds the plan's data (Term, Phase, MemoryPlan,
Layout), the exact parameter counts and the terms the phases share; trainer/plan_generation.py
the generation phase, one memory model per rollout backend (GENERATION_MODELS); this module
the activations, the training and swap phases, the entry points and the CLI.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from tandem_core.config import ConfigError, TandemConfig, load_config
from tandem_core.config_rules import validate_config
from tandem_core.model_shapes import read_model_args
from tandem_core.models import ModelArgs
from trainer.plan_generation import GENERATION_MODELS, generic_generation
from trainer.plan_model import (
    GIB,
    Layout,
    MemoryPlan,
    Phase,
    _all_stage_weights,
    _count,
    _gpu,
    _layout,
    _model_state_terms,
    _reference,
    _reserve,
    _t,
    counted_gib,
    stage_params,
    total_params,
)

H100_80GB_GIB = 79.1
"""What torch.cuda reports for an 80 GB H100: the CLI's assumption when no GPU is visible."""


class PlanError(ConfigError):
    """A layout that does not fit the GPU; the message names the phase and its numbers."""


# ---- activations -----------------------------------------------------------------------------
def activation_bytes_per_token(
    m: ModelArgs, tp: int, sp: bool, dtype_bytes: int, fused_swiglu: bool = False
) -> float:
    """Bytes one decoder layer keeps for backward per token (Tandem's sdpa/local specs, no
    recompute, dropout 0), counted as Korthikanti et al. 2022 do, term by term for a Llama
    layer (tests/cpu/test_plan.py checks the sum against autograd's saved tensors):

    - replicated over TP unless sequence parallel: per RMSNorm its input, the normalised input
      (for the weight's grad) and its output (the next linear's input): 6h, plus the fp32
      inverse RMS of each norm: 2 (× 4 B);
    - split over TP: the linear_qkv output (a+2g)d (v is a view that keeps it alive), the
      rotated q and k (a+g)d, the attention output and its copy into linear_proj 2ad: (4a+3g)d;
      the linear_fc1 output 2f, gate, silu(gate) and the SwiGLU output 3f: 5f (with
      megatron's fused SwiGLU, on CUDA: its input 2f and its output f, 3f); the fp32
      log-sum-exp of the attention: a (× 4 B).
    """
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    a, g = m.num_attention_heads, m.num_query_groups
    seq_split = tp if sp else 1
    replicated = (6 * h * dtype_bytes + 2 * 4) / seq_split
    mlp = (3 if fused_swiglu else 5) * f
    split = (((4 * a + 3 * g) * d + mlp) * dtype_bytes + a * 4) / tp
    return replicated + split


def layer_microbatches_in_flight(
    num_layers: int, pp: int, vpp: int | None, stage: int, microbatches: float
) -> float:
    """Layer × micro-batch units of activations a PP stage holds at its peak.

    No PP: one micro-batch through all layers. 1F1B: stage r runs pp - r forwards before its
    first backward, each through num_layers/pp layers. Interleaved (vpp chunks): megatron's
    warm-up of (pp - r - 1)·2 + (vpp - 1)·pp chunk forwards plus the one in steady state,
    each num_layers/(pp·vpp) layers. Both capped by the micro-batches there are.
    """
    if pp == 1:
        return num_layers
    if vpp is None:
        return min(pp - stage, microbatches) * num_layers / pp
    chunks = (pp - stage - 1) * 2 + (vpp - 1) * pp + 1
    return min(chunks, microbatches * vpp) * num_layers / (pp * vpp)


# ---- phases: training and swap ---------------------------------------------------------------
def _training_stage(cfg: TandemConfig, lay: Layout, stage: int) -> Phase:
    m, a = lay.m, cfg.actor
    if a.use_dynamic_bsz:
        tokens, micro_note = a.max_tokens_per_microbatch, "actor.max_tokens_per_microbatch"
        microbatches = math.inf  # unknown until the lengths are seen: assume enough to fill PP
    else:
        tokens = a.micro_batch_size * lay.seq_len
        micro_note = f"micro-batch {a.micro_batch_size} × {lay.seq_len} tokens"
        microbatches = a.ppo_mini_batch_size * cfg.rollout.n / lay.dp / a.micro_batch_size
    in_flight = layer_microbatches_in_flight(m.num_layers, lay.pp, lay.vpp, stage, microbatches)
    # The plan is for GPUs, where the model runs megatron's fused SwiGLU (tandem_core.models).
    per_token = activation_bytes_per_token(m, lay.tp, lay.sp, lay.dtype_bytes, fused_swiglu=True)
    params = stage_params(m, lay.tp, lay.pp, stage)
    terms = _model_state_terms(lay, params, "actor")
    vocab = m.padded_vocab_size(lay.tp) // lay.tp
    last = stage == lay.pp - 1
    # The LM head runs on the response rows only (ResponseRowsGPTModel); a token budget bounds
    # them too (rows × trimmed response width ≤ rows × longest row).
    rows = tokens if a.use_dynamic_bsz else a.micro_batch_size * cfg.rollout.response_length
    update = [
        _t(
            "activations in flight",
            in_flight * tokens * per_token,
            f"{in_flight:g} layer·micro-batches × {micro_note} × {per_token / 1024:.1f} KiB",
        )
    ]
    if last:
        update.append(
            _t(
                "logits of one micro-batch and their grad",
                rows * vocab * 2 * lay.dtype_bytes,
                f"{rows} response rows × vocab/TP {vocab} × 2 × {lay.dtype_bytes} B (the fp32"
                " softmax math runs fused, chunk by chunk: trainer/logprobs.py)",
            )
        )
    terms += max(update, _forward_only_terms(cfg, lay, per_token, vocab, last), key=counted_gib)
    if lay.critic:
        terms += _model_state_terms(lay, stage_params(m, lay.tp, lay.pp, stage, True), "critic")
    terms += _reference(lay, stage)
    terms.append(_reserve(terms))
    return Phase("training", f"PP stage {stage} of {lay.pp}", tuple(terms))


def _forward_only_terms(cfg, lay: Layout, per_token: float, vocab: int, last: bool):
    """The old/reference log-prob pass at actor.log_prob_micro_batch_size: no activations kept,
    one layer's live at a time (bounded by what the layer would keep), and the logits."""
    a = cfg.actor
    if a.use_dynamic_bsz or not a.log_prob_micro_batch_size:
        return []
    mbs = a.log_prob_micro_batch_size
    tokens, rows = mbs * lay.seq_len, mbs * cfg.rollout.response_length
    terms = [
        _t(
            "activations of one layer, forward-only log-prob pass",
            tokens * per_token,
            f"actor.log_prob_micro_batch_size {mbs} × {lay.seq_len} tokens × "
            f"{per_token / 1024:.1f} KiB",
        )
    ]
    if last:
        terms.append(
            _t(
                "logits of one log-prob micro-batch",
                rows * vocab * lay.dtype_bytes,
                f"{rows} response rows × vocab/TP {vocab} × {lay.dtype_bytes} B",
            )
        )
    return terms


def training_phase(cfg: TandemConfig, lay: Layout) -> Phase:
    """The PP stage that needs most (the first holds most activations, the last the logits)."""
    return max((_training_stage(cfg, lay, s) for s in range(lay.pp)), key=lambda p: p.total_gib)


def swap_phase(cfg: TandemConfig, lay: Layout) -> Phase:
    """AllGatherPPModel fills the other stages' buffers before the training state is released:
    the own stage's full training state plus every other stage's weights (TP shard)."""
    stages = []
    for stage in range(lay.pp):
        own = stage_params(lay.m, lay.tp, lay.pp, stage)
        foreign = _all_stage_weights(lay) - own
        terms = _model_state_terms(lay, own, "actor")
        terms.append(
            _t(
                "other PP stages' weights (AllGatherPPModel)",
                foreign * lay.dtype_bytes,
                f"{_count(foreign)} params × {lay.dtype_bytes} B ({lay.pp - 1} stages)",
            )
        )
        if lay.critic:
            critic = stage_params(lay.m, lay.tp, lay.pp, stage, True)
            terms += _model_state_terms(lay, critic, "critic")
        terms += _reference(lay, stage)
        terms.append(_reserve(terms))
        stages.append(Phase("swap", f"PP stage {stage} of {lay.pp}, gathering", tuple(terms)))
    return max(stages, key=lambda p: p.total_gib)


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
    model_args = model_args or read_model_args(cfg.model)
    validate_config(cfg, world_size, model_args)
    lay = _layout(cfg, world_size, model_args)
    generation = GENERATION_MODELS.get(cfg.rollout.name, generic_generation)
    phases = (
        training_phase(cfg, lay),
        swap_phase(cfg, lay),
        generation(cfg, lay, gpu_memory_gb),
    )
    name = cfg.model.preset if cfg.model.path is None else cfg.model.path
    rtp = cfg.rollout.tensor_model_parallel_size
    header = (
        f"Memory plan: {name} ({_count(total_params(model_args))} params, {cfg.model.dtype}),"
        f" world {world_size} = TP {lay.tp} × PP {lay.pp} × DP {lay.dp}"
        f"{' (SP)' if lay.sp else ''}{f' × VPP {lay.vpp}' if lay.vpp else ''};"
        f" rollout {cfg.rollout.name} TP {rtp}; sequences {lay.seq_len} tokens;"
        f" GPU {_gpu(gpu_memory_gb)} GiB"
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


def _default_world_size() -> int:
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if key in os.environ:
            return int(os.environ[key])
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.plan",
        description="Check a Tandem layout and estimate per-GPU memory in each phase.",
    )
    parser.add_argument("overrides", nargs="*", help="hydra overrides, as given to trainer.main")
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks of the run (default: $WORLD_SIZE, $SLURM_NTASKS, or 1)",
    )
    parser.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help=f"GiB per GPU (default: GPU 0 here, else an H100's {H100_80GB_GIB})",
    )
    parser.add_argument(
        "--measured",
        default=None,
        help="a run's metrics.jsonl: print the plan beside the peak GPU memory it measured",
    )
    args = parser.parse_intermixed_args(argv)  # overrides and options in any order
    world = args.world_size or _default_world_size()
    gpu = args.gpu_memory_gb or detect_gpu_memory_gb()
    if gpu is None:
        print(
            f"(no GPU visible: planning for an 80 GB H100, {H100_80GB_GIB} GiB;"
            " pass --gpu-memory-gb)"
        )
        gpu = H100_80GB_GIB
    try:
        # World size is checked by plan_or_raise with the value given here, not the env's.
        cfg = load_config(args.overrides, world_size=world)
        plan = plan_or_raise(cfg, world, gpu)
    except ConfigError as err:
        print(f"REFUSED: {err}", file=sys.stderr)
        return 2
    print(plan.table())
    if args.measured:
        from trainer.tracking import read_metrics

        print(compare_with_run(plan, read_metrics(args.measured)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
