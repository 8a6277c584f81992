"""Multi-turn rollouts on a real engine: the log-probs the engine gave the model's tokens of a
conversation (tool turns between them) equal the actor's on the same tokens.

usage: multi_turn_check.py BACKEND ROLLOUT_TP
Tiny Llama (random weights, fp32), megatron actor at DP = world, the calculator called after
every model turn (mt_formats.py: tiny random models write no real calls), turns ended at a
frequent character (a stop token), sampled. Checks: some conversations have tool turns; engine
vs actor ≤ 1e-4 on the model's tokens; the ranks of one engine (rollout TP 2) hold the same
conversations; an actor update on the batch runs.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402
from he_check import prompts, train_batch  # noqa: E402

import archs  # noqa: E402
from archs.checkpoints import build_char_tokenizer, ensure_tiny_checkpoint  # noqa: E402
from hybrid_engine import MegatronShardingManager  # noqa: E402
from rollout import build_rollout  # noqa: E402
from tandem_core import distributed as D  # noqa: E402
from tandem_core.config import (  # noqa: E402
    ActorConfig,
    MultiTurnConfig,
    OptimConfig,
    ParallelConfig,
    RolloutConfig,
)
from trainer.workers.actor import PolicyActor  # noqa: E402
from trainer.workers.model import build_model_worker  # noqa: E402

TOL = float(os.environ.get("HE_TOL", "1e-4"))


def main():
    backend, rollout_tp = sys.argv[1], int(sys.argv[2])
    D.init_distributed()
    hf_dir = ensure_tiny_checkpoint("tiny_llama")
    args = archs.model_args_from_hf(hf_dir)
    multi_turn = MultiTurnConfig(
        enable=True,
        tools=["calculator"],
        format="mt_formats:every_turn_calls_the_calculator",
        max_turns=4,
    )
    cfg = RolloutConfig(
        name=backend,
        tensor_model_parallel_size=rollout_tp,
        response_length=96,
        enforce_eager=True,
        multi_turn=multi_turn,
    )
    rollout = build_rollout(cfg, hf_dir, max_model_len=160)
    D.init_model_parallel(ParallelConfig())
    worker = build_model_worker(args, hf_dir, ParallelConfig(), optim=OptimConfig(lr=1e-3))
    actor = PolicyActor(worker, ActorConfig(ppo_mini_batch_size=4, micro_batch_size=2))
    manager = MegatronShardingManager(worker, rollout)
    tokenizer = build_char_tokenizer()
    batch = prompts(tokenizer)
    # sampled, two samples a prompt; a turn ends at "e" (or the end-of-turn token)
    stop = tokenizer.convert_tokens_to_ids("e")
    batch.meta_info = {"sampling": {"n": 2, "seed": 3, "stop_token_ids": [stop]}}
    with manager:
        out = manager.postprocess_data(rollout.generate_sequences(manager.preprocess_data(batch)))

    mask = out["response_mask"].bool()
    attended = out["attention_mask"][:, out["prompts"].shape[1] :].bool()
    tool_tokens = int((attended & ~mask).sum())
    turns = out["num_turns"]
    assert tool_tokens > 0 and int((turns >= 2).sum()) >= 2, (turns.tolist(), tool_tokens)
    actor_lp = actor.compute_log_prob(out)["log_probs"]
    err = float((out["rollout_log_probs"] - actor_lp).abs()[mask].max())
    assert err <= TOL, f"engine vs actor on the model's tokens: {err} > {TOL}"

    mine = [out["responses"], out["response_mask"], out["attention_mask"]]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, [t.cpu() for t in mine])
    for other in every[1:]:
        assert all(torch.equal(a, b) for a, b in zip(every[0], other, strict=True))
    stats = actor.update_policy(train_batch(actor, out))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values() if isinstance(v, float))
    write_result(
        {
            "err": err,
            "samples": len(out),
            "mean_turns": float(turns.mean()),
            "max_turns": float(turns.max()),
            "tool_tokens": tool_tokens,
            "model_tokens": int(mask.sum()),
        }
    )


if __name__ == "__main__":
    main()
    exit_now()
