"""megatron-core's optimizer and LR scheduler for a trained role (the scheduler also drives
the FSDP2 strategy's torch AdamW), and what megatron-core 0.16.1 needs around them without
transformer-engine or apex: torch's AdamW kernel choice, and the workarounds that make a
checkpoint load exact (each names the megatron behaviour it undoes).
"""

from __future__ import annotations

import logging

import torch

from tandem_core.config import OptimConfig, ParallelConfig

log = logging.getLogger(__name__)


def build_optimizer(chunks, config, optim: OptimConfig, parallel: ParallelConfig, total_steps):
    """megatron's optimizer (distributed when configured) and OptimizerParamScheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    set_adam_kernel(optimizer, optim.fused)
    return optimizer, build_scheduler(optimizer, optim, total_steps)


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    """megatron's OptimizerParamScheduler over `optimizer`'s param groups (a megatron optimizer
    or a torch one with megatron's `wd_mult` per group): warmup, decay, weight decay."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = optim.lr_decay_steps or max(total_steps, optim.lr_warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )


def torch_adams(optimizer) -> list[torch.optim.Optimizer]:
    """The torch Adam(W)s inside a megatron optimizer (none when it runs TE's or apex's)."""
    inners = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [o for o in inners if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]


def set_adam_kernel(optimizer, fused: bool) -> None:
    """Run megatron's torch AdamW as torch's fused kernel, or as foreach (megatron's default).

    Fused is one launch per param group where foreach is a dozen per step, a few percent of a 1B
    update. torch reads the flag from the param group at every step, so it can be set after
    megatron built the optimizer. A fused step wants each `step` count on its param's device,
    foreach on the host: existing counts move with the flag (per parameter, never shared)."""
    for inner in torch_adams(optimizer):
        for group in inner.param_groups:
            group["fused"], group["foreach"] = fused, None
            for p in group["params"]:
                state = inner.state.get(p)
                if state and "step" in state:
                    device = p.device if fused else torch.device("cpu")
                    state["step"] = state["step"].to(device, torch.float32, copy=True)


# ---- loading a checkpoint into megatron-core 0.16.1's optimizer -----------------------------
def init_empty_adam_state(optimizer) -> None:
    """A fresh worker (a restarted trainer) has no Adam state yet; megatron-core 0.16.1's
    DistributedOptimizer.state_dict then asserts (it reads torch's `step`), so loading into it
    fails. Give it torch's own zero-step state; the checkpoint then overwrites every value."""
    for inner in torch_adams(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(
                        step=torch.tensor(0.0, dtype=torch.float32),
                        exp_avg=torch.zeros_like(p),
                        exp_avg_sq=torch.zeros_like(p),
                    )


def untie_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam step count, equal to the saved one.

    megatron-core 0.16.1's DistributedOptimizer.load_state_dict, with torch's AdamW (no TE/apex),
    hands all parameters ONE shared `step` tensor, then overwrites it with the template's stale
    value; torch then increments the shared tensor once per parameter per step, so the bias
    correction after a resume would be wrong. The saved count survives in param_groups."""
    for inner in torch_adams(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state and "step" in state:
                    old = state["step"]
                    state["step"] = torch.tensor(
                        float(group["step"]), dtype=old.dtype, device=old.device
                    )


def load_scheduler_state(scheduler, saved: dict) -> None:
    """The step count comes from the checkpoint; the schedule's shape from this run's config,
    so a resumed run may change total_steps or the LR (megatron would assert instead)."""
    changed = {
        k: (v, saved[k])
        for k, v in scheduler.state_dict().items()
        if k != "num_steps" and k in saved and v != saved[k]
    }
    if changed:
        log.warning(
            "LR schedule differs from the checkpoint's; using this run's values "
            "(field: (now, saved)): %s",
            changed,
        )
    # megatron's load_state_dict adds the saved step count to the current one: start at 0.
    scheduler.num_steps = 0
    override = scheduler.override_opt_param_scheduler
    scheduler.override_opt_param_scheduler = True
    try:
        scheduler.load_state_dict(saved)
    finally:
        scheduler.override_opt_param_scheduler = override
