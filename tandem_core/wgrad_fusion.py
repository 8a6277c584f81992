"""megatron's gradient-accumulation fusion without apex: each linear layer's weight gradient
is accumulated by its GEMM straight into the fp32 `main_grad` buffer of megatron's DDP.

Unfused, every weight's gradient is a bf16 GEMM output that megatron's DDP hook then adds into
`main_grad`: one more kernel and a pass over the gradient per weight per micro-batch (392 fp32
adds, 6.7 % of the Llama-3.2-1B update's device time on an H200), and the gradient rounded to
bf16 before it is summed. megatron fuses this through apex's `fused_weight_gradient_mlp_cuda`
extension, absent here; torch's `addmm` with `out_dtype` is the same cuBLAS call (bf16 inputs,
fp32 accumulator, beta = 1). Written by hand: the two entry points megatron calls, in that
extension's signature, handed to megatron's tensor-parallel layers (`install`).
"""

from __future__ import annotations

import types

import torch


def wgrad_gemm_accum(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad):
    """main_grad[out, in] += grad_outputᵀ · total_input over every token (either may be [s, b, ·])."""
    x = total_input.reshape(-1, total_input.shape[-1])
    g = grad_output.reshape(-1, grad_output.shape[-1])
    if x.dtype == main_grad.dtype:
        main_grad.addmm_(g.t(), x)
    elif main_grad.is_cuda:  # bf16 inputs, fp32 accumulator: one GEMM
        torch.addmm(main_grad, g.t(), x, out_dtype=main_grad.dtype, out=main_grad)
    else:  # torch has no mixed-dtype addmm on CPU
        main_grad.add_(torch.mm(g.t(), x))


def install() -> None:
    """Give megatron's tensor-parallel layers this module where they look for apex's."""
    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
            wgrad_gemm_accum_fp32=wgrad_gemm_accum, wgrad_gemm_accum_fp16=wgrad_gemm_accum
        )
        layers._grad_accum_fusion_available = True
