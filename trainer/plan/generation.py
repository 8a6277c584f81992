"""The generation phase: one memory model per rollout backend, in a registry by rollout.name.

vLLM takes `rollout.gpu_memory_utilization` of the GPU for its weights at rollout TP, its
workspace and the KV cache; the hf backend holds a whole model per rank and a KV cache for its
batch; a backend without a model of its own gets a generic estimate. Beside the engine stay the
gathered actor weights, the critic's and reference weights, and the optimizer states unless
actor.offload_optimizer (trainer/plan.py has the overview).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tandem_core.config import RolloutConfig, TandemConfig
from tandem_core.model_args import ModelArgs
from tandem_core.registry import Registry
from trainer.plan.terms import (
    GIB,
    Layout,
    Phase,
    Term,
    all_stage_weights,
    format_count,
    format_gpu,
    gib,
    reference_terms,
    reserve_term,
    role_state_terms,
    stage_params,
    term,
    total_params,
)

VLLM_MAX_BATCHED_TOKENS = 16384
"""vLLM's default token budget of one engine step for the offline LLM class on big GPUs."""
VLLM_MAX_NUM_SEQS = 1024
"""vLLM's default cap on sequences per engine step (offline LLM class)."""
VLLM_VOCAB_PAD = 64
"""vLLM pads its vocab-parallel embedding and LM head to this multiple."""
CUDA_GRAPH_GIB = 1.0
"""Memory pool of captured CUDA graphs when rollout.enforce_eager is false."""


