"""Streaming megatron -> HF weights vs a plain copy of the same bytes, on one process.

Both sides copy every byte once into preallocated destination tensors (what an engine's
`load_weights` does): "plain copy" copies megatron parameter to megatron-shaped buffers;
"stream" runs `stream_hf_weights` (QKV de-interleave, gate/up split, vocab unpad) and copies each
HF tensor into HF-shaped buffers. The ratio is the cost of the layout conversion.

    python -m benchmarks.bench_weight_stream [--model smollm2|tiny_llama] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny_llama"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    opts = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import weight_loaders as wl
    from tandem_core.config import ParallelConfig
    from tandem_core.distributed import init_distributed, init_model_parallel
    from tandem_core.models import build_gpt_model, build_transformer_config

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
    config = build_transformer_config(args, parallel, "float32")
    model = build_gpt_model(args, config)
    t0 = time.perf_counter()
    wl.load_hf_into_megatron([model], src, args, config)
    load_s = time.perf_counter() - t0

    params = list(wl.megatron_named_params([model], config))
    copy_dst = [torch.empty_like(p) for _, p in params]
    hf_dst = {n: torch.empty_like(t) for n, t in wl.stream_hf_weights(params, args)}
    copy_bytes = sum(p.numel() * p.element_size() for _, p in params)
    hf_bytes = sum(t.numel() * t.element_size() for t in hf_dst.values())

    def plain_copy():
        for d, (_, p) in zip(copy_dst, params, strict=True):
            d.copy_(p)

    def stream():
        for name, t in wl.stream_hf_weights(params, args):
            hf_dst[name].copy_(t)

    def stream_buckets():
        for b in wl.stream_hf_weights(params, args, bucket_mb=opts.bucket_mb):
            for name, t in b:
                hf_dst[name].copy_(t)

    with torch.no_grad():
        results = {
            "plain copy": (copy_bytes, _timed(plain_copy, opts.repeats)),
            "stream (per tensor)": (hf_bytes, _timed(stream, opts.repeats)),
            f"stream (buckets {opts.bucket_mb:g} MiB)": (
                hf_bytes,
                _timed(stream_buckets, opts.repeats),
            ),
        }
    print(
        f"model {opts.model}: {hf_bytes / 1e9:.3f} GB of HF tensors "
        f"({copy_bytes / 1e9:.3f} GB megatron incl. vocab padding), "
        f"threads={torch.get_num_threads()}, import {load_s:.2f} s"
    )
    base = copy_bytes / results["plain copy"][1]
    for name, (nbytes, sec) in results.items():
        gbps = nbytes / sec / 1e9
        print(
            f"  {name:28s} {sec * 1e3:8.1f} ms  {gbps:6.2f} GB/s  ({gbps / (base / 1e9):.2f}x copy)"
        )


if __name__ == "__main__":
    main()
