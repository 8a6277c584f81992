"""Model FLOPs utilisation of the actor update vs plain megatron-core, in one run.

    python -m benchmarks.bench_mfu [--model llama3_1b] [--batch 16] [--seq 1024]
        [--micro-batch 4] [--specs sdpa sdpa-unfused sdpa-compiled local megatron] [--steps 3] [--peak-size 8192]
        [--profile 20] [--gaps 20] [--layers N (a shape preset cut to its first N layers)]

Three ways to run the same optimizer step (one mini-batch, one optimizer step):
- `sdpa`: `PolicyActor.update_policy` with Tandem's default layer spec: forward + backward
  of every micro-batch through megatron's schedule, the LM head on the response rows only,
  the PPO loss on the fused vocab-parallel log-probs, megatron's distributed optimizer step
  (Adam, fp32 master weights) with torch's fused AdamW kernel (`actor.optim.fused`), weight
  gradients accumulated by their GEMMs into the fp32 main grads (tandem_core/wgrad_fusion.py).
- `sdpa-unfused` (on request): the same with megatron's weight gradients unfused (each
  layer's bf16 gradient added into its fp32 main grad by megatron's DDP hook, as without apex).
- `sdpa-compiled` (on request): the same with each decoder layer's forward compiled
  (`actor.compile_layers=true`).
- `local`: the same update with megatron's local layer spec (unfused attention): the
  attention alone, everything else shared.
- `fsdp2` (on request, `--specs sdpa fsdp2`): the same `PolicyActor.update_policy` on the FSDP2
  strategy (trainer/workers/fsdp.py: transformers' model under fully_shard, its LM head on the
  response span, torch's AdamW): the issue's "FSDP2 vs Tandem's megatron path" ratio;
  `fsdp2-compiled`: the same with each decoder layer's forward compiled (actor.compile_layers).
- `megatron`: plain megatron-core, the baseline the GPU targets are stated against: the local
  spec, and the loss the way megatron trains a GPTModel (`model(..., labels=...)`: logits for
  every position, megatron's `vocab_parallel_cross_entropy` on them upcast to fp32), the same
  PPO loss on -CE at the response positions, the same schedule and distributed optimizer,
  stepping with torch's foreach AdamW, no gradient-accumulation fusion, megatron's own
  torch.compile'd SwiGLU and its per-tensor grad-norm fallback (megatron's choices without
  TE/apex, not the stand-ins Tandem hands megatron). Its loss differs from the others' only
  where the vocabulary is padded (megatron's softmax includes the padding columns; Llama-3.2's
  128,256 needs none).
bf16 on CUDA, fp32 on CPU. Same model shape (random init), same batch (every row full:
`--seq` tokens, half prompt, half response), one world of one. Each runs in its own process,
one after the other (so none holds another's memory); the parent then measures this device's
matmul peak: the best of `--peak-repeats` `--peak-size`³ torch.matmul in the same dtype (after
warm-up), 2·n³ FLOP each. Step time is the best of `--steps` after `--warmup` steps, with the
device synchronised around each. The first warm-up step, when torch.compile builds the
kernels, is reported on its own.

FLOP count (fwd + bwd = 3 × forward, the Megatron/PaLM convention), per step:
    tokens·(6·N + 12·L·q·s) + response tokens·6·h·V
N = the layers' matmul weights: L·[h·(q + 2·kv) + q·h + 3·h·f] (attention QKV and output,
gated MLP; the embedding lookup, norms and biases are not counted), q = heads·head_dim,
kv = query_groups·head_dim, f = FFN width, V = the real (unpadded) vocabulary, s = sequence
length. The LM head (h·V) runs on the response positions only (`ResponseRowsGPTModel`), so
only those are credited. The attention term counts the full s×s score and value products, NOT
halved for causal masking (SDPA's flash kernel skips the upper half; the local spec computes
it and masks it), so the same number of FLOPs is credited to every row: `megatron` computes
the prompt's logits too and is not credited for them (its MFU is of the useful work). Tokens =
every token of the batch (all rows are full). MFU = achieved FLOP/s / peak, against the
measured peak and against 989 TFLOP/s (H100/H200 SXM dense bf16, nominal; CUDA only).

`--profile N` adds, per row, the N kernels with the most device time in one more step
(torch.profiler), as a share of that step; `--gaps N` (CUDA) one more profiled step's idle
time, by what the host was running when each gap ended (benchmarks/host_gaps.py). Every timed
step's time is in the row's result line (`steps_s`); "host µs/launch" is the row process's host
time per queued one-element op (`common.host_launch_us`), the speed a launch-bound step follows.
"""

