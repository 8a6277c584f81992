"""The RL math against hand computations and straightforward python references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer import core_algos as ca


@pytest.fixture(autouse=True)
def _float64():
    # Exact comparisons want fp64; restore the default so other test modules are unaffected.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()


# ---- masked statistics ---------------------------------------------------------------------
def test_masked_mean_var_whiten():
    v = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -7.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert ca.masked_mean(v, m).item() == pytest.approx(3.0)
    assert ca.masked_mean(v, m, axis=-1).tolist() == pytest.approx([2.0, 4.5])
    assert ca.masked_var(v, m).item() == pytest.approx(real.var(unbiased=True).item())
    w = ca.masked_whiten(v, m)
    expect = (real - 3.0) / math.sqrt(2.5 + 1e-8)
    assert w[m.bool()].tolist() == pytest.approx(expect.tolist())
    # An empty mask gives 0, not NaN.
    assert ca.masked_mean(v, torch.zeros_like(m)).item() == 0.0


# ---- agg_loss --------------------------------------------------------------------------------
LOSS = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 6.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode,expect",
    [
        ("token-mean", (1 + 2 + 3 + 4 + 6) / 5),
        ("seq-mean-token-sum", ((1 + 2 + 3) + (4 + 6)) / 2),
        ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + (4 + 6) / 2) / 2),
        ("seq-mean-token-sum-norm", ((1 + 2 + 3) / 4 + (4 + 6) / 4) / 2),
    ],
)
def test_agg_loss_modes(mode, expect):
    assert ca.agg_loss(LOSS, MASK, mode).item() == pytest.approx(expect)


def test_agg_loss_norm_len_and_unknown_mode():
    got = ca.agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", norm_len=10)
    assert got.item() == pytest.approx(16 / (2 * 10))
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'nope'"):
        ca.agg_loss(LOSS, MASK, "nope")


@pytest.mark.parametrize("mode", ca.LOSS_AGG_MODES)
@pytest.mark.parametrize("n_micro", [1, 2, 4])
def test_micro_batch_invariance(mode, n_micro):
    """Summing the per-micro-batch losses with global normalisers gives the same loss and
    gradient as the whole mini-batch at once; plain per-micro-batch means do not."""
    g = torch.Generator().manual_seed(0)
    B, T = 8, 6
    lengths = [1, 6, 3, 2, 5, 6, 4, 1]
    mask = _mask(lengths, T)
    old = torch.randn(B, T, generator=g) * 0.1 - 1
    adv = torch.randn(B, T, generator=g)
    theta_full = (old + torch.randn(B, T, generator=g) * 0.1).requires_grad_()
    full_loss, _ = ca.ppo_clip_loss(old, theta_full, adv, mask, loss_agg_mode=mode)
    full_loss.backward()

    theta = theta_full.detach().clone().requires_grad_()
    total = 0.0
    size = B // n_micro
    for i in range(0, B, size):
        sl = slice(i, i + size)
        loss, _ = ca.ppo_clip_loss(
            old[sl],
            theta[sl],
            adv[sl],
            mask[sl],
            loss_agg_mode=mode,
            global_tokens=mask.sum(),
            global_seqs=B,
        )
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(full_loss.item(), rel=1e-12)
    torch.testing.assert_close(theta.grad, theta_full.grad, rtol=1e-12, atol=1e-14)

    if n_micro > 1 and mode == "token-mean":
        # Local normalisers weigh micro-batches equally, which is wrong for uneven lengths.
        theta2 = theta_full.detach().clone().requires_grad_()
        for i in range(0, B, size):
            sl = slice(i, i + size)
            loss, _ = ca.ppo_clip_loss(old[sl], theta2[sl], adv[sl], mask[sl], loss_agg_mode=mode)
            (loss / n_micro).backward()
        assert not torch.allclose(theta2.grad, theta_full.grad)


# ---- policy losses ---------------------------------------------------------------------------
def _ppo_ref(old, new, adv, low, high, c):
    """Per-token vanilla PPO loss in plain python."""
    r = math.exp(new - old)
    clipped = -adv * min(max(r, 1 - low), 1 + high)
    loss = max(-adv * r, clipped)
    if adv < 0:
        loss = min(loss, -adv * c)
    return loss


def test_ppo_clip_against_reference_and_metrics():
    old = torch.zeros(1, 6)
    log_ratios = [0.0, 0.5, -0.5, 2.0, 0.1, -0.05]
    new = torch.tensor([log_ratios])
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0, 2.0, -1.0]])
    mask = torch.ones(1, 6)
    loss, m = ca.ppo_clip_loss(
        old, new, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0
    )
    ref = [
        _ppo_ref(0.0, lr, a, 0.2, 0.28, 3.0)
        for lr, a in zip(log_ratios, adv[0].tolist(), strict=True)
    ]
    assert loss.item() == pytest.approx(sum(ref) / 6)
    # Clipped tokens: r=e^0.5>1.28 with A>0, r=e^-0.5<0.8 with A<0. (r=e^2 with A<0 is not:
    # the clip lowers its loss, so the max keeps the unclipped one; dual clip bounds it.)
    assert m["pg_clipfrac"].item() == pytest.approx(2 / 6)
    # Dual clip: only the token with A<0 and r=e^2 > 3.
    assert m["pg_clipfrac_lower"].item() == pytest.approx(1 / 6)
    assert m["ppo_kl"].item() == pytest.approx(-sum(log_ratios) / 6)


def test_dual_clip_only_for_negative_advantages():
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), math.log(10.0))  # ratio 10, far beyond both clips
    adv = torch.tensor([[-1.0, 1.0]])
    mask = torch.ones(1, 2)
    new.requires_grad_()
    loss, m = ca.ppo_clip_loss(
        old, new, adv, mask, loss_agg_mode="seq-mean-token-sum", clip_ratio_c=3.0
    )
    # A<0: unclipped loss 10 would be capped by dual clip at 3. A>0: clip(10)=1.2 -> -1.2.
    assert loss.item() == pytest.approx(3.0 - 1.2)
    assert m["pg_clipfrac_lower"].item() == pytest.approx(0.5)
    loss.backward()
    assert new.grad[0].tolist() == [0.0, 0.0]  # both tokens clipped: no gradient

    # Without dual clip's effect (c huge), the A<0 token keeps the unbounded loss 10.
    loss_nc, m_nc = ca.ppo_clip_loss(
        old, new.detach(), adv, mask, loss_agg_mode="seq-mean-token-sum", clip_ratio_c=100.0
    )
    assert loss_nc.item() == pytest.approx(10.0 - 1.2)
    assert m_nc["pg_clipfrac_lower"].item() == 0.0

    # A positive advantage with a huge ratio is never dual-clipped (its loss is -A*1.2 < 0).
    _, m_pos = ca.ppo_clip_loss(old, new.detach(), torch.ones(1, 2), mask)
    assert m_pos["pg_clipfrac_lower"].item() == 0.0


def test_clip_higher_is_asymmetric():
    old = torch.zeros(1, 1)
    mask = torch.ones(1, 1)
    up = torch.full((1, 1), math.log(1.25))
    down = torch.full((1, 1), math.log(0.75))
    kw = dict(clip_ratio_low=0.2, clip_ratio_high=0.28)
    # A>0, r=1.25 within the higher bound 1.28: not clipped, loss -1.25, gradient flows.
    loss, m = ca.ppo_clip_loss(old, up, torch.ones(1, 1), mask, **kw)
    assert loss.item() == pytest.approx(-1.25) and m["pg_clipfrac"].item() == 0.0
    # Symmetric 0.2 would clip the same token at 1.2.
    loss, m = ca.ppo_clip_loss(
        old, up, torch.ones(1, 1), mask, clip_ratio_low=0.2, clip_ratio_high=0.2
    )
    assert loss.item() == pytest.approx(-1.2) and m["pg_clipfrac"].item() == 1.0
    # A<0, r=0.75 below the lower bound 0.8: clipped at 0.8.
    loss, m = ca.ppo_clip_loss(old, down, -torch.ones(1, 1), mask, **kw)
    assert loss.item() == pytest.approx(0.8) and m["pg_clipfrac"].item() == 1.0


def test_truncated_importance_sampling():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    new = old.clone().requires_grad_()  # ratio 1: loss per token = -A
    adv = torch.tensor([[1.0, 1.0, 1.0]])
    rollout = torch.tensor([[-1.0, -1.5, -3.0]])  # old/rollout = 1, e^0.5, e^2
    mask = torch.ones(1, 3)
    loss, _ = ca.ppo_clip_loss(
        old,
        new,
        adv,
        mask,
        loss_agg_mode="seq-mean-token-sum",
        rollout_log_probs=rollout,
        rollout_is_threshold=2.0,
    )
    weights = [1.0, math.exp(0.5), 2.0]
    assert loss.item() == pytest.approx(-sum(weights))
    loss.backward()
    assert new.grad[0].tolist() == pytest.approx([-w for w in weights])
    # Off when no threshold is given.
    loss_off, _ = ca.ppo_clip_loss(
        old, new.detach(), adv, mask, loss_agg_mode="seq-mean-token-sum", rollout_log_probs=rollout
    )
    assert loss_off.item() == pytest.approx(-3.0)


def test_gspo_sequence_ratio_and_gradient():
    g = torch.Generator().manual_seed(1)
    B, T = 3, 5
    mask = _mask([5, 2, 4], T)
    old = -torch.rand(B, T, generator=g) - 0.5
    new = (old + 0.01 * torch.randn(B, T, generator=g)).requires_grad_()
    adv = torch.tensor([[1.0], [-2.0], [0.5]]).expand(B, T)
    low, high = 3e-3, 4e-3
    loss, m = ca.gspo_loss(
        old,
        new,
        adv,
        mask,
        clip_ratio_low=low,
        clip_ratio_high=high,
        loss_agg_mode="seq-mean-token-mean",
    )
    loss.backward()

    # Reference: the paper's objective written with one scalar ratio per sequence.
    new_ref = new.detach().clone().requires_grad_()
    total = 0.0
    n_clipped = 0
    for i in range(B):
        n = int(mask[i].sum())
        s = torch.exp((new_ref[i, :n] - old[i, :n]).mean())
        a = adv[i, 0]
        s_clip = s.clamp(1 - low, 1 + high)
        total = total + torch.maximum(-a * s, -a * s_clip)
        n_clipped += n * int((-a * s_clip > -a * s).item())
    (total / B).backward()
    assert loss.item() == pytest.approx(total.item() / B, rel=1e-12)
    torch.testing.assert_close(new.grad, new_ref.grad, rtol=1e-10, atol=1e-12)
    assert m["pg_clipfrac"].item() == pytest.approx(n_clipped / mask.sum().item())


def test_policy_loss_registry():
    assert {"vanilla", "gspo"} <= set(ca.POLICY_LOSSES)
    with pytest.raises(KeyError, match="unknown policy loss 'nope'.*vanilla"):
        ca.POLICY_LOSSES["nope"]
    with pytest.raises(ValueError, match="already registered"):
        ca.register_policy_loss("vanilla")(lambda *a, **k: None)


# ---- KL --------------------------------------------------------------------------------------
def test_kl_estimators():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = [0.5, -1.0, 0.0]
    assert ca.kl_penalty(lp, ref, "kl").tolist() == pytest.approx(d)
    assert ca.kl_penalty(lp, ref, "k1").tolist() == pytest.approx(d)
    assert ca.kl_penalty(lp, ref, "abs").tolist() == pytest.approx([abs(x) for x in d])
    assert ca.kl_penalty(lp, ref, "mse").tolist() == pytest.approx([0.5 * x * x for x in d])
    k3 = [math.exp(-x) + x - 1 for x in d]
    assert ca.kl_penalty(lp, ref, "low_var_kl").tolist() == pytest.approx(k3)
    assert ca.kl_penalty(lp, ref, "k3").tolist() == pytest.approx(k3)
    # k3 is clamped at 10 for far-apart distributions.
    assert ca.kl_penalty(torch.tensor([-30.0]), torch.tensor([-1.0]), "low_var_kl").item() == 10.0
    with pytest.raises(KeyError, match="unknown kl penalty"):
        ca.kl_penalty(lp, ref, "k9")


def test_k3_is_unbiased_estimate_of_kl():
    """E_{x~p}[k3] = KL(p||q) for categorical p, q (checked exactly by enumeration)."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    k3 = ca.kl_penalty(p.log(), q.log(), "low_var_kl")
    k1 = ca.kl_penalty(p.log(), q.log(), "kl")
    kl = (p * (p / q).log()).sum()
    assert (p * k3).sum().item() == pytest.approx(kl.item())
    assert (p * k1).sum().item() == pytest.approx(kl.item())