# ---- the engine's parameters -----------------------------------------------------------------
def engine_kv_heads(m: ModelArgs, rollout_tp: int) -> int:
    """KV heads per engine rank: vLLM splits them when there are enough, else replicates."""
    return max(m.num_query_groups // rollout_tp, 1)


def engine_params(m: ModelArgs, rollout_tp: int) -> int:
    """Parameters of one vLLM rank at rollout TP (q, o, MLP and vocab split; KV heads split or
    replicated; norms replicated; every expert, split over TP, and the router replicated)."""
    h, f, d, a = m.hidden_size, m.ffn_hidden_size, m.kv_channels, m.num_attention_heads
    q_width = a * d // rollout_tp
    kv_width = 2 * engine_kv_heads(m, rollout_tp) * d
    attention = h * (q_width + kv_width) + (q_width + kv_width if m.qkv_bias else 0)
    attention += q_width * h + 2 * h + (2 * d if m.qk_norm else 0)
    dense = 3 * h * f // rollout_tp
    sparse = m.num_experts * h + m.num_experts * 3 * h * m.moe_ffn_hidden_size // rollout_tp
    layers = sum(attention + (sparse if moe else dense) for moe in m.moe_layer_pattern())
    vocab = math.ceil(m.vocab_size / VLLM_VOCAB_PAD) * VLLM_VOCAB_PAD // rollout_tp
    heads = 1 if m.tie_word_embeddings else 2
    return layers + heads * vocab * h + h


# ---- generation: one memory model per rollout backend ----------------------------------------
GenerationModel = Callable[[TandemConfig, Layout, "float | None"], Phase]
GENERATION_MODELS = Registry("generation memory model")
"""rollout.name -> the memory its generation phase needs; a backend without one of its own
gets `generic_generation`."""
generation_model = GENERATION_MODELS.register


def kv_bytes_per_token(m: ModelArgs, kv_heads: int, dtype_bytes: int) -> int:
    """K and V of every layer for one token: 2 × layers × KV heads per rank × head dim."""
    return 2 * m.num_layers * kv_heads * m.kv_channels * dtype_bytes


def _sequences_per_engine(cfg: TandemConfig, engine_dp: int) -> int:
    """Sequences one engine generates per iteration: the prompts × n over the engine replicas."""
    return math.ceil(cfg.data.train_batch_size * cfg.rollout.n / engine_dp)


def _resident_in_generation(lay: Layout, stage: int) -> list[Term]:
    """What stays beside the rollout: the critic's and the reference model's weights."""
    terms = []
    if lay.critic:
        critic = stage_params(lay.m, lay.tp, lay.pp, stage, True, lay.ep)
        terms.append(term("critic weights", critic * lay.dtype_bytes, "params × dtype"))
    return terms + reference_terms(lay, stage)


def _optimizer_terms(lay: Layout, who: str, value_head: bool = False) -> list[Term]:
    """Adam states and fp32 master weights: freed grads aside, what a trained model keeps on
    the GPU while the engine runs (unless offloaded)."""
    terms = role_state_terms(lay, 0, who, value_head)
    return [t for t in terms if "Adam" in t.name or "master" in t.name]


def _generation_base(cfg: TandemConfig, lay: Layout) -> list[Term]:
    if "actor" in lay.fsdp_roles:  # FSDP2 keeps its fp32 shards (the master weights) resident
        shards = [t for t in role_state_terms(lay, 0, "actor") if "master" in t.name]
        terms = shards + _resident_in_generation(lay, 0)
        if not cfg.actor.offload_optimizer:
            terms += [t for t in _optimizer_terms(lay, "actor") if "Adam" in t.name]
        if lay.critic:
            terms += _optimizer_terms(lay, "critic", value_head=True)
        return terms
    gathered = all_stage_weights(lay)
    terms = [
        term(
            "actor weights, all PP stages (AllGatherPPModel)",
            gathered * lay.dtype_bytes,
            f"{format_count(gathered)} params × {lay.dtype_bytes} B",
        ),
        *_resident_in_generation(lay, 0),
    ]
    if not cfg.actor.offload_optimizer:
        terms += _optimizer_terms(lay, "actor")
    if lay.critic:
        terms += _optimizer_terms(lay, "critic", value_head=True)
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
    weights = gib(engine_params(m, rtp) * w)
    step = (
        VLLM_MAX_BATCHED_TOKENS
        * (4 * h + (m.num_attention_heads // rtp * 2 + 2 * kv_heads) * d + 3 * f // rtp)
        * w
    )
    sampler = VLLM_MAX_NUM_SEQS * m.vocab_size * 4 * 2
    workspace = gib(step + sampler) + (0.0 if r.enforce_eager else CUDA_GRAPH_GIB)
    per_token = kv_bytes_per_token(m, kv_heads, w)
    seqs = _sequences_per_engine(cfg, lay.world // rtp)
    kv_needed = gib(seqs * lay.seq_len * per_token)
    needed = weights + workspace + kv_needed
    budget = needed if gpu is None else r.gpu_memory_utilization * gpu
    base = _generation_base(cfg, lay)
    terms = [
        *base,
        Term(
            "vLLM engine (rollout.gpu_memory_utilization × GPU)",
            budget,
            f"{r.gpu_memory_utilization:g} × {format_gpu(gpu)}"
            if gpu
            else "weights + workspace + KV",
        ),
        Term(
            f"engine weights at rollout TP {rtp}",
            weights,
            f"{format_count(engine_params(m, rtp))} params × {w} B",
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
    terms.append(reserve_term(base))
    problems, notes = [], []
    kv_room = budget - weights - workspace
    if kv_room <= 0:
        problems.append(
            f"the engine's weights {weights:.1f} + workspace {workspace:.1f} GiB exceed its"
            f" budget rollout.gpu_memory_utilization {r.gpu_memory_utilization:g} × GPU"
            f" = {budget:.1f} GiB: raise rollout.tensor_model_parallel_size or the utilization"
        )
    elif kv_room < gib(cfg.model.max_seq_len * per_token):
        problems.append(
            f"KV cache room {kv_room:.2f} GiB holds less than one model.max_seq_len"
            f" {cfg.model.max_seq_len} sequence ({gib(cfg.model.max_seq_len * per_token):.2f}"
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
        term(
            "HF model (whole, TP 1)",
            total_params(m) * w,
            f"{format_count(total_params(m))} params × {w} B",
        ),
        term(
            "KV cache for the batch",
            seqs * lay.seq_len * per_token,
            f"{seqs} seqs × {lay.seq_len} tokens × {per_token / 1024:.0f} KiB",
        ),
        term("logits of one step", seqs * m.vocab_size * 4, f"{seqs} seqs × vocab × 4 B"),
    ]
    terms.append(reserve_term(terms))
    return Phase("generation", f"hf, one model per rank × DP {lay.world}", tuple(terms))


def generic_generation(cfg: TandemConfig, lay: Layout, gpu: float | None) -> Phase:
    """A backend with no memory model of its own: weights at rollout TP plus its KV cache."""
    m, w, rtp = lay.m, lay.dtype_bytes, cfg.rollout.tensor_model_parallel_size
    seqs = _sequences_per_engine(cfg, lay.world // rtp)
    per_token = kv_bytes_per_token(m, engine_kv_heads(m, rtp), w)
    terms = [
        *_generation_base(cfg, lay),
        term(f"engine weights at rollout TP {rtp}", engine_params(m, rtp) * w, "params × dtype"),
        term(
            "KV cache for the batch",
            seqs * lay.seq_len * per_token,
            f"{seqs} seqs × {lay.seq_len} tokens",
        ),
    ]
    terms.append(reserve_term(terms))
    note = f"rollout.name {cfg.rollout.name!r} has no memory model: generic estimate"
    return Phase("generation", f"rollout TP {rtp}", tuple(terms), notes=(note,))
