"""The hydra config tree and its validation: every preset composes and validates, and a
catalogue of bad configs each fails with a ConfigError whose message starts with the key,
without building a model or allocating a tensor."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import archs
from archs import model_args_from_hf, read_model_args
from tandem_core.config import ConfigError, ModelConfig, TandemConfig, to_structured, uses_critic
from tandem_core.model_args import ModelArgs
from trainer.config_check import CHOICES, RANGES, check_config, load_config

TP, PP = "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size"
VPP = "parallel.virtual_pipeline_model_parallel_size"


def test_default_config_composes():
    cfg = load_config([], world_size=1)
    assert isinstance(cfg, TandemConfig)
    assert (cfg.model.preset, cfg.model.path) == ("tiny_llama", None)
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size) == (
        1,
        1,
    )
    assert (cfg.rollout.name, cfg.data.task, cfg.reward.name) == ("vllm", "arith", "arith_dense")
    assert cfg.actor.optim.lr == 2e-3  # the tiny preset sets a learning rate random weights need
    assert (cfg.algorithm.name, cfg.algorithm.adv_estimator, cfg.rollout.n) == ("grpo", "grpo", 4)
    assert cfg.actor.use_kl_loss and cfg.actor.kl_loss_type == "low_var_kl"
    assert cfg.logger.backends == ["console"]
    assert cfg.trainer.output_dir == "runs/default"  # interpolation resolved
    assert cfg.actor.optim.betas == (0.9, 0.999)  # the tuple type survives the round trip
    assert not uses_critic(cfg.algorithm)


def test_overrides_reach_the_typed_config():
    cfg = load_config(
        [
            "model=smollm2_135m",
            "actor.optim.lr=1e-6",
            f"{TP}=3",
            "rollout=hf",
            "logger=tensorboard",
            "logger.experiment=exp1",
            "actor.optim.betas=[0.9,0.95]",
            "data.max_prompt_length=200",
        ],
        world_size=3,
    )
    assert cfg.actor.optim.lr == 1e-6 and isinstance(cfg.actor.optim.lr, float)
    assert cfg.parallel.tensor_model_parallel_size == 3
    assert (cfg.model.preset, cfg.model.max_seq_len, cfg.rollout.name) == (
        "smollm2_135m",
        1024,
        "hf",
    )
    assert cfg.logger.backends == ["console", "tensorboard"]
    assert cfg.trainer.output_dir == "runs/exp1"
    assert cfg.actor.optim.betas == (0.9, 0.95)


def test_world_size_comes_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert load_config(["parallel=tp2"]).parallel.tensor_model_parallel_size == 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=f"^{TP}"):
        load_config(["parallel=tp2"])


# What each algorithm preset must set (verl / the papers); the rest stays at the defaults.
ALGORITHMS = {
    "ppo": dict(adv_estimator="gae", n=1, use_kl_loss=False, use_kl_in_reward=True, critic=True),
    "grpo": dict(adv_estimator="grpo", n=4, use_kl_loss=True, kl_loss_type="low_var_kl"),
    "rloo": dict(adv_estimator="rloo", n=4, use_kl_in_reward=True),
    "reinforce_pp": dict(adv_estimator="reinforce_plus_plus", use_kl_in_reward=True),
    "dapo": dict(clip_ratio_high=0.28, dynamic_sampling=True, loss_agg_mode="token-mean"),
    "drgrpo": dict(
        adv_estimator="drgrpo", norm_adv=False, loss_agg_mode="seq-mean-token-sum-norm"
    ),
    "gspo": dict(
        policy_loss="gspo", loss_agg_mode="seq-mean-token-mean", clip_ratio_low=3e-4,
        clip_ratio_high=4e-4,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_algorithm_presets(name):
    cfg = load_config([f"algorithm={name}", "parallel=pp2"], world_size=2)
    want = ALGORITHMS[name]
    alg, actor = cfg.algorithm, cfg.actor
    got = dict(
        adv_estimator=alg.adv_estimator, n=cfg.rollout.n, use_kl_loss=actor.use_kl_loss,
        use_kl_in_reward=alg.use_kl_in_reward, kl_loss_type=actor.kl_loss_type,
        clip_ratio_low=actor.clip_ratio_low, clip_ratio_high=actor.clip_ratio_high,
        dynamic_sampling=alg.dynamic_sampling, loss_agg_mode=actor.loss_agg_mode,
        norm_adv=alg.norm_adv_by_std_in_grpo, policy_loss=actor.policy_loss,
        critic=uses_critic(alg),
    )  # fmt: skip
    assert alg.name == name
    assert {k: got[k] for k in want} == want


@pytest.mark.parametrize(
    "preset, world",
    [("single", 1), ("tp2", 2), ("pp2", 2), ("tp2_sp", 2), ("tp2_pp2", 4), ("vpp", 2), ("vpp", 4)],
)
def test_parallel_presets_validate_at_their_world_size(preset, world):
    cfg = load_config([f"parallel={preset}"], world_size=world)
    p = cfg.parallel
    assert world % (p.tensor_model_parallel_size * p.pipeline_model_parallel_size) == 0


@pytest.mark.parametrize(
    "model",
    ["tiny_llama", "tiny_llama_tied", "tiny_qwen2", "tiny_mistral", "tiny_qwen3", "smollm2_135m"],
)
def test_model_presets(model):
    assert load_config([f"model={model}"], world_size=1).model.preset == model


@pytest.mark.parametrize(
    "preset", ["tiny_llama", "tiny_llama_tied", "tiny_qwen2", "tiny_mistral", "tiny_qwen3"]
)
def test_preset_shapes_match_the_built_checkpoints(tiny_ckpt, preset):
    """The cheap preset table agrees with the config.json of the checkpoint actually built."""
    table = read_model_args(ModelConfig(preset=preset))
    built = read_model_args(ModelConfig(path=str(tiny_ckpt(preset))))
    assert table == built


@pytest.mark.parametrize(
    "preset",
    ["qwen2_0p5b", "llama3_1b", "llama3_8b", "llama2_7b", "llama3_70b", "qwen3_0p6b", "qwen3_8b"],
)
def test_shape_dirs_match_the_preset_table(tmp_path, preset):
    """A shape preset's weightless directory (model.random_init) has the table's exact shape,
    and its model file names the same preset."""
    built = archs.ensure_preset_dir(preset, tmp_path, weights=False)
    assert not list(built.glob("*.safetensors"))
    assert read_model_args(ModelConfig(path=str(built))) == read_model_args(
        ModelConfig(preset=preset)
    )
    cfg = load_config([f"model={preset}"] if preset != "llama3_70b" else [], world_size=1)
    assert preset == "llama3_70b" or (cfg.model.preset, cfg.model.random_init) == (preset, True)


def test_a_shape_cut_to_its_first_layers(tmp_path):
    """model.num_layers: the weightless directory and the preset table agree on the cut shape,
    MoE layer pattern included; the run's model dir is that directory."""
    model = load_config(["model=qwen3_30b_a3b", "model.num_layers=3"], world_size=1).model
    table = read_model_args(model)
    built = archs.model_dir(model, tmp_path)
    assert built.name == "qwen3_30b_a3b_3l_shape"
    assert read_model_args(ModelConfig(path=str(built))) == table
    full = read_model_args(ModelConfig(preset="qwen3_30b_a3b"))
    assert table.num_layers == 3 and table.moe_layer_pattern() == full.moe_layer_pattern()[:3]
    assert table.num_experts == full.num_experts


