"""The actor update of a mixture-of-experts model: grouped experts (`TorchGroupedMLP`, one
`torch._grouped_mm` per GEMM for all local experts) vs megatron's `SequentialMLP` (one GEMM
pair per expert), and Tandem's token dispatch (`DeviceIndexDispatcher`, no host
synchronisation at EP 1) vs megatron's unfused all-to-all dispatcher, side by side in one run,
and the update's MFU on active parameters.

    python -m benchmarks.bench_moe [--model qwen3_30b_a3b] [--layers 6] [--batch 8]
        [--seq 1024] [--micro-batch 2] [--experts grouped sequential] [--steps 3]
        [--dispatchers device megatron] [--profile 25] [--gaps 25]
    python -m benchmarks.bench_moe --ep 2 --layers 12    # two ranks per row, by torchrun

A row is an experts module with a dispatcher (`grouped`, `sequential`: the first of
`--dispatchers`; then `grouped+megatron` etc. for the others, grouped experts only). "vs seq"
and "vs mcore" are the `sequential+…` and `grouped+megatron` rows' step times over this row's.

The model is the preset's shape with its first `--layers` layers (random init, bf16 on CUDA),
every row full (`--seq` tokens, half prompt, half response), the same update as
`benchmarks.bench_mfu`'s `sdpa` row: `PolicyActor.update_policy`, megatron's distributed
optimizer with torch's fused AdamW. Each experts module runs in its own process.

FLOP count (fwd + bwd = 3 × forward), per step: tokens·(6·N_active + 12·L·q·s) + response
tokens·6·h·V, with N_active = L·[h·(q + 2·kv) + q·h + E·h + k·3·h·f_moe] (attention, the
router, the k experts a token is routed to). MFU is against the measured bf16 matmul peak.
`--profile N` adds, per row, the N kernels with the most device time in one more step
(torch.profiler; rank 0 at EP > 1), as a share of that step: the "(all kernels)" row's share
is how busy the device was. `--gaps N` (CUDA) one more profiled step's idle time, by what the
host was running when each gap ended (benchmarks/host_gaps.py).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import common as C
from benchmarks.bench_mfu import matmul_peak_tflops


def active_weights(args) -> int:
    h, layers = args.hidden_size, args.num_layers
    q = args.num_attention_heads * args.kv_channels
    kv = args.num_query_groups * args.kv_channels
    experts = args.num_experts * h + args.moe_router_topk * 3 * h * args.moe_ffn_hidden_size
    return layers * (h * (q + 2 * kv) + q * h + experts)


def step_flops(args, rows: int, seq: int, response: int) -> float:
    q = args.num_attention_heads * args.kv_channels
    per_token = 6.0 * active_weights(args) + 12.0 * args.num_layers * q * seq
    return rows * (seq * per_token + response * 6.0 * args.hidden_size * args.vocab_size)


def run_experts(opts, row: str) -> dict:
    import archs
    from tandem_core.config import ActorConfig, OptimConfig, ParallelConfig
    from trainer.workers.actor import PolicyActor
    from trainer.workers.model import MoESettings, build_model_worker

    experts, _, dispatcher = row.partition("+")
    args = archs.cut_to_layers(archs.PRESETS[opts.model], opts.layers).args
    parallel = C.init_world(ParallelConfig(expert_model_parallel_size=opts.ep))
    worker = build_model_worker(
        args,
        None,  # megatron's random init
        parallel,
        dtype=opts.dtype,
        layer_spec="sdpa",
        optim=OptimConfig(lr=1e-6),
        moe=MoESettings(experts=experts, dispatcher=dispatcher or "device"),
    )
    cfg = ActorConfig(ppo_mini_batch_size=opts.batch, micro_batch_size=opts.micro_batch)
    actor = PolicyActor(worker, cfg)
    prompt = opts.seq // 2
    batch = C.training_batch(args.vocab_size, opts.batch, prompt, opts.seq - prompt, n=1)
    first_s = C.timed(lambda: actor.update_policy(batch))
    step_s = C.best_of(lambda: actor.update_policy(batch), opts.steps, warmup=0)
    step = lambda: actor.update_policy(batch)  # noqa: E731
    top_kernels = C.profile_kernels(step, opts.profile) if opts.profile else None
    gaps = None
    if opts.gaps and C.on_cuda():
        from benchmarks.host_gaps import profile_host_gaps

        gaps = profile_host_gaps(step, opts.gaps, tag=row)
    tokens = int(batch["attention_mask"].sum()) * parallel.expert_model_parallel_size
    return {
        "experts": row,
        "step_s": step_s,
        "first_s": first_s,
        "tokens": tokens,
        "flops": step_flops(args, opts.batch, opts.seq, opts.seq - prompt),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if C.on_cuda() else 0.0,
        "layers": args.num_layers,
        "active": active_weights(args),
        "top_kernels": top_kernels,
        "host_gaps": gaps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=C.pick("tiny_qwen3_moe", "qwen3_30b_a3b"))
    ap.add_argument("--layers", type=int, default=C.pick(4, 6))
    ap.add_argument("--ep", type=int, default=1, help="expert parallelism (torchrun ranks)")
    ap.add_argument("--batch", type=int, default=C.pick(4, 8), help="sequences per step")
    ap.add_argument("--seq", type=int, default=C.pick(128, 1024), help="tokens per sequence")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--dtype", default=C.default_dtype(), choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--experts", nargs="+", default=["grouped", "sequential"])
    ap.add_argument("--peak-size", type=int, default=C.pick(1024, 8192))
    ap.add_argument(
        "--dispatchers",
        nargs="+",
        default=["device"],
        help="device | megatron (model.moe_dispatcher)",
    )
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="top-N kernel table")
    ap.add_argument("--gaps", type=int, default=0, metavar="N", help="CUDA: top-N host gaps")
    ap.add_argument("--one", metavar="EXPERTS", help="(internal) run one row in this process")
    opts = ap.parse_args()
    if opts.one:  # one row, in this process (under torchrun for EP > 1)
        C.emit_result(run_experts(opts, opts.one))
        return
    keys = ("model", "layers", "ep", "batch", "seq", "micro_batch", "dtype", "steps")
    keys += ("profile", "gaps")
    forwarded = [f"--{k.replace('_', '-')}={getattr(opts, k)}" for k in keys]
    first, *others = opts.dispatchers
    names = [f"{e}+{first}" for e in opts.experts] + [f"grouped+{d}" for d in others]
    rows = []
    for name in names:
        row = C.run_child(["-m", "benchmarks.bench_moe", *forwarded, "--one", name], name, opts.ep)
        print(f"[bench_moe] {name}: {row}", flush=True)
        rows.append(row)
    peak = matmul_peak_tflops(opts.peak_size, C.torch_dtype(opts.dtype), 10)
    base = next((r for r in rows if r["experts"].startswith("sequential")), None)
    mcore = next((r for r in rows if r["experts"] == "grouped+megatron"), None)

    def ratio(ref, r) -> str:  # ref's step time over r's: how much faster r is
        return f"{ref['step_s'] / r['step_s']:.2f}x" if ref else "-"

    lines = [
        f"{opts.model}, its first {opts.layers} layers, EP {opts.ep}, {opts.dtype}, {opts.batch}"
        f" × {opts.seq} tokens per rank, micro-batch {opts.micro_batch}; measured matmul peak"
        f" {peak:.1f} TFLOP/s (per GPU; tokens/s of all ranks, MFU per GPU)",
        f"{'experts+dispatcher':<20}{'step s':>9}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>8}"
        f"{'vs seq':>9}{'vs mcore':>10}{'first s':>9}{'peak GiB':>10}",
    ]
    for r in rows:
        tflops = r["flops"] / r["step_s"] / 1e12
        lines.append(
            f"{r['experts']:<20}{r['step_s']:>9.3f}{r['tokens'] / r['step_s']:>11.0f}"
            f"{tflops:>9.1f}{tflops / peak:>8.1%}{ratio(base, r):>9}{ratio(mcore, r):>10}"
            f"{r['first_s']:>9.1f}{r['peak_mem_gib']:>10.1f}"
        )
    for r in rows:
        if r["top_kernels"]:
            lines += ["", f"{r['experts']}: kernels by device time in one step", r["top_kernels"]]
        if r.get("host_gaps"):
            lines += ["", f"{r['experts']}: where the device waited for the host", r["host_gaps"]]
    C.report("\n".join(lines))


if __name__ == "__main__":
    main()
