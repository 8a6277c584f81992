"""The CUDA path with NCCL on 2, 4 and 8 GPUs: `make test-multigpu` (skips, saying so, without
GPUs; each test skips, naming the count it needs, when fewer GPUs are visible).

- 1 GPU: the MoE token dispatch without host synchronisations (and at 2 GPUs, EP 2);
  HybridEngine swaps with CUDA vLLM (training 1x1, rollout TP 1: the direct weight
  copies run against vLLM's own parameters), also for tiny_qwen3_moe (its experts copied
  into vLLM's fused w13/w2); a short GRPO run with CUDA graphs in the rollout
  (`rollout.enforce_eager=false`) across sleep/wake, and one of tiny_qwen3_moe with routing
  replay; test_kernels_cuda.py checks the fused log-prob kernels and the compiled RoPE;
- 2 GPUs: megatron TP=2, PP=2, TP=2+SP and DP=2 in bf16 equal one GPU on the same weights;
  HybridEngine swaps with CUDA vLLM (rollout TP 1 and 2) for training layouts 1x1 (DP=2), 2x1,
  1x2 (TPxPP) on tiny_llama, and tiny_qwen3_moe at EP 2 (experts all-gathered over EP into
  vLLM's stacks); a short GRPO run end to end (TP=2 training, rollout TP 1), and
  tiny_qwen3_moe's at EP 1 and EP 2, whose engine-vs-actor gaps must agree;
  checkpoint save → load → step, bitwise equal to an uninterrupted run at TP2, PP2, DP2;
- 4 GPUs: megatron parity for TP=4, TP2×PP2 and TP2×DP2; swaps for training layouts 4x1, 2x2,
  2x1 (DP=2) and 1x2 (DP=2) with rollout TP 1, 2 and 4 on tiny_llama_wide (8 heads / 8 KV
  heads); GRPO with TP2×PP2 training and rollout TP 4 on tiny_llama_wide;
- 8 GPUs: megatron parity for TP=8, TP4×PP2 and TP2×PP2×DP2; swaps for 8x1, 4x2 and 2x2 (DP=2)
  with rollout TP 2, 4 and 8.

Parity runs tests/cpu/workers/megatron_parity.py: its "gqa" model (4 heads / 2 KV groups) for
TP ≤ 2, its "wide" one (8 / 8) otherwise; with DP each rank runs a slice of the micro-batches.
bf16 tolerances: loss within 1% relative; each gradient's relative error ‖g − g_ref‖ / ‖g_ref‖
below 5% (bf16 has an 8-bit mantissa and the layouts sum partial products in different orders).
Swaps run tests/cpu/workers/he_check.py: engine log-probs equal the actor's after every sync
within 3e-3 (vLLM's attention computes fp32 matmuls in TF32), stale syncs detected, device
memory freed by enter measured.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_gpus

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
REPO = Path(__file__).resolve().parents[2]
HE_TOL = 3e-3
WIDE = "tiny_llama_wide"  # archs/llama.py: 8 heads and 8 KV heads, TP up to 8
MOE = "tiny_qwen3_moe"  # archs/qwen3_moe.py: 8 experts, top-2; vLLM's fused-MoE w13/w2

# ---- megatron parity: (world, TP, PP, SP, worker model); DP = world / (TP × PP) ----------------
PARITY_LAYOUTS = [
    pytest.param(2, 2, 1, 0, "gqa", id="tp2", marks=needs_gpus(2)),
    pytest.param(2, 1, 2, 0, "gqa", id="pp2", marks=needs_gpus(2)),
    pytest.param(2, 2, 1, 1, "gqa", id="tp2_sp", marks=needs_gpus(2)),
    pytest.param(2, 1, 1, 0, "gqa", id="dp2", marks=needs_gpus(2)),
    pytest.param(4, 4, 1, 0, "wide", id="tp4", marks=needs_gpus(4)),
    pytest.param(4, 2, 2, 0, "wide", id="tp2_pp2", marks=needs_gpus(4)),
    pytest.param(4, 2, 1, 0, "wide", id="tp2_dp2", marks=needs_gpus(4)),
    pytest.param(8, 8, 1, 0, "wide", id="tp8", marks=needs_gpus(8)),
    pytest.param(8, 4, 2, 0, "wide", id="tp4_pp2", marks=needs_gpus(8)),
    pytest.param(8, 2, 2, 0, "wide", id="tp2_pp2_dp2", marks=needs_gpus(8)),
]


# ---- swaps: (world, rollout TP, training layouts TPxPP, tiny preset or None for the default) --
def swap_runs(world: int, layouts: str, preset: str | None, rollout_tps: tuple[int, ...]):
    return [
        pytest.param(
            world,
            rtp,
            layouts,
            preset,
            id=f"{world}gpu-{preset or 'tiny_llama'}-rollout_tp{rtp}",
            marks=needs_gpus(world),
        )
        for rtp in rollout_tps
    ]


HE_RUNS = [
    *swap_runs(1, "1x1", None, (1,)),
    *swap_runs(1, "1x1", MOE, (1,)),
    *swap_runs(2, "1x1,2x1,1x2", None, (1, 2)),
    *swap_runs(2, "1x1e2", MOE, (1,)),
    *swap_runs(4, "4x1,2x2,2x1,1x2", WIDE, (1, 2, 4)),
    *swap_runs(8, "8x1,4x2,2x2", WIDE, (2, 4, 8)),
]

# ---- GRPO end to end: (world, hydra overrides on top of grpo_command's) -------------------------
GRPO_RUNS = [
    pytest.param(1, ["rollout.enforce_eager=false"], id="1gpu-cuda_graphs", marks=needs_gpus(1)),
    pytest.param(
        1, [f"model={MOE}", "actor.router_replay=true"], id="1gpu-moe-r3", marks=needs_gpus(1)
    ),
    pytest.param(2, ["parallel=tp2"], id="2gpu-tp2-rollout_tp1", marks=needs_gpus(2)),
    pytest.param(
        4,
        [
            f"model={WIDE}",
            "parallel.tensor_model_parallel_size=2",
            "parallel.pipeline_model_parallel_size=2",
            "rollout.tensor_model_parallel_size=4",
        ],
        id="4gpu-tp2_pp2-rollout_tp4",
        marks=needs_gpus(4),
    ),
]


@pytest.fixture(scope="module")
def reference_bf16(tmp_path_factory):
    """reference_bf16(model) -> the worker's 1-GPU bf16 result for that model (run once)."""
    from conftest import _cpu

    cache = {}

    def get(model: str) -> dict:
        if model not in cache:
            out = tmp_path_factory.mktemp("ref") / f"{model}.pt"
            _cpu.run_torchrun("megatron_parity.py", 1, str(out), "1", "1", "0", "bfloat16", model)
            cache[model] = torch.load(out)
        return cache[model]

    return get


