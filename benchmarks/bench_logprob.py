"""Log-prob throughput of the actor vs a plain megatron forward of the same model, one process.

"forward" calls the megatron GPTModel on the very micro-batches the actor builds (aligned,
trimmed, already on the device), keeping the logits of every position and nothing else: the
floor. "log-prob" is `PolicyActor.compute_log_prob` end to end: host→device copies,
micro-batching, megatron's schedule, the LM head on the response rows only, the chunked
vocab-parallel log-softmax (fp32) and the copy back.
The ratio is what log-probs cost on top of the forward. Tokens are real (unpadded) prompt +
response tokens; rows have mixed lengths (prompt and response lengths drawn in [len/2, len]).
Both are timed best of `--repeats`, interleaved, with the device synchronised around each.

Defaults: on CUDA the Qwen2.5-0.5B shape with random weights in bf16, 64 rows × (256 + 256),
micro-batch 16; on CPU SmolLM2-135M in fp32, 8 rows × (32 + 32), micro-batch 4.

    python -m benchmarks.bench_logprob [--model qwen2_0p5b|smollm2|tiny_llama|...]
        [--batch 64] [--prompt-len 256] [--response-len 256] [--micro-batch 16] [--repeats 3]
        [--profile 15]

`--profile N` adds the N kernels with the most device time in one call of each.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import common as C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=C.pick("smollm2", "qwen2_0p5b"))
    ap.add_argument("--batch", type=int, default=C.pick(8, 64))
    ap.add_argument("--prompt-len", type=int, default=C.pick(32, 256))
    ap.add_argument("--response-len", type=int, default=C.pick(32, 256))
    ap.add_argument("--micro-batch", type=int, default=C.pick(4, 16))
    ap.add_argument("--dtype", default=C.default_dtype(), choices=["float32", "bfloat16"])
    ap.add_argument("--layer-spec", default="sdpa", choices=["sdpa", "local"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="top-N kernel tables")
    opts = ap.parse_args()

    import archs
    from tandem_core import cpu_compat
    from tandem_core.config import ActorConfig
    from tandem_core.protocol import Batch
    from trainer.workers.actor import PolicyActor
    from trainer.workers.model import build_model_worker
    from trainer.workers.passes import make_micro_batches, micro_batch_layout

    src = C.resolve_model(opts.model)
    parallel = C.init_world()
    args = archs.model_args_from_hf(src.hf_dir)
    worker = build_model_worker(
        args, src.weights_dir, parallel, dtype=opts.dtype, layer_spec=opts.layer_spec
    )
    batch = Batch.from_dict(
        C.rollout_batch(args.vocab_size, opts.batch, opts.prompt_len, opts.response_len)
    )
    actor = PolicyActor(worker, ActorConfig(micro_batch_size=opts.micro_batch))
    tokens = int(batch["attention_mask"].sum())
    model = worker.chunks[0]
    mbs = make_micro_batches(batch, opts.micro_batch, None, **micro_batch_layout(worker, batch))

    @torch.no_grad()
    def plain_forward():
        with cpu_compat.megatron_device_scope():
            for mb in mbs:
                model(mb.input_ids, mb.position_ids, None)

    def logprobs():
        actor.compute_log_prob(batch)

    plain_forward(), logprobs()  # warm-up
    best = C.interleaved_best({"forward": plain_forward, "logprob": logprobs}, opts.repeats)
    fwd_s, lp_s = best["forward"], best["logprob"]
    init = "random init" if src.random_init else "checkpoint"
    head = (
        f"model {opts.model} ({init}): {args.num_layers} layers, hidden {args.hidden_size}, "
        f"vocab {args.vocab_size}; {opts.dtype}, spec {opts.layer_spec}; {opts.batch} rows × "
        f"({opts.prompt_len} + {opts.response_len}), {tokens} real tokens, micro-batch "
        f"{opts.micro_batch}; {C.device_name()}"
    )
    table = C.markdown_table(
        ["pass", "time", "tokens/s"],
        [
            ["plain megatron forward", f"{fwd_s * 1e3:,.1f} ms", f"{tokens / fwd_s:,.0f}"],
            ["compute_log_prob", f"{lp_s * 1e3:,.1f} ms", f"{tokens / lp_s:,.0f}"],
        ],
    )
    text = f"{head}\n\n{table}\n\nlog-prob / forward throughput: {fwd_s / lp_s:.3f}"
    if opts.profile:
        for name, fn in (("plain megatron forward", plain_forward), ("compute_log_prob", logprobs)):
            text += f"\n\n{name}: kernels with the most device time\n\n"
            text += C.profile_kernels(fn, opts.profile)
    C.report(text)


if __name__ == "__main__":
    C.run_main(main)
