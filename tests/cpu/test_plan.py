"""The memory planner: its counts against real megatron-core, transformers and autograd, the
shipped Llama-3-70B layout accepted, and a catalogue of impossible 70B layouts refused, each
naming the phase or the config key that breaks."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archs import read_model_args
from archs.llama import LLAMA3_70B
from tandem_core.config import ConfigError, ModelConfig
from trainer import plan as P
from trainer.config_check import load_config
from trainer.plan import generation as G
from trainer.plan import terms as PM
from trainer.plan import training as PT
from trainer.plan.__main__ import main as plan_main

REPO = Path(__file__).resolve().parents[2]
TP, PP = "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size"
VPP, RTP = "parallel.virtual_pipeline_model_parallel_size", "rollout.tensor_model_parallel_size"
H100 = P.H100_80GB_GIB
M70 = LLAMA3_70B


def shipped_overrides() -> list[str]:
    """The defaults slurm/ppo_70b.sh passes to the trainer (one source of truth)."""
    text = (REPO / "slurm" / "ppo_70b.sh").read_text()
    block = re.search(r"^DEFAULTS=\((.*?)^\)", text, re.S | re.M).group(1)
    return block.split()


def plan70(extra=(), world=32, gpu=H100):
    cfg = load_config([*shipped_overrides(), *extra], world_size=world)
    return P.plan_or_raise(cfg, world, gpu)


# ---- counts against the real parts ---------------------------------------------------------------
def test_llama3_70b_parameter_count_matches_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    a = LLAMA3_70B
    hf = LlamaConfig(
        hidden_size=a.hidden_size,
        intermediate_size=a.ffn_hidden_size,
        num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_query_groups,
        vocab_size=a.vocab_size,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(hf)
    count = sum(p.numel() for p in model.parameters())
    assert count == PM.total_params(M70) == 70_553_706_496
    # vLLM at TP 1 holds the same (its 128256 vocab is already a multiple of 64).
    assert G.engine_params(M70, 1) == count


def test_70b_rank_counts_split_the_model():
    # Every (TP, PP) rank together holds the model once, plus megatron's vocab padding.
    for tp, pp in ((8, 4), (4, 8), (8, 1), (2, 16)):
        ranks = tp * sum(PM.stage_params(M70, tp, pp, s) for s in range(pp))
        padding = 2 * (M70.padded_vocab_size(tp) - M70.vocab_size) * M70.hidden_size
        norms = (tp - 1) * (2 * M70.num_layers + 1) * M70.hidden_size  # replicated over TP
        assert ranks == PM.total_params(M70) + padding + norms
    # vLLM replicates the 8 KV heads beyond TP 8: each rank of TP 16 keeps one.
    assert G.engine_kv_heads(M70, 16) == 1 and G.engine_kv_heads(M70, 4) == 2


MEASURE = """
import json, sys, torch
from archs import read_model_args
from tandem_core import cpu_compat
from tandem_core.config import ModelConfig, ParallelConfig
from tandem_core.distributed import init_distributed, init_model_parallel
from tandem_core.models import build_gpt_model, build_transformer_config

