"""The RL math of Tandem: pure functions, tensors in, tensors out.

Nothing here knows about configs, models, process groups or batches; the trainer passes the
few numbers each function needs. Policy losses and advantage estimators live in registries
filled by decorators, so the trainer calls `POLICY_LOSSES[name](...)` and
`ADV_ESTIMATORS[name](...)` without branching on names, and a new variant is one function.

Shapes: every per-token tensor is [batch, response_length], right-padded; `response_mask` is 1
on real response tokens (EOS included) and 0 on padding.

Loss aggregation and micro-batches
----------------------------------
The actor splits a mini-batch into micro-batches and sums their gradients. A per-micro-batch
mean would weight a micro-batch of few tokens like one of many, so the gradient would depend on
how the mini-batch was cut. `agg_loss` therefore takes optional *global* normalisers:
`global_tokens` (real tokens in the whole mini-batch) and `global_seqs` (sequences in it). With
them each micro-batch returns its share, `sum(micro) / global`, and the sum of the
micro-batch losses equals the mini-batch loss exactly, whatever the split. Without them the
normaliser is the micro-batch's own count (what a single-micro-batch caller wants).
If gradients are then *averaged* over data-parallel ranks (megatron's default), pass the
per-rank counts; if they are summed, pass the counts over all ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from tandem_core.registry import Registry

POLICY_LOSSES = Registry("policy loss")
ADV_ESTIMATORS = Registry("advantage estimator")
KL_PENALTIES = Registry("kl penalty")
register_policy_loss = POLICY_LOSSES.register
register_adv_estimator = ADV_ESTIMATORS.register
register_kl_penalty = KL_PENALTIES.register

# exp() of a log-ratio beyond this overflows fp32 / bf16 long before it means anything.
_MAX_LOG_RATIO = 20.0


# ---- masked statistics ----------------------------------------------------------------------
def masked_sum(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if axis is None else (values * mask).sum(axis)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Mean over the positions where mask is 1 (0 when the mask is empty, never NaN)."""
    return masked_sum(values, mask, axis) / masked_sum(torch.ones_like(values), mask, axis).clamp(
        min=1
    )


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            # One value has no spread; a zero variance whitens it to 0 instead of NaN.
            return torch.zeros_like(var)
        var = var * n / (n - 1)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True
) -> torch.Tensor:
    """(values - mean) / std over the masked positions (Bessel-corrected, as verl)."""
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + 1e-8)
    return whitened if shift_mean else whitened + mean


# ---- loss aggregation ------------------------------------------------------------------------
LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    norm_len: int | None = None,
) -> torch.Tensor:
    """Reduce a [B, T] loss matrix to a scalar.

    - token-mean: sum over all real tokens / number of real tokens (every token weighs the same);
    - seq-mean-token-sum: per-sequence token sum, mean over sequences;
    - seq-mean-token-mean: per-sequence token mean, mean over sequences (GRPO paper);
    - seq-mean-token-sum-norm: per-sequence token sum / a constant length, mean over sequences
      (Dr. GRPO: no length bias). The constant is `norm_len` (default: T, the padded response
      length, which is constant when responses are padded to the configured length). Unlike
      verl, the mean over sequences is kept, so the scale does not grow with the batch.

    `global_tokens` / `global_seqs` replace the denominators by mini-batch totals so that
    micro-batch losses sum to the mini-batch loss (see the module docstring).
    """
    mask = loss_mask.to(loss_mat.dtype)
    if mode == "token-mean":
        denom = mask.sum().clamp(min=1) if global_tokens is None else global_tokens
        return masked_sum(loss_mat, mask) / denom
    n_seqs = loss_mat.shape[0] if global_seqs is None else global_seqs
    seq_sums = masked_sum(loss_mat, mask, axis=-1)
    if mode == "seq-mean-token-sum":
        return seq_sums.sum() / n_seqs
    if mode == "seq-mean-token-mean":
        # A sequence with no real token contributes 0 (its sum is 0), not NaN.
        return (seq_sums / mask.sum(-1).clamp(min=1)).sum() / n_seqs
    if mode == "seq-mean-token-sum-norm":
        length = loss_mat.shape[-1] if norm_len is None else norm_len
        return seq_sums.sum() / (n_seqs * length)
    raise ValueError(f"unknown loss_agg_mode {mode!r}; known: {', '.join(LOSS_AGG_MODES)}")