def test_apply_kl_penalty():
    scores = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -0.5, -1.0], [-2.0, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = ca.apply_kl_penalty(scores, old, ref, mask, kl_coef=0.1, kind="kl")
    kld = torch.tensor([[0.5, -0.5, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, scores - 0.1 * kld)
    assert kl.item() == pytest.approx((0.0 / 3 + 1.0 / 2) / 2)


def test_kl_controllers():
    fixed = ca.FixedKLController(0.05)
    fixed.update(10.0, 100)
    assert fixed.value == 0.05
    ctl = ca.AdaptiveKLController(init_kl_coef=0.1, target_kl=0.5, horizon=100)
    ctl.update(current_kl=0.6, n_steps=10)  # error 0.2 -> x1.02
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(current_kl=5.0, n_steps=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 1.02)
    ctl.update(current_kl=0.45, n_steps=50)  # error -0.1 -> x0.95
    assert ctl.value == pytest.approx(0.1 * 1.02 * 1.02 * 0.95)
    ctl2 = ca.AdaptiveKLController(0.1, 0.5, 100)
    ctl2.load_state_dict(ctl.state_dict())
    assert ctl2.value == ctl.value


# ---- value loss ------------------------------------------------------------------------------
def test_value_loss_clipped():
    values = torch.tensor([[0.0, 0.0, 0.0]])
    vpreds = torch.tensor([[1.0, 0.3, -1.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipfrac = ca.compute_value_loss(vpreds, returns, values, mask, cliprange_value=0.5)
    # token 0: unclipped (1-2)^2=1, clipped (0.5-2)^2=2.25 -> 2.25 (clipped wins)
    # token 1: unclipped 0.09, clipped same (0.3 within range) -> 0.09
    assert loss.item() == pytest.approx(0.5 * (2.25 + 0.09) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
    loss.backward()
    # Clipped token has no gradient; the other 0.5 * 2 * 0.3 / 2.
    assert vpreds.grad[0].tolist() == pytest.approx([0.0, 0.15, 0.0])


# ---- advantage estimators --------------------------------------------------------------------
def test_gae_matches_python_loop():
    g = torch.Generator().manual_seed(2)
    B, T = 4, 7
    lengths = [7, 3, 5, 1]
    mask = _mask(lengths, T)
    rewards = torch.randn(B, T, generator=g) * mask
    values = torch.randn(B, T, generator=g)  # garbage on padding must not matter
    gamma, lam = 0.9, 0.8
    adv, ret = ca.ADV_ESTIMATORS["gae"](rewards, mask, values=values, gamma=gamma, lam=lam)

    raw = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        gae = 0.0
        for t in reversed(range(n)):
            next_v = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            gae = delta + gamma * lam * gae
            raw[i, t] = gae
    torch.testing.assert_close(ret * mask, (raw + values) * mask)
    real = raw[mask.bool()]
    white = (real - real.mean()) / torch.sqrt(real.var() + 1e-8)
    torch.testing.assert_close(adv[mask.bool()], white)
    assert (adv[~mask.bool()] == 0).all()


def test_gae_skips_masked_tokens_inside_a_response():
    # Token 1 is masked (e.g. tool output): the recursion jumps from token 2 to token 0.
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 9.0, 0.5]])
    _, ret = ca.compute_gae_advantage(rewards, mask, values=values, gamma=0.5, lam=1.0)
    # t=2: delta = 1 - 0.5 = 0.5; t=0: delta = 0 + 0.5*0.5 - 0.2 = 0.05, gae = 0.05 + 0.5*0.5
    assert ret[0, 2].item() == pytest.approx(0.5 + 0.5)
    assert ret[0, 0].item() == pytest.approx(0.05 + 0.25 + 0.2)


def _outcome(scores, lengths, T):
    mask = _mask(lengths, T)
    rewards = torch.zeros(len(scores), T)
    for i, (s, n) in enumerate(zip(scores, lengths, strict=True)):
        rewards[i, n - 1] = s
    return rewards, mask


def test_grpo_group_normalisation():
    scores = [1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.7]
    index = np.array(["a", "a", "a", "a", "b", "b", "c"], dtype=object)
    rewards, mask = _outcome(scores, [3, 1, 2, 3, 3, 2, 1], 3)
    adv, ret = ca.ADV_ESTIMATORS["grpo"](rewards, mask, index=index)
    a = torch.tensor(scores[:4])
    b = torch.tensor(scores[4:6])
    expect = ((a - a.mean()) / (a.std() + 1e-6)).tolist() + (
        (b - b.mean()) / (b.std() + 1e-6)
    ).tolist()
    expect.append(0.7)  # a group of one: raw score
    got = [adv[i, 0].item() for i in range(7)]
    assert got == pytest.approx(expect)
    assert (adv * (1 - mask) == 0).all() and torch.equal(adv, ret)
    # Every real token of a sequence carries its advantage.
    assert adv[0].tolist() == pytest.approx([expect[0]] * 3)

    adv_dr, _ = ca.ADV_ESTIMATORS["drgrpo"](rewards, mask, index=index)
    expect_dr = (a - a.mean()).tolist() + (b - b.mean()).tolist() + [0.7]
    assert [adv_dr[i, 0].item() for i in range(7)] == pytest.approx(expect_dr)
    adv_nostd, _ = ca.ADV_ESTIMATORS["grpo"](
        rewards, mask, index=index, norm_adv_by_std_in_grpo=False
    )
    torch.testing.assert_close(adv_nostd, adv_dr)


def test_grpo_equal_rewards_give_zero_advantage():
    rewards, mask = _outcome([1.0, 1.0, 1.0, 1.0], [2, 2, 2, 2], 2)
    adv, _ = ca.compute_grpo_advantage(rewards, mask, index=np.array([7, 7, 7, 7], dtype=object))
    assert (adv == 0).all()


def test_rloo_leave_one_out():
    scores = [1.0, 0.0, 0.5, 2.0, 3.0, 4.0]
    index = np.array([0, 0, 0, 1, 1, 5], dtype=object)
    rewards, mask = _outcome(scores, [2, 2, 1, 2, 1, 2], 2)
    adv, _ = ca.ADV_ESTIMATORS["rloo"](rewards, mask, index=index)
    expect = [1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5, 2.0 - 3.0, 3.0 - 2.0, 4.0]
    assert [adv[i, 0].item() for i in range(6)] == pytest.approx(expect)
    assert adv[2, 1].item() == 0.0  # padding


def test_reinforce_plus_plus():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    gamma = 0.5
    adv, ret = ca.ADV_ESTIMATORS["reinforce_plus_plus"](rewards, mask, gamma=gamma)
    expect_ret = torch.tensor([[0.25, 0.5, 1.0], [0.5, 0.0, 0.0]])
    torch.testing.assert_close(ret, expect_ret)
    real = expect_ret[mask.bool()]
    torch.testing.assert_close(
        adv[mask.bool()], (real - real.mean()) / torch.sqrt(real.var() + 1e-8)
    )


def test_estimators_share_one_signature():
    rewards, mask = _outcome([1.0, 0.0, 1.0, 0.0], [2, 2, 1, 2], 2)
    kwargs = dict(
        index=np.array([0, 0, 1, 1], dtype=object),
        values=torch.zeros(4, 2),
        gamma=1.0,
        lam=1.0,
        norm_adv_by_std_in_grpo=True,
    )
    for name in ("gae", "grpo", "drgrpo", "rloo", "reinforce_plus_plus"):
        adv, ret = ca.ADV_ESTIMATORS[name](rewards, mask, **kwargs)
        assert adv.shape == ret.shape == (4, 2), name
        assert torch.isfinite(adv).all(), name
    with pytest.raises(ValueError, match="need `index`"):
        ca.ADV_ESTIMATORS["grpo"](rewards, mask)
    with pytest.raises(ValueError, match="needs the critic"):
        ca.ADV_ESTIMATORS["gae"](rewards, mask)
