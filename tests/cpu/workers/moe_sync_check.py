"""Host synchronisations of one MoE layer's forward and backward on CUDA, per token dispatcher.

usage: moe_sync_check.py (torchrun; expert parallelism = the world size)
A MoELayer with grouped experts (Qwen3-MoE's router: softmax top-8 of 64 experts, bf16) runs a
forward and backward once to warm up, then again under `torch.cuda.set_sync_debug_mode("warn")`,
which warns at every operation that makes the host wait for the device; the warnings are
counted, with the first few sources, for megatron's all-to-all dispatcher and for Tandem's
`DeviceIndexDispatcher`. Outputs and gradients of the two layers (the same weights) are
compared too, bitwise under torch's deterministic algorithms (megatron's unpermute then adds
by `index_add_` instead of atomics). Rank 0's counts go to $TANDEM_RESULT. Without CUDA it
runs the same layers on CPU and counts nothing (syncs -1): a smoke test of this file.
"""

import dataclasses
import os
import sys
import traceback
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402

from tandem_core import cpu_compat  # noqa: E402
from tandem_core import distributed as D  # noqa: E402
from tandem_core.config import ParallelConfig  # noqa: E402
from tandem_core.model_args import ModelArgs  # noqa: E402

EXPERTS, TOPK, HIDDEN, FFN, SEQ, BATCH = 64, 8, 512, 256, 512, 2
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def build(config, module):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from tandem_core.moe import TorchGroupedMLP

    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=True).submodules.mlp
    spec.submodules.experts = ModuleSpec(module=TorchGroupedMLP)
    spec.module = module
    return build_module(spec, config=config).to(DEVICE, torch.bfloat16)


def step(layer, x, g):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out, _ = layer(x)
    (out * g).sum().backward()
    return [out, x.grad, *(p.grad for p in layer.parameters())]


def count_syncs(layer, x, g) -> dict:
    """Run one step with sync warnings on: their count and where the first three came from."""
    if not CUDA:
        return {"syncs": -1, "where": []}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(layer, x, g)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = [f"{os.path.basename(w.filename)}:{w.lineno}" for w in syncs[:3]]
    return {"syncs": len(syncs), "where": where}


def main():
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from tandem_core.models import build_transformer_config
    from tandem_core.moe import DeviceIndexMoELayer, fix_router_without_te

    D.init_distributed()
    fix_router_without_te()
    world, rank = dist.get_world_size(), dist.get_rank()
    D.init_model_parallel(ParallelConfig(expert_model_parallel_size=world))
    args = ModelArgs(
        "qwen3_moe",
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_query_groups=4,
        ffn_hidden_size=FFN,
        vocab_size=128,
        kv_channels=128,
        max_position_embeddings=SEQ,
        num_experts=EXPERTS,
        moe_ffn_hidden_size=FFN,
        moe_router_topk=TOPK,
    )
    config = build_transformer_config(args, ParallelConfig(expert_model_parallel_size=world))
    config = dataclasses.replace(config, gradient_accumulation_fusion=False, bf16=True)
    gen = torch.Generator(device=DEVICE).manual_seed(1 + rank)
    x = torch.randn(SEQ, BATCH, HIDDEN, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    g = torch.randn(SEQ, BATCH, HIDDEN, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    result = {"world": world}
    layers, weights = {}, None
    for name, module in (("megatron", MoELayer), ("device", DeviceIndexMoELayer)):
        with cpu_compat.megatron_device_scope():
            layers[name] = build(config, module)
        if weights is None:  # megatron's CUDA RNG tracker gives each build other weights
            weights = layers[name].state_dict()
        layers[name].load_state_dict(weights)
    for name, layer in layers.items():
        try:
            step(layer, x, g)  # warm-up: allocator, kernels' first launches
            result[name] = count_syncs(layer, x, g)
        except Exception:  # noqa: BLE001  (reported, then asserted by the test)
            result[name] = {"syncs": -1, "where": [traceback.format_exc()[-1500:]]}
    # bitwise, with deterministic kernels (also for megatron's own scatter-add)
    torch.use_deterministic_algorithms(True)
    pairs = list(zip(*(step(layer, x, g) for layer in layers.values()), strict=True))
    torch.use_deterministic_algorithms(False)
    result["bitwise_equal"] = all(torch.equal(a, b) for a, b in pairs)
    result["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in pairs)
    if rank == 0:
        write_result(result)
    D.destroy()


if __name__ == "__main__":
    main()
    exit_now()
