"""TorchGroupedMLP (tandem_core/moe.py) against megatron's SequentialMLP on CPU, fp32.

usage: moe_experts_ep.py OUT_DIR [CKPT_DIR]
Expert parallelism = the world size (TP 1, PP 1). Every parameter is a deterministic function
of its global name (expert index global), so every EP layout holds the same model.
- world 1 only, `units`: the experts modules alone, for several configs (SwiGLU; SwiGLU with
  moe_act recompute; GELU without GLU; SwiGLU with a clamp and a GLU offset; an FFN width whose
  rows are not 16-byte aligned, which takes the per-expert loop) and tokens_per_expert patterns
  with zeros and T = 0: output and gradient differences, round-trip exactness, the weights'
  attributes.
- `layer`: a MoELayer (softmax top-2 router, alltoall dispatcher, 8 experts, hidden 64,
  moe_ffn 32) built with SequentialMLP and with TorchGroupedMLP from the same weights: the
  differences of output and gradients, and the full output/gradients saved to
  OUT_DIR/moe_ep{world}.pt for the pytest side to compare across EP sizes.
- `dispatch`: the layer with megatron's all-to-all dispatcher and with Tandem's
  `DeviceIndexDispatcher`, either experts module: bitwise equal outputs and gradients.
- `ckpt`: the SequentialMLP layer saved with megatron's dist_checkpointing (torch_dist) loads
  into the TorchGroupedMLP layer (same weights as `sequential_to_grouped` gives, bitwise) and
  back; with CKPT_DIR, a checkpoint saved by another EP size loads too.
The maxima go to $TANDEM_RESULT; the pytest side asserts them.
"""

import dataclasses
import os
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402

from tandem_core import cpu_compat  # noqa: E402
from tandem_core import distributed as D  # noqa: E402
from tandem_core.config import ParallelConfig  # noqa: E402
from tandem_core.model_args import ModelArgs  # noqa: E402

# megatron is imported inside the functions: dist_checkpointing's first save spawns a helper
# process that re-imports this file, and megatron's import would add ~6 s to it.

