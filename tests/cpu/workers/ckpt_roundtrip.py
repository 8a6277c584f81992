"""Checkpoint save → load → one more step, bitwise equal to a run that never stopped.

usage: ckpt_roundtrip.py OUT_DIR LAYOUT [LAYOUT ...]   (LAYOUT: a key of LAYOUTS)
Per layout, on every rank (asserted here):
1. run A: actor + critic (value head) train on batch 1, save (step 1) with extra_state (RNG of
   this rank incl. a named generator, a rank-specific value), train on batch 2, save (step 2);
2. run B: built fresh and trained twice on batch 3 (so every part of its state differs),
   loads step 1: params, optimizer moments/step, LR schedule and RNG equal A's at step 1;
   trained on batch 2: metrics, params and optimizer state equal A's after step 2, bitwise;
   run C: the same from a freshly built worker (a restarted trainer: no optimizer state yet);
   run D: the same with the other Adam kernel (fused ⇄ foreach): its flag wins over the
   checkpoint's, state equal after load, the next step equal to rounding (rtol 1e-4);
3. latest_complete() finds step 2 on every rank; A's actor at step 2 is exported as HF (read
   back by the pytest side, which also damages the checkpoint files);
4. a SIGUSR1 on the last rank only makes StopRequest.agreed() true on all ranks;
5. a Tracker on every rank writes from rank 0 only (checked by the pytest side).
"""

import dataclasses
import importlib.util
import math
import os
import random
import signal
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402
from _reference import synthetic_rollout  # noqa: E402

import archs  # noqa: E402
from archs import ensure_tiny_checkpoint  # noqa: E402
from tandem_core import distributed as D  # noqa: E402
from tandem_core.config import ActorConfig, OptimConfig, ParallelConfig  # noqa: E402
from tandem_core.protocol import Batch  # noqa: E402
from trainer.state import checkpoints as C  # noqa: E402
from trainer.state.rng import capture_rng_state, restore_rng_state  # noqa: E402
from trainer.state.signals import install_signal_handlers  # noqa: E402
from trainer.tracking import Tracker  # noqa: E402
from trainer.workers.actor import PolicyActor  # noqa: E402
from trainer.workers.model import build_model_worker  # noqa: E402
from trainer.workers.optimizer import torch_adams  # noqa: E402
from trainer.workers.passes import (  # noqa: E402
    dp_slice,
    make_micro_batches,
    reduce_metrics,
    train_step,
)
from trainer.workers.sequences import mask_response  # noqa: E402

OPTIM = OptimConfig(
    lr=1e-3,
    eps=1e-4,
    weight_decay=0.01,
    clip_grad=1.0,
    lr_warmup_steps=2,
    lr_decay_style="linear",
    lr_decay_steps=10,
)
ACTOR = ActorConfig(ppo_mini_batch_size=4, micro_batch_size=2, optim=OPTIM, entropy_coeff=0.01)


