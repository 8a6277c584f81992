"""The memory plan's data and the counts every phase builds from: Term, Phase, MemoryPlan and
the Layout derived once from the config; exact parameter counts from the shapes; the per-term
constants (bytes per parameter, the reserve) and the terms the phases share (a model's
training state, the reference weights). Units: GiB (2**30 bytes); see trainer/plan/planner.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem_core.config import TandemConfig, uses_critic
from tandem_core.model_args import ModelArgs

GIB = 2**30

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
        return counted_gib(self.terms)


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
            out.append(f"{'  total':<54}{phase.total_gib:>8.2f}   of {format_gpu(gpu)}: {verdict}")
            out += [f"  ! {p}" for p in phase.problems] + [f"  note: {n}" for n in phase.notes]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


HINTS = {
    "training": "more pipeline stages or TP, parallel.use_distributed_optimizer=true over more"
    " data-parallel ranks, or a smaller actor.micro_batch_size / max_tokens_per_microbatch /"
    " log_prob_micro_batch_size",
    "swap": "every rank gathers all PP stages of its TP shard while its grads and optimizer"
    " states are still there: raise parallel.tensor_model_parallel_size (fewer, larger TP"
    " shards) or spread the optimizer over more data-parallel ranks",
    "generation": "raise rollout.tensor_model_parallel_size or training TP, or lower"
    " rollout.gpu_memory_utilization (a smaller KV cache)",
}


def format_gpu(gpu: float | None) -> str:
    return "?" if gpu is None else f"{gpu:.1f}"


# ---- parameter counts (exact, from the shapes) -----------------------------------------------
def layer_params(m: ModelArgs, tp: int, ep: int = 1, moe: bool = False) -> int:
    """One decoder layer on one TP (and EP) rank (megatron's layout).

    linear_qkv h×(a+2g)d/tp (+ its bias), linear_proj a·d×h/tp, two RMSNorm weights h and q/k
    norms 2d (replicated); a dense MLP: linear_fc1 h×2f/tp (gate;up), linear_fc2 f×h/tp; a
    mixture-of-experts MLP: the router E×h (replicated) and E/ep experts of 3·h·f_moe/tp.
    """
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    qkv_width = (m.num_attention_heads + 2 * m.num_query_groups) * d
    qkv = h * qkv_width + (qkv_width if m.qkv_bias else 0)
    norms = 2 * h + (2 * d if m.qk_norm else 0)
    attention = (qkv + m.num_attention_heads * d * h) // tp + norms
    if moe:
        return attention + m.num_experts * h + expert_params(m, tp, ep)
    return attention + 3 * h * f // tp


def expert_params(m: ModelArgs, tp: int, ep: int = 1) -> int:
    """The experts of one mixture-of-experts layer on one TP × EP rank."""
    return m.num_experts // ep * 3 * m.hidden_size * m.moe_ffn_hidden_size // tp


def stage_layers(m: ModelArgs, pp: int, stage: int) -> list[bool]:
    """Whether each layer of a PP stage is a mixture-of-experts layer."""
    per = m.num_layers // pp
    return [bool(x) for x in m.moe_layer_pattern()[stage * per : (stage + 1) * per]]


def stage_params(
    m: ModelArgs, tp: int, pp: int, stage: int, value_head: bool = False, ep: int = 1
) -> int:
    """Parameters of one training rank: its PP stage's layers at TP (experts at EP), plus the
    embedding on the first stage and final norm + output layer on the last (vocab padded to
    128·TP). Tied embeddings with PP > 1 keep a second copy on the last stage (megatron's
    convention); a critic has a value head (h) instead of the output layer."""
    h, vocab = m.hidden_size, m.padded_vocab_size(tp)
    n = sum(layer_params(m, tp, ep, moe) for moe in stage_layers(m, pp, stage))
    if stage == 0:
        n += vocab * h // tp
    if stage == pp - 1:
        n += h
        if value_head:
            n += h
        elif not m.tie_word_embeddings or pp > 1:
            n += vocab * h // tp
    return n


def stage_expert_params(m: ModelArgs, tp: int, pp: int, stage: int, ep: int = 1) -> int:
    """The experts among a stage's parameters (their optimizer states split over DP / EP)."""
    return sum(expert_params(m, tp, ep) for moe in stage_layers(m, pp, stage) if moe)


def total_params(m: ModelArgs) -> int:
    """The model's parameter count (unpadded vocab, one embedding when tied)."""
    embed = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    layers = sum(layer_params(m, 1, 1, bool(moe)) for moe in m.moe_layer_pattern())
    return layers + embed + m.hidden_size


# ---- the layout and the terms the phases share -----------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The numbers every phase uses, derived once from the config."""

    m: ModelArgs
    world: int
    tp: int
    pp: int
    vpp: int | None
    dp: int
    ep: int
    """Expert parallelism: each layer's experts split over this many of the DP ranks."""
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
    cp: int = 1
    """Context parallel: each rank holds 1/CP of every sequence's tokens."""
    fsdp_roles: frozenset = frozenset()
    """Roles trained with the fsdp2 strategy ("actor" also covers the reference, "critic")."""


def layout_of(cfg: TandemConfig, world: int, m: ModelArgs) -> Layout:
    p = cfg.parallel
    tp, pp, cp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
    )
    dp = world // (tp * pp * cp)
    uses_ref = cfg.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward
    return Layout(
        m=m,
        world=world,
        tp=tp,
        pp=pp,
        vpp=p.virtual_pipeline_model_parallel_size,
        dp=dp,
        ep=p.expert_model_parallel_size,
        cp=cp,
        sp=p.sequence_parallel,
        dtype_bytes=DTYPE_BYTES[cfg.model.dtype],
        optim_shards=dp * cp if p.use_distributed_optimizer else 1,  # megatron shards over DP×CP
        bf16=cfg.model.dtype == "bfloat16",
        seq_len=cfg.data.max_prompt_length + cfg.rollout.response_length,
        critic=uses_critic(cfg.algorithm),
        ref_resident=uses_ref and not cfg.ref.offload_params,
        fsdp_roles=frozenset(
            role for role in ("actor", "critic") if getattr(cfg, role).strategy == "fsdp2"
        ),
    )


