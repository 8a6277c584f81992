"""The actor update on long-tailed response lengths: packed micro-batches (`model.pack_sequences`,
token budgets filled first-fit-decreasing) vs padded ones, side by side in one run.

    python -m benchmarks.bench_packing [--model qwen3_8b] [--layers 8] [--batch 32]
        [--mean 4096] [--max 16384] [--budget 32768] [--micro-batch 2] [--steps 2]

One batch of `--batch` sequences: a 256-token prompt and a response whose length is drawn
from a log-normal (median ≈ --mean / 1.6, the long tail clipped at --max), fixed seed. Rows,
each in its own process, the same `PolicyActor.update_policy` (megatron, the sdpa spec, fused
AdamW, one optimizer step over the whole batch):
- `padded`: fixed micro-batches of `--micro-batch` rows, each padded to its longest row;
- `padded-budget`: token-budget micro-batches, rows × longest ≤ --budget (Tandem's dynamic
  batching before packing);
- `packed`: token-budget micro-batches of real tokens ≤ --budget, each one packed row.
Tokens/s counts real tokens (prompt + response) of the batch; step time is the best of
`--steps` after one warm-up step.
"""

from __future__ import annotations

import argparse
import math

import torch

from benchmarks import common as C

ROWS = ("padded", "padded-budget", "packed")


def lengths(opts) -> list[int]:
    """Response lengths: log-normal around the mean, sigma 1 (mean = median · e^0.5)."""
    g = torch.Generator().manual_seed(0)
    median = opts.mean / math.exp(0.5)
    drawn = torch.exp(torch.randn(opts.batch, generator=g) + math.log(median))
    return [int(x) for x in drawn.clamp(64, opts.max).tolist()]


def long_tail_batch(vocab: int, opts):
    from tandem_core.protocol import Batch

    resp = lengths(opts)
    prompt, width = 256, max(resp)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (opts.batch, prompt + width), generator=g)
    resp_mask = (torch.arange(width)[None] < torch.tensor(resp)[:, None]).long()
    attn = torch.cat([torch.ones(opts.batch, prompt, dtype=torch.long), resp_mask], dim=1)
    ids = ids * attn
    data = {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
        "responses": ids[:, prompt:],
        "response_mask": resp_mask,
        "old_log_probs": torch.full((opts.batch, width), -math.log(vocab)),
        "advantages": torch.randn(opts.batch, width, generator=g),
    }
    return Batch.from_dict(data, meta_info={"n": 1})


def computed_tokens(opts, name: str) -> int:
    """Token positions the row's micro-batches run (real tokens + padding): what bounds the
    speed-up packing can give, before attention's quadratic cost."""
    from trainer.workers.sequences import split_by_token_budget

    real = [256 + n for n in lengths(opts)]
    if name == "packed":
        return sum(real)
    if name == "padded":
        groups = [
            range(i, min(i + opts.micro_batch, len(real)))
            for i in range(0, len(real), opts.micro_batch)
        ]
    else:
        groups = split_by_token_budget(real, opts.budget)
    return sum(len(g) * max(real[i] for i in g) for g in groups)