@pytest.mark.parametrize("world,tp,pp,sp,model", PARITY_LAYOUTS)
def test_layouts_equal_one_gpu_bf16(world, tp, pp, sp, model, reference_bf16, torchrun, tmp_path):
    ref = reference_bf16(model)
    out = tmp_path / "out.pt"
    torchrun("megatron_parity.py", world, str(out), str(tp), str(pp), str(sp), "bfloat16", model)
    got = torch.load(out)
    assert got["grads"].keys() == ref["grads"].keys()
    assert abs(float(got["loss"]) / float(ref["loss"]) - 1) < 1e-2
    for name, ref_grad in ref["grads"].items():
        rel = (got["grads"][name] - ref_grad).norm() / ref_grad.norm()
        assert rel < 5e-2, (name, float(rel))


@pytest.mark.parametrize("world,rollout_tp,layouts,preset", HE_RUNS)
def test_hybrid_engine_swaps_vllm(world, rollout_tp, layouts, preset, torchrun, tiny_checkpoints):
    args = ["vllm", str(rollout_tp), layouts, *([preset] if preset else [])]
    timeout = 1200 if world == 2 else 1800
    result = torchrun("he_check.py", world, *args, timeout=timeout, env={"HE_TOL": str(HE_TOL)})
    assert set(result) == set(layouts.split(",")), result
    for layout, numbers in result.items():
        assert numbers["cuda_mib_freed_by_enter"] > 0, (layout, numbers)
        for key in ("err_first", "err_after_step", "err_repaired"):
            assert numbers[key] <= HE_TOL, (layout, key, numbers[key])
    print(result)


@needs_gpus(2)
def test_hybrid_engine_swaps_vllm_expert_parallel(torchrun, tiny_checkpoints):
    """`rollout.enable_expert_parallel` at rollout TP 2 (vLLM's EP: experts 0-3 on one GPU,
    4-7 on the other): engine log-probs equal the actor's after every sync, from training EP 2
    (each rank copies its own experts) and EP 1 (each copies the engine rank's half); partial,
    skipped and some-experts syncs are caught (he_check.py with HE_ENGINE_EP=1)."""
    env = {"HE_TOL": str(HE_TOL), "HE_ENGINE_EP": "1"}
    result = torchrun("he_check.py", 2, "vllm", "2", "1x1e2,1x1", MOE, timeout=1200, env=env)
    for layout, numbers in result.items():
        for key in ("err_first", "err_after_step", "err_repaired"):
            assert numbers[key] <= HE_TOL, (layout, key, numbers[key])
    print(result)


