"""Critic, reference offload and the actor's dynamic batching / bad-input handling, on
megatron-core vs plain transformers/PyTorch, for one parallel layout (one launch, many checks).

usage: critic_check.py ARCH TP PP SP(0|1) CHECKS [VPP]   CHECKS: comma list of
       (STRATEGY=fsdp2: the FSDP2 workers over every rank, TP = PP = 1; critic and dynamic)
       (PACK=1: megatron with packed micro-batches; CP=2: context parallel 2; critic and
       dynamic)
  critic   compute_values equals HF backbone + linear head to 1e-5; one critic update (two
           mini-batches, clipped value loss) gives the parameters of plain PyTorch (AdamW,
           clipping) to 1e-5 and reports the same vf_loss;
  ref      reference with offload_params: storage moves and comes back, values identical,
           log-probs equal to the non-offloaded ones exactly and to transformers' to 1e-5;
  dynamic  actor update_policy with token-budget micro-batches = fixed micro-batches (1e-5);
  bad      too-long sequences refused before any forward (message names length and limit);
           empty responses give finite outputs and steps; NaN advantages skip the step on
           every rank (parameters unchanged), a finite step resets the count, K in a row abort.
Every rank asserts; rank 0 writes the numbers.
"""

import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402
from _reference import hf_logprobs, synthetic_rollout  # noqa: E402

import archs  # noqa: E402
import weight_loaders  # noqa: E402
from archs import ensure_tiny_checkpoint  # noqa: E402
from tandem_core import distributed as D  # noqa: E402
from tandem_core.config import (  # noqa: E402
    ActorConfig,
    CriticConfig,
    OptimConfig,
    ParallelConfig,
    RefConfig,
)
from tandem_core.models import ValueHead  # noqa: E402
from tandem_core.protocol import Batch  # noqa: E402
from trainer import core_algos  # noqa: E402
from trainer.workers.actor import PolicyActor  # noqa: E402
from trainer.workers.critic import ValueCritic  # noqa: E402
from trainer.workers.fsdp import build_fsdp_worker  # noqa: E402
from trainer.workers.model import build_model_worker  # noqa: E402
from trainer.workers.passes import NonFiniteLossError, SequenceTooLongError  # noqa: E402
from trainer.workers.reference import ReferencePolicy, reload_params  # noqa: E402
from weight_loaders.stream import unwrap_model  # noqa: E402

LR, EPS, CLIP = 1e-3, 1e-4, 1.0  # large eps: Adam's first step is then smooth in the grad
TOL = 1e-5


STRATEGY = os.environ.get("STRATEGY", "megatron")
PACK = os.environ.get("PACK") == "1"  # megatron: micro-batches packed into one row each
CP = int(os.environ.get("CP", "1"))  # megatron: context parallel size


def build_worker(args, hf_dir, parallel, value_head=False, optim=None):
    if STRATEGY == "fsdp2":
        return build_fsdp_worker(args, hf_dir, optim=optim, value_head=value_head)
    return build_model_worker(
        args, hf_dir, parallel, value_head=value_head, optim=optim, pack_sequences=PACK
    )


def set_value_head(worker, weight: torch.Tensor) -> None:
    """The critic's head := `weight` (the megatron head lives on the last stage; FSDP2's is a
    sharded DTensor, filled from the full tensor)."""
    if STRATEGY == "fsdp2":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(worker.model, {"value_head.weight": weight}, options=full)
    elif worker.is_last_stage:
        with torch.no_grad():
            value_head(worker).weight.copy_(weight)


def value_head(worker):
    return unwrap_model(worker.chunks[-1]).output_layer


def whole_params(worker, args) -> dict[str, torch.Tensor]:
    """Backbone as HF tensors (+ `value_head.weight` of a critic), whole on every rank."""
    if STRATEGY == "fsdp2":
        return {k: v.detach().clone() for k, v in worker.full_tensors()}
    critic = worker.is_last_stage and isinstance(value_head(worker), ValueHead)
    named = [
        (k, v)
        for k, v in weight_loaders.megatron_named_params(worker.chunks)
        if not (critic and k == "output_layer.weight")
    ]
    mine = {
        k: v.detach().clone()
        for k, v in weight_loaders.stream_hf_weights(named, args, D.tp_group())
    }
    if critic:
        mine["value_head.weight"] = value_head(worker).weight.detach().clone()
    stages = [None] * D.pp_size()
    dist.all_gather_object(stages, mine, group=D.pp_group())
    return {k: v for s in stages for k, v in s.items()}


def max_err(got: dict, want: dict) -> float:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    return max((got[k] - want[k]).abs().max().item() for k in got)


