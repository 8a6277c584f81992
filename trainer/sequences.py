"""Sequence layout between the rollout contract and megatron.

Rollouts come as [left-padded prompt | right-padded response] rows. Megatron's RoPE uses
positions 0..s-1 and Tandem's attention is plain causal, so each row is rolled left by its
number of leading pads: real tokens then start at position 0 and all padding is at the end,
where causal attention cannot see it. Micro-batches are also trimmed to their longest real
sequence, which removes most padding without megatron's packed-sequence path (that path needs
transformer-engine's THD attention, absent on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AlignedMicroBatch:
    input_ids: torch.Tensor  # [b, s] real tokens from 0, right-padded
    # R: the batch's response columns trimmed to the last one this micro-batch uses.
    response_index: torch.Tensor  # [b, R] position whose logits predict response token j
    labels: torch.Tensor  # [b, R] response token j (what position response_index[j] predicts)
    response_mask: torch.Tensor  # [b, R]
    fields: dict  # the micro-batch's other per-token tensors ([b, R] advantages, ...)

    @property
    def position_ids(self) -> torch.Tensor:
        b, s = self.input_ids.shape
        return torch.arange(s, device=self.input_ids.device).expand(b, s)


def align_micro_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    fields: dict | None = None,
    seq_multiple: int = 1,
) -> AlignedMicroBatch:
    """Roll rows so real tokens start at 0; trim to the longest row (rounded up to
    `seq_multiple`, e.g. TP for sequence parallelism). The response columns (mask and the
    [b, R] `fields`) are trimmed to the last one any row uses: the model's output rows are
    these columns, so response padding costs no logits."""
    b, total = input_ids.shape
    prompt_len = total - response_mask.shape[1]
    shift = (attention_mask.cumsum(-1) == 0).sum(-1)  # leading pads per row
    resp_start = prompt_len - shift  # aligned position of response token 0
    real_len = resp_start + response_mask.sum(-1)
    columns = torch.arange(1, response_mask.shape[1] + 1, device=response_mask.device)
    last_used = response_mask.bool() * columns
    # One host sync for both trims: the longest row and the last response column in use.
    longest = torch.stack([real_len.max().long(), last_used.max()]).clamp(min=1).tolist()
    s, resp_len = longest
    response_mask = response_mask[:, :resp_len]
    fields = {k: v[:, :resp_len] for k, v in (fields or {}).items()}
    cols = (torch.arange(total, device=input_ids.device)[None, :] + shift[:, None]) % total
    ids = input_ids.gather(1, cols)
    s = min(-(-s // seq_multiple) * seq_multiple, total + seq_multiple)
    if s > total:  # rounding up past the row: extend with pads
        ids = torch.cat([ids, ids.new_zeros(b, s - total)], dim=1)
    ids = ids[:, :s].contiguous()
    index = resp_start[:, None] - 1 + torch.arange(resp_len, device=ids.device)[None, :]
    index = index.clamp(0, s - 1)
    labels = torch.cat([ids[:, 1:], ids.new_zeros(b, 1)], dim=1).gather(1, index)
    return AlignedMicroBatch(ids, index, labels, response_mask, fields)


def pad_to_length(mb: AlignedMicroBatch, length: int) -> AlignedMicroBatch:
    """Right-pad a micro-batch to `length` positions (for schedules that need one shape)."""
    extra = length - mb.input_ids.shape[1]
    if extra <= 0:
        return mb
    pad = mb.input_ids.new_zeros(mb.input_ids.shape[0], extra)
    return AlignedMicroBatch(
        torch.cat([mb.input_ids, pad], 1), mb.response_index, mb.labels, mb.response_mask, mb.fields
    )


def mask_response(values: torch.Tensor, mb: AlignedMicroBatch) -> torch.Tensor:
    """[b, R] values at the response rows (the model's output rows) → 0 on response padding."""
    return values * mb.response_mask.to(values.dtype)


def split_by_token_budget(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups of rows whose padded size (rows × longest) stays within max_tokens.

    Order is kept, so results map back without a permutation; a single row longer than the
    budget gets a micro-batch of its own.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        new_longest = max(longest, n)
        if current and new_longest * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, new_longest = [], n
        current.append(i)
        longest = new_longest
    if current:
        groups.append(current)
    return groups
