"""Compiled decoder layers (actor.compile_layers on the megatron strategy) vs the same layers
eager, on this machine's device: log-probs of the response tokens, then three PPO updates
(each mini-batch one optimizer step), parameters compared after them.

usage: compile_check.py ARCH BACKEND DTYPE   (BACKEND: inductor on CUDA, the trainer's;
                                               aot_eager on CPU)
Writes the largest differences, the layers compiled, and dynamo's graph and break counts.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402
from _reference import synthetic_rollout  # noqa: E402

import archs  # noqa: E402
from archs import ensure_tiny_checkpoint  # noqa: E402
from tandem_core import distributed as D  # noqa: E402
from tandem_core.config import ActorConfig, OptimConfig, ParallelConfig  # noqa: E402
from tandem_core.models import compile_dense_layers  # noqa: E402
from tandem_core.protocol import Batch  # noqa: E402
from trainer.workers.actor import PolicyActor  # noqa: E402
from trainer.workers.model import build_model_worker  # noqa: E402


def run(args, hf_dir, batch, dtype: str, backend: str | None):
    worker = build_model_worker(
        args, hf_dir, ParallelConfig(), dtype=dtype, optim=OptimConfig(lr=1e-4)
    )
    compiled = compile_dense_layers(worker.chunks, backend=backend) if backend else 0
    actor = PolicyActor(worker, ActorConfig(ppo_mini_batch_size=4, micro_batch_size=2))
    log_probs = actor.compute_log_prob(batch)["log_probs"].float()
    norms = [actor.update_policy(batch)["actor/grad_norm"] for _ in range(3)]
    params = [p.detach().float().clone() for p in worker.chunks[0].parameters()]
    return log_probs, norms, params, compiled


def main():
    arch, backend, dtype = sys.argv[1:4]
    D.init_distributed()
    D.init_model_parallel(ParallelConfig())
    hf_dir = ensure_tiny_checkpoint(arch)
    args = archs.model_args_from_hf(hf_dir)
    data = synthetic_rollout(args.vocab_size, batch=8, prompt_len=40, resp_len=30)
    g = torch.Generator().manual_seed(1)
    shape = data["responses"].shape
    data["old_log_probs"] = -2.0 + 0.1 * torch.randn(shape, generator=g)
    data["advantages"] = torch.randn(shape, generator=g)
    batch = Batch.from_dict(data, meta_info={"n": 1})

    eager = run(args, hf_dir, batch, dtype, None)
    compiled = run(args, hf_dir, batch, dtype, backend)
    from torch._dynamo.utils import counters

    write_result(
        {
            "logprob_err": (eager[0] - compiled[0]).abs().max().item(),
            "grad_norms": [eager[1], compiled[1]],
            "param_err": max(
                (a - b).abs().max().item() for a, b in zip(eager[2], compiled[2], strict=True)
            ),
            "compiled_layers": compiled[3],
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "break_reasons": sorted(counters["graph_break"])[:5],
        }
    )


if __name__ == "__main__":
    main()
    exit_now()
