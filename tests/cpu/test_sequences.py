"""The rollout layout → megatron micro-batch alignment (trainer/workers/sequences.py)."""

import torch

from trainer.workers.sequences import align_micro_batches, mask_response, split_by_token_budget


def align_micro_batch(ids, attn, rmask, fields=None, seq_multiple=1):
    """All rows as one micro-batch."""
    return align_micro_batches(ids, attn, rmask, fields, [range(len(ids))], seq_multiple)[0]


def _rows():
    # [left-padded prompt (4) | right-padded response (5)], pad id 0.
    prompts = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24], [0, 31, 32, 33]])
    responses = torch.tensor([[13, 14, 15, 0, 0], [25, 0, 0, 0, 0], [34, 35, 0, 0, 0]])
    response_mask = (responses != 0).long()
    attention_mask = torch.cat([(prompts != 0).long(), response_mask], dim=1)
    return torch.cat([prompts, responses], dim=1), attention_mask, responses, response_mask


def test_rows_start_at_zero_and_point_at_their_response():
    ids, attn, responses, rmask = _rows()
    adv = torch.arange(15, dtype=torch.float32).view(3, 5)
    mb = align_micro_batch(ids, attn, rmask, {"advantages": adv})

    # Real tokens from position 0; trimmed to the longest row (2 + 3 = 4 + 1 = 5 tokens).
    assert mb.input_ids.tolist() == [
        [11, 12, 13, 14, 15],
        [21, 22, 23, 24, 25],
        [31, 32, 33, 34, 35],
    ]
    # Response columns trimmed to the last one any row uses (3 of 5), fields alike.
    assert mb.response_mask.shape == (3, 3) and mb.fields["advantages"].shape == (3, 3)
    assert torch.equal(mb.fields["advantages"], adv[:, :3])
    # Position response_index[i, j] predicts response token j: the next input is that token.
    real = mb.response_mask.bool()
    nxt = mb.input_ids.gather(1, (mb.response_index + 1).clamp(max=mb.input_ids.shape[1] - 1))
    assert torch.equal(nxt[real], responses[:, :3][real])
    assert torch.equal(mb.labels[real], responses[:, :3][real])
    assert mb.response_index[0].tolist() == [1, 2, 3]
    assert mb.response_index[1, 0] == 3 and mb.response_index[2, :2].tolist() == [2, 3]
    # Values at padded response columns are zeroed.
    assert torch.equal(mask_response(torch.ones(3, 3), mb), real.float())


def test_sequence_parallel_rounding_and_empty_responses():
    ids, attn, _, rmask = _rows()
    mb = align_micro_batch(ids, attn, rmask, seq_multiple=4)
    assert mb.input_ids.shape[1] == 8  # 5 rounded up to a multiple of 4
    empty = align_micro_batch(ids, attn, torch.zeros_like(rmask))
    assert empty.response_mask.shape == (3, 1) and not empty.response_mask.any()


def test_groups_of_one_batch_match_aligning_each_group_alone():
    ids, attn, _, rmask = _rows()
    adv = torch.arange(15, dtype=torch.float32).view(3, 5)
    groups = [range(0, 1), range(1, 3)]
    together = align_micro_batches(ids, attn, rmask, {"advantages": adv}, groups)
    for rows, mb in zip(groups, together, strict=True):
        sl = slice(rows.start, rows.stop)
        alone = align_micro_batch(ids[sl], attn[sl], rmask[sl], {"advantages": adv[sl]})
        # Each group is trimmed to its own rows: row 0 alone is 5 tokens with 3 response columns.
        for name in ("input_ids", "response_index", "labels", "response_mask"):
            assert torch.equal(getattr(mb, name), getattr(alone, name)), name
        assert torch.equal(mb.fields["advantages"], alone.fields["advantages"])
    assert together[1].input_ids.shape == (2, 5) and together[1].response_mask.shape == (2, 2)


def test_token_budget_groups_are_consecutive_ranges():
    # Padded size = rows × longest; a row over the budget gets a group of its own.
    assert split_by_token_budget([3, 3, 3, 9, 2, 2], 8) == [
        range(0, 2),
        range(2, 3),
        range(3, 4),
        range(4, 6),
    ]
    assert split_by_token_budget([], 8) == []


def test_packed_rows_sit_back_to_back_and_point_at_their_response():
    """model.pack_sequences: the rows' real tokens in one row, padded at the end to the
    multiple (a sequence of its own), positions restarting per row, the [b, R] side kept."""
    ids, attn, responses, rmask = _rows()
    [mb] = align_micro_batches(ids, attn, rmask, None, [range(3)], seq_multiple=4, pack=True)
    assert mb.input_ids.tolist() == [
        [11, 12, 13, 14, 15, 21, 22, 23, 24, 25, 31, 32, 33, 34, 35, 0]
    ]
    assert mb.cu_seqlens.tolist() == [0, 5, 10, 15, 16]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0]]
    assert mb.max_seqlen == 5 and mb.response_mask.shape == (3, 3)
    real = mb.response_mask.bool()
    nxt = mb.input_ids[0][mb.response_index + 1]
    assert torch.equal(nxt[real], responses[:, :3][real]) and torch.equal(
        mb.labels[real], responses[:, :3][real]
    )
    # every index stays inside its own row, padding columns too
    starts = mb.cu_seqlens[:-2, None].long()
    assert ((mb.response_index >= starts) & (mb.response_index < starts + 5)).all()


def test_packed_token_budget_counts_real_tokens():
    assert split_by_token_budget([3, 3, 3, 9, 2, 2], 8, packed=True) == [
        range(0, 2),
        range(2, 3),
        range(3, 4),
        range(4, 6),
    ]


def test_first_fit_decreasing_bins():
    from trainer.workers.sequences import first_fit_decreasing

    # longest first: 9 alone (over the budget), 5+3, 4+4, 2 -> bins keep batch order inside
    assert first_fit_decreasing([3, 9, 4, 5, 2, 4], 8) == [[1], [0, 3], [2, 5], [4]]
    assert first_fit_decreasing([], 8) == []
