"""HybridEngine swap cost on this machine, one process (a world of one):

    python -m benchmarks.bench_swap [--model qwen2_0p5b|smollm2_135m|tiny_llama|...]
        [--layers N] [--backend vllm|hf] [--strategy megatron|fsdp2] [--repeat 3]
        [--gpu-memory-utilization 0.3] [--ep 1] [--engine-ep]
    python -m benchmarks.bench_swap --model qwen3_30b_a3b --layers 4 --ep 2   # by torchrun

`--ep N` trains with the experts split over N ranks (it starts itself under torchrun), each
rank with an engine of its own that holds every expert (rollout DP N): its sync gathers the
other ranks' experts over EP, and the baseline stays one contiguous copy on its own device of
the bytes its engine receives. With `--engine-ep` the N ranks run one engine instead (rollout
TP N, vLLM's expert parallelism: each rank's engine holds its own experts whole, so the sync
copies them locally), and the baseline is the bytes of that rank's engine parameters. Rank 0
reports.

Measured side by side in one run, with the device synchronised around every timing:
- weight sync, two ways, against the device's limit: one contiguous `copy_` of a buffer of the
  same number of bytes on the same device (a Python loop of `copy_` over the HF tensors is
  shown beside it; it is not the baseline): through the engine's loader
  (`rollout.load_weights` of the manager's HF stream: TP gather, QKV/gate-up conversion,
  buckets), and as the manager syncs after its first sync (direct copies into the engine's
  parameters where planned, on CUDA one Triton launch over their ranges,
  weight_loaders/copy_kernel.py; the loader for the rest); best of `--repeat` each, after a
  warm-up; and, where the plan has that launch, the same sync with those ranges copied by
  torch instead (`copy_` per big run, one `_foreach_copy_` for the rest);
- swap: `with manager: pass`, i.e. enter (gather, free grads, wake the engine's weights, sync,
  wake its KV cache) + exit (engine sleep, grads back), from the engine asleep as in the trainer;
  best of `--repeat` after one warm-up; the sync inside it is reported too;
- one actor training step (update_policy: one optimizer step) on a GRPO-sized batch of the
  same model: `--prompts` × `--n` full rows of `--prompt-len` + `--response-len` tokens.

Defaults: on CUDA the Qwen2.5-0.5B shape with random weights (megatron init; vLLM starts with
load_format=dummy and the sync fills it) in bf16, vLLM at gpu_memory_utilization 0.3 with sleep
mode, 32 prompts × 8 samples × (256 + 256); on CPU SmolLM2-135M in fp32, 8 × 4 × (64 + 64).
"""

from __future__ import annotations

import argparse
import functools
import time
from contextlib import contextmanager

import torch

from benchmarks import common as C


def sync_vs_copy(manager, rollout, repeat: int) -> dict:
    """One contiguous device copy of as many bytes as the engine receives (the device's limit),
    and a loop of copies over the HF tensors, against the sync through the engine's loader and
    the sync as the manager runs it after its first (direct copies where planned, the loader
    for the rest); best of `repeat` each."""
    gathered = getattr(manager, "allgather", None)  # megatron's pipeline stages
    if gathered is not None:
        gathered.gather()
    rollout.wake_up()  # the engine sleeps outside the manager's block (from its construction)
    # The bytes the engine receives: FSDP2 at DP 1 hands out its fp32 tensors, which the
    # sync's copies cast to the engine's dtype; the baseline copies that dtype's bytes.
    engine_dtype = getattr(manager.worker, "compute_dtype", None)
    with torch.no_grad():
        pairs = [
            (n, t.detach().to(dtype=engine_dtype or t.dtype, copy=True))
            for n, t in manager.hf_weights()
        ]
    nbytes = sum(t.nbytes for _, t in pairs)
    engine = rollout.engine_parameters()
    if engine is not None and engine.expert_parallel:
        # vLLM's EP: this rank's engine holds a TP slice of each dense tensor and its own experts
        # whole, not the whole stream; the bytes it receives are its own parameters' (without
        # the per-expert views `experts_by_name` adds).
        from weight_loaders.direct_copy import ENGINE_EXPERT

        nbytes = sum(t.nbytes for n, t in engine.params.items() if not ENGINE_EXPERT.search(n))
    dst = [torch.empty_like(t) for _, t in pairs]

    @torch.no_grad()
    def loop_of_copies():
        for d, (_, s) in zip(dst, pairs, strict=True):
            d.copy_(s)

    out = {"bytes": nbytes, "devices": {str(t.device) for _, t in pairs}, "tensors": len(pairs)}
    out["loop_s"] = C.best_of(loop_of_copies, repeat, warmup=1)
    device = pairs[0][1].device
    pairs.clear()  # the copies' memory back before the syncs
    dst.clear()
    flat = torch.empty(2, nbytes, dtype=torch.uint8, device=device)
    one_copy = functools.partial(flat[1].copy_, flat[0])
    out["copy_s"] = C.best_of(one_copy, repeat, warmup=1)
    del flat, one_copy
    out["loader_s"] = C.best_of(
        lambda: rollout.load_weights(manager.hf_weights()), repeat, warmup=1
    )
    manager.sync_weights()  # the first sync: the engine's loader, then the direct-copy plan
    direct = manager.direct  # megatron's DirectCopies (gathered copies counted), FSDP2's views
    if isinstance(direct, dict):
        planned = sum(t.nbytes for t in direct.values())
        out["launches"] = len(direct)
    else:
        planned = direct.nbytes
        buckets = direct.gather.buckets if direct.gather else []
        own = direct.runs.launches if direct.runs else 0
        out["launches"] = own + sum(b.runs.launches for b in buckets)
    out["direct_share"] = planned / nbytes
    out["direct_s"] = C.best_of(manager.sync_weights, repeat, warmup=1)
    if not isinstance(direct, dict):
        out["torch_copies"] = torch_copies_sync(manager, repeat)
        manager.sync_weights()  # the engine as the manager leaves it
    rollout.sleep(level=manager.sleep_level)
    if gathered is not None:
        gathered.release()
    return out


