"""HybridEngine swap cost on this machine: `python -m benchmarks.bench_swap [--model M]`.

One process (a world of one). Measured side by side in one run:
- weight sync: streaming the actor's weights into the engine (`load_weights` of the HF stream),
  against a plain copy of the same bytes (`torch` copy into preallocated tensors);
- enter + exit of the sharding manager, as a share of one actor training step (update_policy on
  a GRPO-sized batch of the same model).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--backend", default="vllm")
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()

    import weight_loaders
    from hybrid_engine import get_sharding_manager
    from rollout import build_rollout
    from tandem_core import distributed as D
    from tandem_core.config import ActorConfig, OptimConfig, ParallelConfig, RolloutConfig
    from tandem_core.protocol import Batch
    from trainer.actor import MegatronActor
    from trainer.megatron_worker import build_model_worker

    if opts.model == "smollm2_135m":
        from tandem_core.smollm2 import ensure_smollm2_checkpoint

        hf_dir = ensure_smollm2_checkpoint()
    else:
        from tandem_core.tiny_models import ensure_tiny_checkpoint

        hf_dir = ensure_tiny_checkpoint(opts.model)
    D.init_distributed()
    parallel = ParallelConfig()
    D.init_model_parallel(parallel)
    args = weight_loaders.model_args_from_hf(hf_dir)
    worker = build_model_worker(args, hf_dir, parallel, optim=OptimConfig(lr=1e-6))
    rollout = build_rollout(
        RolloutConfig(name=opts.backend, response_length=16), hf_dir, max_model_len=256
    )
    manager = get_sharding_manager(opts.backend)(worker, rollout)

    # Weight sync vs a plain copy of the same bytes.
    manager.allgather.gather()
    pairs = [(n, t.detach().clone()) for n, t in manager.hf_weights()]
    nbytes = sum(t.numel() * t.element_size() for _, t in pairs)
    dst = [torch.empty_like(t) for _, t in pairs]

    def plain_copy():
        for d, (_, s) in zip(dst, pairs, strict=True):
            d.copy_(s)

    copy_s = _best(plain_copy, opts.repeat)
    sync_s = _best(lambda: rollout.load_weights(manager.hf_weights()), opts.repeat)
    manager.allgather.release()

    def swap():
        with manager:
            pass

    swap_s = _best(swap, opts.repeat)

    # One actor step on a GRPO-sized batch: 8 prompts × 4 samples, 64 prompt + 64 response tokens.
    g = torch.Generator().manual_seed(0)
    B, P, R = 32, 64, 64
    ids = torch.randint(10, args.vocab_size, (B, P + R), generator=g)
    batch = Batch.from_dict(
        {
            "input_ids": ids,
            "attention_mask": torch.ones(B, P + R, dtype=torch.long),
            "responses": ids[:, P:],
            "response_mask": torch.ones(B, R, dtype=torch.long),
            "old_log_probs": torch.zeros(B, R) - 2.0,
            "advantages": torch.randn(B, R, generator=g),
        },
        meta_info={"n": 4},
    )
    actor = MegatronActor(worker, ActorConfig(ppo_mini_batch_size=8, micro_batch_size=4))
    step_s = _best(lambda: actor.update_policy(batch), 1)

    print(
        f"model {opts.model} ({nbytes / 1e9:.3f} GB of HF tensors), backend {opts.backend}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(
        f"  plain copy of the same bytes : {copy_s * 1e3:8.1f} ms  ({nbytes / copy_s / 1e9:.2f} GB/s)"
    )
    print(
        f"  weight sync into the engine  : {sync_s * 1e3:8.1f} ms  ({nbytes / sync_s / 1e9:.2f} GB/s, "
        f"{sync_s / copy_s:.2f}x copy)"
    )
    print(f"  swap (enter + exit)          : {swap_s * 1e3:8.1f} ms")
    print(
        f"  actor step (32 seq × 128 tok): {step_s * 1e3:8.1f} ms  -> swap = "
        f"{100 * swap_s / step_s:.1f}% of a step"
    )


if __name__ == "__main__":
    main()
