"""PolicyActor vs plain transformers/PyTorch for each parallel layout (workers/actor_check.py),
dense and Qwen3-MoE (expert parallel; transformers' stacked experts compared one by one), and
the FSDP2 strategy at DP 1 and 2, and packed micro-batches (model.pack_sequences):
log-probs and entropy of the response tokens, and the parameters after one PPO update (two
mini-batches; clip, entropy bonus, k3 KL loss; AdamW + clipping) with micro-batches of 1 and 4.
"""

import pytest
from conftest import run_cases, run_torchrun, some_slow

TOL = 1e-5
LAYOUTS = {  # name: (processes, arch, TP, PP, SP[, VPP (0: none)[, EP]])
    "tp1": (1, "tiny_llama", 1, 1, 0),
    # the LM head and the embedding one weight: its fused gradient must not drop the embedding's
    "tp1_tied": (1, "tiny_llama_tied", 1, 1, 0),
    "tp2": (2, "tiny_llama", 2, 1, 0),
    "pp2": (2, "tiny_qwen2", 1, 2, 0),
    "tp2_sp": (2, "tiny_llama", 2, 1, 1),
    "dp2": (2, "tiny_llama", 1, 1, 0),
    # interleaved 1F1B: 4 micro-batches per mini-batch reach the schedule's steady state
    "pp2_vpp2": (2, "tiny_mistral", 1, 2, 0, 2),
    # Qwen3-MoE: experts split over two data-parallel ranks, tokens by all-to-all
    "ep2_moe": (2, "tiny_qwen3_moe", 1, 1, 0, 0, 2),
    "tp2_sp_moe": (2, "tiny_qwen3_moe", 2, 1, 1),
}


CP_LAYOUTS = {  # name: (layout of LAYOUTS, packed, activation recompute)
    "cp2": ("tp1", False, False),
    "cp2_tp2_sp": ("tp2_sp", False, False),
    "cp2_pp2": ("pp2", False, False),
    "cp2_packed": ("tp1", True, False),
    "cp2_tp2_sp_packed": ("tp2_sp", True, False),
    "cp2_pp2_packed": ("pp2", True, False),
    # what long sequences run with: CP and megatron's full recompute (actor.activation_checkpointing)
    "cp2_recompute": ("tp1", False, True),
}

# Each check's layouts, those in the slow set, and so the fast set's (check, layout) pairs.
PARAMS = {
    "padded": list(LAYOUTS),
    "fsdp2": [1, 2],
    "packed": ["tp1", "tp2_sp", "pp2", "ep2_moe"],
    "on_policy": ["dp2", "pp2", "ep2_moe"],
    "cp": list(CP_LAYOUTS),
}
SLOW = {
    "padded": {"tp1", "tp2", "pp2", "dp2", "tp2_sp_moe"},
    "fsdp2": {1},
    "packed": {"tp2_sp", "pp2", "ep2_moe"},
    "on_policy": {"pp2", "ep2_moe"},
    "cp": set(CP_LAYOUTS) - {"cp2_recompute"},
}
FAST = {
    (check, name) for check, names in PARAMS.items() for name in names if name not in SLOW[check]
}


def _case(check: str, layout) -> tuple[int, list, dict]:
    """(ranks, actor_check.py's arguments, its environment) of one check in one layout."""
    if check == "fsdp2":
        return layout, ["tiny_llama", 1, 1, 0], {"STRATEGY": "fsdp2"}
    if check == "cp":
        base, packed, recompute = CP_LAYOUTS[layout]
        nproc, *argv = LAYOUTS[base]
        return nproc * 2, argv, {"CP": 2, "PACK": int(packed), "RECOMPUTE": int(recompute)}
    nproc, *argv = LAYOUTS[layout]
    return nproc, argv, {"padded": {}, "packed": {"PACK": 1}, "on_policy": {"ON_POLICY": 1}}[check]


@pytest.fixture(scope="module")
def fast_results(tiny_ckpt) -> dict:
    """Every check of the fast set, in two torchrun launches (1 and 2 ranks; conftest's
    run_cases) instead of one each: a launch's imports cost more than these checks."""
    cases = {f"{check}:{layout}": _case(check, layout) for check, layout in sorted(FAST, key=str)}
    for _, argv, _ in cases.values():
        tiny_ckpt(argv[0])  # built once here, not by every rank at once
    return run_cases("actor_check.py", cases)


def _result(check: str, layout, request, tiny_ckpt) -> dict:
    if (check, layout) in FAST:
        return request.getfixturevalue("fast_results")[f"{check}:{layout}"]
    nproc, argv, env = _case(check, layout)
    tiny_ckpt(argv[0])
    return run_torchrun(
        "actor_check.py", nproc, *map(str, argv), env={k: str(v) for k, v in env.items()}
    )


