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
  micro-batch on the last stage. The critic's state (PPO/GAE) and the reference weights stay
  resident beside it.
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
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tandem_core.config import (
    ConfigError,
    RolloutConfig,
    TandemConfig,
    load_config,
    read_model_args,
    uses_critic,
    validate_config,
)
from tandem_core.models import ModelArgs

GIB = 2**30
H100_80GB_GIB = 79.1
"""What torch.cuda reports for an 80 GB H100: the CLI's assumption when no GPU is visible."""

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
GRAD_BYTES = 4
"""megatron's DDP accumulates grads in an fp32 `main_grad` buffer (grad_reduce_in_fp32)."""
ADAM_BYTES = 8
"""Adam's exp_avg and exp_avg_sq, fp32 each."""
MASTER_BYTES = 4
"""fp32 master copy of each bf16 parameter, kept by megatron's mixed-precision optimizer."""
RESERVE_FIXED_GIB = 2.0
"""CUDA context (~0.5 GiB), NCCL communicators and cuBLAS workspaces."""
RESERVE_FRACTION = 0.05
"""Allocator fragmentation, as a share of the phase's own tensors."""

VLLM_MAX_BATCHED_TOKENS = 16384
"""vLLM's default token budget of one engine step for the offline LLM class on big GPUs."""
VLLM_MAX_NUM_SEQS = 1024
"""vLLM's default cap on sequences per engine step (offline LLM class)."""
VLLM_VOCAB_PAD = 64
"""vLLM pads its vocab-parallel embedding and LM head to this multiple."""
CUDA_GRAPH_GIB = 1.0
"""Memory pool of captured CUDA graphs when rollout.enforce_eager is false."""


class PlanError(ConfigError):
    """A layout that does not fit the GPU; the message names the phase and its numbers."""


# ---- the plan's data -------------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    name: str
    """What the memory holds."""
    gib: float
    """Its size on one GPU."""
    formula: str = ""
    """How it was counted (shown in the table)."""
    counted: bool = True
    """False: a detail of another term (shown indented, not added to the total)."""


@dataclass(frozen=True)
class Phase:
    name: str
    """training | swap | generation."""
    where: str
    """Which rank the numbers are for (the one that needs most)."""
    terms: tuple[Term, ...]
    problems: tuple[str, ...] = ()
    """Refusals that are not a plain over-the-GPU total (e.g. vLLM's own start-up checks)."""
    notes: tuple[str, ...] = ()

    @property
    def total_gib(self) -> float:
        return sum(t.gib for t in self.terms if t.counted)


@dataclass(frozen=True)
class MemoryPlan:
    header: str
    phases: tuple[Phase, ...]
    gpu_memory_gib: float | None
    """None: no GPU to compare with (CPU runs): the plan is informative only."""
    notes: tuple[str, ...] = field(default=())

    def failures(self) -> list[str]:
        """One line per phase that does not fit: '<phase> phase: ...' with its numbers."""
        lines = []
        for phase in self.phases:
            lines += [f"{phase.name} phase: {p}" for p in phase.problems]
            gpu = self.gpu_memory_gib
            if gpu is not None and phase.total_gib > gpu:
                top = sorted((t for t in phase.terms if t.counted), key=lambda t: -t.gib)[:4]
                parts = ", ".join(f"{t.name} {t.gib:.1f}" for t in top)
                lines.append(
                    f"{phase.name} phase: needs {phase.total_gib:.1f} GiB per GPU > {gpu:.1f} GiB"
                    f" ({phase.where}; largest: {parts}); {HINTS[phase.name]}"
                )
        return lines

    def table(self) -> str:
        gpu = self.gpu_memory_gib
        out = [self.header, f"{'phase / term':<54}{'GiB':>8}   formula"]
        for phase in self.phases:
            out.append(f"{phase.name} ({phase.where})")
            for t in phase.terms:
                label = ("  " if t.counted else "    · ") + t.name
                out.append(f"{label:<54}{t.gib:>8.2f}   {t.formula}")
            verdict = (
                "no GPU to compare"
                if gpu is None
                else ("fits" if phase.total_gib <= gpu and not phase.problems else "DOES NOT FIT")
            )
            out.append(f"{'  total':<54}{phase.total_gib:>8.2f}   of {_gpu(gpu)}: {verdict}")
            out += [f"  ! {p}" for p in phase.problems] + [f"  note: {n}" for n in phase.notes]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


