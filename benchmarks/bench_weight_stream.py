"""Streaming megatron -> HF weights vs a plain copy of the same bytes, on one process.

Both sides copy every byte once into preallocated destination tensors (what an engine's
`load_weights` does): "plain copy" copies megatron parameter to megatron-shaped buffers;
"stream" runs `stream_hf_weights` (QKV de-interleave, gate/up split, vocab unpad) and copies each
HF tensor into HF-shaped buffers. The ratio is the cost of the layout conversion.

Best of `--repeats` each after one warm-up, the device synchronised around each.

    python -m benchmarks.bench_weight_stream [--model smollm2|tiny_llama|...] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import common as C


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default=C.default_dtype(), choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    opts = parser.parse_args()

    import archs
    import weight_loaders as wl
    from tandem_core.models import build_gpt_model, build_transformer_config

    src = C.resolve_model(opts.model)
    parallel = C.init_world()
    args = archs.model_args_from_hf(src.hf_dir)
    config = build_transformer_config(args, parallel, opts.dtype)
    model = build_gpt_model(args, config)
    load_s = 0.0
    if src.weights_dir is not None:  # else megatron's random init
        load_s = C.timed(lambda: wl.load_hf_into_megatron([model], src.hf_dir, args, config))

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
            "plain copy": (copy_bytes, C.best_of(plain_copy, opts.repeats, warmup=1)),
            "stream (per tensor)": (hf_bytes, C.best_of(stream, opts.repeats, warmup=1)),
            f"stream (buckets {opts.bucket_mb:g} MiB)": (
                hf_bytes,
                C.best_of(stream_buckets, opts.repeats, warmup=1),
            ),
        }
    lines = [
        f"model {opts.model}: {hf_bytes / 1e9:.3f} GB of HF tensors "
        f"({copy_bytes / 1e9:.3f} GB megatron incl. vocab padding), {opts.dtype}, "
        f"{C.device_name()}, import {load_s:.2f} s",
        "",
    ]
    base = copy_bytes / results["plain copy"][1]
    rows = []
    for name, (nbytes, sec) in results.items():
        gbps = nbytes / sec / 1e9
        rows.append([name, f"{sec * 1e3:,.1f} ms", f"{gbps:.2f}", f"{gbps / (base / 1e9):.2f}×"])
    lines.append(C.markdown_table(["method", "time", "GB/s", "vs copy"], rows))
    C.report("\n".join(lines))


if __name__ == "__main__":
    C.run_main(main)