def torch_copies_sync(manager, repeat: int) -> dict | None:
    """The manager's sync with its planned pairs copied by torch (`copy_` per big run, one
    `_foreach_copy_` for the rest: `CopyRuns.plan(one_launch=False)`), as before the one-launch
    range copy; None when the manager's plan has no range copy to compare with."""
    from weight_loaders.direct_copy import CopyRuns

    direct = manager.direct
    own = direct.runs
    if own is None or own.ranges is None:
        return None
    direct.runs = CopyRuns.plan(direct.dst, direct.src, one_launch=False)
    try:
        seconds = C.best_of(manager.sync_weights, repeat, warmup=1)
        return {"s": seconds, "launches": direct.runs.launches, "ranges": len(own.ranges.pairs)}
    finally:
        direct.runs = own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=C.pick("smollm2_135m", "qwen2_0p5b"))
    ap.add_argument("--layers", type=int, help="a shape preset cut to its first N layers")
    ap.add_argument("--backend", default="vllm")
    ap.add_argument("--strategy", default="megatron", choices=["megatron", "fsdp2"])
    ap.add_argument("--dtype", default=C.default_dtype(), choices=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--prompts", type=int, default=C.pick(8, 32))
    ap.add_argument("--n", type=int, default=C.pick(4, 8))
    ap.add_argument("--prompt-len", type=int, default=C.pick(64, 256))
    ap.add_argument("--response-len", type=int, default=C.pick(64, 256))
    ap.add_argument("--micro-batch", type=int, default=C.pick(4, 8))
    ap.add_argument("--step-warmup", type=int, default=C.pick(0, 1))
    ap.add_argument("--ep", type=int, default=1, help="expert parallelism (torchrun ranks)")
    ap.add_argument(
        "--engine-ep",
        action="store_true",
        help="vLLM's expert parallelism over the --ep ranks (one engine, rollout TP = --ep)",
    )
    opts = ap.parse_args()
    if opts.ep > 1 and opts.strategy != "megatron":
        ap.error("--ep: expert parallelism is megatron's (--strategy megatron)")
    if opts.engine_ep and (opts.ep < 2 or opts.backend != "vllm"):
        ap.error("--engine-ep: vLLM's expert parallelism, over --ep 2 or more ranks")
    C.ranks_or_relaunch("benchmarks.bench_swap", opts.ep)

    import archs
    from hybrid_engine import FSDPShardingManager, MegatronShardingManager
    from rollout import build_rollout
    from tandem_core.config import ActorConfig, OptimConfig, ParallelConfig, RolloutConfig
    from trainer.workers.actor import PolicyActor
    from trainer.workers.fsdp import build_fsdp_worker
    from trainer.workers.model import build_model_worker

    src = C.resolve_model(opts.model, opts.layers)
    parallel = C.init_world(ParallelConfig(expert_model_parallel_size=opts.ep))
    args = archs.model_args_from_hf(src.hf_dir)
    optim = OptimConfig(lr=1e-6)
    if opts.strategy == "fsdp2":
        worker = build_fsdp_worker(
            args, src.hf_dir, dtype=opts.dtype, optim=optim, random_init=src.random_init
        )
    else:
        worker = build_model_worker(args, src.weights_dir, parallel, dtype=opts.dtype, optim=optim)
    seq = opts.prompt_len + opts.response_len
    rcfg = RolloutConfig(
        name=opts.backend,
        tensor_model_parallel_size=opts.ep if opts.engine_ep else 1,
        enable_expert_parallel=opts.engine_ep,
        response_length=16,
        load_format=src.load_format,
        gpu_memory_utilization=opts.gpu_memory_utilization,
    )
    rollout = build_rollout(rcfg, src.hf_dir, dtype=opts.dtype, max_model_len=max(seq, 256))
    if opts.strategy == "fsdp2":
        manager = FSDPShardingManager(worker, rollout, sleep_level=rcfg.sleep_level)
    else:
        manager = MegatronShardingManager(
            worker, rollout, weight_bucket_mb=rcfg.weight_bucket_mb, sleep_level=rcfg.sleep_level
        )

    # Weight sync vs one device copy of the same bytes (the engine is awake, as after start).
    sync = sync_vs_copy(manager, rollout, opts.repeat)
    copy_s, loader_s, sync_s = sync["copy_s"], sync["loader_s"], sync["direct_s"]
    if C.on_cuda():
        torch.cuda.empty_cache()  # the copy's buffers

    # The swap, from the engine asleep (as between two trainer iterations).
    rollout.sleep(level=rcfg.sleep_level)
    inner_sync = []

    @contextmanager
    def time_sync(name: str):  # the manager's phase hook: keep the sync's own time
        C.synchronize()
        start = time.perf_counter()
        yield
        C.synchronize()
        if name == "sync":
            inner_sync.append(time.perf_counter() - start)

    manager.phase_timer = time_sync

    def swap():
        with manager:
            pass

    swap_s = C.best_of(swap, opts.repeat, warmup=1)

    # One actor step on a GRPO-sized batch (the engine asleep, as while training).
    n_seq = opts.prompts * opts.n
    batch = C.training_batch(args.vocab_size, n_seq, opts.prompt_len, opts.response_len, n=opts.n)
    actor = PolicyActor(
        worker, ActorConfig(ppo_mini_batch_size=opts.prompts, micro_batch_size=opts.micro_batch)
    )
    metrics = []
    step_s = C.best_of(lambda: metrics.append(actor.update_policy(batch)), 1, opts.step_warmup)
    if any(m["actor/skipped_steps"] for m in metrics):
        raise RuntimeError("the actor step was skipped (non-finite loss): its time is not a step")

    init = "random init" if src.random_init else "checkpoint"
    gbs = sync["bytes"] / 1e9
    where = ", ".join(sorted(sync["devices"]))
    head = (
        f"model {opts.model} ({init}, {gbs:.3f} GB of HF tensors on {where}), "
        f"backend {opts.backend}, {opts.strategy}, {opts.dtype}, {C.device_name()}"
        + (f", EP {opts.ep} (rank 0 of {C.world_size()})" if opts.ep > 1 else "")
    )
    rows = [
        [
            f"one contiguous device copy of {gbs:.3f} GB (the baseline)",
            f"{copy_s * 1e3:,.2f} ms",
            f"{gbs / copy_s:.1f}",
            "1.00×",
        ],
        [
            f"a loop of copy_ over the {sync['tensors']} HF tensors",
            f"{sync['loop_s'] * 1e3:,.2f} ms",
            f"{gbs / sync['loop_s']:.1f}",
            f"{sync['loop_s'] / copy_s:.2f}× the copy",
        ],
        [
            "weight sync through the engine's loader (stream + load_weights)",
            f"{loader_s * 1e3:,.1f} ms",
            f"{gbs / loader_s:.1f}",
            f"{loader_s / copy_s:.2f}× the copy",
        ],
        [
            f"weight sync as the manager runs it ({100 * sync['direct_share']:.0f} % of the "
            f"bytes by direct copy in {sync['launches']} copy launches, the rest by loader)",
            f"{sync_s * 1e3:,.2f} ms",
            f"{gbs / sync_s:.1f}",
            f"{sync_s / copy_s:.2f}× the copy",
        ],
        *(
            [
                [
                    f"the same sync, its {k['ranges']} ranges copied by torch instead "
                    f"({k['launches']} copy_ / foreach launches)",
                    f"{k['s'] * 1e3:,.2f} ms",
                    f"{gbs / k['s']:.1f}",
                    f"{k['s'] / copy_s:.2f}× the copy",
                ]
            ]
            if (k := sync.get("torch_copies"))
            else []
        ),
        [
            f"swap: enter + exit (its sync: {min(inner_sync) * 1e3:,.1f} ms)",
            f"{swap_s * 1e3:,.1f} ms",
            "",
            f"{100 * swap_s / step_s:.1f} % of a step",
        ],
        [
            f"actor step ({n_seq} seq × {seq} tok, micro-batch {opts.micro_batch})",
            f"{step_s * 1e3:,.1f} ms",
            "",
            "",
        ],
    ]
    table = C.markdown_table(["what", "time", "GB/s", "ratio"], rows)
    tail = (
        f"sync / copy: {sync_s / copy_s:.2f}× (through the loader: {loader_s / copy_s:.2f}×); "
        f"swap / actor step: {swap_s / step_s:.3f} "
        f"({100 * swap_s / step_s:.1f} %)"
    )
    C.report(f"{head}\n\n{table}\n\n{tail}")


if __name__ == "__main__":
    C.run_main(main)
