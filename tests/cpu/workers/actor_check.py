"""Actor on megatron-core vs plain transformers/PyTorch, for one parallel layout.

usage: actor_check.py ARCH TP PP SP(0|1) [VPP [EP]]   (VPP 0: none; EP: expert parallel, MoE)
       STRATEGY=fsdp2 actor_check.py ARCH 1 1 0        (FSDP2 over every rank, data parallel)
       PACK=1 actor_check.py ...   (megatron with packed micro-batches: the same checks, so
                                    packed equals padded through the same references)
       CP=2 actor_check.py ...     (megatron with context parallelism 2: CP2 equals CP1 so)
       COMPILE=aot_eager actor_check.py ...   (megatron with its dense layers through
                                    torch.compile on this dynamo backend: one graph a layer,
                                    no break, the same checks)
       ON_POLICY=1 actor_check.py ...   (check 1, then only check 5)
Checks (asserted here, on every rank):
1. compute_log_prob: log-probs and entropy equal transformers' to 1e-5 (micro-batches of 3,
   and one micro-batch of 8 through actor.log_prob_micro_batch_size);
2. update_policy (2 mini-batches, PPO clip + entropy + k3 KL loss) gives the same parameters
   as the plain PyTorch reference (AdamW, clipping) to 1e-5, and the same gradient norms
   before clipping (1e-4 relative), with micro-batch size 1 and 4;
3. forward-only passes leave the model in eval mode, and an update after one runs in train
   mode;
4. (fsdp2) the update also equals the megatron path's update on the same data to 1e-5.
5. (ON_POLICY) one optimizer step over a batch without old_log_probs (the trainer's
   actor.old_log_prob_pass=auto) gives the parameters of the same step given the old pass's
   log-probs, to 1e-6, and reports that pass's entropy and train/rollout gap (1e-6); with two
   mini-batches it refuses.
"""

import os
import re
import sys
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402
from _reference import hf_logprobs, reference_ppo_step, synthetic_rollout  # noqa: E402

import archs  # noqa: E402
import weight_loaders  # noqa: E402
from archs import ensure_tiny_checkpoint  # noqa: E402
from tandem_core import distributed as D  # noqa: E402
from tandem_core.config import ActorConfig, OptimConfig, ParallelConfig  # noqa: E402
from tandem_core.models import compile_dense_layers  # noqa: E402
from tandem_core.protocol import Batch  # noqa: E402
from trainer.workers.actor import PolicyActor  # noqa: E402
from trainer.workers.fsdp import build_fsdp_worker  # noqa: E402
from trainer.workers.model import build_model_worker  # noqa: E402

LR, EPS, CLIP = 1e-3, 1e-4, 1.0  # large eps: Adam's first step is then smooth in the grad


def hf_named_params(worker, args):
    """The megatron actor's weights as HF tensors, whole on every rank (experts named one by
    one: `mlp.experts.{e}.gate_proj.weight`, ...)."""
    named = weight_loaders.megatron_named_params(worker.chunks, worker.config)
    mine = {
        k: v.detach().cpu().clone()
        for k, v in weight_loaders.stream_hf_weights(named, args, D.tp_group())
    }
    for group, size in ((D.pp_group(), D.pp_size()), (D.ep_group(), D.ep_size())):
        parts = [None] * size  # pipeline stages, then each expert-parallel rank's experts
        dist.all_gather_object(parts, mine, group=group)
        mine = {k: v for part in parts for k, v in part.items()}
    return mine


STRATEGY = os.environ.get("STRATEGY", "megatron")
PACK = os.environ.get("PACK") == "1"  # megatron: micro-batches packed into one row each
CP = int(os.environ.get("CP", "1"))  # megatron: context parallel size
RECOMPUTE = os.environ.get("RECOMPUTE") == "1"  # megatron: full activation recompute
COMPILE = os.environ.get("COMPILE")  # megatron: compile_dense_layers on this dynamo backend
COMPILED = []  # layers compiled, per worker built


def build_worker(args, hf_dir, parallel, optim=None, strategy=STRATEGY):
    if strategy == "fsdp2":
        return build_fsdp_worker(args, hf_dir, optim=optim)
    worker = build_model_worker(
        args, hf_dir, parallel, optim=optim, pack_sequences=PACK, activation_checkpointing=RECOMPUTE
    )
    if COMPILE:  # what compile_layers does on CUDA (inductor), on a backend that runs on CPU
        COMPILED.append(compile_dense_layers(worker.chunks, backend=COMPILE))
    return worker


def trained_params(worker, args) -> dict:
    """The worker's weights as HF tensors, whole on every rank."""
    if hasattr(worker, "full_tensors"):  # FSDP2: transformers' own names
        return {k: v.detach().cpu().clone() for k, v in worker.full_tensors()}
    return hf_named_params(worker, args)