# ---- KL estimators ---------------------------------------------------------------------------
@register_kl_penalty("kl")
def _kl_k1(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log q: unbiased, high variance, can be negative per token."""
    return logprob - ref_logprob


@register_kl_penalty("abs")
def _kl_abs(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    return (logprob - ref_logprob).abs()


@register_kl_penalty("mse")
def _kl_k2(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 (log p - log q)^2."""
    return 0.5 * (logprob - ref_logprob).square()


@register_kl_penalty("low_var_kl")
def _kl_k3(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """k3 = q/p - log(q/p) - 1 >= 0 (Schulman's estimator), clamped to [-10, 10] as verl does:
    a token with a huge ratio would otherwise dominate the loss."""
    log_ratio = (ref_logprob - logprob).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return (log_ratio.exp() - log_ratio - 1).clamp(-10, 10)


# Schulman's names for the same estimators.
KL_PENALTIES.add("k1", _kl_k1)
KL_PENALTIES.add("k2", _kl_k2)
KL_PENALTIES.add("k3", _kl_k3)


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate: kl (k1) | abs | mse (k2) | low_var_kl (k3)."""
    return KL_PENALTIES[kind](logprob, ref_logprob)


# ---- policy losses ---------------------------------------------------------------------------
def _truncated_is_weight(
    old_log_prob: torch.Tensor,
    rollout_log_probs: torch.Tensor | None,
    threshold: float | None,
) -> torch.Tensor | None:
    """TIS: min(pi_old / pi_rollout, threshold), detached. The engine samples from slightly
    different numerics than the trainer; this corrects the off-policyness it introduces."""
    if rollout_log_probs is None or threshold is None:
        return None
    log_ratio = (old_log_prob - rollout_log_probs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return log_ratio.exp().clamp(max=threshold).detach()


def _weighted_agg(
    pg_losses,
    old_log_prob,
    rollout_log_probs,
    threshold,
    response_mask,
    mode,
    global_tokens,
    global_seqs,
) -> torch.Tensor:
    """Per-token losses × the truncated rollout importance weight (when asked), aggregated."""
    weight = _truncated_is_weight(old_log_prob, rollout_log_probs, threshold)
    if weight is not None:
        pg_losses = pg_losses * weight
    return agg_loss(
        pg_losses, response_mask, mode, global_tokens=global_tokens, global_seqs=global_seqs
    )


@register_policy_loss("vanilla")
def ppo_clip_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    rollout_log_probs: torch.Tensor | None = None,
    rollout_is_threshold: float | None = None,
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with clip-higher and dual-clip.

    Per token: max(-A r, -A clip(r, 1 - low, 1 + high)); clip-higher (high > low, DAPO) leaves
    more room to raise the probability of rare good tokens. For A < 0 the surrogate above is
    unbounded as r grows; dual-clip (Ye et al. 2020) caps it at -A * clip_ratio_c.
    """
    assert clip_ratio_c > 1.0, f"dual-clip constant must be > 1, got {clip_ratio_c}"
    neg_approx_kl = (log_prob - old_log_prob).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = neg_approx_kl.exp()
    losses_unclipped = -advantages * ratio
    losses_clipped = -advantages * ratio.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
    clip_losses = torch.maximum(losses_unclipped, losses_clipped)
    dual_bound = -advantages * clip_ratio_c
    dual_losses = torch.minimum(clip_losses, dual_bound)
    negative = advantages < 0
    pg_losses = torch.where(negative, dual_losses, clip_losses)

    pg_loss = _weighted_agg(
        pg_losses,
        old_log_prob,
        rollout_log_probs,
        rollout_is_threshold,
        response_mask,
        loss_agg_mode,
        global_tokens,
        global_seqs,
    )
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((losses_clipped > losses_unclipped).float(), response_mask),
            "ppo_kl": masked_mean(-neg_approx_kl, response_mask),
            "pg_clipfrac_lower": masked_mean(
                ((clip_losses > dual_bound) & negative).float(), response_mask
            ),
        }
    return pg_loss, metrics


@register_policy_loss("gspo")
def gspo_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 3e-4,
    clip_ratio_high: float = 4e-4,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "seq-mean-token-mean",
    rollout_log_probs: torch.Tensor | None = None,
    rollout_is_threshold: float | None = None,
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025): one importance ratio per sequence,
    s_i = exp(mean_t log(pi / pi_old)), clipped per sequence.

    Written per token as s_i,t = sg[s_i] * pi_t / sg[pi_t]: its value is s_i and its gradient is
    s_i * grad log pi_t, so with seq-mean-token-mean aggregation (the paper's objective) the
    gradient is the paper's. The ranges are tiny (the paper uses 3e-4 / 4e-4) because the
    ratio is a geometric mean. `clip_ratio_c` is accepted for a uniform signature and unused:
    the sequence ratio is already bounded by the clip.
    """
    del clip_ratio_c
    neg_approx_kl = log_prob - old_log_prob
    seq_log_ratio = masked_mean(neg_approx_kl, response_mask, axis=-1)
    log_ratio = log_prob - log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = log_ratio.clamp(max=10.0).exp()
    losses_unclipped = -advantages * ratio
    losses_clipped = -advantages * ratio.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = torch.maximum(losses_unclipped, losses_clipped)

    pg_loss = _weighted_agg(
        pg_losses,
        old_log_prob,
        rollout_log_probs,
        rollout_is_threshold,
        response_mask,
        loss_agg_mode,
        global_tokens,
        global_seqs,
    )
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((losses_clipped > losses_unclipped).float(), response_mask),
            "ppo_kl": masked_mean(-neg_approx_kl, response_mask),
            "pg_clipfrac_lower": torch.zeros((), device=log_prob.device),
        }
    return pg_loss, metrics


# ---- value loss ------------------------------------------------------------------------------
def compute_value_loss(
    vpreds: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    *,
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2), aggregated.

    `values` are the critic's predictions at rollout time (v_old). Returns (vf_loss, vf_clipfrac).
    """
    vpreds_clipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
    losses_unclipped = (vpreds - returns).square()
    losses_clipped = (vpreds_clipped - returns).square()
    vf_loss = 0.5 * agg_loss(
        torch.maximum(losses_unclipped, losses_clipped),
        response_mask,
        loss_agg_mode,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
    )
    with torch.no_grad():
        vf_clipfrac = masked_mean((losses_clipped > losses_unclipped).float(), response_mask)
    return vf_loss, vf_clipfrac


# ---- advantage estimators --------------------------------------------------------------------
# One signature for all: fn(token_level_rewards, response_mask, *, index, values, gamma, lam,
# norm_adv_by_std_in_grpo, epsilon) -> (advantages, returns), both [B, T] and zero on padding.
# `index` holds one group id (uid) per row, the prompt the sample answers.


@register_adv_estimator("gae")
@torch.no_grad()
def compute_gae_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    index: np.ndarray | None = None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) over the real tokens; advantages whitened over the batch.

    Masked positions are not steps: the recursion carries the next value and the running GAE
    through them, so padding after the last token makes it terminal (next value 0), and masked
    tokens inside a response (e.g. tool output) are skipped.
    """
    if values is None:
        raise ValueError("gae needs the critic's values")
    mask = response_mask.to(values.dtype)
    values = values * mask
    next_value = torch.zeros_like(values[:, 0])
    last_gae = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
        gae = delta + gamma * lam * last_gae
        advantages[:, t] = gae * m
        next_value = m * values[:, t] + (1 - m) * next_value
        last_gae = m * gae + (1 - m) * last_gae
    returns = advantages + values
    return masked_whiten(advantages, mask) * mask, returns


def _group_stats(
    scores: torch.Tensor, index: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (mean of its group, unbiased std of its group, group size)."""
    _, group = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    group = torch.as_tensor(group, device=scores.device)
    n_groups = int(group.max()) + 1
    count = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(
        0, group, torch.ones_like(scores)
    )
    total = torch.zeros_like(count).index_add_(0, group, scores)
    mean = total / count
    sq = torch.zeros_like(count).index_add_(0, group, (scores - mean[group]).square())
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    return mean[group], std[group], count[group]