def rollout(vocab: int, seed: int) -> Batch:
    data = synthetic_rollout(vocab, batch=8, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    shape = data["responses"].shape
    data.update(
        old_log_probs=-3.0 + 0.1 * torch.randn(shape, generator=g),
        advantages=torch.randn(shape, generator=g),
        returns=torch.randn(shape, generator=g),
    )
    return Batch.from_dict(data, meta_info={"n": 1})  # on the host, as the trainer hands it over


def value_loss(tokens: float, n_micro: int):
    def loss_fn(mb, values):
        v = mask_response(values.squeeze(-1), mb)
        loss = ((v - mb.fields["returns"]) ** 2 * mb.response_mask).sum() / tokens
        return loss, {"loss": loss.detach().clone(), "vf_loss": loss.detach() * n_micro}

    return loss_fn


def critic_update(worker, batch: Batch) -> dict:
    """Value regression, two optimizer steps of 4 rows, through megatron's schedule."""
    metrics = {}
    for i, mini in enumerate(batch.split(4)):
        tokens = mini["response_mask"].sum().item() / D.dp_size()
        mbs = make_micro_batches(dp_slice(mini), 2, None, seq_multiple=1)
        outputs, grad_norm, _ = train_step(
            worker, mbs, value_loss(tokens, len(mbs)), max_nan_steps=3
        )
        metrics.update(
            {
                f"vf_loss{i}": reduce_metrics(outputs, ["vf_loss"])["vf_loss"],
                f"grad_norm{i}": grad_norm,
            }
        )
    return metrics


def build(args, hf_dir, parallel, optim=OPTIM):
    return {
        "actor": build_model_worker(args, hf_dir, parallel, optim=optim, total_optimizer_steps=10),
        "critic": build_model_worker(
            args, hf_dir, parallel, value_head=True, optim=optim, total_optimizer_steps=10
        ),
    }


def train(workers, batch: Batch) -> dict:
    metrics = PolicyActor(workers["actor"], ACTOR).update_policy(batch)
    metrics.update({f"critic/{k}": v for k, v in critic_update(workers["critic"], batch).items()})
    return metrics


def snapshot(workers) -> dict[str, torch.Tensor]:
    """Every parameter, every optimizer state tensor, LR and schedule step of every role."""
    out = {}
    for role, w in workers.items():
        for i, chunk in enumerate(w.chunks):
            for n, p in chunk.named_parameters():
                out[f"{role}.{i}.{n}"] = p.detach().clone()
        for j, opt in enumerate(getattr(w.optimizer, "chained_optimizers", [w.optimizer])):
            inner = opt.optimizer
            for g, group in enumerate(inner.param_groups):
                out[f"{role}.opt{j}.g{g}.lr"] = torch.tensor(group["lr"], dtype=torch.float64)
                for k, p in enumerate(group["params"]):
                    out[f"{role}.opt{j}.g{g}.p{k}"] = p.detach().clone()
                    for name, v in inner.state.get(p, {}).items():  # `step` may sit on the host
                        out[f"{role}.opt{j}.g{g}.p{k}.{name}"] = torch.as_tensor(v).to(
                            "cpu", copy=True
                        )
        out[f"{role}.sched"] = torch.tensor(w.scheduler.num_steps)
    return out


def diff(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return [k for k in a if not torch.equal(a[k], b[k])]


def run_layout(
    name: str, out_dir: Path, tp: int, pp: int, dist_opt: bool, vpp: int | None = None
) -> dict:
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        use_distributed_optimizer=dist_opt,
    )
    D.init_model_parallel(parallel)
    hf_dir = ensure_tiny_checkpoint("tiny_llama")
    args = archs.model_args_from_hf(hf_dir)
    b1, b2, b3 = (rollout(args.vocab_size, s) for s in (1, 2, 3))
    identity = {
        "model": dataclasses.asdict(args),
        "roles": ["actor", "critic"],
        "layout": {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "virtual_pipeline_model_parallel_size": vpp,
            "data_parallel_size": dist.get_world_size() // (tp * pp),
        },
        "algorithm": "ppo",
        "tandem_version": C.tandem_version(),
    }
    mgr = C.CheckpointManager(out_dir / name, max_to_keep=2, identity=identity)
    gen = torch.Generator().manual_seed(7 + dist.get_rank())

    # run A: never stops
    a = build(args, hf_dir, parallel)
    train(a, b1)
    torch.manual_seed(1000 + dist.get_rank())
    random.seed(dist.get_rank())
    extra = {"step": 1, "rank": dist.get_rank(), "rng": capture_rng_state({"rollout": gen})}
    path = mgr.save(1, a, extra)
    at_save = snapshot(a)
    draws_a = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=gen))
    metrics_a = train(a, b2)
    after_a = snapshot(a)
    path2 = mgr.save(2, a, {"step": 2, "rank": dist.get_rank()})
    mgr.export_hf(2, lambda out: a["actor"].export_hf(out, hf_dir))  # read back by pytest

    # run B: different history, then the checkpoint
    b = build(args, hf_dir, parallel)
    train(b, b3)
    train(b, b3)  # two updates: B's schedule is also ahead of the checkpoint's
    same = set(at_save) - set(diff(snapshot(b), at_save))
    assert not same, f"run B should start out different, equal in {sorted(same)[:5]}"
    torch.manual_seed(99)
    gen.manual_seed(99)
    found, _ = mgr.latest_complete()
    assert found == (2, path2), found
    loaded = mgr.load(path, b)
    assert loaded["rank"] == dist.get_rank() and loaded["step"] == 1, loaded
    restore_rng_state(loaded["rng"], {"rollout": gen})
    draws_b = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=gen))
    assert all(
        torch.equal(torch.as_tensor(x), torch.as_tensor(y))
        for x, y in zip(draws_a, draws_b, strict=True)
    ), (draws_a, draws_b)
    bad = diff(snapshot(b), at_save)
    assert not bad, f"{name}: after load, differs from the saved state in {bad[:5]}"
    metrics_b = train(b, b2)
    assert metrics_a == metrics_b, (metrics_a, metrics_b)
    bad = diff(snapshot(b), after_a)
    assert not bad, f"{name}: the step after resume differs from the uninterrupted one: {bad[:5]}"

    # run C: freshly built, as a restarted trainer is (no optimizer state yet)
    c = build(args, hf_dir, parallel)
    mgr.load(path, c)
    bad = diff(snapshot(c), at_save)
    assert not bad, f"{name}: fresh worker after load differs from the saved state in {bad[:5]}"
    assert train(c, b2) == metrics_a
    bad = diff(snapshot(c), after_a)
    assert not bad, f"{name}: fresh worker, the step after resume differs: {bad[:5]}"

    # run D: resumed with the other Adam kernel (actor.optim.fused flipped): this run's kernel
    # wins over the checkpoint's, the state is the saved one, the next step equal to rounding
    d = build(args, hf_dir, parallel, replace(OPTIM, fused=not OPTIM.fused))
    mgr.load(path, d)
    flags = {
        g["fused"] for w in d.values() for a in torch_adams(w.optimizer) for g in a.param_groups
    }
    assert flags == {not OPTIM.fused}, f"{name}: Adam kernel after load {flags}"
    bad = diff(snapshot(d), at_save)
    assert not bad, f"{name}: other kernel, after load differs from the saved state in {bad[:5]}"
    metrics_d = train(d, b2)
    assert metrics_d.keys() == metrics_a.keys()
    far = [k for k in metrics_a if not math.isclose(metrics_a[k], metrics_d[k], rel_tol=1e-4)]
    assert not far, f"{name}: other kernel, metrics {[(metrics_a[k], metrics_d[k]) for k in far]}"
    after_d = snapshot(d)
    far = [k for k in after_a if not torch.allclose(after_d[k], after_a[k], rtol=1e-4, atol=1e-7)]
    assert not far, f"{name}: other kernel, the step after resume is not close in {far[:5]}"

    moved = sum(not torch.equal(at_save[k], after_a[k]) for k in at_save)
    return {"tensors": len(at_save), "changed_by_step2": moved, "metrics": metrics_b}