HINTS = {
    "training": "more pipeline stages or TP, parallel.use_distributed_optimizer=true over more"
    " data-parallel ranks, or a smaller actor.micro_batch_size / max_tokens_per_microbatch",
    "swap": "every rank gathers all PP stages of its TP shard while its grads and optimizer"
    " states are still there: raise parallel.tensor_model_parallel_size (fewer, larger TP"
    " shards) or spread the optimizer over more data-parallel ranks",
    "generation": "raise rollout.tensor_model_parallel_size or training TP, or lower"
    " rollout.gpu_memory_utilization (a smaller KV cache)",
}


def _gpu(gpu: float | None) -> str:
    return "?" if gpu is None else f"{gpu:.1f}"


# ---- parameter counts (exact, from the shapes) -----------------------------------------------
def layer_params(m: ModelArgs, tp: int) -> int:
    """One decoder layer on one TP rank (megatron's layout).

    linear_qkv h×(a+2g)d/tp (+ its bias), linear_proj a·d×h/tp, linear_fc1 h×2f/tp (gate;up),
    linear_fc2 f×h/tp, two RMSNorm weights h (replicated).
    """
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    qkv_width = (m.num_attention_heads + 2 * m.num_query_groups) * d
    qkv = h * qkv_width + (qkv_width if m.qkv_bias else 0)
    return (qkv + m.num_attention_heads * d * h + 3 * h * f) // tp + 2 * h


def stage_params(m: ModelArgs, tp: int, pp: int, stage: int, value_head: bool = False) -> int:
    """Parameters of one training rank: its PP stage's layers at TP, plus the embedding on the
    first stage and final norm + output layer on the last (vocab padded to 128·TP). Tied
    embeddings with PP > 1 keep a second copy on the last stage (megatron's convention); a
    critic has a value head (h) instead of the output layer."""
    h, vocab = m.hidden_size, m.padded_vocab_size(tp)
    n = m.num_layers // pp * layer_params(m, tp)
    if stage == 0:
        n += vocab * h // tp
    if stage == pp - 1:
        n += h
        if value_head:
            n += h
        elif not m.tie_word_embeddings or pp > 1:
            n += vocab * h // tp
    return n


def total_params(m: ModelArgs) -> int:
    """The model's parameter count (unpadded vocab, one embedding when tied)."""
    embed = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    return m.num_layers * layer_params(m, 1) + embed + m.hidden_size