# ---- plain PyTorch critic --------------------------------------------------------------------
def hf_values(backbone, head, data):
    R = data["responses"].shape[1]
    hidden = backbone(
        input_ids=data["input_ids"],
        attention_mask=data["attention_mask"],
        position_ids=data["position_ids"],
    ).last_hidden_state
    return head(hidden)[:, -R - 1 : -1, 0] * data["response_mask"].float()


def reference_critic_step(backbone, head, data, cfg: CriticConfig, mini_batch: int):
    """The critic update as plain PyTorch: clipped value loss, torch AdamW, norm clipping.
    Returns the mean vf_loss over mini-batches."""
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=0.0)
    losses = []
    for start in range(0, data["input_ids"].shape[0], mini_batch):
        mini = {k: v[start : start + mini_batch] for k, v in data.items()}
        opt.zero_grad()
        vpreds = hf_values(backbone, head, mini)
        loss, _ = core_algos.compute_value_loss(
            vpreds, mini["returns"], mini["values"], mini["response_mask"], cfg.cliprange_value
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


def check_critic(args, hf_dir, parallel, data) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    head = torch.nn.Linear(args.hidden_size, 1, bias=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the ValueHead starts at 0: give both the same non-zero weight
        head.weight.copy_(0.2 * torch.randn(head.weight.shape, generator=g))
    cfg = CriticConfig(
        optim=OptimConfig(lr=LR, eps=EPS, clip_grad=CLIP),
        cliprange_value=0.2,
        ppo_mini_batch_size=4,
        micro_batch_size=3,
    )

    def build():
        worker = build_worker(args, hf_dir, parallel, value_head=True, optim=cfg.optim)
        set_value_head(worker, head.weight.detach())
        return worker

    worker = build()
    with torch.no_grad():
        want_values = hf_values(hf.model, head, data)
    for forward_mbs in (None, len(data["responses"])):  # micro-batches of 3, then one of all
        forward_cfg = replace(cfg, forward_micro_batch_size=forward_mbs)
        values = ValueCritic(worker, forward_cfg).compute_values(Batch.from_dict(data))
        values_err = (values["values"] - want_values).abs().max().item()
        assert values_err < TOL, (forward_mbs, values_err)
    assert want_values.abs().max() > 0.1, "values too small for a meaningful check"

    train = {
        **data,
        "values": want_values + 0.3 * torch.randn(want_values.shape, generator=g),
        "returns": torch.randn(want_values.shape, generator=g),
    }
    before = {
        **{k: v.detach().clone() for k, v in hf.model.named_parameters()},
        "head": head.weight.detach().clone(),
    }
    want_loss = reference_critic_step(hf.model, head, train, cfg, mini_batch=4)
    want = {
        **{f"model.{k}": v.detach() for k, v in hf.model.named_parameters()},
        "value_head.weight": head.weight.detach(),
    }
    moved = min(
        (want["value_head.weight"] - before["head"]).abs().max().item(),
        *((want[f"model.{k}"] - before[k]).abs().max().item() for k in before if k != "head"),
    )
    assert moved > 1e-4, f"the reference step left a tensor unchanged ({moved})"

    metrics = ValueCritic(worker, cfg).update_critic(Batch.from_dict(train, meta_info={"n": 1}))
    param_err = max_err(whole_params(worker, args), want)
    assert param_err < TOL, param_err
    assert abs(metrics["critic/vf_loss"] - want_loss) < TOL, (metrics, want_loss)
    assert 0 < metrics["critic/vf_clipfrac"] < 1, metrics
    assert metrics["critic/skipped_steps"] == 0 and metrics["critic/grad_norm"] > 0, metrics
    return {"values_err": values_err, "critic_param_err": param_err, "critic_metrics": metrics}


# ---- reference offload ------------------------------------------------------------------------
def check_reference(args, hf_dir, parallel, data, want_lp) -> dict:
    batch = Batch.from_dict(data)
    plain = build_model_worker(args, hf_dir, parallel)
    expect = PolicyActor(plain, ActorConfig(micro_batch_size=3)).compute_log_prob(batch)
    worker = build_model_worker(args, hf_dir, parallel)
    params = list(dict.fromkeys(p for c in worker.chunks for p in c.parameters()))
    snapshot = [p.detach().clone() for p in params]
    ptrs = [p.data_ptr() for p in params]
    ref = ReferencePolicy(worker, ActorConfig(micro_batch_size=3), RefConfig(offload_params=True))
    assert worker.offloaded
    # Offloading gives every parameter new host storage with the same values.
    assert all(p.data_ptr() != q for p, q in zip(params, ptrs, strict=True))
    assert all(p.device.type == "cpu" for p in params)
    assert all(torch.equal(p, s) for p, s in zip(params, snapshot, strict=True))
    got = ref.compute_ref_log_prob(batch)["ref_log_probs"]
    assert worker.offloaded, "the reference must go back to host memory after use"
    assert torch.equal(got, expect["log_probs"]), (got - expect["log_probs"]).abs().max()
    ref_err = (got - want_lp).abs().max().item()
    assert ref_err < TOL, ref_err
    reload_params(worker)
    assert not worker.offloaded
    assert all(torch.equal(p, s) for p, s in zip(params, snapshot, strict=True))
    return {"ref_logprob_err": ref_err}


# ---- actor: dynamic batching ------------------------------------------------------------------
def ppo_batch(data, want_lp, seed=1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        **data,
        "old_log_probs": want_lp + 0.05 * torch.randn(want_lp.shape, generator=g),
        "ref_log_probs": want_lp + 0.05 * torch.randn(want_lp.shape, generator=g),
        "advantages": torch.randn(want_lp.shape, generator=g),
    }


ACTOR_CFG = ActorConfig(
    ppo_mini_batch_size=4,
    micro_batch_size=2,
    optim=OptimConfig(lr=LR, eps=EPS, clip_grad=CLIP),
    entropy_coeff=0.01,
    use_kl_loss=True,
    kl_loss_coef=0.1,
    clip_ratio_high=0.28,
)


def actor_params(args, hf_dir, parallel, train, cfg) -> dict:
    worker = build_worker(args, hf_dir, parallel, optim=cfg.optim)
    metrics = PolicyActor(worker, cfg).update_policy(Batch.from_dict(train, meta_info={"n": 1}))
    assert metrics["actor/skipped_steps"] == 0, metrics
    return whole_params(worker, args)


def check_dynamic(args, hf_dir, parallel, data, want_lp) -> dict:
    train = ppo_batch(data, want_lp)
    fixed = actor_params(args, hf_dir, parallel, train, ACTOR_CFG)
    # A budget of 24 tokens makes micro-batches of 1-3 rows from these 6-11 token rows.
    dyn_cfg = replace(ACTOR_CFG, use_dynamic_bsz=True, max_tokens_per_microbatch=24)
    dynamic = actor_params(args, hf_dir, parallel, train, dyn_cfg)
    err = max_err(dynamic, fixed)
    assert err < TOL, err
    # the forward pass too: its rows come back in the batch's order (packed token budgets
    # fill micro-batches first-fit-decreasing, which re-orders them)
    worker = build_worker(args, hf_dir, parallel)
    batch = Batch.from_dict(data)
    lp_fixed = PolicyActor(worker, ACTOR_CFG).compute_log_prob(batch)["log_probs"]
    lp_dynamic = PolicyActor(worker, dyn_cfg).compute_log_prob(batch)["log_probs"]
    lp_err = (lp_dynamic - lp_fixed).abs().max().item()
    assert lp_err < TOL, lp_err
    return {"dynamic_vs_fixed_err": err, "dynamic_logprob_err": lp_err}


# ---- bad input --------------------------------------------------------------------------------
def check_bad_input(args, hf_dir, parallel, data, want_lp) -> dict:
    out = {}
    # 1. too long: refused with length and limit, before any forward.
    limit = args.max_position_embeddings
    long = synthetic_rollout(args.vocab_size, batch=2, prompt_len=limit + 3, resp_len=5)
    long["attention_mask"][1] = 1
    long["position_ids"] = (long["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    long_train = ppo_batch(long, torch.zeros(2, 5))
    worker = build_model_worker(args, hf_dir, parallel, optim=ACTOR_CFG.optim)
    critic_worker = build_model_worker(
        args, hf_dir, parallel, value_head=True, optim=ACTOR_CFG.optim
    )
    forwards = []
    for c in worker.chunks + critic_worker.chunks:
        c.register_forward_pre_hook(lambda *a: forwards.append(1))
    actor = PolicyActor(worker, ACTOR_CFG)
    critic = ValueCritic(critic_worker, CriticConfig(ppo_mini_batch_size=2))
    calls = {
        "compute_log_prob": lambda: actor.compute_log_prob(Batch.from_dict(long)),
        "update_policy": lambda: actor.update_policy(Batch.from_dict(long_train)),
        "compute_values": lambda: critic.compute_values(Batch.from_dict(long)),
        "update_critic": lambda: critic.update_critic(
            Batch.from_dict({**long, "values": torch.zeros(2, 5), "returns": torch.zeros(2, 5)})
        ),
    }
    for name, call in calls.items():
        try:
            call()
        except SequenceTooLongError as e:
            assert str(limit + 3 + 5) in str(e) and str(limit) in str(e), str(e)
            out["too_long_message"] = str(e)
        else:
            raise AssertionError(f"{name} accepted a sequence longer than {limit}")
    assert not forwards, f"{len(forwards)} forwards ran before the length error"

    # 2. empty responses: a whole mini-batch of them (rows 0-3) and row 5.
    empty = {k: v.clone() for k, v in ppo_batch(data, want_lp).items()}
    R = empty["responses"].shape[1]
    for row in (0, 1, 2, 3, 5):
        empty["response_mask"][row] = 0
        empty["attention_mask"][row, -R:] = 0
        empty["input_ids"][row, -R:] = 0
        empty["responses"][row] = 0
    for key in ("old_log_probs", "ref_log_probs", "advantages"):
        empty[key] = empty[key] * empty["response_mask"]
    lp = actor.compute_log_prob(Batch.from_dict(empty), calculate_entropy=True)
    assert torch.isfinite(lp["log_probs"]).all() and torch.isfinite(lp["entropy"]).all()
    assert (lp["log_probs"][empty["response_mask"] == 0] == 0).all()
    metrics = actor.update_policy(Batch.from_dict(empty, meta_info={"n": 1}))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert metrics["actor/skipped_steps"] == 0, metrics
    assert all(torch.isfinite(p).all() for c in worker.chunks for p in c.parameters())
    vals = critic.compute_values(Batch.from_dict(empty))["values"]
    assert torch.isfinite(vals).all()
    cm = critic.update_critic(
        Batch.from_dict(
            {**empty, "values": vals, "returns": torch.randn(vals.shape) * empty["response_mask"]},
            meta_info={"n": 1},
        )
    )
    assert all(torch.isfinite(torch.tensor(v)) for v in cm.values()), cm
    assert cm["critic/skipped_steps"] == 0, cm

    # 3. NaN advantages on one row (one DP rank only when DP > 1): the step is skipped on
    # every rank; a finite step resets the count; K=2 skips in a row abort.
    nan_worker = build_model_worker(args, hf_dir, parallel, optim=ACTOR_CFG.optim)
    nan_actor = PolicyActor(nan_worker, replace(ACTOR_CFG, max_nan_steps=2))
    good = {k: v[:4] for k, v in ppo_batch(data, want_lp).items()}
    bad = {**good, "advantages": good["advantages"].clone()}
    bad["advantages"][0, 0] = float("nan")
    params = [p for c in nan_worker.chunks for p in c.parameters()]
    snapshot = [p.detach().clone() for p in params]
    m = nan_actor.update_policy(Batch.from_dict(bad, meta_info={"n": 1}))
    assert m["actor/skipped_steps"] == 1, m
    assert all(torch.equal(p, s) for p, s in zip(params, snapshot, strict=True)), (
        "a skipped step changed parameters"
    )
    m = nan_actor.update_policy(Batch.from_dict(good, meta_info={"n": 1}))
    assert m["actor/skipped_steps"] == 0, m
    m = nan_actor.update_policy(Batch.from_dict(bad, meta_info={"n": 1}))
    assert m["actor/skipped_steps"] == 1, m
    try:
        nan_actor.update_policy(Batch.from_dict(bad, meta_info={"n": 1}))
    except NonFiniteLossError as e:
        assert "2 consecutive" in str(e), str(e)
        out["nan_message"] = str(e)
    else:
        raise AssertionError("two non-finite steps in a row did not abort")
    return out


def main():
    arch, tp, pp, sp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4]))
    checks = sys.argv[5].split(",")
    vpp = int(sys.argv[6]) if len(sys.argv) > 6 else None  # interleaved chunks per PP rank
    D.init_distributed()
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=CP,
    )
    D.init_model_parallel(parallel)
    from transformers import AutoModelForCausalLM

    hf_dir = ensure_tiny_checkpoint(arch)
    args = archs.model_args_from_hf(hf_dir)
    data = synthetic_rollout(args.vocab_size, batch=8)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        want_lp, _ = hf_logprobs(hf, data)
    result = {}
    if "critic" in checks:
        result.update(check_critic(args, hf_dir, parallel, data))
    if "ref" in checks:
        result.update(check_reference(args, hf_dir, parallel, data, want_lp))
    if "dynamic" in checks:
        result.update(check_dynamic(args, hf_dir, parallel, data, want_lp))
    if "bad" in checks:
        result.update(check_bad_input(args, hf_dir, parallel, data, want_lp))
    write_result(result)
    D.destroy()


if __name__ == "__main__":
    main()
    exit_now()