from __future__ import annotations

import argparse
import math

import torch

from benchmarks import common as C

BASELINES = {
    "sdpa-unfused": "the same update with the weight gradients unfused: the fusion's gain",
    "sdpa-compiled": "the same update with its layers compiled (the ratio below 1 is their gain)",
    "local": "the same update with unfused attention: attention alone",
    "megatron": "plain megatron-core, the local spec and its full-logit fp32 cross-entropy",
}


def matmul_weights(args) -> int:
    """N of the docstring: the layers' parameters every token multiplies with."""
    h, f, L = args.hidden_size, args.ffn_hidden_size, args.num_layers
    q = args.num_attention_heads * args.kv_channels
    kv = args.num_query_groups * args.kv_channels
    return L * (h * (q + 2 * kv) + q * h + 3 * h * f)


def step_flops(args, rows: int, seq: int, response: int) -> float:
    """FLOPs of one update over `rows` full rows of `seq` tokens, `response` of them response."""
    q = args.num_attention_heads * args.kv_channels
    per_token = 6.0 * matmul_weights(args) + 12.0 * args.num_layers * q * seq
    return rows * (seq * per_token + response * 6.0 * args.hidden_size * args.vocab_size)


def matmul_peak_tflops(size: int, dtype: torch.dtype, repeats: int) -> float:
    """Best of `repeats` size³ matmuls on this device (random normal inputs), in TFLOP/s."""
    dev = C.device()
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(size, size, device=dev, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=dev, dtype=dtype, generator=g)
    out = torch.empty(size, size, device=dev, dtype=dtype)
    best = C.best_of(lambda: torch.matmul(a, b, out=out), repeats, warmup=3)
    return 2.0 * size**3 / best / 1e12


