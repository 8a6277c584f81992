"""Batch in, token lists out, batch back: the part of the contract every backend shares.

A backend only turns prompt token lists into response token lists (+ their log-probs); these
pure functions do the checking of the input and the building of the output tensors, so that
padding, masks and positions are the same for every engine by construction.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from rollout.sampling import SamplingSettings
from tandem_core.protocol import Batch

PROMPT_KEYS = ("input_ids", "attention_mask", "position_ids")


def prompt_token_lists(
    prompts: Batch, *, max_model_len: int, response_length: int
) -> list[list[int]]:
    """The real (unpadded) token ids of each left-padded prompt, after checking them all.

    Raises ValueError before any generation, so a bad row never yields a half-built batch.
    """
    missing = [k for k in PROMPT_KEYS if k not in prompts.tensors.keys()]
    if missing:
        raise ValueError(f"prompt batch lacks {missing}; it needs {list(PROMPT_KEYS)}")
    if len(prompts) == 0:
        raise ValueError("empty prompt batch (0 rows)")
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    if ids.dim() != 2 or ids.shape != mask.shape:
        raise ValueError(
            f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must both be [B, P]"
        )
    mask = mask.to(torch.bool).cpu()
    lengths = mask.sum(dim=1)
    for row in range(len(prompts)):
        n = int(lengths[row])
        if n == 0:
            raise ValueError(f"empty prompt in row {row} (attention_mask is all zeros)")
        if not bool(mask[row, -n:].all()):
            raise ValueError(
                f"prompt row {row} is not left-padded (real tokens must be at the end)"
            )
        if n + response_length > max_model_len:
            raise ValueError(
                f"prompt row {row} is too long: {n} prompt tokens + response_length "
                f"{response_length} > the engine's max_model_len {max_model_len}"
            )
    ids = ids.cpu()
    return [ids[row, ids.shape[1] - int(lengths[row]) :].tolist() for row in range(len(prompts))]


def cut_at_eos(tokens: list[int], s: SamplingSettings) -> int:
    """Number of tokens to keep: up to and including the first EOS, at most response_length."""
    eos = set(s.eos_token_ids)
    for i, tok in enumerate(tokens[: s.response_length]):
        if tok in eos:
            return i + 1
    return min(len(tokens), s.response_length)


def build_output(
    prompts: Batch,
    responses: list[list[int]],
    log_probs: list[list[float]],
    s: SamplingSettings,
    routed_experts: list[torch.Tensor] | None = None,
) -> Batch:
    """Assemble the rollout batch from the responses of B*n samples (prompt-major order).

    Adds `prompts`, `responses` [B*n, R] right-padded with the pad id, `response_mask`,
    `rollout_log_probs` (0 on padding), and rebuilds `input_ids` / `attention_mask` /
    `position_ids` for prompt ++ response. Other fields of `prompts` are repeated n times.
    `routed_experts` (one [tokens, layers, top-k] tensor per sample: the experts the engine
    routed each prompt and response token to) becomes the `routed_experts` column, see
    `routing_column`.
    """
    rows, width = len(prompts) * s.n, s.response_length
    if len(responses) != rows or len(log_probs) != rows:
        raise RuntimeError(f"backend returned {len(responses)} responses for {rows} samples")
    # Filled by numpy from the flattened lists, with no Python loop over tokens (65k of them
    # for 256 × 256): cut_at_eos becomes each row's first EOS in the [rows, R] layout.
    resp, lengths = _padded_rows(responses, s.pad_token_id, np.int64, width)
    logp, logp_lengths = _padded_rows(log_probs, 0.0, np.float32, width)
    column = np.arange(resp.shape[1])
    eos = (column < np.minimum(lengths, width)[:, None]) & np.isin(resp, list(s.eos_token_ids))
    keep = np.where(eos.any(axis=1), eos.argmax(axis=1) + 1, np.minimum(lengths, width))
    short = np.flatnonzero(logp_lengths < keep)
    if len(short):
        i = short[0]
        raise RuntimeError(f"backend returned {logp_lengths[i]} log-probs for {keep[i]} tokens")
    kept = column[:width] < keep[:, None]
    resp = torch.from_numpy(np.where(kept, resp[:, :width], s.pad_token_id))
    logp = torch.from_numpy(np.where(kept, logp[:, :width], np.float32(0.0)))
    resp_mask = torch.from_numpy(kept.astype(np.int64))

    out = with_responses(prompts.repeat(s.n, interleave=True), resp, resp_mask, resp_mask, logp)
    if routed_experts is not None:
        prompt_mask = out["attention_mask"][:, :-width]
        out["routed_experts"] = routing_column(routed_experts, prompt_mask, resp_mask).to(
            prompt_mask.device
        )
    return out


def _padded_rows(seqs, fill, dtype, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences right-padded into one [rows, max(width, longest)] array, and their lengths."""
    lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype, int(lengths.sum()))
    column = np.arange(max(width, int(lengths.max(initial=0))))
    out = np.full((len(seqs), len(column)), fill, dtype=dtype)
    out[column < lengths[:, None]] = flat  # row-major: each row's values in order
    return out, lengths