def run_row(opts, name: str) -> dict:
    import archs
    from tandem_core.config import ActorConfig, OptimConfig
    from trainer.workers.actor import PolicyActor
    from trainer.workers.model import build_model_worker

    src = C.resolve_model(opts.model, opts.layers)
    parallel = C.init_world()
    args = archs.model_args_from_hf(src.hf_dir)
    worker = build_model_worker(
        args,
        src.weights_dir,
        parallel,
        dtype=opts.dtype,
        layer_spec="sdpa",
        optim=OptimConfig(lr=1e-6),
        pack_sequences=name == "packed",
    )
    budget = name != "padded"
    cfg = ActorConfig(
        ppo_mini_batch_size=opts.batch,
        micro_batch_size=opts.micro_batch,
        use_dynamic_bsz=budget,
        max_tokens_per_microbatch=opts.budget,
    )
    actor = PolicyActor(worker, cfg)
    batch = long_tail_batch(args.vocab_size, opts)

    def step():
        metrics = actor.update_policy(batch)
        if metrics["actor/skipped_steps"]:
            raise RuntimeError(f"{name}: a step was skipped (non-finite loss)")

    agreement = None
    if name == "packed":  # the same weights through both layouts: log-probs must agree
        packed = actor.compute_log_prob(batch)["log_probs"]
        worker.pack_sequences = False
        padded = actor.compute_log_prob(batch)["log_probs"]
        worker.pack_sequences = True
        mask = batch["response_mask"].bool()
        agreement = float((packed - padded).abs()[mask].max())
    first_s = C.timed(step)
    step_s = C.best_of(step, opts.steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if C.on_cuda() else 0.0
    real = int(batch["attention_mask"].sum())
    return {
        "row": name,
        "step_s": step_s,
        "first_s": first_s,
        "tokens": real,
        "peak_gib": peak,
        "logprob_vs_padded": agreement,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=C.pick("tiny_llama", "qwen3_8b"))
    ap.add_argument("--layers", type=int, default=C.pick(None, 8))
    ap.add_argument("--batch", type=int, default=C.pick(8, 32))
    ap.add_argument("--mean", type=int, default=C.pick(96, 4096), help="mean response length")
    ap.add_argument("--max", type=int, default=C.pick(200, 16384), help="longest response")
    ap.add_argument("--budget", type=int, default=C.pick(512, 32768), help="tokens a micro-batch")
    ap.add_argument("--micro-batch", type=int, default=2, help="rows of a padded micro-batch")
    ap.add_argument("--dtype", default=C.default_dtype(), choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--one", help="(internal) run one row in this process")
    opts = ap.parse_args()
    if opts.one:
        C.emit_result(run_row(opts, opts.one))
        return
    C.resolve_model(opts.model, opts.layers)
    forwarded = [
        f"--{k.replace('_', '-')}={getattr(opts, k)}"
        for k in ("model", "batch", "mean", "max", "budget", "micro_batch", "dtype", "steps")
    ]
    if opts.layers:
        forwarded.append(f"--layers={opts.layers}")
    results = {}
    for name in opts.rows:
        results[name] = C.run_child(
            ["-m", "benchmarks.bench_packing", *forwarded, "--one", name], name
        )
        print(f"[bench_packing] {name}: {results[name]}", flush=True)
    resp = lengths(opts)
    base = results.get("padded") or next(iter(results.values()))
    table = C.markdown_table(
        [
            "update",
            "step",
            "real tokens/s",
            "vs padded",
            "positions run / real",
            "peak GiB",
            "first step",
        ],
        [
            [
                name,
                f"{r['step_s'] * 1e3:,.0f} ms",
                f"{r['tokens'] / r['step_s']:,.0f}",
                f"{base['step_s'] / r['step_s']:.2f}×",
                f"{computed_tokens(opts, name) / r['tokens']:.2f}",
                f"{r['peak_gib']:.1f}",
                f"{r['first_s']:.1f} s",
            ]
            for name, r in results.items()
        ],
    )
    C.report(
        f"model {opts.model} ({opts.layers or 'all'} layers), {opts.dtype}, {C.device_name()}\n"
        f"{opts.batch} sequences: 256-token prompts, responses {min(resp)}–{max(resp)} tokens "
        f"(mean {sum(resp) / len(resp):,.0f}), {base['tokens']:,} real tokens; budget "
        f"{opts.budget} tokens, padded micro-batches of {opts.micro_batch}\n\n{table}"
        + (
            f"\n\npacked vs padded log-probs, same weights: max abs diff "
            f"{results['packed']['logprob_vs_padded']:.2e}"
            if "packed" in results
            else ""
        )
    )


if __name__ == "__main__":
    C.run_main(main)
