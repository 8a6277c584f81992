"""Release and restore what training keeps on the device but generation does not need:
megatron DDP's gradient buffers and the optimizer's states (and fp32 master copies).

Gradients are dropped (the next step zeroes them anyway); optimizer state moves to host
memory and back bit for bit. On CPU the "host copy" is a second CPU tensor; the code path is
the GPU one.
"""

from __future__ import annotations

import torch


def release_grad_buffers(ddp_chunks) -> None:
    for chunk in ddp_chunks:
        for buf in chunk.buffers:
            buf.offload_to_cpu(move_params=False, move_grads=True)


def restore_grad_buffers(ddp_chunks) -> None:
    for chunk in ddp_chunks:
        for buf in chunk.buffers:
            buf.reload_from_cpu(move_params=False, move_grads=True)


def return_cached_memory() -> None:
    """Give torch's cached, unused device blocks back to the driver. Freed tensors stay reserved
    by the caching allocator, invisible to the engine, which allocates through its own pool:
    measured on an H200, a GRPO step of a 0.5B model left ~13 GiB of training activations
    cached while vLLM's KV cache was allocated beside it."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def grad_buffer_bytes(ddp_chunks) -> int:
    return sum(b.grad_data.untyped_storage().size() for c in ddp_chunks for b in c.buffers)


def _optimizer_tensors(optimizer):
    """Every state tensor (exp_avg, exp_avg_sq, fp32 master params) of a megatron optimizer,
    or of a torch one (FSDP2: each DTensor's local shard)."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in inner:
        for state in getattr(opt, "optimizer", opt).state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.numel() > 1:
                    yield value.to_local() if hasattr(value, "to_local") else value
        for group_name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            for group in getattr(opt, group_name, []) or []:
                yield from (t for t in group if t is not None)


class OptimizerOffload:
    """Moves optimizer state tensors to host memory and back, keeping tensor identity."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self._host: list[tuple[torch.Tensor, torch.Tensor]] = []

    def offload(self) -> None:
        pin = torch.cuda.is_available()
        for t in _optimizer_tensors(self.optimizer):
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            host.copy_(t.detach())
            self._host.append((t, host))
            t.data.untyped_storage().resize_(0)

    def reload(self) -> None:
        for t, host in self._host:
            t.data.untyped_storage().resize_(host.numel() * host.element_size())
            t.data.copy_(host)
        self._host = []

    def device_bytes(self) -> int:
        return sum(t.untyped_storage().size() for t in _optimizer_tensors(self.optimizer))