def in_train_mode(worker) -> bool:
    return (
        worker.model.training
        if hasattr(worker, "model")
        else all(c.training for c in worker.chunks)
    )


def per_expert(named: dict) -> dict:
    """transformers' stacked experts (`mlp.experts.gate_up_proj` [E, 2f, h], `down_proj`
    [E, h, f]) named one by one, as the stream names them; other tensors unchanged."""
    out = {}
    for name, t in named.items():
        stacked = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)", name)
        if stacked is None:
            out[name] = t
            continue
        prefix, kind = stacked.groups()
        for e, w in enumerate(t):
            if kind == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = w
            else:
                gate, up = w.chunk(2)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate
                out[f"{prefix}.{e}.up_proj.weight"] = up
    return out


def count_recomputed_layers() -> list[int]:
    """How many layer forwards ran under megatron's activation checkpoint (a recompute that
    never engaged would pass every equality check)."""
    from megatron.core.tensor_parallel import random as mrandom

    calls, forward = [0], mrandom.CheckpointFunction.forward

    def counted(ctx, *args):
        calls[0] += 1
        return forward(ctx, *args)

    mrandom.CheckpointFunction.forward = staticmethod(counted)
    return calls


def count_fused_wgrads() -> list[int]:
    """How many weight gradients megatron's linear layers accumulated straight into main_grad
    (tandem_core/wgrad_fusion.py; a fusion that never engaged would pass every check)."""
    from megatron.core.tensor_parallel import layers

    from tandem_core import wgrad_fusion

    wgrad_fusion.install()  # what building a megatron model does
    calls, fused = [0], layers.fused_weight_gradient_mlp_cuda

    def counted(*args):
        calls[0] += 1
        return fused.wgrad_gemm_accum_fp32(*args)

    layers.fused_weight_gradient_mlp_cuda = SimpleNamespace(wgrad_gemm_accum_fp32=counted)
    return calls


