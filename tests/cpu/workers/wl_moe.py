"""Qwen3-MoE through the weight loaders at one TP × PP × EP layout (torchrun, gloo, fp32):

1. the checkpoint in both expert layouts: experts one by one (what the hub's checkpoints hold
   and transformers 5.19 saves) and stacked [E, rows, cols] (written here);
2. each imported into megatron (grouped experts): the two imports give bitwise the same
   parameters, and the logits equal transformers' (≤ 1e-5);
3. the stream an engine gets (every EP rank's experts, TP gathered) equals the per-expert
   tensors bitwise;
4. the HF export of each is that checkpoint again, bitwise (the layout of the source), and
   transformers reloads it.

usage: wl_moe.py TP PP EP OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _common import exit_now, write_result  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from wl_common import hf_logits, megatron_logits, read_all  # noqa: E402

import archs  # noqa: E402
import weight_loaders as wl  # noqa: E402
from archs.qwen3_moe import fused_expert_name  # noqa: E402
from tandem_core.config import ParallelConfig  # noqa: E402
from tandem_core.distributed import init_distributed, init_model_parallel  # noqa: E402
from tandem_core.models import build_gpt_model, build_transformer_config  # noqa: E402


def stack(separate: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-expert tensors stacked, as the exporter writes them for a stacked source."""
    from weight_loaders.hf_export import stack_experts

    return stack_experts(separate, fused_expert_name)


def write_stacked(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    import shutil

    if dist.get_rank() == 0:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    dist.barrier()
    return dst


def build(args, parallel):
    from megatron.core import parallel_state as mpu

    config = build_transformer_config(args, parallel, "float32")
    model = build_gpt_model(
        args,
        config,
        layer_spec="sdpa",
        pre_process=mpu.is_pipeline_first_stage(),
        post_process=mpu.is_pipeline_last_stage(),
    ).eval()
    return [model], config


def main():
    from megatron.core import parallel_state as mpu

    tp, pp, ep = (int(a) for a in sys.argv[1:4])
    out_root = Path(sys.argv[4])
    init_distributed()
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    init_model_parallel(parallel)
    src = archs.ensure_tiny_checkpoint("tiny_qwen3_moe")
    args = archs.model_args_from_hf(src)
    separate = read_all(src)
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in separate, "not the per-expert layout"
    stacked = stack(separate)
    layouts = {
        "per_expert": (src, separate),
        "stacked": (write_stacked(src, out_root / "stacked", stacked), stacked),
    }
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    result, params = {}, {}
    for label, (hf_dir, tensors) in layouts.items():
        chunks, config = build(args, parallel)
        wl.load_hf_into_megatron(chunks, hf_dir, args, config)
        params[label] = {n: p.detach().clone() for n, p in wl.megatron_named_params(chunks)}
        logits = megatron_logits(chunks, config, tokens, args.vocab_size)
        diff = torch.zeros(())
        if logits is not None:
            diff = (logits - hf_logits(src, tokens)).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        result[f"logits_max_abs_diff_{label}"] = diff.item()

        out = out_root / f"export_{label}"
        wl.export_megatron_to_hf(chunks, args, config, out, hf_dir)
        if dist.get_rank() == 0:
            exported = read_all(out)
            assert exported.keys() == tensors.keys(), sorted(exported.keys() ^ tensors.keys())
            bad = [n for n, t in tensors.items() if not torch.equal(exported[n], t)]
            assert not bad, f"{label}: exported tensors differ: {bad[:5]}"
            result[f"export_bitwise_{label}"] = True
            reload = torch.equal(hf_logits(out, tokens), hf_logits(src, tokens))
            result[f"hf_reload_equal_{label}"] = reload
    per, st = params["per_expert"], params["stacked"]
    result["imports_equal"] = per.keys() == st.keys() and all(
        torch.equal(per[n], st[n]) for n in per
    )

    ep_group = mpu.get_expert_model_parallel_group()
    named = wl.with_every_expert(wl.megatron_named_params(chunks), args, ep_group)
    seen = 0
    for name, t in wl.stream_hf_weights(named, args, mpu.get_tensor_model_parallel_group()):
        assert torch.equal(t, separate[name]), f"streamed {name} differs from the checkpoint"
        seen += 1
    seen = torch.tensor(seen)
    dist.all_reduce(seen, group=mpu.get_pipeline_model_parallel_group())
    result["streamed"], result["per_expert_tensors"] = int(seen), len(separate)
    write_result(result)
    dist.barrier()


if __name__ == "__main__":
    main()
    exit_now()