@needs_gpus(2)
def test_checkpoint_resume_bitwise(torchrun, tiny_checkpoints, tmp_path):
    """tests/cpu/workers/ckpt_roundtrip.py over NCCL: save, load, one more step, bitwise equal
    to the run that never stopped (fused AdamW: its step counts live on the GPU), and within
    rounding when resumed with the other Adam kernel."""
    layouts = ("tp2", "pp2", "dp2", "dp2_plain")
    # cuBLAS is deterministic only with a fixed workspace (torch.use_deterministic_algorithms)
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    result = torchrun("ckpt_roundtrip.py", 2, str(tmp_path), *layouts, timeout=900, env=env)
    assert set(result) == set(layouts), result
    for layout, r in result.items():
        assert r["changed_by_step2"] == r["tensors"] > 100, (layout, r)


def grpo_command(world: int, output_dir: Path, overrides: list[str]) -> list[str]:
    """A 3-step bf16 GRPO run with the vLLM rollout on `world` local GPUs, plus `overrides`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(world),
        "-m",
        "trainer.main",
        "algorithm=grpo",
        "rollout=vllm",
        *overrides,
        "trainer.total_steps=3",
        "trainer.test_freq=0",
        "trainer.save_freq=0",
        "model.dtype=bfloat16",
        f"trainer.output_dir={output_dir}",
    ]


def run_grpo(world: int, out: Path, overrides: list[str]) -> dict[int, dict]:
    """grpo_command's run; its metrics by step."""
    from trainer.tracking import read_metrics

    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        grpo_command(world, out, overrides),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return read_metrics(out / "metrics.jsonl")


@needs_gpus(1)
def test_compiled_layers_match_eager(torchrun, tiny_checkpoints):
    """actor.compile_layers=true on the megatron strategy (inductor's kernels) against the same
    layers eager, fp32 on one GPU: log-probs, the gradient norm of three updates, the
    parameters."""
    res = torchrun("compile_check.py", 1, "tiny_llama", "inductor", "float32")
    assert res["compiled_layers"] == 4, res
    assert res["logprob_err"] < 2e-4, res
    assert all(abs(c / e - 1) < 1e-3 for e, c in zip(*res["grad_norms"], strict=True)), res
    # Adam moves a weight at most ~lr a step whatever its gradient: 3 steps at lr 1e-4
    assert res["param_err"] < 6e-4, res


@pytest.mark.parametrize("world,overrides", GRPO_RUNS)
def test_grpo_end_to_end(world, overrides, tiny_checkpoints, tmp_path):
    metrics = run_grpo(world, tmp_path / "run", overrides)
    assert sorted(metrics) == [1, 2, 3]
    assert all(math.isfinite(m["actor/pg_loss"]) for m in metrics.values())
    # Engine vs actor log-probs after every sync, bf16: 2.4e-3 to 8.0e-3 seen on 1, 2 and 4 GPUs.
    assert all(m["rollout/logprob_abs_diff"] < 2e-2 for m in metrics.values()), metrics
    print(
        {
            s: {
                k: m[k]
                for k in (
                    "critic/score/mean",
                    "timing_s/gen",
                    "timing_s/update_actor",
                    "rollout/logprob_abs_diff",
                )
            }
            for s, m in metrics.items()
        }
    )


@needs_gpus(2)
def test_moe_gap_at_ep2_equals_ep1(tiny_checkpoints, tmp_path):
    """The same bf16 GRPO run of tiny_qwen3_moe_128e (128 experts, top-8) on two GPUs (rollout
    DP 2) at EP 1 and at EP 2: the same first batch, so the engine-vs-actor gap of step 1 must
    agree. Two H200s gave 0.11-0.14 at EP 2 on Qwen3-30B-A3B's shape, 25-30x one GPU's EP 1
    gap; on CPU this preset reproduced it (0.044 against 0.0046 in bf16, 0.046 against 2e-7 in
    fp32) until the EP-gathered stream kept the ranks' experts in step
    (hybrid_engine/allgather_pp.py). The bf16 gap is above debug_check_weight_sync's 1e-3, so
    that check stays off."""
    gaps = {}
    for ep in (1, 2):
        layout = [
            f"model={MOE}",
            "model.preset=tiny_qwen3_moe_128e",
            f"parallel.expert_model_parallel_size={ep}",
        ]
        metrics = run_grpo(2, tmp_path / f"ep{ep}", layout)
        gaps[ep] = metrics[1]["rollout/logprob_abs_diff"]
    print(gaps)
    assert gaps[2] < 1.5 * gaps[1] + 1e-3, gaps


@pytest.mark.parametrize("world", [1, 2])
def test_moe_dispatch_syncs(world, torchrun):
    """One MoE layer's forward and backward (grouped experts, top-8 of 64, bf16): Tandem's
    DeviceIndexDispatcher makes the host wait for the device nowhere at EP 1 and at most once
    (the all-to-all's split sizes) at EP 2, where megatron's unfused dispatcher waits several
    times; outputs and gradients bitwise equal (tests/cpu/workers/moe_sync_check.py)."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs")
    r = torchrun("moe_sync_check.py", world)
    assert r["bitwise_equal"], r
    assert r["device"]["syncs"] <= (0 if world == 1 else 1), r
    assert r["megatron"]["syncs"] >= 2, r
