"""One kernel launch that copies a planned list of contiguous ranges (a candidate for the sync).

A direct-copy sync moves ~1 GB (Qwen2.5-0.5B) to ~10 GB in a few hundred pieces, from
megatron's buffers into the engine's parameters. `torch._foreach_copy_` over all of them
reaches ~60 % of an H200's copy bandwidth, and one `copy_` per large piece pays a launch and
a ramp-up and tail per piece (CopyRuns in direct_copy.py: 1.43–1.57× one contiguous copy of
the same bytes). Here every piece is a row of a table (source address, destination address,
length in 8-byte words) and one Triton kernel copies them all, each program one block of one
piece, so the device sees one grid of equal blocks, as for one contiguous copy.

The addresses are read once, when the table is built: it is valid while both sides keep
their storage where it is (megatron's DDP buffers, vLLM's parameters across sleep and wake);
buffers that are released and regrown (the gathered pipeline stages, the TP gather's
buffers) need a new table. Pieces must be contiguous, of one dtype on both sides, 8-byte aligned
and a whole number of 8-byte words (`RangeCopy.fits`); the caller copies the others another way.

Written by hand: neither torch nor Triton ships a copy of a list of ranges in one launch.
"""

from __future__ import annotations

import functools

import torch

WORD = 8
"""Bytes per load and store (int64 words)."""


@functools.cache
def _kernel():
    # Built on first use: TRITON_INTERPRET (the CPU tests) is read when the kernel is defined.
    import triton
    import triton.language as tl

    @triton.jit
    def copy_ranges(table, block_range, block_start, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        r = tl.load(block_range + pid).to(tl.int64)
        start = tl.load(block_start + pid)
        src = tl.load(table + r * 3).to(tl.pointer_type(tl.int64))
        dst = tl.load(table + r * 3 + 1).to(tl.pointer_type(tl.int64))
        words = tl.load(table + r * 3 + 2)
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < words
        tl.store(dst + offsets, tl.load(src + offsets, mask=mask), mask=mask)

    return copy_ranges


class RangeCopy:
    """(destination, source) pairs of equal bytes copied by one launch of `_kernel`; `block`
    words per program."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], block: int = 4096):
        if not pairs:
            raise ValueError("RangeCopy needs at least one pair")
        bad = next((i for i, (d, s) in enumerate(pairs) if not self.fits(d, s)), None)
        if bad is not None:
            raise ValueError(f"pair {bad}: not contiguous 8-byte words of one dtype and device")
        rows, block_range, block_start = [], [], []
        for i, (d, s) in enumerate(pairs):
            words = d.nbytes // WORD
            rows.append((s.data_ptr(), d.data_ptr(), words))
            starts = range(0, words, block)
            block_range += [i] * len(starts)
            block_start += starts
        device = pairs[0][0].device
        self.table = torch.tensor(rows, dtype=torch.int64, device=device)
        self.block_range = torch.tensor(block_range, dtype=torch.int32, device=device)
        self.block_start = torch.tensor(block_start, dtype=torch.int64, device=device)
        self.block = block
        self.nbytes = sum(d.nbytes for d, _ in pairs)
        self._keep = pairs  # the views (and their storages) the table's addresses point into

    @staticmethod
    def fits(dst: torch.Tensor, src: torch.Tensor) -> bool:
        return (
            dst.is_contiguous()
            and src.is_contiguous()
            and dst.device == src.device
            and dst.dtype == src.dtype  # a byte copy: no casts
            and dst.nbytes == src.nbytes
            and dst.nbytes % WORD == 0
            and dst.data_ptr() % WORD == 0
            and src.data_ptr() % WORD == 0
        )

    def copy(self) -> None:
        grid = (self.block_range.numel(),)
        _kernel()[grid](self.table, self.block_range, self.block_start, BLOCK=self.block)
