"""For one TP/PP(/VPP) layout and each tiny architecture given: HF -> megatron import (owned
slices only), megatron logits vs HF logits, the TP-gathered HF stream vs the checkpoint
(bitwise), and export megatron -> HF vs the checkpoint (bitwise, and loadable by transformers).

usage: wl_layout.py TP PP VPP(0=none) OUT_ROOT PRESET [PRESET ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _common import exit_now, write_result  # noqa: E402
from wl_common import build_chunks, hf_logits, megatron_logits, read_all, setup  # noqa: E402

import archs  # noqa: E402
import weight_loaders as wl  # noqa: E402
from archs import ensure_tiny_checkpoint  # noqa: E402

BUCKET_MB = 0.1


def check_stream(chunks, config, args, source) -> int:
    from megatron.core import parallel_state as mpu

    seen = 0
    buckets = wl.stream_hf_weights(
        wl.megatron_named_params(chunks, config),
        args,
        tp_group=mpu.get_tensor_model_parallel_group(),
        bucket_mb=BUCKET_MB,
    )
    for b in buckets:
        sizes = [t.numel() * t.element_size() for _, t in b]
        assert len(b) == 1 or sum(sizes) <= BUCKET_MB * 2**20, (len(b), sum(sizes))
        for name, t in b:
            assert torch.equal(t, source[name]), f"streamed {name} differs from the checkpoint"
            seen += 1
    return seen


def run_preset(preset: str, parallel, out_root: Path, tokens: torch.Tensor) -> dict:
    from megatron.core import parallel_state as mpu

    src = ensure_tiny_checkpoint(preset)
    args = archs.model_args_from_hf(src)
    chunks, config = build_chunks(args, parallel)
    wl.load_hf_into_megatron(chunks, src, args, config)

    logits = megatron_logits(chunks, config, tokens, args.vocab_size)
    diff = torch.zeros(())
    if logits is not None:
        diff = (logits - hf_logits(src, tokens)).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)

    source = read_all(src)
    streamed = torch.tensor(check_stream(chunks, config, args, source))
    # Each PP stage streams its own tensors; every TP rank of it sees the same ones.
    dist.all_reduce(streamed, group=mpu.get_pipeline_model_parallel_group())

    out = out_root / preset
    wl.export_megatron_to_hf(chunks, args, config, out, src)
    result = {"logits_max_abs_diff": diff.item(), "streamed": int(streamed)}
    if dist.get_rank() == 0:
        exported = read_all(out)
        assert exported.keys() == source.keys(), sorted(exported.keys() ^ source.keys())
        for name, t in source.items():
            assert torch.equal(exported[name], t), f"exported {name} differs"
        same = torch.equal(hf_logits(out, tokens), hf_logits(src, tokens))
        result.update(exported=len(exported), source=len(source), hf_reload_equal=same)
    return result


def main():
    tp, pp, vpp = (int(a) for a in sys.argv[1:4])
    out_root, presets = Path(sys.argv[4]), sys.argv[5:]
    parallel = setup(tp, pp, vpp or None)
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    results = {
        p: run_preset(p, parallel, out_root / f"tp{tp}pp{pp}vpp{vpp}", tokens) for p in presets
    }
    for p, r in results.items():
        assert r["logits_max_abs_diff"] < 1e-5, (p, r)
    write_result(results)
    dist.barrier()


if __name__ == "__main__":
    main()
    exit_now()