init_distributed()
init_model_parallel(ParallelConfig())
result = {}
for preset in sys.argv[1:]:
    m = read_model_args(ModelConfig(preset=preset))
    model = build_gpt_model(m, build_transformer_config(m, ParallelConfig()), "sdpa")
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    b, s = 2, 64
    with cpu_compat.megatron_device_scope():
        hidden = torch.randn(s, b, m.hidden_size, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.decoder(hidden, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(s))
    result[preset] = dict(
        params=sum(p.numel() for p in model.parameters()),
        saved_per_token_layer=sum(saved.values()) / (b * s * m.num_layers),
    )
print("RESULT" + json.dumps(result))
"""


@pytest.fixture(scope="module")
def megatron_counts():
    """Parameters and the bytes autograd saves per token and layer, of real megatron GPTModels
    built with Tandem's sdpa spec (fp32, one rank). In a child process: megatron on CPU patches
    torch.cuda process-wide, which the rest of the suite must not see."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, "tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_qwen3_moe"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def test_counts_match_a_real_megatron_model(megatron_counts, preset):

    m = read_model_args(ModelConfig(preset=preset))
    measured = megatron_counts[preset]
    assert measured["params"] == PM.stage_params(m, 1, 1, 0)
    formula = PT.activation_bytes_per_token(m, tp=1, sp=False, dtype_bytes=4)
    # An upper bound within 3 % (3.5 % for tiny_qwen3, whose hidden size is small beside its
    # attention widths): autograd keeps one [s, b, h] tensor per layer fewer than the 6h counted
    # for the two norms, which the model's input and RoPE's angle table (kept once, per
    # position) make up in part.
    saved = measured["saved_per_token_layer"]
    assert saved <= formula <= saved * (1.035 if m.qk_norm else 1.03), (saved, formula)


def test_moe_counts_match_megatron_and_transformers(megatron_counts, tiny_ckpt):
    """Experts, router and the dense layer among them: one rank's parameters as megatron builds
    them (grouped experts), and the whole model's as transformers counts it."""
    from transformers import AutoModelForCausalLM

    m = read_model_args(ModelConfig(preset="tiny_qwen3_moe"))
    assert megatron_counts["tiny_qwen3_moe"]["params"] == PM.stage_params(m, 1, 1, 0)
    hf = AutoModelForCausalLM.from_pretrained(tiny_ckpt("tiny_qwen3_moe"))
    assert sum(p.numel() for p in hf.parameters()) == PM.total_params(m)
    # at EP 2 a rank holds half of each layer's experts
    experts = PM.stage_expert_params(m, 1, 1, 0)
    assert PM.stage_params(m, 1, 1, 0) - PM.stage_params(m, 1, 1, 0, ep=2) == experts // 2
    # transformers counts 30,532,122,624 for the Qwen3-30B-A3B config (on the meta device)
    assert PM.total_params(read_model_args(ModelConfig(preset="qwen3_30b_a3b"))) == 30_532_122_624


def test_fused_swiglu_keeps_its_input_and_output_only():
    """megatron's fused SwiGLU (on CUDA) saves fc1's output 2f; fc2 saves its input f: 3f,
    where the unfused gate, silu(gate) and product add 2f more."""

    m = read_model_args(ModelConfig(preset="llama3_70b"))
    unfused = PT.activation_bytes_per_token(m, tp=8, sp=True, dtype_bytes=2)
    fused = PT.activation_bytes_per_token(m, tp=8, sp=True, dtype_bytes=2, fused_swiglu=True)
    assert unfused - fused == 2 * m.ffn_hidden_size * 2 / 8


def test_pipeline_in_flight_counts():
    # 1F1B: the first stage holds pp micro-batches of L/pp layers = L; the last one.
    assert PT.layer_microbatches_in_flight(80, 4, None, 0, 16) == 80
    assert PT.layer_microbatches_in_flight(80, 4, None, 3, 16) == 20
    assert PT.layer_microbatches_in_flight(80, 4, None, 0, 2) == 40  # fewer micro-batches
    # Interleaved: L × (1 + (p-1)/(p·v)) on the first stage (Korthikanti et al. 2022).
    assert PT.layer_microbatches_in_flight(80, 4, 5, 0, 16) == pytest.approx(80 * (1 + 3 / 20))
    assert PT.layer_microbatches_in_flight(80, 1, None, 0, 1) == 80


# ---- the shipped layout -------------------------------------------------------------------------
def test_shipped_70b_layout_fits_80gb_gpus():
    plan = plan70()
    training, swap, generation = plan.phases
    assert [p.name for p in plan.phases] == ["training", "swap", "generation"]
    assert all(p.total_gib < H100 - 5 for p in plan.phases), plan.table()  # a 5 GiB margin
    assert not plan.failures() and not any(p.problems for p in plan.phases)
    terms = {t.name: t.gib for t in training.terms}
    # Stage 0 at TP 8: 20 layers of 855.6M/8 + the embedding 129024 (padded) × 8192 / 8.
    stage0 = 20 * ((8192 * 10240 + 8192 * 8192 + 3 * 8192 * 28672) // 8 + 2 * 8192)
    stage0 += 129024 * 8192 // 8
    assert terms["actor weights"] == pytest.approx(stage0 * 2 / 2**30)
    assert terms["actor grads (fp32 main_grad)"] == pytest.approx(stage0 * 4 / 2**30)
    assert terms["actor Adam states (fp32 m, v)"] == pytest.approx(stage0 * 8 / 2**30)
    assert terms["reference weights"] == pytest.approx(stage0 * 2 / 2**30)  # GRPO's KL loss
    gen = {t.name: t.gib for t in generation.terms}
    assert gen["actor weights, all PP stages (AllGatherPPModel)"] == pytest.approx(16.43, abs=0.01)
    assert gen["engine weights at rollout TP 8"] == pytest.approx(16.43, abs=0.01)
    # 64 prompts × 8 samples over 4 engines of TP 8: 128 sequences of 4096 tokens, 40 KiB each.
    assert gen["KV cache for the batch"] == pytest.approx(128 * 4096 * 40 * 1024 / 2**30)
    assert "training" in plan.table() and "DOES NOT FIT" not in plan.table()


def test_fsdp2_terms_shard_the_whole_state_over_dp():
    """actor.strategy=fsdp2: fp32 parameter shards (the master weights), grads and Adam states
    all / DP, the gathered root and two layers in the compute dtype, logits at every position;
    nothing gathered in the swap but one streamed tensor; generation keeps shards and Adam."""
    over = ["algorithm=grpo", "model=smollm2_135m"]
    cfg = load_config(over + ["actor.strategy=fsdp2", "model.dtype=bfloat16"], world_size=8)
    m = read_model_args(cfg.model)
    training, swap, generation = P.plan_memory(cfg, 8, H100, m).phases
    n = PM.total_params(m)
    terms = {t.name: t.gib for t in training.terms}
    assert terms["actor fp32 master weights (parameter shards)"] == pytest.approx(n * 4 / 8 / 2**30)
    assert terms["actor grads (fp32, sharded)"] == pytest.approx(n * 4 / 8 / 2**30)
    assert terms["actor Adam states (fp32 m, v)"] == pytest.approx(n * 8 / 8 / 2**30)
    # SmolLM2-135M: 30 layers of hidden 576, 9 heads / 3 KV heads of 64, FFN 1536, tied vocab
    layer = 576 * (576 + 2 * 192) + 576 * 576 + 3 * 576 * 1536 + 2 * 576
    root = 49152 * 576 + 576  # the tied embedding and the final norm
    assert n == 30 * layer + root
    assert terms["actor gathered root and two layers (FSDP2)"] == pytest.approx(
        (root + 2 * layer) * 2 / 2**30
    )
    assert terms["reference weights (fp32 shards)"] == pytest.approx(n * 4 / 8 / 2**30)
    swap_names = {t.name for t in swap.terms}
    assert "one full tensor in the sync stream" in swap_names
    assert not any("grads" in name or "gathered" in name for name in swap_names)
    gen = {t.name for t in generation.terms}
    assert "actor Adam states (fp32 m, v)" in gen and not any("AllGather" in x for x in gen)
    # the same run on megatron keeps whole bf16 weights and fp32 grads on every rank
    megatron = P.plan_memory(load_config(over + ["model.dtype=bfloat16"], world_size=8), 8, H100)
    assert training.total_gib < megatron.phases[0].total_gib


def test_long_responses_plan_context_parallel_and_recompute():
    """A 32k-token response of the 8B shape on two 139.8 GiB GPUs: CP 2 halves each rank's
    activations and logits, activation recompute keeps each layer's input and one layer's
    activations; without recompute it is refused before launch, with it at CP 2 it fits."""
    over = [
        "algorithm=grpo", "model=qwen3_8b", "actor.use_kl_loss=false", "rollout.n=2",
        "data.max_prompt_length=256", "rollout.response_length=32768", "model.max_seq_len=33024",
        "data.train_batch_size=1", "actor.ppo_mini_batch_size=1", "actor.micro_batch_size=1",
    ]  # fmt: skip
    h200 = 139.8

    def training(*extra):
        cfg = load_config([*over, *extra], world_size=2)
        return P.plan_memory(cfg, 2, h200).phases[0]

    cp1, cp2 = training(), training("parallel.context_parallel_size=2")
    recompute = training("parallel.context_parallel_size=2", "actor.activation_checkpointing=true")
    terms = [{t.name: t.gib for t in p.terms} for p in (cp1, cp2, recompute)]
    logits = "logits of one micro-batch and their grad"
    assert terms[1][logits] == pytest.approx(terms[0][logits] / 2)
    assert terms[1]["activations in flight"] == pytest.approx(terms[0]["activations in flight"] / 2)
    m = read_model_args(load_config(over, world_size=2).model)
    per_token = PT.activation_bytes_per_token(m, 1, False, 2, True, False)
    kept = (36 * m.hidden_size * 2 + per_token) * 33024 / 2 / 2**30
    name = "layer inputs in flight (activation recompute) and one layer's activations"
    assert terms[2][name] == pytest.approx(kept)
    assert cp2.total_gib > h200 and recompute.total_gib < h200
    with pytest.raises(P.PlanError, match="training"):
        P.plan_or_raise(
            load_config([*over, "parallel.context_parallel_size=2"], world_size=2), 2, h200
        )


def test_forward_only_micro_batches_count_when_they_need_more():
    """actor.log_prob_micro_batch_size: the log-prob pass keeps no activations for a backward,
    so up to some size it costs nothing over the update's own peak."""
    base = plan70().phases[0]
    assert plan70(["actor.log_prob_micro_batch_size=32"]).phases[0] == base
    big = plan70(["actor.log_prob_micro_batch_size=96"]).phases[0]
    names = [t.name for t in big.terms]
    assert "logits of one log-prob micro-batch" in names and "activations in flight" not in names
    assert big.total_gib > base.total_gib


def test_without_a_gpu_size_the_plan_only_informs():
    cfg = load_config([*shipped_overrides(), f"{PP}=1"], world_size=8)
    plan = P.plan_or_raise(cfg, 8, None)  # far over 80 GB, but no GPU to compare with
    assert plan.phases[0].total_gib > 150 and "no GPU to compare" in plan.table()
    with pytest.raises(ConfigError, match=f"^{PP}: 3 does not divide"):  # rules still apply
        P.plan_or_raise(load_config([*shipped_overrides(), f"{PP}=3"], world_size=24), 24, None)


def test_plan_is_pure():
    cfg = load_config(shipped_overrides(), world_size=32)
    before = copy.deepcopy(cfg)
    first = P.plan_memory(cfg, 32, H100)
    assert P.plan_memory(cfg, 32, H100) == first and cfg == before


# ---- the catalogue of impossible layouts ---------------------------------------------------------
SWAP_ONLY = [  # PPO's critic doubles the training state that is still there while gathering
    "algorithm=ppo",
    "critic.ppo_mini_batch_size=16",
    "critic.micro_batch_size=1",
    f"{TP}=4",
    f"{PP}=8",
    "rollout.response_length=512",
    "rollout.gpu_memory_utilization=0.29",
    "ref.offload_params=true",  # room for the critic's Adam states while generating
]
IMPOSSIBLE = [
    # (extra overrides, world, what the error must start with / contain)
    ([], 40, rf"^{TP} × {PP}: 8×4 = 32 does not divide the world size 40"),
    ([f"{TP}=3"], 24, rf"^{TP}: 3 does not divide the model's 64 attention heads"),
    ([f"{TP}=16"], 64, rf"^{TP}: 16 does not divide the model's 8 KV heads"),
    ([f"{PP}=3"], 24, rf"^{PP}: 3 does not divide the model's 80 layers"),
    ([f"{VPP}=3"], 32, rf"^{VPP}: {PP} × {VPP} = 4×3 does not divide the model's 80 layers"),
    ([f"{RTP}=3"], 32, rf"^{RTP}: 3 does not divide the world size 32"),
    (["data.max_prompt_length=2048"], 32, r"^model.max_seq_len: 4096 < data.max_prompt_length"),
    (["model.max_seq_len=16384"], 32, r"^model.max_seq_len: 16384 exceeds the model's max_pos"),
    (["data.train_batch_size=66"], 32, r"^actor.ppo_mini_batch_size: 16 does not divide"),
    # One node: the whole model's training state on 8 GPUs (18 bytes a parameter / 8).
    ([f"{PP}=1"], 8, r"^training phase: needs 18\d\.\d GiB per GPU > 79.1 GiB \(PP stage 0 of 1"),
    ([f"{PP}=2"], 16, r"^training phase: needs 10\d\.\d GiB .*actor Adam states"),
    # Without the distributed optimizer, DP 4 does not shard Adam's 8 + 4 bytes a parameter.
    (
        [f"{PP}=2", "parallel.use_distributed_optimizer=false"],
        64,
        r"^training phase: .*Adam states \(fp32 m, v\) 32\.9",
    ),
    # Activations with megatron's fused SwiGLU (3f of the MLP's 5f kept), as on the GPUs.
    (["actor.micro_batch_size=4"], 32, r"^training phase: .*largest: activations in flight 52"),
    (["parallel.sequence_parallel=false"], 32, r"^training phase: .*activations in flight 39"),
    (
        ["actor.use_dynamic_bsz=true", "actor.max_tokens_per_microbatch=16384"],
        32,
        r"^training phase: .*activations in flight",
    ),
    (
        ["algorithm=ppo", "critic.ppo_mini_batch_size=16", "critic.micro_batch_size=1"],
        32,
        r"^training phase: .*critic Adam states",
    ),
    (
        ["actor.log_prob_micro_batch_size=128"],
        32,
        r"^training phase: needs 8\d\.\d GiB .*forward-only log-prob pass 20\.9, .*"
        r"logits of one log-prob micro-batch 11\.8",
    ),
    (SWAP_ONLY, 64, r"^swap phase: needs 8\d\.\d GiB .*other PP stages' weights \(AllGather"),
    # TP 2 × PP 16: every rank gathers 70.55B / 2 parameters for generation.
    ([f"{TP}=2", f"{PP}=16"], 32, r"swap phase: needs 1\d\d\.\d GiB"),
    (["rollout=hf"], 32, r"^generation phase: needs 16\d\.\d GiB .*HF model \(whole, TP 1\) 131"),
    ([f"{RTP}=1"], 32, r"^generation phase: the engine's weights 131\.4 \+ workspace"),
    ([f"{RTP}=2"], 32, r"^generation phase: the engine's weights 65\.7"),
    (["rollout.gpu_memory_utilization=0.2"], 32, r"^generation phase: the engine's weights 16\.4"),
    (["rollout.gpu_memory_utilization=0.9"], 32, r"^generation phase: needs 9\d\.\d GiB .*vLLM"),
    (
        ["rollout.gpu_memory_utilization=0.239"],
        32,
        r"^generation phase: KV cache room 0\.\d\d GiB holds less than one model.max_seq_len",
    ),
]


@pytest.mark.parametrize(
    "extra, world, message", IMPOSSIBLE, ids=[f"{i:02d}" for i in range(len(IMPOSSIBLE))]
)
def test_impossible_70b_layouts_are_refused(extra, world, message):
    with pytest.raises(ConfigError) as err:
        plan70(extra, world)
    assert re.search(message, str(err.value), re.M), str(err.value)


def test_swap_only_case_fits_training_and_generation():
    """The AllGatherPPModel case above is refused for the swap alone: the planner's phases
    are separate checks, not one sum."""
    cfg = load_config([*shipped_overrides(), *SWAP_ONLY], world_size=64)
    training, swap, generation = P.plan_memory(cfg, 64, H100).phases
    assert training.total_gib < H100 < swap.total_gib and generation.total_gib < H100


def test_memory_refusals_are_plan_errors_with_the_table():
    with pytest.raises(P.PlanError) as err:
        plan70([f"{PP}=1"], 8)
    text = str(err.value)
    assert text.startswith("training phase") and "Memory plan: llama3_70b" in text
    assert "DOES NOT FIT" in text and "more pipeline stages" in text  # the hint


def test_cli(capsys):
    assert plan_main([*shipped_overrides(), "--world-size", "32", "--gpu-memory-gb", "79.1"]) == 0
    out = capsys.readouterr().out
    assert "world 32 = TP 8 × PP 4 × DP 1 (SP)" in out and out.count(": fits") == 3
    assert plan_main([*shipped_overrides(), f"{PP}=1", "--world-size", "8"]) == 2
    assert "python -m trainer.plan: error: training phase" in capsys.readouterr().err


def test_compare_with_a_run_takes_each_phase_peak(tmp_path):
    """`--measured metrics.jsonl`: per planned phase, the highest peak the run logged over its
    steps and over the trainer phases it covers; unmeasured phases are marked."""
    cfg = load_config(["model=tiny_llama"], world_size=1)
    plan = P.plan_memory(cfg, 1, H100)
    metrics = {
        1: {"memory/peak_gib/update_actor": 3.0, "memory/peak_gib/ref": 4.0},
        2: {"memory/peak_gib/update_actor": 3.5, "memory/peak_gib/generate": 20.0},
    }
    rows = {
        line.split()[0]: line.split() for line in P.compare_with_run(plan, metrics).splitlines()
    }
    training, _, generation = plan.phases
    assert float(rows["training"][2]) == 4.0 and rows["training"][-1] == "memory/peak_gib/ref"
    assert float(rows["training"][1]) == pytest.approx(training.total_gib, abs=0.01)
    assert float(rows["generation"][3][:-1]) == pytest.approx(generation.total_gib / 20, abs=0.01)
    assert "not measured" in " ".join(rows["swap"])
