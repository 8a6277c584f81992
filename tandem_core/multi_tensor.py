"""megatron's multi-tensor L2 norm and scale without apex or transformer-engine: torch's
foreach kernels.

Without either extension megatron's optimizer falls back to `local_multi_tensor_l2_norm`,
which sums one 0-dim norm per gradient through `torch.tensor(list)`: a device-to-host copy,
and so a full synchronisation, per gradient (98 each optimizer step of the Llama-3.2-1B
update, `aten::item` in benchmarks/host_gaps.py), and to `local_multi_tensor_scale`, two
kernels per tensor. torch's `_foreach_norm` / `_foreach_mul_` / `_foreach_copy_` do the same
in a few multi-tensor launches and no synchronisation; the one `.item()` left is megatron's
own, after its all-reduce of the total. Written by hand: the two entry points megatron calls,
in apex's signature (`op(chunk_size, noop_flag, tensor_lists, *args)`), handed to megatron's
optimizer modules (`install`), as wgrad_fusion.py does for apex's GEMM extension.
"""

from __future__ import annotations

import torch


def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """The L2 norm of all of tensor_lists[0] together, as a [1] fp32 tensor on their device
    (and each one's norm with `per_tensor`, as apex returns them)."""
    norms = [n.float() for n in torch._foreach_norm(tensor_lists[0], 2.0)]
    each = torch.stack(norms)
    return torch.linalg.vector_norm(each).reshape(1), (each if per_tensor else None)


def scale(chunk_size, noop_flag, tensor_lists, factor):
    """tensor_lists[1][i] = tensor_lists[0][i] · factor (in place when they are the same
    tensors, as megatron's gradient clipping calls it; a cast where the dtypes differ)."""
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, factor)
    elif factor == 1.0:  # megatron's copy of one list into another
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, factor))


def install() -> None:
    """Hand megatron's optimizer modules these where they took their per-tensor fallbacks."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = scale


def uninstall() -> None:
    """megatron's own fallbacks back (plain megatron-core's row of bench_mfu)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if clip_grads.l2_norm_impl is l2_norm:
        clip_grads.l2_norm_impl = utils.local_multi_tensor_l2_norm
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is scale:
            module.multi_tensor_scale_impl = utils.local_multi_tensor_scale