def engine_kv_heads(m: ModelArgs, rollout_tp: int) -> int:
    """KV heads per engine rank: vLLM splits them when there are enough, else replicates."""
    return max(m.num_query_groups // rollout_tp, 1)


def engine_params(m: ModelArgs, rollout_tp: int) -> int:
    """Parameters of one vLLM rank at rollout TP (q, o, MLP and vocab split; KV heads split or
    replicated; norms replicated)."""
    h, f, d, a = m.hidden_size, m.ffn_hidden_size, m.kv_channels, m.num_attention_heads
    q_width = a * d // rollout_tp
    kv_width = 2 * engine_kv_heads(m, rollout_tp) * d
    layer = h * (q_width + kv_width) + (q_width + kv_width if m.qkv_bias else 0)
    layer += q_width * h + 3 * h * f // rollout_tp + 2 * h
    vocab = math.ceil(m.vocab_size / VLLM_VOCAB_PAD) * VLLM_VOCAB_PAD // rollout_tp
    heads = 1 if m.tie_word_embeddings else 2
    return m.num_layers * layer + heads * vocab * h + h


# ---- activations -----------------------------------------------------------------------------
def activation_bytes_per_token(m: ModelArgs, tp: int, sp: bool, dtype_bytes: int) -> float:
    """Bytes one decoder layer keeps for backward per token (Tandem's sdpa/local specs, no
    recompute, dropout 0), counted as Korthikanti et al. 2022 do, term by term for a Llama
    layer (tests/cpu/test_plan.py checks the sum against autograd's saved tensors):

    - replicated over TP unless sequence parallel: per RMSNorm its input, the normalised input
      (for the weight's grad) and its output (the next linear's input): 6h, plus the fp32
      inverse RMS of each norm: 2 (× 4 B);
    - split over TP: the linear_qkv output (a+2g)d (v is a view that keeps it alive), the
      rotated q and k (a+g)d, the attention output and its copy into linear_proj 2ad: (4a+3g)d;
      the linear_fc1 output 2f, gate, silu(gate) and the SwiGLU output 3f: 5f; the fp32
      log-sum-exp of the attention: a (× 4 B).
    """
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    a, g = m.num_attention_heads, m.num_query_groups
    seq_split = tp if sp else 1
    replicated = (6 * h * dtype_bytes + 2 * 4) / seq_split
    split = (((4 * a + 3 * g) * d + 5 * f) * dtype_bytes + a * 4) / tp
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


# ---- phases ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The numbers every phase uses, derived once from the config."""

    m: ModelArgs
    world: int
    tp: int
    pp: int
    vpp: int | None
    dp: int
    sp: bool
    dtype_bytes: int
    optim_shards: int
    """DP ranks the optimizer states are split over (1 without the distributed optimizer)."""
    bf16: bool
    seq_len: int
    """Longest prompt + response."""
    critic: bool
    ref_resident: bool
    """A reference model is used (KL) and its weights stay on the GPU."""


def _layout(cfg: TandemConfig, world: int, m: ModelArgs) -> Layout:
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = world // (tp * pp)
    uses_ref = cfg.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward
    return Layout(
        m=m,
        world=world,
        tp=tp,
        pp=pp,
        vpp=p.virtual_pipeline_model_parallel_size,
        dp=dp,
        sp=p.sequence_parallel,
        dtype_bytes=DTYPE_BYTES[cfg.model.dtype],
        optim_shards=dp if p.use_distributed_optimizer else 1,
        bf16=cfg.model.dtype == "bfloat16",
        seq_len=cfg.data.max_prompt_length + cfg.rollout.response_length,
        critic=uses_critic(cfg.algorithm),
        ref_resident=uses_ref and not cfg.ref.offload_params,
    )


def _gib(n_bytes: float) -> float:
    return n_bytes / GIB


def _t(name: str, n_bytes: float, formula: str = "", counted: bool = True) -> Term:
    """A term from its size in bytes."""
    return Term(name, n_bytes / GIB, formula, counted)


def _count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _reserve(terms: list[Term]) -> Term:
    own = sum(t.gib for t in terms if t.counted)
    return Term(
        "reserve (CUDA context, NCCL, fragmentation)",
        RESERVE_FIXED_GIB + RESERVE_FRACTION * own,
        f"{RESERVE_FIXED_GIB:g} + {RESERVE_FRACTION:g} × the terms above",
    )


def _model_state_terms(lay: Layout, params: int, who: str) -> list[Term]:
    """Weights, fp32 grads, Adam states and fp32 master weights (the last two split over DP
    with the distributed optimizer) of one model stage."""
    w, shards = lay.dtype_bytes, lay.optim_shards
    dp_note = f"/ DP {lay.dp}" if shards == lay.dp else "(distributed optimizer off)"
    terms = [
        _t(f"{who} weights", params * w, f"{_count(params)} params × {w} B"),
        _t(f"{who} grads (fp32 main_grad)", params * GRAD_BYTES, f"params × {GRAD_BYTES} B"),
        _t(
            f"{who} Adam states (fp32 m, v)",
            params * ADAM_BYTES / shards,
            f"params × {ADAM_BYTES} B {dp_note}",
        ),
    ]
    if lay.bf16:
        terms.append(
            _t(
                f"{who} fp32 master weights",
                params * MASTER_BYTES / shards,
                f"params × {MASTER_BYTES} B {dp_note}",
            )
        )
    return terms


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
    per_token = activation_bytes_per_token(m, lay.tp, lay.sp, lay.dtype_bytes)
    params = stage_params(m, lay.tp, lay.pp, stage)
    terms = _model_state_terms(lay, params, "actor")
    terms.append(
        _t(
            "activations in flight",
            in_flight * tokens * per_token,
            f"{in_flight:g} layer·micro-batches × {micro_note} × {per_token / 1024:.1f} KiB",
        )
    )
    if stage == lay.pp - 1:
        vocab = m.padded_vocab_size(lay.tp) // lay.tp
        terms.append(
            _t(
                "logits of one micro-batch and their grad",
                tokens * vocab * 2 * lay.dtype_bytes,
                f"{tokens} tokens × vocab/TP {vocab} × 2 × {lay.dtype_bytes} B (the fp32 softmax"
                " math runs fused, chunk by chunk: trainer/logprobs.py)",
            )
        )
    if lay.critic:
        terms += _model_state_terms(lay, stage_params(m, lay.tp, lay.pp, stage, True), "critic")
    terms += _reference(lay, stage)
    terms.append(_reserve(terms))
    return Phase("training", f"PP stage {stage} of {lay.pp}", tuple(terms))


def training_phase(cfg: TandemConfig, lay: Layout) -> Phase:
    """The PP stage that needs most (the first holds most activations, the last the logits)."""
    return max((_training_stage(cfg, lay, s) for s in range(lay.pp)), key=lambda p: p.total_gib)


def _all_stage_weights(lay: Layout) -> int:
    return sum(stage_params(lay.m, lay.tp, lay.pp, s) for s in range(lay.pp))


def _resident_in_generation(lay: Layout, stage: int) -> list[Term]:
    """What stays beside the rollout: the critic's and the reference model's weights."""
    terms = []
    if lay.critic:
        critic = stage_params(lay.m, lay.tp, lay.pp, stage, True)
        terms.append(_t("critic weights", critic * lay.dtype_bytes, "params × dtype"))
    return terms + _reference(lay, stage)


def _reference(lay: Layout, stage: int) -> list[Term]:
    """The reference model's weights (KL), when they stay on the GPU (ref.offload_params)."""
    if not lay.ref_resident:
        return []
    ref = stage_params(lay.m, lay.tp, lay.pp, stage)
    return [_t("reference weights", ref * lay.dtype_bytes, "params × dtype (not offloaded)")]


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


# ---- generation: one memory model per rollout backend ----------------------------------------
GenerationModel = Callable[[TandemConfig, Layout, "float | None"], Phase]
GENERATION_MODELS: dict[str, GenerationModel] = {}
"""rollout.name -> the memory its generation phase needs; filled by @generation_model."""


def generation_model(name: str) -> Callable[[GenerationModel], GenerationModel]:
    def register(fn: GenerationModel) -> GenerationModel:
        GENERATION_MODELS[name] = fn
        return fn

    return register


def kv_bytes_per_token(m: ModelArgs, kv_heads: int, dtype_bytes: int) -> int:
    """K and V of every layer for one token: 2 × layers × KV heads per rank × head dim."""
    return 2 * m.num_layers * kv_heads * m.kv_channels * dtype_bytes


def _sequences_per_engine(cfg: TandemConfig, engine_dp: int) -> int:
    """Sequences one engine generates per iteration: the prompts × n over the engine replicas."""
    return math.ceil(cfg.data.train_batch_size * cfg.rollout.n / engine_dp)


def _optimizer_terms(lay: Layout, params: int, who: str) -> list[Term]:
    """Adam states and fp32 master weights: freed grads aside, what a trained model keeps on
    the GPU while the engine runs (unless offloaded)."""
    return [
        t for t in _model_state_terms(lay, params, who) if "Adam" in t.name or "master" in t.name
    ]


def _generation_base(cfg: TandemConfig, lay: Layout) -> list[Term]:
    gathered = _all_stage_weights(lay)
    terms = [
        _t(
            "actor weights, all PP stages (AllGatherPPModel)",
            gathered * lay.dtype_bytes,
            f"{_count(gathered)} params × {lay.dtype_bytes} B",
        ),
        *_resident_in_generation(lay, 0),
    ]
    if not cfg.actor.offload_optimizer:
        terms += _optimizer_terms(lay, stage_params(lay.m, lay.tp, lay.pp, 0), "actor")
    if lay.critic:
        terms += _optimizer_terms(lay, stage_params(lay.m, lay.tp, lay.pp, 0, True), "critic")
    return terms


@generation_model("vllm")
def vllm_generation(cfg: TandemConfig, lay: Layout, gpu: float | None) -> Phase:
    """vLLM reserves `gpu_memory_utilization` × the GPU for its weights at rollout TP, its
    workspace (one engine step of VLLM_MAX_BATCHED_TOKENS tokens through a layer, plus fp32
    logits and probabilities of VLLM_MAX_NUM_SEQS sequences over the whole vocab) and the
    KV cache, which gets what is left. Too little KV cache only queues sequences, but less
    than one max_seq_len sequence makes vLLM refuse to start."""
    r: RolloutConfig = cfg.rollout
    m, w, rtp = lay.m, lay.dtype_bytes, r.tensor_model_parallel_size
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    kv_heads = engine_kv_heads(m, rtp)
    weights = _gib(engine_params(m, rtp) * w)
    step = (
        VLLM_MAX_BATCHED_TOKENS
        * (4 * h + (m.num_attention_heads // rtp * 2 + 2 * kv_heads) * d + 3 * f // rtp)
        * w
    )
    sampler = VLLM_MAX_NUM_SEQS * m.vocab_size * 4 * 2
    workspace = _gib(step + sampler) + (0.0 if r.enforce_eager else CUDA_GRAPH_GIB)
    per_token = kv_bytes_per_token(m, kv_heads, w)
    seqs = _sequences_per_engine(cfg, lay.world // rtp)
    kv_needed = _gib(seqs * lay.seq_len * per_token)
    needed = weights + workspace + kv_needed
    budget = needed if gpu is None else r.gpu_memory_utilization * gpu
    base = _generation_base(cfg, lay)
    terms = [
        *base,
        Term(
            "vLLM engine (rollout.gpu_memory_utilization × GPU)",
            budget,
            f"{r.gpu_memory_utilization:g} × {_gpu(gpu)}" if gpu else "weights + workspace + KV",
        ),
        Term(
            f"engine weights at rollout TP {rtp}",
            weights,
            f"{_count(engine_params(m, rtp))} params × {w} B",
            counted=False,
        ),
        Term(
            "engine workspace",
            workspace,
            f"{VLLM_MAX_BATCHED_TOKENS} batched tokens, {VLLM_MAX_NUM_SEQS} seqs' fp32 logits"
            + ("" if r.enforce_eager else ", CUDA graphs"),
            counted=False,
        ),
        Term(
            "KV cache for the batch",
            kv_needed,
            f"{seqs} seqs × {lay.seq_len} tokens × {per_token / 1024:.0f} KiB",
            counted=False,
        ),
    ]
    terms.append(_reserve(base))
    problems, notes = [], []
    kv_room = budget - weights - workspace
    if kv_room <= 0:
        problems.append(
            f"the engine's weights {weights:.1f} + workspace {workspace:.1f} GiB exceed its"
            f" budget rollout.gpu_memory_utilization {r.gpu_memory_utilization:g} × GPU"
            f" = {budget:.1f} GiB: raise rollout.tensor_model_parallel_size or the utilization"
        )
    elif kv_room < _gib(cfg.model.max_seq_len * per_token):
        problems.append(
            f"KV cache room {kv_room:.2f} GiB holds less than one model.max_seq_len"
            f" {cfg.model.max_seq_len} sequence ({_gib(cfg.model.max_seq_len * per_token):.2f}"
            " GiB): vLLM refuses to start"
        )
    elif kv_room < kv_needed:
        fits = int(kv_room * GIB // (lay.seq_len * per_token))
        notes.append(
            f"KV cache room {kv_room:.1f} GiB holds {fits} of {seqs} sequences at once;"
            " vLLM queues the rest (slower, not a failure)"
        )
    return Phase(
        "generation",
        f"rollout TP {rtp} × DP {lay.world // rtp}",
        tuple(terms),
        tuple(problems),
        tuple(notes),
    )


@generation_model("hf")
def hf_generation(cfg: TandemConfig, lay: Layout, gpu: float | None) -> Phase:
    """transformers generate(): a whole model on every rank (TP 1), a KV cache for its share
    of the batch at full length, and one step's fp32 logits over the vocab."""
    m, w = lay.m, lay.dtype_bytes
    seqs = _sequences_per_engine(cfg, lay.world)
    per_token = kv_bytes_per_token(m, m.num_query_groups, w)
    base = _generation_base(cfg, lay)
    terms = [
        *base,
        _t(
            "HF model (whole, TP 1)",
            total_params(m) * w,
            f"{_count(total_params(m))} params × {w} B",
        ),
        _t(
            "KV cache for the batch",
            seqs * lay.seq_len * per_token,
            f"{seqs} seqs × {lay.seq_len} tokens × {per_token / 1024:.0f} KiB",
        ),
        _t("logits of one step", seqs * m.vocab_size * 4, f"{seqs} seqs × vocab × 4 B"),
    ]
    terms.append(_reserve(terms))
    return Phase("generation", f"hf, one model per rank × DP {lay.world}", tuple(terms))


def generic_generation(cfg: TandemConfig, lay: Layout, gpu: float | None) -> Phase:
    """A backend with no memory model of its own: weights at rollout TP plus its KV cache."""
    m, w, rtp = lay.m, lay.dtype_bytes, cfg.rollout.tensor_model_parallel_size
    seqs = _sequences_per_engine(cfg, lay.world // rtp)
    per_token = kv_bytes_per_token(m, engine_kv_heads(m, rtp), w)
    terms = [
        *_generation_base(cfg, lay),
        _t(f"engine weights at rollout TP {rtp}", engine_params(m, rtp) * w, "params × dtype"),
        _t(
            "KV cache for the batch",
            seqs * lay.seq_len * per_token,
            f"{seqs} seqs × {lay.seq_len} tokens",
        ),
    ]
    terms.append(_reserve(terms))
    note = f"rollout.name {cfg.rollout.name!r} has no memory model: generic estimate"
    return Phase("generation", f"rollout TP {rtp}", tuple(terms), notes=(note,))


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
