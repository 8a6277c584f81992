"""The training and swap phases of the memory plan, and the activation counts they rest on
(trainer/plan/planner.py has the overview)."""

from __future__ import annotations

import math

from tandem_core.config import TandemConfig
from tandem_core.model_args import ModelArgs
from trainer.plan.terms import (
    Layout,
    Phase,
    all_stage_weights,
    counted_gib,
    format_count,
    reference_terms,
    reserve_term,
    role_state_terms,
    stage_layers,
    stage_params,
    term,
)


# ---- activations -----------------------------------------------------------------------------
def activation_bytes_per_token(
    m: ModelArgs,
    tp: int,
    sp: bool,
    dtype_bytes: int,
    fused_swiglu: bool = False,
    moe: bool = False,
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
      log-sum-exp of the attention: a (× 4 B); with per-head q/k norms (Qwen3) as for the
      hidden norms their normalised inputs (a+g)d, plus q's input ad (megatron reshapes q
      into heads, a copy; k's input is a view of the linear_qkv output), and their fp32
      inverse RMS a+g (× 4 B); their outputs are rotated before anything keeps them.

    A mixture-of-experts layer (`moe`) keeps, instead of the dense MLP's, for each of the
    top-k copies of a token its expert's fc1 output and SwiGLU terms ((3|5)f_moe, split over
    TP) and the permuted input and output rows (2h), plus the router's fp32 logits and
    probabilities (2E × 4 B): an estimate, not checked against autograd like the rest.
    """
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    a, g = m.num_attention_heads, m.num_query_groups
    seq_split = tp if sp else 1
    replicated = (6 * h * dtype_bytes + 2 * 4) / seq_split
    swiglu = 3 if fused_swiglu else 5
    mlp, routed = swiglu * f, 0.0
    if moe:
        k = m.moe_router_topk
        mlp = k * swiglu * m.moe_ffn_hidden_size
        routed = k * 2 * m.hidden_size * dtype_bytes + 2 * m.num_experts * 4
    qk_norms = ((2 * a + g) * d * dtype_bytes + (a + g) * 4) if m.qk_norm else 0
    split = (((4 * a + 3 * g) * d + mlp) * dtype_bytes + a * 4 + qk_norms) / tp
    return replicated + split + routed


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
def _with_residents(terms: list, lay: Layout, stage: int) -> tuple:
    """A training or swap phase's terms, completed by what stays resident beside the actor
    (the critic's training state, the reference weights) and the reserve."""
    terms = list(terms)
    if lay.critic:
        terms += role_state_terms(lay, stage, "critic", value_head=True)
    terms += reference_terms(lay, stage)
    terms.append(reserve_term(terms))
    return tuple(terms)


def _fsdp_training(cfg: TandemConfig, lay: Layout) -> Phase:
    """FSDP2 actor: transformers' layers keep their activations (its unfused SwiGLU), or with
    activation checkpointing each layer's input and one layer's activations; the LM head runs
    on every position (the logits of one micro-batch, transiently, then the response rows')."""
    m, a = lay.m, cfg.actor
    tokens = a.max_tokens_per_microbatch if a.use_dynamic_bsz else a.micro_batch_size * lay.seq_len
    rows = tokens if a.use_dynamic_bsz else a.micro_batch_size * cfg.rollout.response_length
    per_token = activation_bytes_per_token(m, 1, False, lay.dtype_bytes)
    if a.activation_checkpointing:
        kept = tokens * (m.num_layers * m.hidden_size * lay.dtype_bytes + per_token)
        how = f"{tokens} tokens × ({m.num_layers} layer inputs + one layer's activations)"
    else:
        kept = m.num_layers * tokens * per_token
        how = f"{m.num_layers} layers × {tokens} tokens × {per_token / 1024:.1f} KiB"
    terms = role_state_terms(lay, 0, "actor")
    terms += [
        term("activations", kept, how),
        term(
            "logits of one micro-batch (every position) and the response rows' grad",
            (tokens + 2 * rows) * m.vocab_size * lay.dtype_bytes,
            f"({tokens} positions + 2 × {rows} response rows) × vocab {m.vocab_size} ×"
            f" {lay.dtype_bytes} B",
        ),
    ]
    return Phase("training", "FSDP2, every rank", _with_residents(terms, lay, 0))


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
    # The stage's heavier kind of layer, for each of its layers (MoE and dense may mix).
    per_token = max(
        activation_bytes_per_token(m, lay.tp, lay.sp, lay.dtype_bytes, True, moe)
        for moe in set(stage_layers(m, lay.pp, stage))
    )
    terms = role_state_terms(lay, stage, "actor")
    vocab = m.padded_vocab_size(lay.tp) // lay.tp
    last = stage == lay.pp - 1
    # The LM head runs on the response rows only (ResponseRowsGPTModel); a token budget bounds
    # them too (rows × trimmed response width ≤ rows × longest row).
    rows = tokens if a.use_dynamic_bsz else a.micro_batch_size * cfg.rollout.response_length
    over_cp = f" / CP {lay.cp}" if lay.cp > 1 else ""
    if a.activation_checkpointing:  # megatron's full recompute: each layer keeps its input
        layer_input = m.hidden_size * lay.dtype_bytes / (lay.tp if lay.sp else 1)
        update = [
            term(
                "layer inputs in flight (activation recompute) and one layer's activations",
                (in_flight * layer_input + per_token) * tokens / lay.cp,
                f"({in_flight:g} layer·micro-batches × {layer_input / 1024:.1f} KiB + one"
                f" layer's {per_token / 1024:.1f} KiB) × {micro_note}{over_cp}",
            )
        ]
        kv_layers = 1.0  # the gathered K/V of the layer being recomputed
    else:
        update = [
            term(
                "activations in flight",
                in_flight * tokens * per_token / lay.cp,
                f"{in_flight:g} layer·micro-batches × {micro_note}{over_cp}"
                f" × {per_token / 1024:.1f} KiB",
            )
        ]
        kv_layers = in_flight
    if lay.cp > 1:  # each layer keeps the whole sequence's K/V, gathered over CP, for backward
        kv = 2 * (m.num_query_groups // lay.tp) * m.kv_channels * lay.dtype_bytes
        update.append(
            term(
                "K/V gathered over CP",
                kv_layers * tokens * kv,
                f"{kv_layers:g} layer·micro-batches × {tokens} tokens × K and V"
                f" ({m.num_query_groups // lay.tp} heads × {m.kv_channels}) × {lay.dtype_bytes} B",
            )
        )
    if last:
        update.append(
            term(
                "logits of one micro-batch and their grad",
                rows * vocab * 2 * lay.dtype_bytes / lay.cp,
                f"{rows} response rows"
                + (f" / CP {lay.cp}" if lay.cp > 1 else "")
                + f" × vocab/TP {vocab} × 2 × {lay.dtype_bytes} B (the fp32"
                " softmax math runs fused, chunk by chunk: trainer/workers/logprobs.py)",
            )
        )
    terms += max(update, _forward_only_terms(cfg, lay, per_token, vocab, last), key=counted_gib)
    return Phase("training", f"PP stage {stage} of {lay.pp}", _with_residents(terms, lay, stage))


def _forward_only_terms(cfg, lay: Layout, per_token: float, vocab: int, last: bool):
    """The old/reference log-prob pass at actor.log_prob_micro_batch_size: no activations kept,
    one layer's live at a time (bounded by what the layer would keep), and the logits."""
    a = cfg.actor
    if a.use_dynamic_bsz or not a.log_prob_micro_batch_size:
        return []
    mbs = a.log_prob_micro_batch_size
    tokens, rows = mbs * lay.seq_len, mbs * cfg.rollout.response_length
    terms = [
        term(
            "activations of one layer, forward-only log-prob pass",
            tokens * per_token / lay.cp,
            f"actor.log_prob_micro_batch_size {mbs} × {lay.seq_len} tokens"
            + (f" / CP {lay.cp}" if lay.cp > 1 else "")
            + f" × {per_token / 1024:.1f} KiB",
        )
    ]
    if last:
        terms.append(
            term(
                "logits of one log-prob micro-batch",
                rows * vocab * lay.dtype_bytes / lay.cp,
                f"{rows} response rows"
                + (f" / CP {lay.cp}" if lay.cp > 1 else "")
                + f" × vocab/TP {vocab} × {lay.dtype_bytes} B",
            )
        )
    return terms


def training_phase(cfg: TandemConfig, lay: Layout) -> Phase:
    """The PP stage that needs most (the first holds most activations, the last the logits)."""
    if "actor" in lay.fsdp_roles:
        return _fsdp_training(cfg, lay)
    return max((_training_stage(cfg, lay, s) for s in range(lay.pp)), key=lambda p: p.total_gib)


def swap_phase(cfg: TandemConfig, lay: Layout) -> Phase:
    """AllGatherPPModel fills the other stages' buffers before the training state is released:
    the own stage's full training state plus every other stage's weights (TP shard). FSDP2
    gathers nothing: one full fp32 tensor at a time is streamed to the engine."""
    if "actor" in lay.fsdp_roles:
        largest = lay.m.vocab_size * lay.m.hidden_size
        # the spent grads are dropped on enter; nothing is gathered but the streamed tensor
        state = role_state_terms(lay, 0, "actor")
        terms = [t for t in state if "master" in t.name or "Adam" in t.name]
        terms.append(
            term(
                "one full tensor in the sync stream",
                largest * 4,
                f"vocab × hidden {format_count(largest)} × 4 B",
            )
        )
        return Phase("swap", "FSDP2, streaming", _with_residents(terms, lay, 0))
    stages = []
    for stage in range(lay.pp):
        own = stage_params(lay.m, lay.tp, lay.pp, stage, ep=lay.ep)
        foreign = all_stage_weights(lay) - own
        terms = role_state_terms(lay, stage, "actor")
        terms.append(
            term(
                "other PP stages' weights (AllGatherPPModel)",
                foreign * lay.dtype_bytes,
                f"{format_count(foreign)} params × {lay.dtype_bytes} B ({lay.pp - 1} stages)",
            )
        )
        where = f"PP stage {stage} of {lay.pp}, gathering"
        stages.append(Phase("swap", where, _with_residents(terms, lay, stage)))
    return max(stages, key=lambda p: p.total_gib)
