"""Log-probabilities and entropy from vocab-parallel logits, without gathering the vocabulary.

Each TP rank holds logits for its vocab slice [start, start + v/tp). The log-softmax needs a
max and a sum of exponentials over the whole vocabulary: two all-reduces of [tokens] vectors,
never a gather of [tokens, vocab]. The math runs in fp32 over chunks of tokens, so the only
[tokens, vocab/tp] tensors alive are the model's own logits and one fp32 chunk.

Backward is written by hand (megatron's vocab_parallel_cross_entropy has no entropy term):
  d logp / d l_k = 1[k = y] - p_k
  d H    / d l_k = -p_k (log p_k + H)
Both are local to the rank's slice once lse and H (global) are known, so backward needs no
communication. Without `with_entropy` the sum for H is skipped (forward and backward), which is
what the reference pass and an update without an entropy bonus need. Written here because no kept library computes entropy over vocab-parallel logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_CHUNK_TOKENS = 4096


def _masked_chunk(logits_chunk, start: int, vocab_size: int):
    """The chunk in fp32 with padded-vocab columns (index >= vocab_size) at -inf.

    `.float()` of fp32 logits is the model's own tensor, so the padding is masked out of place.
    """
    x = logits_chunk.float()
    local_valid = max(vocab_size - start, 0)
    if local_valid < x.shape[-1]:
        padded = torch.arange(x.shape[-1], device=x.device) >= local_valid
        x = x.masked_fill(padded, float("-inf"))
    return x


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, vocab_size, group, chunk_tokens, with_entropy):
        # logits [T, v_local] (any float dtype), labels [T] global ids.
        T, v_local = logits.shape
        lse = torch.empty(T, dtype=torch.float32, device=logits.device)
        label_logit = torch.zeros(T, dtype=torch.float32, device=logits.device)
        sum_pl = torch.zeros(T, dtype=torch.float32, device=logits.device)
        maxes = torch.empty(T, dtype=torch.float32, device=logits.device)
        for s in range(0, T, chunk_tokens):
            x = _masked_chunk(logits[s : s + chunk_tokens], vocab_start, vocab_size)
            maxes[s : s + chunk_tokens] = x.max(dim=-1).values
        if group is not None:
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        sumexp = torch.empty_like(lse)
        for s in range(0, T, chunk_tokens):
            e = slice(s, s + chunk_tokens)
            x = _masked_chunk(logits[e], vocab_start, vocab_size) - maxes[e, None]
            ex = x.exp()
            sumexp[e] = ex.sum(-1)
            if with_entropy:
                # sum_k exp(x_k) * x_k; exp(-inf) * -inf would be nan, so mask it out.
                sum_pl[e] = torch.where(ex > 0, ex * x, torch.zeros_like(x)).sum(-1)
            local = labels[e] - vocab_start
            owned = (local >= 0) & (local < v_local)
            picked = x.gather(-1, local.clamp(0, v_local - 1)[:, None]).squeeze(-1)
            label_logit[e] = torch.where(owned, picked, torch.zeros_like(picked))
        if group is not None:
            stacked = torch.stack([sumexp, sum_pl, label_logit])
            dist.all_reduce(stacked, group=group)
            sumexp, sum_pl, label_logit = stacked
        lse_shifted = sumexp.log()  # lse - max
        logp = label_logit - lse_shifted
        entropy = lse_shifted - sum_pl / sumexp if with_entropy else None
        lse = lse_shifted + maxes
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.meta = (vocab_start, vocab_size, chunk_tokens)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        vocab_start, vocab_size, chunk_tokens = ctx.meta
        T, v_local = logits.shape
        grad = torch.empty_like(logits)
        g_lp = grad_logp.float() if grad_logp is not None else torch.zeros_like(lse)
        with_h = entropy is not None and grad_entropy is not None
        for s in range(0, T, chunk_tokens):
            e = slice(s, s + chunk_tokens)
            logp_all = _masked_chunk(logits[e], vocab_start, vocab_size) - lse[e, None]
            p = logp_all.exp()
            g = -p * g_lp[e, None]
            if with_h:
                # -p_k (log p_k + H); p_k = 0 on padded columns, keep 0 (not 0 * -inf).
                dh = torch.where(p > 0, -p * (logp_all + entropy[e, None]), torch.zeros_like(p))
                g += dh * grad_entropy[e, None].float()
            local = labels[e] - vocab_start
            owned = (local >= 0) & (local < v_local)
            rows = owned.nonzero(as_tuple=True)[0]
            g[rows, local[rows]] += g_lp[e][rows]
            grad[e] = g.to(grad.dtype)
        return grad, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    tp_group=None,
    tp_rank: int = 0,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of `labels` and entropy of the distribution (None without `with_entropy`), per
    token.

    logits: [..., v_local] this rank's vocab slice (slice index = tp_rank); labels: [...].
    vocab_size: the real vocabulary (columns past it are padding and excluded).
    Returns (logp, entropy), both fp32 with the shape of labels.
    """
    shape = labels.shape
    v_local = logits.shape[-1]
    flat = logits.reshape(-1, v_local)
    if temperature != 1.0:
        flat = flat / temperature
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    logp, entropy = _VocabParallelLogProbEntropy.apply(
        flat, labels.reshape(-1), tp_rank * v_local, vocab_size, group, chunk_tokens, with_entropy
    )
    return logp.view(shape), None if entropy is None else entropy.view(shape)