def _outcome_scores(token_level_rewards: torch.Tensor, index: np.ndarray | None) -> torch.Tensor:
    if index is None:
        raise ValueError("group-relative estimators need `index` (one group id per row)")
    if len(index) != token_level_rewards.shape[0]:
        raise ValueError(
            f"index has {len(index)} rows, rewards have {token_level_rewards.shape[0]}"
        )
    return token_level_rewards.sum(-1)


@register_adv_estimator("grpo")
@torch.no_grad()
def compute_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    index: np.ndarray | None = None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: each sequence's outcome reward minus its group's mean, divided by the group's std
    (+ epsilon) when `norm_adv_by_std_in_grpo`; broadcast over the sequence's tokens.
    A group of one has no baseline: its advantage is its raw score (mean 0, std 1, as verl)."""
    scores = _outcome_scores(token_level_rewards, index)
    mean, std, count = _group_stats(scores, index)
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    adv = scores - mean
    if norm_adv_by_std_in_grpo:
        adv = adv / (std + epsilon)
    adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


@register_adv_estimator("drgrpo")
def compute_drgrpo_advantage(token_level_rewards, response_mask, **kwargs):
    """Dr. GRPO: GRPO without the std division (std scaling biases towards easy/hard groups)."""
    kwargs["norm_adv_by_std_in_grpo"] = False
    return compute_grpo_advantage(token_level_rewards, response_mask, **kwargs)


@register_adv_estimator("rloo")
@torch.no_grad()
def compute_rloo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    index: np.ndarray | None = None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (Ahmadian et al. 2024): baseline = mean score of the *other* samples of the group,
    i.e. A_i = s_i - (sum_group - s_i) / (n - 1). A group of one keeps its raw score."""
    scores = _outcome_scores(token_level_rewards, index)
    mean, _, count = _group_stats(scores, index)
    baseline = (mean * count - scores) / (count - 1).clamp(min=1)
    adv = torch.where(count > 1, scores - baseline, scores)
    adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