def test_shape_presets_need_a_path_or_random_init():
    from archs import check_model_source

    # random_init=true there
    check_model_source(load_config(["model=llama2_7b"], world_size=1).model)
    with pytest.raises(ConfigError, match=r"^model.preset: 'llama2_7b' is a shape only"):
        check_model_source(
            load_config(["model=llama2_7b", "model.random_init=false"], world_size=1).model
        )
    with pytest.raises(ConfigError, match=r"^model.path: /nonexistent: no HF checkpoint at"):
        load_config(["model.path=/nonexistent"], world_size=1)


# ---- the catalogue of bad configs: (overrides, world size, key the message starts with) ----
BAD = [
    # unknown keys and wrong types (found by hydra/omegaconf against the schema)
    (["actor.optim.lrr=1e-6"], 1, "actor.optim.lrr"),
    (["+critic.optim.foo=1"], 1, "critic.optim.foo"),
    (["trainer.totl_steps=5"], 1, "trainer.totl_steps"),
    (["actor.optim.lr=fast"], 1, "actor.optim.lr"),
    (["rollout.n=2.5"], 1, "rollout.n"),
    (["parallel.sequence_parallel=maybe"], 1, "parallel.sequence_parallel"),
    (["actor.optim=3"], 1, "actor.optim"),
    (["actor.optim.lr"], 1, "actor.optim.lr"),
    (["model=tiny_gpt"], 1, "model"),
    (["trainer.output_dir=runs/${nope}"], 1, "trainer.output_dir"),
    # training layout
    ([f"{TP}=3"], 3, TP),  # 4 heads
    (["model=smollm2_135m", "parallel=tp2"], 2, TP),  # 9 heads
    ([f"{PP}=3"], 3, PP),  # 4 layers
    (["parallel=tp2_pp2"], 2, TP),  # world 2 < TP×PP 4
    (["parallel=vpp", f"{VPP}=4"], 2, VPP),  # 4 layers < PP 2 × VPP 4
    ([f"{VPP}=2"], 1, VPP),  # VPP needs PP > 1
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel"),
    # rollout layout
    (["rollout.tensor_model_parallel_size=2"], 1, "rollout.tensor_model_parallel_size"),
    (["rollout.tensor_model_parallel_size=8"], 8, "rollout.tensor_model_parallel_size"),
    # batch sizes
    (["algorithm=ppo", "data.train_batch_size=3", "actor.ppo_mini_batch_size=1"], 2, "data.train_batch_size"),
    (["actor.ppo_mini_batch_size=3"], 1, "actor.ppo_mini_batch_size"),
    (["algorithm=ppo", "actor.ppo_mini_batch_size=1"], 2, "actor.ppo_mini_batch_size"),
    (["actor.micro_batch_size=3"], 1, "actor.micro_batch_size"),
    (["algorithm=ppo", "critic.micro_batch_size=3"], 1, "critic.micro_batch_size"),
    (["parallel=vpp", "actor.micro_batch_size=32"], 2, "actor.micro_batch_size"),
    # lengths
    (["rollout.response_length=250"], 1, "model.max_seq_len"),
    (["model.max_seq_len=1024"], 1, "model.max_seq_len"),
    (["actor.use_dynamic_bsz=true", "actor.max_tokens_per_microbatch=100"], 1, "actor.max_tokens_per_microbatch"),
    (["model.preset=tiny_gpt"], 1, "model.preset"),
    # enumerated choices
    (["model.dtype=float16"], 1, "model.dtype"),
    (["model.layer_spec=flash"], 1, "model.layer_spec"),
    (["data.overlong_prompt=truncate"], 1, "data.overlong_prompt"),
    (["actor.loss_agg_mode=sum"], 1, "actor.loss_agg_mode"),
    (["actor.kl_loss_type=k9"], 1, "actor.kl_loss_type"),
    (["critic.optim.lr_decay_style=step"], 1, "critic.optim.lr_decay_style"),
    (["algorithm.kl_ctrl_type=pid"], 1, "algorithm.kl_ctrl_type"),
    (["logger.backends=[console,mlflow]"], 1, "logger.backends"),
    (["actor.old_log_prob_pass=never"], 1, "actor.old_log_prob_pass"),
    # numeric ranges
    (["actor.optim.lr=-1e-6"], 1, "actor.optim.lr"),
    (["actor.clip_ratio_low=0"], 1, "actor.clip_ratio_low"),
    (["actor.clip_ratio_c=1.0"], 1, "actor.clip_ratio_c"),
    (["rollout.n=0"], 1, "rollout.n"),
    (["rollout.temperature=-0.1"], 1, "rollout.temperature"),
    (["rollout.top_p=0"], 1, "rollout.top_p"),
    (["rollout.top_p=1.5"], 1, "rollout.top_p"),
    (["rollout.response_length=0"], 1, "rollout.response_length"),
    (["actor.log_prob_micro_batch_size=0"], 1, "actor.log_prob_micro_batch_size"),
    (["actor.optim.betas=[0.9,1.0]"], 1, "actor.optim.betas"),
    (["actor.optim.betas=[0.9]"], 1, "actor.optim.betas"),
    (["critic.optim.betas=[0.9,0.95,0.99]"], 1, "critic.optim.betas"),
    # names a registry owns (one per registry; tests/cpu/test_cli.py runs them as commands)
    (["rollout.name=vlm"], 1, "rollout.name"),
    (["reward.name=arth"], 1, "reward.name"),
    (["reward.fn=nomodule"], 1, "reward.fn"),
    (["reward.fn=no_such_module:score"], 1, "reward.fn"),
    (["reward.fn=json:nothing"], 1, "reward.fn"),
    (["reward.fn=json:__doc__"], 1, "reward.fn"),
    (["actor.policy_loss=vanila"], 1, "actor.policy_loss"),
    (["algorithm.adv_estimator=gpro"], 1, "algorithm.adv_estimator"),
    (["algorithm.kl_penalty=k9"], 1, "algorithm.kl_penalty"),
    (["algorithm.name=bogus"], 1, "algorithm.name"),
    # dynamic micro-batches of the critic
    (["algorithm=ppo", "critic.use_dynamic_bsz=true", "critic.max_tokens_per_microbatch=100"], 1, "critic.max_tokens_per_microbatch"),
    # context parallelism and packing
    (["parallel.context_parallel_size=2"], 3, TP),  # world 3, TP×PP×CP 2
    (["parallel.context_parallel_size=2", "model.layer_spec=local"], 2, "parallel.context_parallel_size"),
    (["parallel.context_parallel_size=2", "actor.strategy=fsdp2"], 2, "parallel.context_parallel_size"),
    (["model.pack_sequences=true", "model.layer_spec=local"], 1, "model.pack_sequences"),
    (["model.pack_sequences=true", "actor.strategy=fsdp2"], 1, "model.pack_sequences"),
    (["parallel.context_parallel_size=0"], 1, "parallel.context_parallel_size"),
    # multi-turn tools
    (["rollout.multi_turn.enable=true"], 1, "rollout.multi_turn.tools"),
    (["rollout.multi_turn.enable=true", "rollout.multi_turn.tools=[calculatr]"], 1, "rollout.multi_turn.tools"),
    (["rollout.multi_turn.enable=true", "rollout.multi_turn.tools=[nomodule:tool]"], 1, "rollout.multi_turn.tools"),
    (["rollout.multi_turn.enable=true", "rollout.multi_turn.tools=[calculator]", "rollout.multi_turn.format=json"], 1, "rollout.multi_turn.format"),
    (["rollout.multi_turn.max_turns=0"], 1, "rollout.multi_turn.max_turns"),
    (["rollout.multi_turn.tool_timeout_s=0"], 1, "rollout.multi_turn.tool_timeout_s"),
    # algorithm needs
    (["algorithm=grpo", "rollout.n=1"], 1, "rollout.n"),
    (["algorithm=dapo", "rollout.n=1"], 1, "rollout.n"),
]  # fmt: skip


