"""Routing replay (R3) on Qwen3-MoE: the actor's routers take the rollout engine's experts.

usage: r3_check.py LAYOUTS   ("2x1,1x2" = TP×EP per layout; SP on when TP > 1; the world is
TP × DP, EP divides DP)
The engine is the transformers backend in bf16 (the actor trains in fp32), so some tokens are
routed differently by the two. Asserted here, on every rank:
1. the engine's `routed_experts` column holds, on every real prompt and response token but
   the last, the experts transformers' routers chose (recomputed over the whole sequence);
2. with replay, every router's top-k is the recorded one, on every token (megatron's token
   order, this rank's sequence-parallel slice), checked position by position from the column;
3. the train/rollout log-prob gap with replay is below the gap without it, on the same batch;
4. an update with replay runs and moves the router weights.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402

import archs  # noqa: E402
from archs import ensure_tiny_checkpoint  # noqa: E402
from rollout import build_rollout  # noqa: E402
from tandem_core import distributed as D  # noqa: E402
from tandem_core.config import ActorConfig, OptimConfig, ParallelConfig, RolloutConfig  # noqa: E402
from tandem_core.protocol import Batch  # noqa: E402
from trainer.workers.actor import PolicyActor  # noqa: E402
from trainer.workers.model import MoESettings, build_model_worker  # noqa: E402


def prompts(n: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (n,), generator=g)
    width = int(lengths.max())
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n_i in enumerate(lengths.tolist()):
        ids[i, width - n_i :] = torch.randint(3, 60, (n_i,), generator=g)
        mask[i, width - n_i :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch.from_dict(
        {"input_ids": ids, "attention_mask": mask, "position_ids": pos},
        meta_info={"sampling": {"do_sample": True, "temperature": 1.0}},
    )


def masked_mean_gap(a, b, mask) -> float:
    return float((a - b).abs()[mask.bool()].mean())


def main():
    D.init_distributed()
    hf_dir = ensure_tiny_checkpoint("tiny_qwen3_moe")
    args = archs.model_args_from_hf(hf_dir)
    moe_layers = [i for i, moe in enumerate(args.moe_layer_pattern()) if moe]
    k = args.moe_router_topk

    # The same prompts on every rank (each rank runs the whole batch: no data split needed).
    rollout = build_rollout(
        RolloutConfig(name="hf", response_length=12),
        hf_dir,
        dtype="bfloat16",
        max_model_len=64,
        routed_experts=True,
    )
    # Each rank's engine samples its own stream: take rank 0's batch everywhere.
    mine = [rollout.generate_sequences(prompts(8, seed=3))]
    dist.broadcast_object_list(mine, src=0)
    batch = mine[0]
    routed = batch["routed_experts"]
    B, T, L, _ = routed.shape
    assert (L, routed.shape[-1]) == (args.num_layers, k), routed.shape

    # 1. the column against transformers' routers over each whole sequence (bf16, same model)
    mask = batch["attention_mask"].bool()
    last = mask.long().cumsum(-1).argmax(-1)  # each row's last real token: never routed
    seen = {}
    hooks = [
        rollout.model.model.layers[i].mlp.gate.register_forward_hook(
            lambda m, inp, out, i=i: seen.__setitem__(i, out[-1].reshape(B, T, k))
        )
        for i in moe_layers
    ]
    with torch.no_grad():
        rollout.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        )
    for h in hooks:
        h.remove()
    checked = mask.clone()
    checked[torch.arange(B), last] = False
    agree = sum(
        int(
            (seen[i].sort(-1).values == routed[:, :, i].long().sort(-1).values)
            .all(-1)[checked]
            .sum()
        )
        for i in moe_layers
    )
    total = int(checked.sum()) * len(moe_layers)
    # bf16 generation with a KV cache against one bf16 pass: a few near-ties may flip.
    assert agree >= 0.97 * total, (agree, total)

    results = {}
    for layout in sys.argv[1].split(","):
        tp, ep = (int(x) for x in layout.split("x"))
        results[layout] = check_layout(tp, ep, args, hf_dir, batch, routed, moe_layers)
    write_result({"engine_agrees": agree / total, **results})
    dist.barrier()


def check_layout(tp, ep, args, hf_dir, batch, routed, moe_layers) -> dict:
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1, expert_model_parallel_size=ep
    )
    D.init_model_parallel(parallel)
    B, k = len(batch), args.moe_router_topk
    mask, resp_mask = batch["attention_mask"].bool(), batch["response_mask"]
    optim = OptimConfig(lr=1e-3, eps=1e-4)
    cfg = ActorConfig(ppo_mini_batch_size=8, micro_batch_size=3)
    plain = PolicyActor(build_model_worker(args, hf_dir, parallel, optim=optim), cfg)
    replay_worker = build_model_worker(
        args, hf_dir, parallel, optim=optim, moe=MoESettings(router_replay=True)
    )
    replay = PolicyActor(replay_worker, cfg)

    # 2. every replayed top-k is the column's, per position (megatron: [s, b], SP slice of s)
    used = []
    for routers in replay_worker.routers.values():
        for router in routers:
            original = router.router_replay.get_replay_topk

            def capture(*a, original=original, layer=router.layer_number, **kw):
                probs, ids = original(*a, **kw)
                used.append((layer, ids.clone()))
                return probs, ids

            router.router_replay.get_replay_topk = capture
    lp_replay = replay.compute_log_prob(batch)["log_probs"]
    shift = (mask.long().cumsum(-1) == 0).sum(-1)  # rows are rolled left by their leading pads
    share = B // D.dp_size()  # this data-parallel rank's rows, in micro-batches of 3
    first = D.dp_rank() * share
    mb_rows = [range(i, min(i + 3, first + share)) for i in range(first, first + share, 3)]
    calls = iter(used)
    compared = 0
    for rows in mb_rows:
        s = int(max(mask[r].sum() for r in rows))
        s = -(-s // tp) * tp if tp > 1 else s
        for layer_i in moe_layers:
            layer, ids = next(calls)
            assert layer == layer_i + 1, (layer, layer_i)
            ids = ids.reshape(-1, len(rows), k)  # [s_local, b, k]
            lo = D.tp_rank() * (s // tp) if tp > 1 else 0
            for j, r in enumerate(rows):
                n_real = int(mask[r].sum())
                for pos in range(lo, lo + ids.shape[0]):
                    if pos < n_real:
                        want = routed[r, shift[r] + pos, layer_i].long()
                        assert torch.equal(ids[pos - lo, j], want), (r, pos, layer_i)
                        compared += 1
    assert next(calls, None) is None
    assert compared > 0

    # 3. the train/rollout gap, with and without replay, on the same batch
    lp_plain = plain.compute_log_prob(batch)["log_probs"]
    gap_on = masked_mean_gap(batch["rollout_log_probs"], lp_replay, resp_mask)
    gap_off = masked_mean_gap(batch["rollout_log_probs"], lp_plain, resp_mask)
    assert gap_on < gap_off, (gap_on, gap_off)

    # 4. an update under replay trains the routers too
    before = {
        n: p.detach().clone()
        for n, p in replay_worker.chunks[0].named_parameters()
        if "router" in n
    }
    upd = batch.select(
        ["input_ids", "attention_mask", "responses", "response_mask", "routed_experts"], []
    )
    upd["old_log_probs"] = lp_replay
    upd["advantages"] = torch.randn(lp_replay.shape, generator=torch.Generator().manual_seed(5))
    upd.meta_info = {"n": 1}
    metrics = replay.update_policy(upd)
    moved = [
        n
        for n, p in replay_worker.chunks[0].named_parameters()
        if "router" in n and not torch.equal(p, before[n])
    ]
    assert len(moved) == len(before) > 0, (moved, list(before))
    return {
        "gap_on": gap_on,
        "gap_off": gap_off,
        "replayed_tokens_checked": compared,
        "grad_norm": metrics["actor/grad_norm"],
    }


if __name__ == "__main__":
    main()
    exit_now()