@register_adv_estimator("reinforce_plus_plus")
@torch.no_grad()
def compute_reinforce_plus_plus_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    index: np.ndarray | None = None,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): discounted return-to-go per token, whitened over the batch."""
    mask = response_mask.to(token_level_rewards.dtype)
    returns = torch.zeros_like(token_level_rewards)
    running = torch.zeros_like(token_level_rewards[:, 0])
    for t in reversed(range(token_level_rewards.shape[1])):
        # Masked positions are not steps (as in GAE): padding after the last token carries
        # nothing back, and tool output inside a multi-turn response passes the return on.
        step = mask[:, t] > 0
        running = torch.where(step, token_level_rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return masked_whiten(returns, mask) * mask, returns * mask


# ---- KL in the reward ------------------------------------------------------------------------
class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019: move the coefficient towards the one that keeps KL at `target`.

    value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def apply_kl_penalty(
    token_level_scores: torch.Tensor,
    old_log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kind: str = "kl",
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards = scores - kl_coef * KL per token. Returns (token_level_rewards, mean KL) where the
    mean is over each sequence's tokens, then over sequences: what the adaptive controller
    tracks. The mean is a 0-dim tensor (call .item() where a float is wanted)."""
    kld = kl_penalty(old_log_prob, ref_log_prob, kind) * response_mask
    rewards = token_level_scores - kl_coef * kld
    return rewards, masked_mean(kld, response_mask, axis=-1).mean()