@pytest.mark.parametrize(
    "overrides, world, key", BAD, ids=[" ".join(o) + f" @{w}" for o, w, _ in BAD]
)
def test_bad_config_fails_naming_the_key(overrides, world, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides, world_size=world)
    message = str(info.value)
    assert message.startswith(key + ":") or message.startswith(key + " ×"), message
    # every further problem is a line of its own, also led by a key
    assert all(line.split(":")[0].split(" ")[0] for line in message.splitlines())


def test_choice_errors_list_the_allowed_values():
    with pytest.raises(ConfigError) as info:
        load_config(["actor.loss_agg_mode=sum"], world_size=1)
    assert all(mode in str(info.value) for mode in CHOICES["actor.loss_agg_mode"])


@pytest.mark.parametrize("alias", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_estimator_aliases_are_accepted(alias):
    cfg = load_config(
        [f"actor.kl_loss_type={alias}", f"algorithm.kl_penalty={alias}"], world_size=1
    )
    assert cfg.actor.kl_loss_type == alias


@pytest.mark.parametrize(
    "overrides, needed",
    [
        ([], False),  # GRPO's default: 8 prompts, one mini-batch of 8, one epoch
        (["actor.old_log_prob_pass=always"], True),
        (["actor.ppo_mini_batch_size=4"], True),  # the second mini-batch is off-policy
        (["actor.ppo_epochs=2"], True),
        (["algorithm=ppo"], True),  # its KL penalty in the reward reads them first
        (["algorithm=ppo", "algorithm.use_kl_in_reward=false"], False),  # critic, GAE do not
        (["trainer.debug_check_weight_sync=true"], True),  # compared with the engine's first
        (["algorithm=dapo"], False),  # refilled groups keep the batch at train_batch_size
    ],
)
def test_old_log_prob_pass_runs_only_when_the_update_cannot_stand_in(overrides, needed):
    from trainer.loop import old_log_probs_needed

    assert old_log_probs_needed(load_config(overrides, world_size=1)) is needed


def test_critic_dynamic_batches_skip_the_micro_batch_rule():
    # 3 does not divide the 8 sequences per rank, which a token budget does not need
    overrides = ["algorithm=ppo", "critic.micro_batch_size=3"]
    load_config([*overrides, "critic.use_dynamic_bsz=true"], world_size=1)


def test_unknown_key_error_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        load_config(["actor.optim.lrr=1e-6"], world_size=1)
    assert "unknown key" in str(info.value) and "lr_decay_style" in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(["rollout.n=0", "rollout.top_p=2", "model.dtype=fp8"], world_size=1)
    keys = [line.split(":")[0] for line in str(info.value).splitlines()]
    assert keys == ["model.dtype", "rollout.n", "rollout.top_p"]


def test_model_path_is_read_from_config_json(tmp_path):
    hf = dict(
        model_type="llama", num_hidden_layers=6, hidden_size=192, num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=512, vocab_size=300, max_position_embeddings=128,
        rope_parameters={"rope_theta": 5e5},
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf))
    args = model_args_from_hf(hf)
    assert (args.kv_channels, args.rope_theta, args.num_query_groups) == (32, 5e5, 2)
    base = [f"model.path={tmp_path}", "model.max_seq_len=128"]
    assert load_config(base + ["parallel=tp2_pp2"], world_size=4).model.path == str(tmp_path)
    cases = [
        (["parallel.tensor_model_parallel_size=4"], 4, TP),  # 4 does not divide 6 heads
        ([f"{PP}=4"], 4, PP),  # 4 does not divide 6 layers
        (["rollout.tensor_model_parallel_size=4"], 4, "rollout.tensor_model_parallel_size"),
        (["model.max_seq_len=256"], 1, "model.max_seq_len"),  # > 128 positions
    ]
    for overrides, world, key in cases:
        with pytest.raises(ConfigError, match=f"^{key}"):
            load_config(base + overrides, world_size=world)
    with pytest.raises(ConfigError, match="^model.path"):
        load_config([f"model.path={tmp_path / 'missing'}"], world_size=1)


