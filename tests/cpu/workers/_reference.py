"""Plain transformers / PyTorch references for the trainer tests (single process, fp32)."""

from __future__ import annotations

import torch

from trainer import core_algos


def synthetic_rollout(
    vocab: int, batch: int = 8, prompt_len: int = 6, resp_len: int = 5, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Left-padded prompts + right-padded responses of mixed lengths, as a rollout returns."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, prompt_len + resp_len), generator=g)
    p_real = torch.randint(2, prompt_len + 1, (batch,), generator=g)
    r_real = torch.randint(1, resp_len + 1, (batch,), generator=g)
    pos = torch.arange(prompt_len + resp_len)
    prompt_mask = (pos[None, :prompt_len] >= (prompt_len - p_real)[:, None]).long()
    resp_mask = (pos[None, :resp_len] < r_real[:, None]).long()
    attn = torch.cat([prompt_mask, resp_mask], dim=1)
    ids = ids * attn  # pad id 0
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
        "responses": ids[:, prompt_len:],
        "response_mask": resp_mask,
    }


def hf_logprobs(model, data: dict, temperature: float = 1.0):
    """Log-probs and entropy of the response tokens from an HF model, left-padded input."""
    R = data["responses"].shape[1]
    out = model(
        input_ids=data["input_ids"],
        attention_mask=data["attention_mask"],
        position_ids=data["position_ids"],
    )
    logits = out.logits[:, -R - 1 : -1].float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, data["responses"][..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    mask = data["response_mask"].float()
    return logp * mask, entropy * mask


def reference_ppo_step(
    model, data: dict, cfg, lr: float, eps: float, clip_grad: float, mini_batch: int
):
    """The actor's update as plain PyTorch: same loss, torch AdamW, global-norm clipping.
    Returns each step's gradient norm before clipping."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=eps, weight_decay=0.0)
    norms = []
    for start in range(0, data["input_ids"].shape[0], mini_batch):
        mini = {k: v[start : start + mini_batch] for k, v in data.items()}
        opt.zero_grad()
        logp, entropy = hf_logprobs(model, mini)
        loss, _ = core_algos.POLICY_LOSSES[cfg.policy_loss](
            mini["old_log_probs"],
            logp,
            mini["advantages"],
            mini["response_mask"],
            clip_ratio_low=cfg.clip_ratio_low,
            clip_ratio_high=cfg.clip_ratio_high,
            clip_ratio_c=cfg.clip_ratio_c,
            loss_agg_mode=cfg.loss_agg_mode,
        )
        ent = core_algos.agg_loss(entropy, mini["response_mask"], cfg.loss_agg_mode)
        loss = loss - cfg.entropy_coeff * ent
        if cfg.use_kl_loss:
            kl = core_algos.kl_penalty(logp, mini["ref_log_probs"], cfg.kl_loss_type)
            loss = loss + cfg.kl_loss_coef * core_algos.agg_loss(
                kl, mini["response_mask"], cfg.loss_agg_mode
            )
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)))
        opt.step()
    return norms
