"""megatron's SwiGLU (forward and backward) by one Triton launch each, on CUDA.

megatron's `SwiGLUFunction` (the gated MLP's activation when `bias_activation_fusion` is on)
calls `swiglu` / `swiglu_back`, which megatron wraps in torch.compile: one fused kernel, but
each call goes through dynamo's guards and inductor's wrapper, ~180-210 µs of host time a call
under the profiler. The actor's forward is host-bound on an H200 (benchmarks/host_gaps.py), so
that host time is step time. A Triton launch costs a fraction of it. Written by hand: torch
has no SwiGLU operator and megatron's other fused one needs transformer-engine.

`install` hands megatron's module these two functions; they take contiguous CUDA tensors and
leave everything else (CPU, a strided input, a trace in progress) to megatron's own.
"""

from __future__ import annotations

import functools

import torch

from tandem_core import cpu_compat

BLOCK = 1024
"""Columns of one row per program."""


@functools.cache
def _kernels():
    # Built on first use: TRITON_INTERPRET (the CPU tests) is read when the kernel is defined.
    import triton
    import triton.language as tl

    @triton.jit
    def forward(y_ptr, out_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < width
        gate = tl.load(y_ptr + row * 2 * width + col, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(y_ptr + row * 2 * width + width + col, mask=mask, other=0.0).to(tl.float32)
        out = gate / (1 + tl.exp(-gate)) * up
        tl.store(out_ptr + row * width + col, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def backward(g_ptr, y_ptr, dy_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < width
        g = tl.load(g_ptr + row * width + col, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(y_ptr + row * 2 * width + col, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(y_ptr + row * 2 * width + width + col, mask=mask, other=0.0).to(tl.float32)
        sig = 1 / (1 + tl.exp(-gate))
        d_gate = g * sig * (1 + gate * (1 - sig)) * up
        d_up = g * gate * sig
        dtype = dy_ptr.dtype.element_ty
        tl.store(dy_ptr + row * 2 * width + col, d_gate.to(dtype), mask=mask)
        tl.store(dy_ptr + row * 2 * width + width + col, d_up.to(dtype), mask=mask)

    return forward, backward


def _takes(*tensors: torch.Tensor) -> bool:
    return (
        all(t.is_cuda and t.is_contiguous() for t in tensors)
        and cpu_compat.triton_available()
        and not torch.compiler.is_compiling()
    )


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """silu(y₁)·y₂ of y's two halves on the last dim."""
    import triton

    width = y.shape[-1] // 2
    out = torch.empty((*y.shape[:-1], width), dtype=y.dtype, device=y.device)
    rows = out.numel() // max(width, 1)
    if rows and width:
        _kernels()[0][(rows, triton.cdiv(width, BLOCK))](y, out, width, BLOCK=BLOCK)
    return out


def swiglu_back(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of `swiglu` at y for the output gradient g (megatron's `swiglu_back`)."""
    import triton

    width = y.shape[-1] // 2
    dy = torch.empty_like(y)
    rows = g.numel() // max(width, 1)
    if rows and width:
        _kernels()[1][(rows, triton.cdiv(width, BLOCK))](g, y, dy, width, BLOCK=BLOCK)
    return dy


def install() -> None:
    """megatron's SwiGLUFunction calls these where they take the call, its own otherwise."""
    from megatron.core.fusions import fused_bias_swiglu as fused

    if getattr(fused.swiglu, "tandem_kernel", False):
        return
    own_forward, own_backward = fused.swiglu, fused.swiglu_back

    def forward(y):
        return swiglu(y) if _takes(y) else own_forward(y)

    def backward(g, y):
        return swiglu_back(g, y) if _takes(g, y) else own_backward(g, y)

    forward.tandem_kernel = backward.tandem_kernel = True
    forward.megatron_own, backward.megatron_own = own_forward, own_backward
    fused.swiglu, fused.swiglu_back = forward, backward


def uninstall() -> None:
    """megatron's own functions back (plain megatron-core's row of bench_mfu)."""
    from megatron.core.fusions import fused_bias_swiglu as fused

    if getattr(fused.swiglu, "tandem_kernel", False):
        fused.swiglu, fused.swiglu_back = fused.swiglu.megatron_own, fused.swiglu_back.megatron_own