def test_check_config_with_given_model_args():
    cfg = load_config([], world_size=2)
    wide = ModelArgs(
        arch="llama", num_layers=6, hidden_size=384, num_attention_heads=6, num_query_groups=6,
        ffn_hidden_size=768, vocab_size=256, kv_channels=64, max_position_embeddings=4096,
    )  # fmt: skip
    tp3 = replace(cfg.parallel, tensor_model_parallel_size=3)
    check_config(replace(cfg, parallel=tp3), world_size=3, model_args=wide)
    with pytest.raises(ConfigError, match=f"^{TP}: 3 does not divide the model's 4 attention"):
        check_config(replace(cfg, parallel=tp3), world_size=3)  # the preset: 4 heads


def test_to_structured_rejects_plain_dicts_with_unknown_keys():
    assert to_structured({"rollout": {"n": 8}}).rollout.n == 8
    with pytest.raises(ConfigError, match="^rollout.nn: unknown key"):
        to_structured({"rollout": {"nn": 8}})


def test_tables_name_real_keys():
    cfg = TandemConfig()
    for key in [*CHOICES, *RANGES]:
        section, *rest = key.split(".")
        node = getattr(cfg, section)
        for part in rest:
            node = getattr(node, part)  # AttributeError = a typo in the table


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_validation_is_pure(monkeypatch, tmp_path):
    """Loading and validating builds no model, writes no checkpoint, runs no tensor op."""
    import archs.checkpoints as checkpoints
    import tandem_core.models as models

    def forbidden(*args, **kwargs):
        raise AssertionError("validation must not build anything")

    monkeypatch.setattr(models, "build_gpt_model", forbidden)
    monkeypatch.setattr(checkpoints, "build_tiny_checkpoint", forbidden)
    monkeypatch.setattr(checkpoints, "ensure_preset_dir", forbidden)
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    with _CountOps() as counter:
        load_config(["model=smollm2_135m", "algorithm=ppo"], world_size=1)
        for overrides, world, _ in BAD[::6]:  # a sample across the catalogue
            with pytest.raises(ConfigError):
                load_config(overrides, world_size=world)
        torch.zeros(1)  # the counter itself works
    assert counter.ops == ["aten.zeros.default"], counter.ops
    assert list(tmp_path.iterdir()) == []


def test_works_while_hydra_is_initialised_elsewhere(tmp_path):
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    (tmp_path / "other.yaml").write_text("a: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        outer = GlobalHydra.instance().hydra
        assert load_config(["algorithm=rloo"], world_size=1).algorithm.name == "rloo"
        assert GlobalHydra.instance().hydra is outer


def test_strategy_choices_are_the_registered_strategies():
    """The config check names the training strategies trainer/build.py registers (it cannot
    import the builders: they pull in megatron, vLLM and the engines)."""
    from trainer.build import STRATEGIES
    from trainer.config_check import CHOICES

    assert set(CHOICES["actor.strategy"]) == set(CHOICES["critic.strategy"]) == set(STRATEGIES)