def build_conversation_output(
    samples: Batch,
    conversations: list[tuple[list[int], list[int], list[float]]],
    s: SamplingSettings,
) -> Batch:
    """The rollout batch of multi-turn samples (rollout/multi_turn/): `samples` are the prompts
    already repeated per sample, each conversation is (tokens after the prompt, 1 where the
    model wrote the token, its log-prob or 0). The conversation is the response:
    `response_mask` is 1 on the model's tokens only, the attention on all of them."""
    rows, width = len(samples), s.response_length
    resp = torch.full((rows, width), s.pad_token_id, dtype=torch.long)
    trained = torch.zeros((rows, width), dtype=torch.long)
    attend = torch.zeros((rows, width), dtype=torch.long)
    logp = torch.zeros((rows, width), dtype=torch.float32)
    for i, (toks, model_written, lps) in enumerate(conversations):
        n = len(toks)
        if n > width:
            raise RuntimeError(f"conversation {i} has {n} tokens, over the budget of {width}")
        resp[i, :n] = torch.tensor(toks, dtype=torch.long)
        trained[i, :n] = torch.tensor(model_written, dtype=torch.long)
        attend[i, :n] = 1
        logp[i, :n] = torch.tensor(lps, dtype=torch.float32)
    return with_responses(samples, resp, trained, attend, logp)


def with_responses(out: Batch, resp, resp_mask, resp_attention, logp) -> Batch:
    """`out` (prompts, one row per sample) extended by its right-padded responses."""
    device = out["input_ids"].device
    prompt_ids, prompt_mask, prompt_pos = (out[k] for k in PROMPT_KEYS)
    # Positions continue after the last prompt token, also over padding (it is masked out).
    steps = torch.arange(1, resp.shape[1] + 1, device=device, dtype=prompt_pos.dtype)
    out["prompts"] = prompt_ids
    out["responses"] = resp.to(device, prompt_ids.dtype)
    out["response_mask"] = resp_mask.to(device, prompt_mask.dtype)
    out["rollout_log_probs"] = logp.to(device)
    out["input_ids"] = torch.cat([prompt_ids, out["responses"]], dim=1)
    resp_attention = resp_attention.to(device, prompt_mask.dtype)
    out["attention_mask"] = torch.cat([prompt_mask, resp_attention], dim=1)
    out["position_ids"] = torch.cat([prompt_pos, prompt_pos[:, -1:] + steps], dim=1)
    return out


def routing_column(
    per_sample: list[torch.Tensor], prompt_mask: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """[rows, P + R, layers, k] expert ids aligned with `input_ids`, for routing replay (R3).

    Sample i's tensor lists its real prompt tokens, then its response tokens (an engine never
    routes the last sampled token: nothing is computed from it). Every other position (padding,
    that last token, dense layers) gets experts 0..k-1, a valid distinct choice: megatron's
    dispatcher counts exactly k experts per token, and those positions reach no loss.
    """
    rows, prompt_width = prompt_mask.shape
    layers, k = per_sample[0].shape[1:] if per_sample else (0, 0)
    dtype = (
        torch.uint8
        if max((int(t.max()) for t in per_sample if t.numel()), default=0) < 256
        else torch.int16
    )
    column = (
        torch.arange(k, dtype=dtype)
        .expand(rows, prompt_width + response_mask.shape[1], layers, k)
        .clone()
    )
    prompt_len = prompt_mask.sum(-1).tolist()
    resp_len = response_mask.sum(-1).tolist()
    for i, ids in enumerate(per_sample):
        start = prompt_width - prompt_len[i]
        n = min(len(ids), prompt_len[i] + resp_len[i])
        routed = ids[:n].to(dtype)
        dense = (routed == 0).all(-1)  # engines report 0s for layers without experts
        routed[dense] = column[i, 0, 0]
        column[i, start : start + n] = routed
    return column