def plain_megatron_step(worker, batch, cfg) -> dict[str, float]:
    """One optimizer step the way megatron-core trains a GPTModel: `model(..., labels=...)`
    returns the per-token cross-entropy of logits for every position (megatron's
    `vocab_parallel_cross_entropy`, fp32); the actor's PPO loss runs on -CE at the response
    positions. Micro-batches, schedule and optimizer step are the actor's."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tandem_core import cpu_compat
    from trainer import core_algos
    from trainer.workers.passes import make_micro_batches

    mbs = make_micro_batches(batch, cfg.micro_batch_size, None, seq_multiple=1)
    tokens = float(batch["response_mask"].sum())

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        labels = torch.cat([mb.input_ids[:, 1:], torch.zeros_like(mb.input_ids[:, :1])], 1)
        cross_entropy = model(mb.input_ids, mb.position_ids, None, labels=labels)  # [b, s]

        def loss_func(ce):
            logp = -ce.gather(1, mb.response_index)
            f = mb.fields
            loss, _ = core_algos.POLICY_LOSSES[cfg.policy_loss](
                f["old_log_probs"], logp, f["advantages"], mb.response_mask, global_tokens=tokens
            )
            return loss * len(mbs), {"pg_loss": loss.detach()}

        return cross_entropy, loss_func

    for chunk in worker.chunks:
        chunk.zero_grad_buffer()
    worker.optimizer.zero_grad()
    with cpu_compat.megatron_device_scope():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(mbs)],
            model=worker.chunks,
            num_microbatches=len(mbs),
            seq_length=max(mb.input_ids.shape[1] for mb in mbs),
            micro_batch_size=cfg.micro_batch_size,
        )
        worker.optimizer.step()
    pg_loss = float(sum(o["pg_loss"] for o in outputs))
    if not math.isfinite(pg_loss):
        raise RuntimeError(f"megatron: non-finite loss {pg_loss}")
    return {"actor/pg_loss": pg_loss, "actor/skipped_steps": 0.0}


def run_spec(opts, name: str) -> dict:
    """One process: build the model for this row (`sdpa`, `local` or plain `megatron`), time
    its update steps."""
    import archs
    from tandem_core.config import ActorConfig, OptimConfig
    from trainer.workers.actor import PolicyActor
    from trainer.workers.fsdp import build_fsdp_worker
    from trainer.workers.model import build_model_worker

    src = C.resolve_model(opts.model, opts.layers)
    parallel = C.init_world()
    args = archs.model_args_from_hf(src.hf_dir)
    if name.startswith("fsdp2"):  # the same update on the FSDP2 strategy (transformers' model)
        worker = build_fsdp_worker(
            args,
            src.hf_dir,
            dtype=opts.dtype,
            optim=OptimConfig(lr=1e-6, fused=opts.adam == "fused"),
            random_init=src.random_init,
            compile_layers=name == "fsdp2-compiled",
        )
    else:
        worker = build_model_worker(
            args,
            src.weights_dir,
            parallel,
            dtype=opts.dtype,
            layer_spec="local" if name in ("local", "megatron") else "sdpa",
            compile_layers=name == "sdpa-compiled",
            # plain megatron-core steps torch's foreach AdamW (its default without TE/apex)
            optim=OptimConfig(lr=1e-6, fused=name != "megatron" and opts.adam == "fused"),
        )
    if name in ("megatron", "sdpa-unfused"):  # megatron-core without apex: no wgrad fusion
        for module in (m for chunk in worker.chunks for m in chunk.modules()):
            if hasattr(module, "gradient_accumulation_fusion"):
                module.gradient_accumulation_fusion = False
    if name == "megatron":  # and its own SwiGLU and grad-norm fallbacks, not Tandem's stand-ins
        from tandem_core import multi_tensor, swiglu_kernel

        swiglu_kernel.uninstall()
        multi_tensor.uninstall()
    cfg = ActorConfig(ppo_mini_batch_size=opts.batch, micro_batch_size=opts.micro_batch)
    actor = PolicyActor(worker, cfg)
    prompt = opts.seq // 2
    batch = C.training_batch(args.vocab_size, opts.batch, prompt, opts.seq - prompt, n=1)
    metrics = []

    def step():
        if name == "megatron":
            metrics.append(plain_megatron_step(worker, batch, cfg))
        else:
            metrics.append(actor.update_policy(batch))

    launch_us = C.host_launch_us()
    first_s = C.timed(step)  # includes torch.compile's builds for this shape
    for _ in range(max(opts.warmup - 1, 0)):
        step()
    steps_s = [C.timed(step) for _ in range(max(opts.steps, 1))]
    top_kernels = C.profile_kernels(step, opts.profile) if opts.profile else None
    gaps = None
    if opts.gaps and C.on_cuda():
        from benchmarks.host_gaps import profile_host_gaps

        gaps = profile_host_gaps(step, opts.gaps, tag=name)
    skipped = sum(m["actor/skipped_steps"] for m in metrics)
    if skipped:
        raise RuntimeError(f"{name}: {skipped:g} of {len(metrics)} steps skipped (non-finite loss)")
    tokens = int(batch["attention_mask"].sum())
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if C.on_cuda() else 0.0
    return {
        "spec": name,
        "step_s": min(steps_s),
        "steps_s": [round(t, 4) for t in steps_s],
        "launch_us": launch_us,
        "first_s": first_s,
        "tokens": tokens,
        "flops": step_flops(args, opts.batch, opts.seq, opts.seq - prompt),
        "matmul_weights": matmul_weights(args),
        "top_kernels": top_kernels,
        "host_gaps": gaps,
        "peak_mem_gib": peak_mem,
        "pg_loss": metrics[-1]["actor/pg_loss"],
        "layers": args.num_layers,
        "hidden": args.hidden_size,
        "vocab": args.vocab_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=C.pick("tiny_llama", "llama3_1b"))
    ap.add_argument("--layers", type=int, help="a shape preset cut to its first N layers")
    ap.add_argument(
        "--specs",
        nargs="+",
        default=["sdpa", "local", "megatron"],
        choices=[
            "sdpa",
            "sdpa-unfused",
            "sdpa-compiled",
            "local",
            "megatron",
            "fsdp2",
            "fsdp2-compiled",
        ],
    )
    ap.add_argument("--batch", type=int, default=C.pick(8, 16), help="sequences per step")
    ap.add_argument("--seq", type=int, default=C.pick(256, 1024), help="tokens per sequence")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--dtype", default=C.default_dtype(), choices=["float32", "bfloat16"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peak-size", type=int, default=C.pick(1024, 8192))
    ap.add_argument("--peak-repeats", type=int, default=10)
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="top-N kernel table")
    ap.add_argument(
        "--gaps", type=int, default=0, metavar="N", help="CUDA: the N largest host-gap sources"
    )
    ap.add_argument("--adam", default="fused", choices=["fused", "foreach"], help="sdpa/local")
    ap.add_argument("--one", metavar="SPEC", help="(internal) run one row in this process")
    opts = ap.parse_args()

    if opts.one:
        C.emit_result(run_spec(opts, opts.one))
        return

    C.resolve_model(
        opts.model, opts.layers
    )  # build the model directory once, before the timed processes
    forwarded = [
        f"--{k.replace('_', '-')}={getattr(opts, k)}"
        for k in (
            "model",
            "batch",
            "seq",
            "micro_batch",
            "dtype",
            "warmup",
            "steps",
            "profile",
            "gaps",
            "adam",
        )
    ]
    if opts.layers:
        forwarded.append(f"--layers={opts.layers}")
    results = {}
    for spec in opts.specs:
        r = C.run_child(["-m", "benchmarks.bench_mfu", *forwarded, "--one", spec], spec)
        results[spec] = r
        print(f"[bench_mfu] {spec}: {r}", flush=True)
    peak = matmul_peak_tflops(opts.peak_size, C.torch_dtype(opts.dtype), opts.peak_repeats)

    first = next(iter(results.values()))
    lines = [
        f"model {opts.model} ({first['layers']} layers, hidden {first['hidden']}, vocab "
        f"{first['vocab']}, N = {first['matmul_weights'] / 1e9:.3f}B matmul weights), "
        f"{opts.dtype}, {C.device_name()}",
        f"batch {opts.batch} × {opts.seq} tokens (full rows, half response), micro-batch "
        f"{opts.micro_batch}, one optimizer step; {first['flops'] / first['tokens'] / 1e9:.2f} "
        "GFLOP/token (6·N + 12·L·q·s, + 6·h·V per response token; attention not halved for "
        "causal)",
        f"measured matmul peak: {peak:.1f} TFLOP/s ({opts.peak_size}³ {opts.dtype}, best of "
        f"{opts.peak_repeats})",
        "",
    ]
    rows = []
    for spec, r in results.items():
        tflops = r["flops"] / r["step_s"] / 1e12
        nominal = f"{100 * tflops / C.H100_BF16_DENSE_TFLOPS:.1f} %" if C.on_cuda() else "n/a"
        rows.append(
            [
                spec,
                f"{r['step_s'] * 1e3:,.1f} ms",
                f"{r['tokens'] / r['step_s']:,.0f}",
                f"{tflops:.2f}",
                f"{100 * tflops / peak:.1f} %",
                nominal,
                f"{r['peak_mem_gib']:.1f}",
                f"{r['first_s']:.1f} s",
                f"{r['launch_us']:.1f}",
            ]
        )
    header = ["update", "step", "tokens/s", "TFLOP/s", "MFU vs measured peak"]
    header += ["MFU vs 989 nominal", "peak mem GiB", "first step (compiles)", "host µs/launch"]
    lines.append(C.markdown_table(header, rows))
    for baseline, what in BASELINES.items():
        if "sdpa" in results and baseline in results:
            speedup = results[baseline]["step_s"] / results["sdpa"]["step_s"]
            lines.append(f"\nsdpa / {baseline} (tokens/s): {speedup:.2f}× ({what})")
    for fsdp in ("fsdp2", "fsdp2-compiled"):
        if "sdpa" in results and fsdp in results:
            ratio = results["sdpa"]["step_s"] / results[fsdp]["step_s"]
            lines.append(f"\n{fsdp} / sdpa (tokens/s): {ratio:.2f}× (FSDP2 vs megatron's path)")
    for spec, r in results.items():
        if r.get("host_gaps"):
            lines.append(
                f"\n{spec}: where the device waited for the host (benchmarks/host_gaps.py)\n"
            )
            lines.append(r["host_gaps"])
    for spec, r in results.items():
        if r["top_kernels"]:
            lines.append(f"\n{spec}: kernels with the most device time in one step\n")
            lines.append(r["top_kernels"])
    C.report("\n".join(lines))


if __name__ == "__main__":
    C.run_main(main)
