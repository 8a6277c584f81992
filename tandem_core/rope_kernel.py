"""RoPE by one Triton launch per tensor: `RotaryQK`'s kernel on CUDA.

The actor's forward is host-bound at micro-batches of a few thousand tokens: on an H200 the
host needs about as long to queue a Llama-3.2-1B layer's kernels as the device to run them
(benchmarks/host_gaps.py), so each operator's host time is step time. `_rotate_qk` through
torch.compile is one fused kernel, but each call goes through dynamo's guards and inductor's
wrapper: ~330 µs of host time a call under the profiler, the most of any operator in the
forward and the backward. A Triton launch costs a fraction of that; q and k take one each.
Written by hand: megatron fuses RoPE only through transformer-engine, torch has no RoPE
operator.

Layout as megatron's `_apply_rotary_pos_emb_bshd`: x [s, b, heads, dim] (any strides with a
unit last stride: q and k are views of the QKV split), freqs [s, 1, 1, rot] fp32 with each
angle repeated over its rotated pair (halves, or neighbours when interleaved); the first `rot`
channels rotate, the rest pass through. The math runs in fp32 and rounds once.
"""

from __future__ import annotations

import functools

import torch

from tandem_core import cpu_compat


@functools.cache
def _kernel():
    # Built on first use: TRITON_INTERPRET (the CPU tests) is read when the kernel is defined.
    import triton
    import triton.language as tl

    @triton.jit
    def rotate(
        x_ptr,
        out_ptr,
        freqs_ptr,
        batch,
        heads,
        stride_s,
        stride_b,
        stride_h,
        sign,
        DIM: tl.constexpr,
        ROT: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        token = tl.program_id(0)  # s * batch + b: one token's heads per program
        s = token // batch
        b = token % batch
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < heads) & (d < DIM)
        src = x_ptr + s.to(tl.int64) * stride_s + b.to(tl.int64) * stride_b + h * stride_h
        x = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
        # pairs (2i, 2i+1): out[2i] = x·cos − x[2i+1]·sin, out[2i+1] = x·cos + x[2i]·sin
        if INTERLEAVED:
            partner = d ^ 1
            flip = tl.where(d % 2 == 0, -1.0, 1.0)
        else:  # halves: out[i] = x·cos − x[i+rot/2]·sin, out[i+rot/2] = x·cos + x[i]·sin
            partner = tl.where(d < ROT // 2, d + ROT // 2, d - ROT // 2)
            flip = tl.where(d < ROT // 2, -1.0, 1.0)
        rotated = d < ROT
        other = tl.load(src + partner, mask=mask & rotated, other=0.0).to(tl.float32)
        angle = tl.load(freqs_ptr + s.to(tl.int64) * ROT + d, mask=d < ROT, other=0.0)
        y = tl.where(rotated, x * tl.cos(angle) + flip * other * (sign * tl.sin(angle)), x)
        dst = out_ptr + ((s.to(tl.int64) * batch + b) * heads + h) * DIM + d
        tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=mask)

    return rotate


def usable(x: torch.Tensor, freqs: torch.Tensor) -> bool:
    """Whether `rotate` takes this tensor: CUDA with Triton, x [s, b, h, d] with a unit last
    stride, freqs [s, 1, 1, rot] (one angle row per position) with rot even and ≤ d."""
    return x.is_cuda and cpu_compat.triton_available() and _fits(x, freqs)


def _fits(x: torch.Tensor, freqs: torch.Tensor) -> bool:
    return (
        x.dim() == 4
        and x.stride(-1) == 1
        and freqs.dim() == 4
        and freqs.shape[0] == x.shape[0]
        and freqs.shape[1] == freqs.shape[2] == 1
        and freqs.shape[3] % 2 == 0
        and freqs.shape[3] <= x.shape[3]
    )


def rotate(x: torch.Tensor, freqs: torch.Tensor, interleaved: bool, sign: float) -> torch.Tensor:
    """x rotated by sign·θ (a new contiguous tensor of x's dtype); sign −1 is the transpose,
    what backward applies to the gradient."""
    if not _fits(x, freqs):
        raise ValueError(f"rope_kernel.rotate: x {tuple(x.shape)}, freqs {tuple(freqs.shape)}")
    import triton

    s, b, heads, dim = x.shape
    out = torch.empty((s, b, heads, dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    freqs = freqs.reshape(s, freqs.shape[3]).float().contiguous()
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(dim)
    _kernel()[(s * b,)](
        x,
        out,
        freqs,
        b,
        heads,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        float(sign),
        DIM=dim,
        ROT=freqs.shape[1],
        INTERLEAVED=interleaved,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4 if block_h * block_d >= 2048 else 1,
    )
    return out
