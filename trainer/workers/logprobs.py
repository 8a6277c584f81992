"""Log-probabilities and entropy from vocab-parallel logits, without gathering the vocabulary.

Each TP rank holds logits for its vocab slice [start, start + v/tp). The log-softmax needs a
max and a sum of exponentials over the whole vocabulary: each rank reads its logits once for
its own max and sums, then two all-reduces of [tokens] vectors (the max, then the sums rebased
on it), never a gather of [tokens, vocab]. The math runs in fp32 over chunks of tokens, so the
only [tokens, vocab/tp] tensors alive are the model's own logits and one fp32 chunk.

Backward is written by hand (megatron's vocab_parallel_cross_entropy has no entropy term):
  d logp / d l_k = 1[k = y] - p_k
  d H    / d l_k = -p_k (log p_k + H)
Both are local to the rank's slice once lse and H (global) are known, so backward needs no
communication. Without `with_entropy` the sum for H is skipped (forward and backward), which is
what the reference pass and an update without an entropy bonus need. Written here because no
kept library computes entropy over vocab-parallel logits.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

DEFAULT_CHUNK_TOKENS = 4096


# ---- per-chunk math: eager on CPU, one fused Triton kernel each on CUDA (torch.compile) -------
def _masked(x: torch.Tensor, start: int, vocab_size: int) -> torch.Tensor:
    """The chunk in fp32 with padded-vocab columns (index >= vocab_size) at -inf, out of place
    (`.float()` of fp32 logits is the model's own tensor)."""
    x = x.float()
    valid = max(vocab_size - start, 0)
    if valid < x.shape[-1]:
        col = torch.arange(x.shape[-1], device=x.device)
        x = torch.where(col < valid, x, float("-inf"))
    return x


def _chunk_stats(x, local_labels, start: int, vocab_size: int, with_entropy: bool):
    """One read of the chunk: the slice's max m, Σ exp(z), Σ exp(z)·z (for H; exp(-inf)·-inf
    would be nan, so masked) and the label's z, with z = x - m. A label outside this rank's
    slice contributes 0; so does a slice of padding only (m = -inf)."""
    xm = _masked(x, start, vocab_size)
    m = xm.max(dim=-1).values
    z = xm - torch.where(m > float("-inf"), m, 0.0)[:, None]
    ex = z.exp()
    sum_pl = torch.where(ex > 0, ex * z, 0.0).sum(-1) if with_entropy else None
    v_local = x.shape[-1]
    owned = (local_labels >= 0) & (local_labels < v_local)
    picked = z.gather(-1, local_labels.clamp(0, v_local - 1)[:, None]).squeeze(-1)
    return m, ex.sum(-1), sum_pl, torch.where(owned, picked, 0.0)


def _chunk_grad(x, lse, entropy, g_lp, g_h, local_labels, start: int, vocab_size: int):
    """d/dl of Σ g_lp·logp + g_h·H on this slice: (1[k=y] - p_k)·g_lp - p_k(log p_k + H)·g_h."""
    logp_all = _masked(x, start, vocab_size) - lse[:, None]
    p = logp_all.exp()
    g = -p * g_lp[:, None]
    if g_h is not None:
        # p_k = 0 on padded columns: keep 0 there (not 0 · -inf).
        g = g + torch.where(p > 0, -p * (logp_all + entropy[:, None]), 0.0) * g_h[:, None]
    col = torch.arange(x.shape[-1], device=x.device)
    g = g + torch.where(col[None, :] == local_labels[:, None], g_lp[:, None], 0.0)
    return g.to(x.dtype)


@functools.cache
def _chunk_ops():
    """(stats, grad). On CUDA each compiles to one fused kernel that reads the bf16 logits
    once, instead of ~10 fp32 passes over [tokens, vocab] (the log-prob pass would otherwise cost
    as much as the model's forward for a 150k vocabulary)."""
    ops = (_chunk_stats, _chunk_grad)
    if torch.cuda.is_available():
        ops = tuple(torch.compile(op, dynamic=True) for op in ops)
    return ops


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, vocab_size, group, chunk_tokens, with_entropy):
        # logits [T, v_local] (any float dtype), labels [T] global ids.
        chunk_stats, _ = _chunk_ops()
        T = logits.shape[0]
        f32 = dict(dtype=torch.float32, device=logits.device)
        maxes, sumexp = torch.empty(T, **f32), torch.empty(T, **f32)
        sum_pl, label_logit = torch.zeros(T, **f32), torch.empty(T, **f32)
        local_labels = labels - vocab_start
        for s in range(0, T, chunk_tokens):
            e = slice(s, s + chunk_tokens)
            stats = chunk_stats(logits[e], local_labels[e], vocab_start, vocab_size, with_entropy)
            maxes[e], sumexp[e], label_logit[e] = stats[0], stats[1], stats[3]
            if with_entropy:
                sum_pl[e] = stats[2]
        if group is not None:
            # Each rank's sums are relative to its own max: rebase them on the global max
            # (exp(x - M) = exp(x - m)·exp(m - M)) rather than reading the logits a second time.
            local_max = maxes.clone()
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            shift = local_max - maxes  # <= 0; -inf on a slice of padding only
            has_mass = sumexp > 0
            scale = shift.exp()
            sum_pl = (sum_pl + torch.where(has_mass, shift, 0.0) * sumexp) * scale
            sumexp = sumexp * scale
            owned = (local_labels >= 0) & (local_labels < logits.shape[-1])
            label_logit = torch.where(owned, label_logit + shift, 0.0)
            stacked = torch.stack([sumexp, sum_pl, label_logit])
            dist.all_reduce(stacked, group=group)
            sumexp, sum_pl, label_logit = stacked
        lse_shifted = sumexp.log()  # lse - max
        logp = label_logit - lse_shifted
        entropy = lse_shifted - sum_pl / sumexp if with_entropy else None
        lse = lse_shifted + maxes
        ctx.save_for_backward(logits, local_labels, lse, entropy)
        ctx.meta = (vocab_start, vocab_size, chunk_tokens)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, local_labels, lse, entropy = ctx.saved_tensors
        vocab_start, vocab_size, chunk_tokens = ctx.meta
        chunk_grad = _chunk_ops()[1]
        grad = torch.empty_like(logits)
        g_lp = grad_logp.float() if grad_logp is not None else torch.zeros_like(lse)
        with_h = entropy is not None and grad_entropy is not None
        g_h = grad_entropy.float() if with_h else None
        for s in range(0, logits.shape[0], chunk_tokens):
            e = slice(s, s + chunk_tokens)
            grad[e] = chunk_grad(
                logits[e],
                lse[e],
                entropy[e] if with_h else None,
                g_lp[e],
                g_h[e] if with_h else None,
                local_labels[e],
                vocab_start,
                vocab_size,
            )
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
