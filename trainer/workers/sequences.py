"""Sequence layout between the rollout contract and megatron.

Rollouts come as [left-padded prompt | right-padded response] rows. Megatron's RoPE uses
positions 0..s-1 and Tandem's attention is plain causal, so each row is rolled left by its
number of leading pads: real tokens then start at position 0 and all padding is at the end,
where causal attention cannot see it. Micro-batches are also trimmed to their longest real
sequence, which removes most padding without megatron's packed-sequence path (that path needs
transformer-engine's THD attention, absent on CPU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tandem_core.distributed import cp_chunks, cp_local_positions


@dataclass
class AlignedMicroBatch:
    input_ids: torch.Tensor  # [b, s] real tokens from 0, right-padded
    # R: the batch's response columns trimmed to the last one this micro-batch uses.
    response_index: torch.Tensor  # [b, R] position whose logits predict response token j
    labels: torch.Tensor  # [b, R] response token j (what position response_index[j] predicts)
    response_mask: torch.Tensor  # [b, R]
    fields: dict  # the micro-batch's other per-token tensors ([b, R] advantages, ...)
    routing: torch.Tensor | None = None  # [b, s, layers, k] expert ids to replay (R3)
    cu_seqlens: torch.Tensor | None = None
    """Packed: input_ids is [1, T], the rows' real tokens one after another (and padding to a
    multiple after them); [rows (+1 for that padding) + 1] int32 start offsets. response_index
    then holds [b, R] positions in the packed row. None: one padded row per sequence."""

    context_parallel: tuple[int, int] | None = None
    """(CP size, this rank): input_ids holds chunks r and 2·CP-1-r of each row's 2·CP
    (`split_for_context_parallel`; a packed row is cut as one row, its cu_seqlens kept whole);
    response_index keeps whole-row positions."""

    @property
    def position_ids(self) -> torch.Tensor:
        b, s = self.input_ids.shape
        positions = torch.arange(s, device=self.input_ids.device)
        if self.context_parallel is not None:
            c = s // 2
            positions = torch.cat(
                [positions[:c] + g * c for g in cp_chunks(*self.context_parallel)]
            )
        if self.cu_seqlens is None:
            return positions.expand(b, s)
        # positions restart with each packed sequence: less the start of the token's sequence
        cu = self.cu_seqlens.long()
        starts = cu[:-1].repeat_interleave(cu.diff(), output_size=int(cu[-1]))
        return (positions - starts[positions])[None]

    @functools.cached_property
    def local_response_rows(self) -> torch.Tensor | None:
        """[b, R] bool, under CP: the response rows whose positions this rank holds, the rows
        its output layer ran on (tandem_core/models.py local_response_rows); None without CP.
        Computed once per micro-batch (labels, log-probs and entropy each ask for it)."""
        if self.context_parallel is None:
            return None
        cp, rank = self.context_parallel
        return cp_local_positions(self.response_index, self.input_ids.shape[1] // 2, cp, rank)[1]

    @property
    def max_seqlen(self) -> int:
        return int(self.cu_seqlens.diff().max()) if self.cu_seqlens is not None else 0


def align_micro_batches(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    fields: dict | None,
    groups: list[range],
    seq_multiple: int = 1,
    device: torch.device | str = "cpu",
    routing: torch.Tensor | None = None,
    pack: bool = False,
) -> list[AlignedMicroBatch]:
    """One micro-batch on `device` per group of consecutive rows of a host batch: rows rolled
    so real tokens start at 0, each micro-batch trimmed to its longest row (rounded up to
    `seq_multiple`, e.g. TP for sequence parallelism) and its response columns (mask and the
    [b, R] `fields`) to the last one any of its rows uses: the model's output rows are these
    columns, so response padding costs no logits.

    The trims are read from the host masks, so cutting a batch never waits on the device; the
    rows are copied and rolled there once for the whole batch, and each micro-batch is a slice.
    `routing` ([B, total, layers, k], aligned with `input_ids`) is rolled and trimmed alike.
    `pack`: each micro-batch is one packed row instead (`pack_rows`): no padding but at its end.
    """
    b, total = input_ids.shape
    prompt_len = total - response_mask.shape[1]
    # Per row: leading pads, aligned position of response token 0, real length, last response
    # column in use (1-based, 0 if none).
    shift = (attention_mask.cumsum(-1) == 0).sum(-1)
    resp_start = prompt_len - shift
    # all real tokens: a multi-turn response holds tool tokens that response_mask leaves out
    real_len = attention_mask.sum(-1).tolist()
    columns = torch.arange(1, response_mask.shape[1] + 1, device=response_mask.device)
    last_used = (response_mask.bool() * columns).max(-1).values.tolist() if b else []

    input_ids, response_mask, shift, resp_start = (
        t.to(device, non_blocking=True) for t in (input_ids, response_mask, shift, resp_start)
    )
    fields = {k: v.to(device, non_blocking=True) for k, v in (fields or {}).items()}
    cols = (torch.arange(total, device=device)[None, :] + shift[:, None]) % total
    rolled = input_ids.gather(1, cols)
    if routing is not None:
        routing = routing.to(device, non_blocking=True)
        routing = routing[torch.arange(b, device=device)[:, None], cols]
    index = resp_start[:, None] - 1 + torch.arange(response_mask.shape[1], device=device)[None, :]
    next_token = torch.cat([rolled[:, 1:], rolled.new_zeros(b, 1)], dim=1)
    labels = next_token.gather(1, index.clamp(0, total - 1))

    if pack:
        return [
            pack_rows(rolled, real_len, index, labels, response_mask, fields, routing, g, last_used,
                      seq_multiple)
            for g in groups
        ]  # fmt: skip
    out = []
    for rows in groups:
        lo, hi = rows.start, rows.stop
        s = max(max(real_len[lo:hi]), 1)
        resp_len = max(max(last_used[lo:hi]), 1)
        s = min(-(-s // seq_multiple) * seq_multiple, total + seq_multiple)
        ids = rolled[lo:hi, :s]
        routed = None if routing is None else routing[lo:hi, :s]
        if s > total:  # rounding up past the row: extend with pads
            ids = torch.cat([ids, ids.new_zeros(hi - lo, s - total)], dim=1)
            routed = None if routed is None else _extend_routing(routed, s)
        out.append(
            AlignedMicroBatch(
                ids.contiguous(),
                index[lo:hi, :resp_len].clamp(0, s - 1),
                labels[lo:hi, :resp_len],
                response_mask[lo:hi, :resp_len],
                {k: v[lo:hi, :resp_len] for k, v in fields.items()},
                routed,
            )
        )
    return out


def pack_rows(
    rolled, real_len, index, labels, response_mask, fields, routing, rows, last_used, multiple
) -> AlignedMicroBatch:
    """Rows `rows` (rolled: real tokens from 0) as one packed row: their real tokens back to
    back, padded at the end to a multiple of `multiple` (that padding is a sequence of its own,
    so it attends only to itself). The [b, R] side (labels, masks, fields) stays per row; the
    response positions move to each row's offset in the packed row."""
    lo, hi = rows.start, rows.stop
    lengths = [max(n, 1) for n in real_len[lo:hi]]
    device = rolled.device
    starts = torch.tensor([0] + lengths, device=device).cumsum(0)
    total = int(starts[-1])
    padded = -(-total // multiple) * multiple
    ids = torch.cat([rolled[r, :n] for r, n in zip(range(lo, hi), lengths, strict=True)])
    ids = torch.cat([ids, ids.new_zeros(padded - total)])[None]
    bounds = torch.cat([starts, starts.new_tensor([padded])]) if padded > total else starts
    resp_len = max(max(last_used[lo:hi]), 1)
    row_len = torch.tensor(lengths, device=device)[:, None]
    # response padding columns point past their row; any position of the row will do (masked)
    where = index[lo:hi, :resp_len].clamp(min=0).minimum(row_len - 1) + starts[:-1, None]
    routed = None
    if routing is not None:
        parts = [routing[r, :n] for r, n in zip(range(lo, hi), lengths, strict=True)]
        routed = _extend_routing(torch.cat(parts)[None], padded)
    return AlignedMicroBatch(
        ids.contiguous(),
        where,
        labels[lo:hi, :resp_len],
        response_mask[lo:hi, :resp_len],
        {k: v[lo:hi, :resp_len] for k, v in fields.items()},
        routed,
        bounds.to(torch.int32),
    )


def split_for_context_parallel(mb: AlignedMicroBatch, cp: int, rank: int) -> AlignedMicroBatch:
    """This CP rank's share of an aligned micro-batch whose length is a multiple of 2·CP:
    chunks r and 2·CP-1-r of each row (megatron's causal load balance: every rank gets one
    early and one late chunk). The [b, R] side stays whole: each rank's output layer runs on the
    response rows it holds, and per-token results are summed over CP
    (`rows_over_context_parallel`)."""
    c = mb.input_ids.shape[1] // (2 * cp)
    ids = torch.cat([mb.input_ids[:, g * c : (g + 1) * c] for g in cp_chunks(cp, rank)], dim=1)
    return AlignedMicroBatch(
        ids.contiguous(),
        mb.response_index,
        mb.labels,
        mb.response_mask,
        mb.fields,
        cu_seqlens=mb.cu_seqlens,
        context_parallel=(cp, rank),
    )


def _extend_routing(routing: torch.Tensor, length: int) -> torch.Tensor:
    """Padding positions route to experts 0..k-1 (any k distinct experts; see
    rollout.assemble.routing_column)."""
    b, s, layers, k = routing.shape
    pad = torch.arange(k, dtype=routing.dtype, device=routing.device)
    return torch.cat([routing, pad.expand(b, length - s, layers, k)], dim=1)


def pad_to_length(mb: AlignedMicroBatch, length: int) -> AlignedMicroBatch:
    """Right-pad a micro-batch to `length` positions (for schedules that need one shape)."""
    extra = length - mb.input_ids.shape[1]
    if extra <= 0:
        return mb
    pad = mb.input_ids.new_zeros(mb.input_ids.shape[0], extra)
    routing = None if mb.routing is None else _extend_routing(mb.routing, length)
    bounds = mb.cu_seqlens
    if bounds is not None:  # the padding is a packed sequence of its own
        bounds = torch.cat([bounds, bounds.new_tensor([length])])
    return AlignedMicroBatch(
        torch.cat([mb.input_ids, pad], 1),
        mb.response_index,
        mb.labels,
        mb.response_mask,
        mb.fields,
        routing,
        bounds,
    )


def rows_over_context_parallel(values: torch.Tensor, mb: AlignedMicroBatch) -> torch.Tensor:
    """[b, R] from the model's per-row outputs: as they are without CP; under CP `values` is
    [1, N] over this rank's rows (`local_response_rows`), scattered into [b, R] and summed
    over the CP group (differentiable: every CP rank then computes the whole loss)."""
    rows = mb.local_response_rows
    if rows is None:
        return values
    from megatron.core import parallel_state as mpu

    from tandem_core.distributed import all_reduce_with_grad

    full = values.new_zeros(rows.shape).masked_scatter(rows, values.reshape(-1))
    return all_reduce_with_grad(full, mpu.get_context_parallel_group())


def mask_response(values: torch.Tensor, mb: AlignedMicroBatch) -> torch.Tensor:
    """[b, R] values at the response rows (the model's output rows) → 0 on response padding."""
    return values * mb.response_mask.to(values.dtype)


def split_by_token_budget(lengths: list[int], max_tokens: int, packed: bool = False) -> list[range]:
    """Consecutive groups of rows whose size stays within max_tokens: padded (rows × longest),
    or `packed` (the sum of their lengths).

    Order is kept, so results map back without a permutation; a single row longer than the
    budget gets a micro-batch of its own.
    """
    groups: list[range] = []
    start, longest, total = 0, 0, 0
    for i, n in enumerate(lengths):
        new_longest = max(longest, n)
        size = total + n if packed else new_longest * (i - start + 1)
        total += n
        if i > start and size > max_tokens:
            groups.append(range(start, i))
            start, new_longest, total = i, n, n
        longest = new_longest
    if start < len(lengths):
        groups.append(range(start, len(lengths)))
    return groups


def first_fit_decreasing(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Rows into bins of at most `max_tokens` real tokens (packed micro-batches): longest row
    first, each into the first bin it fits, a row over the budget alone. Each bin lists its
    rows in batch order; bins in the order they were opened."""
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        fit = next((b for b, left in enumerate(room) if lengths[row] <= left), None)
        if fit is None:
            bins.append([row])
            room.append(max_tokens - lengths[row])
        else:
            bins[fit].append(row)
            room[fit] -= lengths[row]
    return [sorted(b) for b in bins]