# name: (TP, PP, distributed optimizer); DP is whatever the world size leaves.
LAYOUTS = {  # name: (TP, PP, distributed optimizer[, VPP chunks per rank])
    "tp2": (2, 1, True),
    "pp2": (1, 2, True),
    "pp2_vpp2": (1, 2, True, 2),
    "dp2": (1, 1, True),
    "dp2_plain": (1, 1, False),
    "tp2pp2": (2, 2, True),
}


def main():
    out_dir = Path(sys.argv[1])
    if torch.cuda.is_available():  # bitwise on GPUs too: no atomics-ordered reductions
        torch.use_deterministic_algorithms(True, warn_only=True)
    D.init_distributed()
    results = {name: run_layout(name, out_dir, *LAYOUTS[name]) for name in sys.argv[2:]}

    stop = install_signal_handlers()
    assert not stop.agreed()
    if dist.get_rank() == dist.get_world_size() - 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.requested == (dist.get_rank() == dist.get_world_size() - 1)
    assert stop.agreed(), "a signal on one rank must stop every rank"
    stop.uninstall()

    # every rank logs; only rank 0 may write (the pytest side counts the records)
    # tensorboard where installed (the CUDA stack of tests/multigpu may lack it)
    backends = ["console"] + ["tensorboard"] * bool(importlib.util.find_spec("tensorboard"))
    with Tracker(backends, "tandem", "ckpt", out_dir / "tracker", total_steps=2) as tracker:
        tracker.log({"actor/pg_loss": float(dist.get_rank())}, step=1)
    write_result(results)
    D.destroy()


if __name__ == "__main__":
    main()
    exit_now()