def check_on_policy_step(args, hf_dir, parallel, data: dict) -> dict:
    """Check 5: the update's own detached log-probs as the old ones, against the old pass."""
    g = torch.Generator().manual_seed(2)
    shape = data["response_mask"].shape
    data = {
        **data,
        "ref_log_probs": -3.0 + 0.1 * torch.randn(shape, generator=g),
        "rollout_log_probs": -3.0 + 0.1 * torch.randn(shape, generator=g),
        "advantages": torch.randn(shape, generator=g),
    }
    cfg = ActorConfig(
        ppo_mini_batch_size=len(data["input_ids"]),
        micro_batch_size=3,
        optim=OptimConfig(lr=LR, eps=EPS, clip_grad=CLIP),
        use_kl_loss=True,
        kl_loss_coef=0.1,
    )
    with_pass = build_worker(args, hf_dir, parallel, optim=cfg.optim)
    actor = PolicyActor(with_pass, cfg)
    old = actor.compute_log_prob(Batch.from_dict(data), calculate_entropy=True)
    want = actor.update_policy(
        Batch.from_dict({**data, "old_log_probs": old["log_probs"]}, meta_info={"n": 1})
    )
    without = build_worker(args, hf_dir, parallel, optim=cfg.optim)
    got = PolicyActor(without, cfg).update_policy(Batch.from_dict(data, meta_info={"n": 1}))
    mask = data["response_mask"].float()

    def masked_mean(x):
        return float((x * mask).sum() / mask.sum())

    result = {
        "param_err": max(
            (a - b).abs().max().item()
            for a, b in zip(
                trained_params(with_pass, args).values(),
                trained_params(without, args).values(),
                strict=True,
            )
        ),
        "entropy_err": abs(got["actor/entropy"] - masked_mean(old["entropy"])),
        "gap_err": abs(
            got["rollout/logprob_abs_diff"]
            - masked_mean((data["rollout_log_probs"] - old["log_probs"]).abs())
        ),
        "grad_norm_err": abs(got["actor/grad_norm"] / want["actor/grad_norm"] - 1),
        "ppo_kl": got["actor/ppo_kl"],
        "pg_clipfrac": got["actor/pg_clipfrac"],
    }
    halves = replace(cfg, ppo_mini_batch_size=len(data["input_ids"]) // 2)
    try:
        PolicyActor(without, halves).update_policy(Batch.from_dict(data, meta_info={"n": 1}))
        result["refused_two_steps"] = False
    except ValueError as err:
        result["refused_two_steps"] = "old_log_probs" in str(err)
    return result


def main():
    recomputed = count_recomputed_layers()
    arch, tp, pp, sp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4]))
    vpp = int(sys.argv[5]) or None if len(sys.argv) > 5 else None
    ep = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    D.init_distributed()
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sp,
        expert_model_parallel_size=ep,
        context_parallel_size=CP,
    )
    D.init_model_parallel(parallel)
    from transformers import AutoModelForCausalLM

    hf_dir = ensure_tiny_checkpoint(arch)
    args = archs.model_args_from_hf(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    data = synthetic_rollout(args.vocab_size, batch=8)
    batch = Batch.from_dict(data, meta_info={"n": 1})

    # 1. log-probs and entropy, in micro-batches of 3 and in one of the whole batch
    ref_worker = build_worker(args, hf_dir, parallel)
    with torch.no_grad():
        want_lp, want_ent = hf_logprobs(hf, data)
    for log_prob_mbs in (None, 8):
        cfg = ActorConfig(micro_batch_size=3, log_prob_micro_batch_size=log_prob_mbs)
        out = PolicyActor(ref_worker, cfg).compute_log_prob(batch, calculate_entropy=True)
        lp_err = (out["log_probs"] - want_lp).abs().max().item()
        ent_err = (out["entropy"] - want_ent).abs().max().item()
        assert lp_err < 1e-5 and ent_err < 1e-5, (log_prob_mbs, lp_err, ent_err)
    assert not in_train_mode(ref_worker), "train mode after a forward-only pass"
    if os.environ.get("ON_POLICY") == "1":
        write_result(check_on_policy_step(args, hf_dir, parallel, data))
        D.destroy()
        return

    fused_wgrads = count_fused_wgrads()

    # 2. one PPO update, two mini-batches, vs plain PyTorch
    g = torch.Generator().manual_seed(1)
    extra = {
        "old_log_probs": want_lp + 0.05 * torch.randn(want_lp.shape, generator=g),
        "ref_log_probs": want_lp + 0.05 * torch.randn(want_lp.shape, generator=g),
        "advantages": torch.randn(want_lp.shape, generator=g),
    }
    cfg = ActorConfig(
        ppo_mini_batch_size=4,
        optim=OptimConfig(lr=LR, eps=EPS, clip_grad=CLIP),
        entropy_coeff=0.01,
        use_kl_loss=True,
        kl_loss_coef=0.1,
        kl_loss_type="low_var_kl",
        clip_ratio_high=0.28,
    )
    before = {k: v.detach().clone() for k, v in per_expert(dict(hf.named_parameters())).items()}
    ref_norms = reference_ppo_step(hf, {**data, **extra}, cfg, LR, EPS, CLIP, mini_batch=4)
    ref_norm = sum(ref_norms) / len(ref_norms)
    want = per_expert(dict(hf.named_parameters()))
    moved = min((want[k].detach() - before[k]).abs().max().item() for k in before)
    assert moved > 1e-4, f"the reference step left a tensor unchanged ({moved})"
    errors = {}
    for mbs in [int(x) for x in os.environ.get("ACTOR_MBS", "1,4").split(",")]:
        worker = build_worker(args, hf_dir, parallel, optim=cfg.optim)
        actor = PolicyActor(worker, replace(cfg, micro_batch_size=mbs))
        actor.compute_log_prob(batch)  # leaves the model in eval mode; the update switches back
        metrics = actor.update_policy(Batch.from_dict({**data, **extra}, meta_info={"n": 1}))
        assert in_train_mode(worker), "an update ran outside train mode"
        # Adam's step hides a gradient's scale; the norm before clipping does not
        norm_err = abs(metrics["actor/grad_norm"] / ref_norm - 1)
        assert norm_err < 1e-4, (mbs, metrics["actor/grad_norm"], ref_norm)
        got = trained_params(worker, args)
        err = max((got[k] - want[k].detach()).abs().max().item() for k in got)
        errors[mbs] = err
        assert err < 1e-5, (mbs, err)
    result = {"logprob_err": lp_err, "entropy_err": ent_err, "param_err": errors}
    result["recomputed_layers"] = recomputed[0]
    result["fused_wgrads"] = fused_wgrads[0]
    if COMPILE:
        from torch._dynamo.utils import counters

        result["compiled_layers"] = COMPILED
        result["graphs"] = counters["stats"]["unique_graphs"]
        result["graph_breaks"] = sum(counters["graph_break"].values())
    if STRATEGY == "fsdp2":  # 4. the same update on the megatron path, same ranks (DP)
        worker = build_worker(args, hf_dir, parallel, optim=cfg.optim, strategy="megatron")
        PolicyActor(worker, replace(cfg, micro_batch_size=2)).update_policy(
            Batch.from_dict({**data, **extra}, meta_info={"n": 1})
        )
        megatron = hf_named_params(worker, args)
        result["vs_megatron"] = max((got[k] - megatron[k]).abs().max().item() for k in got)
        assert result["vs_megatron"] < 1e-5, result
    write_result(result)
    D.destroy()


if __name__ == "__main__":
    main()
    exit_now()