NUM_EXPERTS, TOPK, HIDDEN, MOE_FFN = 8, 2, 64, 32
SEQ, BATCH = 16, 2
PATTERNS = [[3, 5, 2, 6], [0, 7, 0, 9], [0, 0, 13, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
ARGS = ModelArgs(
    "llama",
    num_layers=1,
    hidden_size=HIDDEN,
    num_attention_heads=4,
    num_query_groups=4,
    ffn_hidden_size=4 * HIDDEN,
    vocab_size=128,
    kv_channels=16,
    max_position_embeddings=64,
)


def moe_config(num_experts=NUM_EXPERTS, **overrides):
    from tandem_core.models import build_transformer_config

    ep = dist.get_world_size()
    base = build_transformer_config(ARGS, ParallelConfig())
    fields = dict(
        num_moe_experts=num_experts,
        moe_ffn_hidden_size=MOE_FFN,
        moe_router_topk=TOPK,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="none",
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=ep,
        # bare layers, no megatron DDP: their weights have no main_grad to accumulate into
        gradient_accumulation_fusion=False,
    )
    fields.update(overrides)
    return dataclasses.replace(base, **fields)


def deterministic(gname: str, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(gname.encode()))
    return 0.1 * torch.randn(shape, generator=gen)


class Diffs(dict):
    """name -> [max |got - ref|, max |ref|] over every add()."""

    def add(self, name: str, ref: torch.Tensor, got: torch.Tensor) -> None:
        assert ref.shape == got.shape, (name, ref.shape, got.shape)
        diff, scale = self.setdefault(name, [0.0, 0.0])
        if ref.numel():
            diff = max(diff, (got.detach() - ref.detach()).abs().max().item())
            scale = max(scale, ref.detach().abs().max().item())
        self[name] = [diff, scale]


def build_experts(config, grouped: bool, num_local: int):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from tandem_core.moe import TorchGroupedMLP

    pgs = get_default_pg_collection()
    if grouped:
        return TorchGroupedMLP(num_local, config, pg_collection=pgs)
    subs = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return SequentialMLP(num_local, config, subs, pg_collection=pgs)


def seq_grads(seq):
    """The sequential experts' weight gradients stacked as the grouped experts hold their
    weights ([E, 2f, h], [E, h, f])."""
    g1 = torch.stack([e.linear_fc1.weight.grad for e in seq.local_experts])
    g2 = torch.stack([e.linear_fc2.weight.grad for e in seq.local_experts])
    return g1, g2


def grouped_grads(grouped):
    """The grouped experts' weight gradients per expert, [E, 2f, h] and [E, h, f]."""
    n = grouped.num_local_experts
    g1, g2 = grouped.weight1.grad, grouped.weight2.grad
    return g1.view(n, -1, g1.shape[1]), g2.view(n, -1, g2.shape[1])


# ---- units: the experts modules alone (world 1) -----------------------------------------------
UNIT_CONFIGS = {
    "swiglu": {},
    "swiglu_recompute": dict(
        recompute_granularity="selective", recompute_modules=["moe_act"], moe_grouped_gemm=True
    ),
    "gelu": dict(gated_linear_unit=False, activation_func=F.gelu),
    "swiglu_clamp_offset": dict(activation_func_clamp_value=0.3, glu_linear_offset=1.0),
    "unaligned_loop": dict(moe_ffn_hidden_size=6),
}


def units() -> dict:
    from tandem_core.moe import grouped_to_sequential, sequential_to_grouped

    results = {}
    for name, overrides in UNIT_CONFIGS.items():
        n = len(PATTERNS[0])
        config = moe_config(num_experts=n, **overrides)
        seq = build_experts(config, False, n)
        grouped = build_experts(config, True, n)
        for pname, p in seq.named_parameters():
            p.data.copy_(deterministic(f"{name}.{pname}", p.shape))
        sequential_to_grouped(seq, grouped)
        # Round trip into a differently initialised SequentialMLP: bitwise equal.
        back = build_experts(config, False, n)
        grouped_to_sequential(grouped, back)
        roundtrip_exact = all(
            torch.equal(a, b) for a, b in zip(seq.parameters(), back.parameters(), strict=True)
        )
        diffs, weight_grads_present, grads_contiguous = Diffs(), True, True
        gen = torch.Generator().manual_seed(7)
        for i, pattern in enumerate(PATTERNS):
            t = sum(pattern)
            x = torch.randn(t, HIDDEN, generator=gen)
            probs = torch.rand(t, generator=gen)
            g = torch.randn(t, HIDDEN, generator=gen)
            tokens = torch.tensor(pattern)
            runs = []
            for module in (seq, grouped):
                module.zero_grad(set_to_none=True)
                xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
                out, bias = module(xi, tokens, pi)
                assert bias is None and out.shape == (t, HIDDEN), (bias, out.shape)
                # Odd patterns (T = 0 among them): out.sum(), whose gradient is expanded.
                (out.sum() if i % 2 else (out * g).sum()).backward()
                runs.append((out, xi.grad, pi.grad))
            for key, ref, got in zip(("out", "x_grad", "probs_grad"), *runs, strict=True):
                diffs.add(key, ref, got)
            weight_grads_present &= grouped.weight1.grad is not None
            weight_grads_present &= grouped.weight2.grad is not None
            # torch's grouped GEMM writes the gradients in the weights' own layout.
            grads_contiguous &= grouped.weight1.grad.is_contiguous()
            grads_contiguous &= grouped.weight2.grad.is_contiguous()
            g1, g2 = seq_grads(seq)
            w1g, w2g = grouped_grads(grouped)
            diffs.add("w1_grad", g1, w1g)
            diffs.add("w2_grad", g2, w2g)
        results[name] = {
            "diffs": diffs,
            "roundtrip_exact": roundtrip_exact,
            "weight_grads_present": bool(weight_grads_present),
            "weight_grads_contiguous": bool(grads_contiguous),
            "use_grouped_mm": grouped.use_grouped_mm,
        }
    attrs = {
        w: {
            k: getattr(getattr(grouped, w), k, None)
            for k in ("allreduce", "tensor_model_parallel", "partition_dim", "partition_stride")
        }
        for w in ("weight1", "weight2")
    }
    return {"units": results, "attrs": attrs}


# ---- layer: a MoELayer with either experts module ---------------------------------------------
def build_layer(config, grouped: bool, module=None):
    """megatron's MoELayer (or `module`) with SequentialMLP or TorchGroupedMLP experts."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.experts import GroupedMLP
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from tandem_core.moe import TorchGroupedMLP

    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=grouped)
    mlp = spec.submodules.mlp
    if grouped:
        assert mlp.submodules.experts.module is GroupedMLP, mlp.submodules.experts
        mlp.submodules.experts = ModuleSpec(module=TorchGroupedMLP)
    if module is not None:
        mlp.module = module
    return build_module(mlp, config=config)


def set_layer(layer) -> None:
    """The sequential layer's weights from global names (local expert j is global
    ep_rank * E_local + j)."""
    from megatron.core import parallel_state as mpu

    offset = mpu.get_expert_model_parallel_rank() * layer.num_local_experts
    for name, p in layer.named_parameters():
        parts = name.split(".")
        if "local_experts" in parts:
            i = parts.index("local_experts") + 1
            parts[i] = str(int(parts[i]) + offset)
        p.data.copy_(deterministic(".".join(parts), p.shape))


def run_layer(layer, x, g):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out, bias = layer(x)
    assert bias is None
    (out * g).sum().backward()
    return out.detach(), x.grad


def gather_dim0(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` concatenated along dim 0 (sequence chunks, or local experts)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def layer_parity(out_dir: Path) -> dict:
    from tandem_core.moe import sequential_to_grouped

    world, rank = dist.get_world_size(), dist.get_rank()
    config = moe_config()
    seq_layer = build_layer(config, grouped=False)
    grp_layer = build_layer(config, grouped=True)
    set_layer(seq_layer)
    grp_layer.router.weight.data.copy_(seq_layer.router.weight)
    sequential_to_grouped(seq_layer.experts, grp_layer.experts)

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).chunk(world)[rank]
    g = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).chunk(world)[rank]
    out_s, xg_s = run_layer(seq_layer, x, g)
    out_g, xg_g = run_layer(grp_layer, x, g)
    g1, g2 = seq_grads(seq_layer.experts)
    n = grp_layer.experts.num_local_experts
    w1g, w2g = grouped_grads(grp_layer.experts)
    diffs = Diffs()
    diffs.add("out", out_s, out_g)
    diffs.add("x_grad", xg_s, xg_g)
    diffs.add("router_grad", seq_layer.router.weight.grad, grp_layer.router.weight.grad)
    diffs.add("w1_grad", g1, w1g)
    diffs.add("w2_grad", g2, w2g)
    # The maxima over the EP ranks.
    flat = torch.tensor([v for pair in diffs.values() for v in pair])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    diffs = {k: flat[2 * i : 2 * i + 2].tolist() for i, k in enumerate(diffs)}
    router_grad = seq_layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)  # each rank's tokens contribute; the sum is one rank's grad
    full = {
        "out": gather_dim0(out_g),
        "x_grad": gather_dim0(xg_g),
        "router_grad": router_grad,
        "w1_grad": gather_dim0(w1g),
        "w2_grad": gather_dim0(w2g),
    }
    if rank == 0:
        torch.save(full, out_dir / f"moe_ep{world}.pt")
    return {
        "layer": diffs,
        "allreduce": [grp_layer.experts.weight1.allreduce, grp_layer.experts.weight2.allreduce],
        "num_local_experts": n,
        "experts_class": type(grp_layer.experts).__name__,
        "use_grouped_mm": grp_layer.experts.use_grouped_mm,
        "out_abs_max": out_s.abs().max().item(),
    }


# ---- dispatch: megatron's all-to-all dispatcher vs DeviceIndexDispatcher ----------------------
def dispatch_parity() -> dict:
    """The same MoELayer (either experts module) with megatron's all-to-all dispatcher and with
    `DeviceIndexDispatcher`: outputs and every gradient bitwise equal; the expert counts the
    experts got (on the device, not the host); and `_chunk_gather_index` against megatron's
    `sort_chunks_by_idxs` on chunk sizes with zeros."""
    from megatron.core.transformer.moe.moe_utils import sort_chunks_by_idxs

    from tandem_core.moe import DeviceIndexDispatcher, DeviceIndexMoELayer, _chunk_gather_index

    world, rank = dist.get_world_size(), dist.get_rank()
    config = moe_config()
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).chunk(world)[rank]
    g = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).chunk(world)[rank]
    result = {}
    for experts in ("grouped", "sequential"):
        ref = build_layer(config, grouped=experts == "grouped")
        dev = build_layer(config, grouped=experts == "grouped", module=DeviceIndexMoELayer)
        assert isinstance(dev.token_dispatcher, DeviceIndexDispatcher)
        dev.load_state_dict(ref.state_dict())
        seen = []
        dev.experts.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[1]))
        runs = [run_layer(layer, x, g) for layer in (ref, dev)]
        grads = [[p.grad for p in layer.parameters() if p.grad is not None] for layer in (ref, dev)]
        equal = all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
        equal &= len(grads[0]) == len(grads[1]) == len(list(ref.parameters()))
        equal &= all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
        flag = torch.tensor(int(equal))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        result[experts] = {
            "bitwise_equal": bool(flag),
            "sorts_chunks": dev.token_dispatcher._sorts_chunks(),
            "sync_point": dev.token_dispatcher.cuda_sync_point,
            "counts_are_tensors": all(torch.is_tensor(t) for t in seen),
            "tokens": int(sum(t.sum() for t in seen)),
        }
    # a routing map naming fewer than k experts for one token fails loudly, not silently
    dispatcher = dev.token_dispatcher
    tokens = x.reshape(-1, HIDDEN)
    bad = torch.zeros(tokens.shape[0], NUM_EXPERTS, dtype=torch.bool)
    bad[:, :TOPK] = True
    bad[0, 1] = False
    try:
        dispatcher.dispatch_preprocess(tokens, bad, bad.float())
        result["short_map_raises"] = False
    except (IndexError, RuntimeError):
        result["short_map_raises"] = True
    gen = torch.Generator().manual_seed(17)
    sizes = torch.tensor([3, 0, 2, 5, 0, 1])
    rows = torch.randn(int(sizes.sum()), 4, generator=gen)
    order = torch.tensor([0, 3, 1, 4, 2, 5])
    want, _ = sort_chunks_by_idxs(rows, sizes, order)
    got = rows[_chunk_gather_index(sizes, order, rows.shape[0])]
    result["chunk_index_equal"] = torch.equal(want, got)
    return {"dispatch": result}


# ---- ckpt: SequentialMLP's dist checkpoint into TorchGroupedMLP and back ----------------------
def ckpt_compat(out_dir: Path, other_ckpt: Path | None) -> dict:
    from megatron.core import dist_checkpointing

    from tandem_core.moe import sequential_to_grouped

    world = dist.get_world_size()
    config = moe_config()
    seq_layer = build_layer(config, grouped=False)
    set_layer(seq_layer)
    expected = build_layer(config, grouped=True)  # the helper's mapping, for reference
    sequential_to_grouped(seq_layer.experts, expected.experts)
    path = out_dir / f"ckpt_seq_ep{world}"
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(seq_layer.sharded_state_dict(prefix="mlp."), str(path))

    def load_into(layer, src: Path) -> None:
        state = dist_checkpointing.load(layer.sharded_state_dict(prefix="mlp."), str(src))
        layer.load_state_dict({k.removeprefix("mlp."): v for k, v in state.items()}, strict=True)

    result = {}
    sources = {"same_ep": path} | ({"other_ep": other_ckpt} if other_ckpt else {})
    for label, src in sources.items():
        grouped = build_layer(config, grouped=True)  # its own random init, overwritten by load
        load_into(grouped, src)
        exact = all(
            torch.equal(getattr(grouped.experts, w), getattr(expected.experts, w))
            for w in ("weight1", "weight2")
        ) and torch.equal(grouped.router.weight, seq_layer.router.weight)
        # ... and the grouped layer's own checkpoint back into a SequentialMLP layer.
        back_path = out_dir / f"ckpt_grouped_ep{world}_{label}"
        if dist.get_rank() == 0:
            back_path.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(grouped.sharded_state_dict(prefix="mlp."), str(back_path))
        back = build_layer(config, grouped=False)
        load_into(back, back_path)
        back_exact = all(
            torch.equal(a, b)
            for a, b in zip(back.parameters(), seq_layer.parameters(), strict=True)
        )
        flags = torch.tensor([int(exact), int(back_exact)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        result[label] = {
            "seq_to_grouped_exact": bool(flags[0]),
            "grouped_to_seq_exact": bool(flags[1]),
        }
    return {"ckpt": result}


def megatron_moe_on_cpu() -> None:
    """megatron's MoE router without transformer-engine (tandem_core.moe; the CPU side of the
    all-to-all dispatcher is tandem_core.cpu_compat's)."""
    from tandem_core.moe import fix_router_without_te

    fix_router_without_te()


def main():
    out_dir = Path(sys.argv[1])
    other_ckpt = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    torch.manual_seed(0)
    D.init_distributed()
    megatron_moe_on_cpu()
    D.init_model_parallel(ParallelConfig(expert_model_parallel_size=dist.get_world_size()))
    with cpu_compat.megatron_device_scope():
        result = {"world": dist.get_world_size(), "seconds": {}}
        parts = [
            ("layer", layer_parity, (out_dir,)),
            ("dispatch", dispatch_parity, ()),
            ("ckpt", ckpt_compat, (out_dir, other_ckpt)),
        ]
        if dist.get_world_size() == 1:
            parts.insert(0, ("units", units, ()))
        for label, part, args in parts:
            start = time.perf_counter()
            result |= part(*args)
            result["seconds"][label] = round(time.perf_counter() - start, 2)
    write_result(result)
    D.destroy()


if __name__ == "__main__":
    main()
    exit_now()
