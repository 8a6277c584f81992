"""The longest response the actor update trains, at a context-parallel size, measured and as the
memory planner predicts it before anything is built.

    torchrun --nproc-per-node 2 -m benchmarks.bench_long --model qwen3_8b --cp 2 \
        --lengths 16384 32768 49152 65536

One sequence per data-parallel rank (world / CP of them): a 256-token prompt and a response of
each length in turn, ascending, through `PolicyActor.update_policy` (megatron, the sdpa spec,
random init, megatron's full activation recompute = `actor.activation_checkpointing`, fused
AdamW, the distributed optimizer over DP × CP). Per length: the step time (best of --steps
after a warm-up step), tokens/s, the peak device memory in use over the ranks (cudaMemGetInfo
sampled through the step: what the planner estimates) and the planner's training phase for
the same run. It stops at the first length that runs out of memory.

The planner's limit is the longest response, in steps of 1024 tokens, whose training phase fits
the GPU (`python -m trainer.plan` with the overrides printed), computed before the model is
built.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import torch

from benchmarks import common as C

PROMPT = 256


def overrides(opts, response: int) -> list[str]:
    """The trainer's overrides for this benchmark's update (what the planner is asked)."""
    world = C.world_size()
    dp = world // opts.cp
    out = [
        f"model={opts.model}",
        f"model.dtype={opts.dtype}",
        f"parallel.context_parallel_size={opts.cp}",
        f"data.max_prompt_length={PROMPT}",
        f"rollout.response_length={response}",
        f"model.max_seq_len={PROMPT + response}",
        "algorithm=grpo",
        "actor.use_kl_loss=false",
        "rollout.n=2",
        f"data.train_batch_size={dp}",
        f"actor.ppo_mini_batch_size={dp}",
        "actor.micro_batch_size=1",
        "actor.activation_checkpointing=true",
    ]
    if opts.layers:
        out.append(f"model.num_layers={opts.layers}")
    return out


def planner(opts, args, gpu_gib: float):
    """(planned training GiB at a response length, the longest length that fits the GPU). The
    shape's max_position_embeddings is lifted: this is about memory."""
    from trainer import plan as P
    from trainer.config_check import load_config

    world = C.world_size()
    base = load_config(overrides(opts, opts.lengths[0]), world_size=world)
    args = dataclasses.replace(args, max_position_embeddings=1 << 30)

    def training_gib(response: int) -> float:
        cfg = dataclasses.replace(
            base,
            rollout=dataclasses.replace(base.rollout, response_length=response),
            model=dataclasses.replace(base.model, max_seq_len=PROMPT + response),
        )
        return P.plan_memory(cfg, world, gpu_gib, args).phases[0].total_gib

    lo, hi = 0, 1024  # multiples of 1024: lo fits, hi does not
    while training_gib(hi) <= gpu_gib:
        lo, hi = hi, hi * 2
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        lo, hi = (mid, hi) if training_gib(mid) <= gpu_gib else (lo, mid)
    return training_gib, lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=C.pick("tiny_llama", "qwen3_8b"))
    ap.add_argument("--layers", type=int, default=None, help="cut the shape to its first N")
    ap.add_argument("--cp", type=int, default=C.world_size())
    ap.add_argument("--lengths", type=int, nargs="+", default=C.pick([256, 512], [16384, 32768]))
    ap.add_argument("--dtype", default=C.default_dtype(), choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=2)
    opts = ap.parse_args()
    opts.lengths = sorted(opts.lengths)

    import torch.distributed as dist

    import archs
    from tandem_core.config import ActorConfig, OptimConfig, ParallelConfig
    from trainer.tracking import DevicePeakMemory
    from trainer.workers.actor import PolicyActor
    from trainer.workers.model import build_model_worker

    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if C.on_cuda() else 0.0
    args = archs.cut_to_layers(archs.PRESETS[opts.model], opts.layers).args
    # RoPE has no length limit; the shape's max_position_embeddings (Qwen3-8B's 40,960, what
    # its released weights were trained to) would stop lengths this benchmark is about
    longest = PROMPT + opts.lengths[-1]
    args = dataclasses.replace(
        args, max_position_embeddings=max(args.max_position_embeddings, longest)
    )
    training_gib, limit = planner(opts, args, gpu_gib or 80.0)
    parallel = C.init_world(ParallelConfig(context_parallel_size=opts.cp))
    dp = C.world_size() // opts.cp
    worker = build_model_worker(
        args,
        None,  # megatron's random init
        parallel,
        dtype=opts.dtype,
        layer_spec="sdpa",
        optim=OptimConfig(lr=1e-6),
        activation_checkpointing=True,
    )
    actor = PolicyActor(worker, ActorConfig(ppo_mini_batch_size=dp, micro_batch_size=1))
    memory = DevicePeakMemory()
    rows = []
    for response in opts.lengths:
        batch = C.training_batch(args.vocab_size, dp, PROMPT, response, n=1)
        try:
            step = functools.partial(actor.update_policy, batch)
            first_s = C.timed(step)
            with memory.phase("update"):
                step_s = C.best_of(step, opts.steps)
            failed = torch.zeros(())
        except torch.OutOfMemoryError:
            failed = torch.ones(())
        if C.on_cuda():
            failed = failed.cuda()
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)  # every rank stops at the same length
        if failed.item():
            rows.append([response, "out of memory", "", "", f"{training_gib(response):.1f}", ""])
            break
        peak = torch.tensor(memory.peaks_gib().get("memory/peak_gib/update", 0.0))
        peak = peak.cuda() if C.on_cuda() else peak
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        planned = training_gib(response)
        tokens = dp * (PROMPT + response)
        rows.append(
            [
                response,
                f"{step_s:.2f} s (first {first_s:.1f} s)",
                f"{tokens / step_s:,.0f}",
                f"{peak.item():.1f}",
                f"{planned:.1f}",
                f"{planned / peak.item():.2f}" if peak.item() else "-",
            ]
        )
        if C.rank() == 0:
            print(f"[bench_long] {rows[-1]}", flush=True)
    if C.rank() == 0:
        table = C.markdown_table(
            [
                "response tokens",
                "update step",
                "tokens/s",
                "peak GiB",
                "planned GiB",
                "planned / peak",
            ],
            rows,
        )
        C.report(
            f"{opts.model} ({opts.layers or 'all'} layers), {opts.dtype}, world {C.world_size()}"
            f" = CP {opts.cp} × DP {dp}, full recompute, {C.device_name()} ({gpu_gib:.1f} GiB)\n"
            f"planner's longest response that fits: {limit:,} tokens "
            f"(python -m trainer.plan {' '.join(overrides(opts, limit))}"
            f" --world-size {C.world_size()})\n\n{table}"
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    C.run_main(main)
