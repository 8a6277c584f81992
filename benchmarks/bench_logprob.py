"""Log-prob throughput of the actor vs a plain megatron forward of the same model, one process.

"forward" calls the megatron GPTModel on the very micro-batches the actor builds (aligned,
trimmed), keeping the logits and nothing else: the floor. "log-prob" is
`MegatronActor.compute_log_prob` end to end: micro-batching, megatron's schedule, the chunked
vocab-parallel log-softmax and entropy, the [B, R] gather. The ratio is what log-probs cost on
top of the forward. Tokens are real (unpadded) prompt + response tokens.

    python -m benchmarks.bench_logprob [--model smollm2|tiny_llama] [--batch 8]
        [--prompt-len 32] [--response-len 32] [--micro-batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rollout(vocab: int, batch: int, prompt_len: int, resp_len: int):
    """Left-padded prompts and right-padded responses of mixed lengths (fixed seed)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, prompt_len + resp_len), generator=g)
    p_real = torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=g)
    r_real = torch.randint(resp_len // 2, resp_len + 1, (batch,), generator=g)
    pos = torch.arange(prompt_len + resp_len)
    prompt_mask = (pos[None, :prompt_len] >= (prompt_len - p_real)[:, None]).long()
    resp_mask = (pos[None, :resp_len] < r_real[:, None]).long()
    attn = torch.cat([prompt_mask, resp_mask], dim=1)
    ids = ids * attn
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
        "responses": ids[:, prompt_len:],
        "response_mask": resp_mask,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny_llama"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    import weight_loaders as wl
    from tandem_core import cpu_compat
    from tandem_core.config import ActorConfig, ParallelConfig
    from tandem_core.distributed import init_distributed, init_model_parallel
    from tandem_core.protocol import Batch
    from trainer.actor import MegatronActor
    from trainer.megatron_worker import (
        build_model_worker,
        make_micro_batches,
        micro_batch_layout,
    )

    if opts.model == "smollm2":
        from tandem_core.smollm2 import ensure_smollm2_checkpoint

        src = ensure_smollm2_checkpoint()
    else:
        from tandem_core.tiny_models import ensure_tiny_checkpoint

        src = ensure_tiny_checkpoint(opts.model)
    init_distributed()
    parallel = ParallelConfig()
    init_model_parallel(parallel)
    args = wl.model_args_from_hf(src)
    worker = build_model_worker(args, src, parallel)
    batch = Batch.from_dict(
        _rollout(args.vocab_size, opts.batch, opts.prompt_len, opts.response_len)
    )
    actor = MegatronActor(worker, ActorConfig(micro_batch_size=opts.micro_batch))
    tokens = int(batch["attention_mask"].sum())
    model = worker.chunks[0]
    mbs = make_micro_batches(batch, opts.micro_batch, None, **micro_batch_layout(worker))

    @torch.no_grad()
    def plain_forward():
        with cpu_compat.megatron_device_scope():
            for mb in mbs:
                model(mb.input_ids, mb.position_ids, None)

    def logprobs():
        actor.compute_log_prob(batch)

    plain_forward(), logprobs()  # warm-up
    # Interleaved, best of `repeats` each, so machine noise hits both sides alike.
    fwd_s = lp_s = float("inf")
    for _ in range(opts.repeats):
        fwd_s = min(fwd_s, _seconds(plain_forward))
        lp_s = min(lp_s, _seconds(logprobs))
    print(
        f"model {opts.model}: {args.num_layers} layers, hidden {args.hidden_size}, "
        f"vocab {args.vocab_size}; {opts.batch} rows, {tokens} real tokens, micro-batch "
        f"{opts.micro_batch}, {torch.get_num_threads()} thread(s)"
    )
    print(f"plain megatron forward: {fwd_s * 1e3:8.1f} ms  {tokens / fwd_s:9.1f} tokens/s")
    print(f"compute_log_prob:       {lp_s * 1e3:8.1f} ms  {tokens / lp_s:9.1f} tokens/s")
    print(f"log-prob / forward throughput: {fwd_s / lp_s:.3f}")


if __name__ == "__main__":
    main()