@pytest.mark.parametrize("layout", some_slow(PARAMS["padded"], SLOW["padded"]))
def test_actor_matches_transformers(layout, request, tiny_ckpt):
    """Weight gradients go through megatron's gradient-accumulation fusion (counted)."""
    res = _result("padded", layout, request, tiny_ckpt)
    assert res["logprob_err"] < TOL and res["entropy_err"] < TOL, res
    assert set(res["param_err"]) == {"1", "4"}, res
    assert all(err < TOL for err in res["param_err"].values()), res
    assert res["fused_wgrads"] > 0, res


@pytest.mark.parametrize("nproc", some_slow(PARAMS["fsdp2"], SLOW["fsdp2"]))
def test_fsdp2_actor_matches_transformers_and_megatron(nproc, request, tiny_ckpt):
    """actor.strategy=fsdp2 (FSDP2 over every rank): log-probs and entropy equal transformers',
    one update equals the PyTorch reference and the megatron path's update on the same data."""
    res = _result("fsdp2", nproc, request, tiny_ckpt)
    assert res["logprob_err"] < TOL and res["entropy_err"] < TOL, res
    assert all(err < TOL for err in res["param_err"].values()), res
    assert res["vs_megatron"] < TOL, res


@pytest.mark.parametrize("layout", some_slow(PARAMS["packed"], SLOW["packed"]))
def test_packed_actor_matches_transformers(layout, request, tiny_ckpt):
    """model.pack_sequences: each micro-batch one packed row (attention within each sequence,
    RoPE restarting), rows of random lengths; the same references as the padded path, so
    packed equals padded to 1e-5 (log-probs, entropy, one update)."""
    res = _result("packed", layout, request, tiny_ckpt)
    assert res["logprob_err"] < TOL and res["entropy_err"] < TOL, res
    assert all(err < TOL for err in res["param_err"].values()), res


@pytest.mark.parametrize("layout", some_slow(PARAMS["on_policy"], SLOW["on_policy"]))
def test_on_policy_step_equals_step_after_old_pass(layout, request, tiny_ckpt):
    """actor.old_log_prob_pass=auto: one optimizer step over a batch without old log-probs
    (the update's own, detached) moves the weights as the step given the old pass's
    log-probs, and reports that pass's entropy and train/rollout gap; ratio 1 exactly."""
    res = _result("on_policy", layout, request, tiny_ckpt)
    assert res["param_err"] < 1e-6 and res["grad_norm_err"] < 1e-5, res
    assert res["entropy_err"] < 1e-6 and res["gap_err"] < 1e-6, res
    assert res["ppo_kl"] == 0.0 and res["pg_clipfrac"] == 0.0, res
    assert res["refused_two_steps"], res


@pytest.mark.parametrize("layout", some_slow(PARAMS["cp"], SLOW["cp"]))
def test_context_parallel_actor_matches_transformers(layout, request, tiny_ckpt):
    """parallel.context_parallel_size=2: each sequence's two chunks per rank, K/V gathered over
    CP, each rank's LM head on its own response rows; the same references as CP 1, so CP 2
    equals CP 1 to 1e-5 (log-probs, entropy, one update), alone, with TP 2 + SP and with PP 2
    (those on 4 ranks), with packed micro-batches (a packed row cut over CP, attention kept
    within each sequence; also with TP 2 + SP and with PP 2), and with megatron's full
    activation recompute."""
    res = _result("cp", layout, request, tiny_ckpt)
    recompute = CP_LAYOUTS[layout][2]
    assert res["logprob_err"] < TOL and res["entropy_err"] < TOL, res
    assert all(err < TOL for err in res["param_err"].values()), res
    assert (res["recomputed_layers"] > 0) == recompute, res


COMPILED_LAYOUTS = {  # name: (layout of LAYOUTS, extra env, layers compiled per worker)
    "tp1": ("tp1", {}, 4),
    "pp2": ("pp2", {}, 2),  # each stage its own two of the four
    "tp1_recompute": ("tp1", {"RECOMPUTE": "1"}, 4),
    "tp1_packed": ("tp1", {"PACK": "1"}, 4),
    "tp2_sp": ("tp2_sp", {}, 0),  # megatron's async backward collectives: left eager
}


@pytest.mark.parametrize("layout", some_slow(COMPILED_LAYOUTS, set(COMPILED_LAYOUTS)))
def test_compiled_layers_actor_matches_transformers(layout, torchrun, tiny_ckpt):
    """actor.compile_layers on the megatron strategy (`compile_dense_layers`): each dense layer
    traced by dynamo, run here by AOT autograd's eager backend (inductor's kernels are the GPU
    suite's), equals the same references to 1e-5; layouts left eager (TP > 1) stay so."""
    base, env, per_worker = COMPILED_LAYOUTS[layout]
    nproc, arch, *layout_args = LAYOUTS[base]
    tiny_ckpt(arch)
    res = torchrun(
        "actor_check.py", nproc, arch, *map(str, layout_args), env={"COMPILE": "aot_eager", **env}
    )
    assert res["logprob_err"] < TOL and res["entropy_err"] < TOL, res
    assert all(err < TOL for err in res["param_err"].values()), res
    assert res["compiled_layers"] == [per_worker] * 3, res  # the log-prob worker, then mbs 1, 4
    assert (res["graphs"] > 0) == (per_worker > 0), res