def gib(n_bytes: float) -> float:
    return n_bytes / GIB


def counted_gib(terms) -> float:
    """What a list of terms adds to the total (terms shown for information only add nothing)."""
    return sum(t.gib for t in terms if t.counted)


def term(name: str, n_bytes: float, formula: str = "", counted: bool = True) -> Term:
    """A term from its size in bytes."""
    return Term(name, n_bytes / GIB, formula, counted)


def format_count(n: float) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def reserve_term(terms: list[Term]) -> Term:
    own = counted_gib(terms)
    return Term(
        "reserve (CUDA context, NCCL, fragmentation)",
        RESERVE_FIXED_GIB + RESERVE_FRACTION * own,
        f"{RESERVE_FIXED_GIB:g} + {RESERVE_FRACTION:g} × the terms above",
    )


def fsdp_state_terms(lay: Layout, params: int, who: str) -> list[Term]:
    """FSDP2: the fp32 parameter shards (the master weights), their fp32 grads and Adam states
    are all split over DP; in forward and backward the root (embeddings, final norm, LM head)
    and up to two decoder layers (the one running, the next prefetched) are gathered whole in
    the compute dtype."""
    m, w, dp = lay.m, lay.dtype_bytes, lay.dp
    root = total_params(m) - sum(layer_params(m, 1, 1, bool(x)) for x in m.moe_layer_pattern())
    layer = max(layer_params(m, 1, 1, bool(x)) for x in m.moe_layer_pattern())
    gathered = root + 2 * layer
    return [
        term(
            f"{who} fp32 master weights (parameter shards)",
            params * MASTER_BYTES / dp,
            f"{format_count(params)} params × {MASTER_BYTES} B / DP {dp}",
        ),
        term(
            f"{who} grads (fp32, sharded)",
            params * GRAD_BYTES / dp,
            f"params × {GRAD_BYTES} B / DP {dp}",
        ),
        term(
            f"{who} Adam states (fp32 m, v)",
            params * ADAM_BYTES / dp,
            f"params × {ADAM_BYTES} B / DP {dp}",
        ),
        term(
            f"{who} gathered root and two layers (FSDP2)",
            gathered * w,
            f"{format_count(gathered)} params × {w} B",
        ),
    ]


def model_state_terms(lay: Layout, params: int, who: str, experts: int = 0) -> list[Term]:
    """Weights, fp32 grads, Adam states and fp32 master weights (the last two split over DP
    with the distributed optimizer; an expert's over DP / EP, the ranks that hold it) of one
    model stage; `experts` of the `params` are experts' parameters. FSDP2 roles:
    `fsdp_state_terms`."""
    if who in lay.fsdp_roles:
        return fsdp_state_terms(lay, params, who)
    w, shards = lay.dtype_bytes, lay.optim_shards
    expert_shards = max(shards // lay.ep, 1)
    if shards == 1:
        dp_note = "(not sharded)" if lay.dp * lay.cp == 1 else "(distributed optimizer off)"
    else:
        dp_note = f"/ DP {lay.dp}" if lay.cp == 1 else f"/ DP × CP {shards}"
    if experts:
        dp_note += f", experts / (DP / EP) {expert_shards}"
    sharded = (params - experts) / shards + experts / expert_shards
    terms = [
        term(f"{who} weights", params * w, f"{format_count(params)} params × {w} B"),
        term(f"{who} grads (fp32 main_grad)", params * GRAD_BYTES, f"params × {GRAD_BYTES} B"),
        term(
            f"{who} Adam states (fp32 m, v)",
            sharded * ADAM_BYTES,
            f"params × {ADAM_BYTES} B {dp_note}",
        ),
    ]
    if lay.bf16:
        terms.append(
            term(
                f"{who} fp32 master weights",
                sharded * MASTER_BYTES,
                f"params × {MASTER_BYTES} B {dp_note}",
            )
        )
    return terms


def role_state_terms(lay: Layout, stage: int, who: str, value_head: bool = False) -> list[Term]:
    """model_state_terms of one role's PP stage, its experts' optimizer split counted apart."""
    params = stage_params(lay.m, lay.tp, lay.pp, stage, value_head, lay.ep)
    experts = stage_expert_params(lay.m, lay.tp, lay.pp, stage, lay.ep)
    return model_state_terms(lay, params, who, experts)


def all_stage_weights(lay: Layout) -> int:
    return sum(stage_params(lay.m, lay.tp, lay.pp, s, ep=lay.ep) for s in range(lay.pp))


def reference_terms(lay: Layout, stage: int) -> list[Term]:
    """The reference model's weights (KL), when they stay on the GPU (ref.offload_params)."""
    if not lay.ref_resident:
        return []
    ref = stage_params(lay.m, lay.tp, lay.pp, stage, ep=lay.ep)
    if "actor" in lay.fsdp_roles:  # the reference's fp32 FSDP2 shards
        return [
            term(
                "reference weights (fp32 shards)",
                ref * MASTER_BYTES / lay.dp,
                f"params × {MASTER_BYTES} B / DP {lay.dp} (not offloaded)",
            )
        ]
    return [term("reference weights", ref * lay.dtype_bytes, "params × dtype (not offloaded)")]
