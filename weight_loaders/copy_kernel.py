"""One kernel launch that copies a planned list of contiguous ranges: the direct-copy sync on CUDA.

A direct-copy sync moves ~1 GB (Qwen2.5-0.5B) to ~10 GB in a few hundred pieces, from
megatron's buffers into the engine's parameters. `torch._foreach_copy_` over all of them
reaches ~60 % of an H200's copy bandwidth, and one `copy_` per large piece pays a launch and
a ramp-up and tail per piece (CopyRuns without this kernel: 1.43–1.78× one contiguous copy of
the same bytes on an H200). Here every piece is a row of a table (source address, destination
address, length in 8-byte words) and one Triton kernel copies them all, each program one block
of one piece, so the device sees one grid of equal blocks, as for one contiguous copy (the
manager's whole sync through it: 1.06× and 1.09× that copy for the 0.5B model and 4 layers of
Qwen3-30B-A3B, bench_swap on an H200).

The addresses are read when the table is built and checked before every launch: a storage
that moved (AllGatherPPModel's foreign stages and the TP gather's buffers are released and
regrown between syncs) rebuilds the table; one that holds no memory is an error, not a write
to address 0. Pieces must be contiguous, of one dtype on both sides, 8-byte aligned and a
whole number of 8-byte words (`RangeCopy.fits`); the caller copies the others another way.

Written by hand: neither torch nor Triton ships a copy of a list of ranges in one launch.
"""

from __future__ import annotations

import functools

import torch

from tandem_core import cpu_compat

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


def usable(device: torch.device) -> bool:
    """Whether the sync takes this kernel on `device`: CUDA with Triton installed (on CPU the
    copies stay with torch; the tests run the kernel through Triton's interpreter)."""
    return device.type == "cuda" and cpu_compat.triton_available()


class RangeCopy:
    """(destination, source) pairs of equal bytes copied by one launch of `_kernel`; `block`
    words per program."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], block: int = 4096):
        if not pairs:
            raise ValueError("RangeCopy needs at least one pair")
        bad = next((i for i, (d, s) in enumerate(pairs) if not self.fits(d, s)), None)
        if bad is not None:
            raise ValueError(f"pair {bad}: not contiguous 8-byte words of one dtype and device")
        self.pairs = pairs  # the views (and their storages) the table's addresses point into
        self.block = block
        self.nbytes = sum(d.nbytes for d, _ in pairs)
        storages = {}  # one entry per storage: the few buffers and the engine's parameters
        for d, s in pairs:
            for t in (d, s):
                storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
        self._storages = list(storages.values())
        self._build()

    def _build(self) -> None:
        rows, block_range, block_start = [], [], []
        for i, (d, s) in enumerate(self.pairs):
            words = d.nbytes // WORD
            rows.append((s.data_ptr(), d.data_ptr(), words))
            starts = range(0, words, self.block)
            block_range += [i] * len(starts)
            block_start += starts
        device = self.pairs[0][0].device
        self.table = torch.tensor(rows, dtype=torch.int64, device=device)
        self.block_range = torch.tensor(block_range, dtype=torch.int32, device=device)
        self.block_start = torch.tensor(block_start, dtype=torch.int64, device=device)
        self._addresses = [st.data_ptr() for st in self._storages]

    def copy_checked(self) -> str | None:
        """The first copy: every destination zeroed, copied, compared with its source. None
        when every piece was written, else why not (Triton cannot build or run the kernel
        here, or it left a piece unwritten); the destinations are then undefined."""
        try:
            with torch.no_grad():
                for d, _ in self.pairs:
                    d.zero_()
                self.copy()
                if all(torch.equal(d, s) for d, s in self.pairs):
                    return None
            return "it left a piece unwritten"
        except Exception as e:  # noqa: BLE001 (any failure: the caller copies another way)
            return f"{type(e).__name__}: {e}"

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
        addresses = [st.data_ptr() for st in self._storages]
        if addresses != self._addresses:
            if 0 in addresses:
                raise RuntimeError("RangeCopy: a planned storage holds no memory")
            self._build()  # a buffer was released and regrown elsewhere
        grid = (self.block_range.numel(),)
        _kernel()[grid](self.table, self.block_range, self.block_start, BLOCK=self.block)
