"""Megatron -> HF (name, tensor) pairs, lazily, for a rollout engine and for export.

Input is "the whole model's parameters under global layer numbering": an iterable of
(megatron name with the GLOBAL layer number, this rank's TP shard). `megatron_named_params`
makes one from a rank's own chunks; AllGatherPPModel makes one covering every pipeline stage.
Each tensor is gathered over TP when it is needed and dropped when the consumer moves on, so
at most one full tensor (or one bucket) is alive at a time beside the model itself.
Without TP gathering (TP=1, norms) a yielded tensor may be a view of the live parameter:
consumers copy it (as every engine's `load_weights` does) before the parameter changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tandem_core.model_args import ModelArgs
from weight_loaders.names import lookup, split_layer, weight_map
from weight_loaders.transforms import LAYOUTS

NamedTensors = Iterable[tuple[str, torch.Tensor]]


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel under megatron's DDP / Float16Module wrappers."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, DistributedDataParallel | Float16Module):
        chunk = chunk.module
    return chunk


@dataclass(frozen=True)
class ExpertShard:
    """Which of a layer's experts a rank's experts tensor holds: `local` of them, numbered from
    `offset` (the EP rank × local)."""

    local: int
    offset: int


def layer_named_params(
    model_chunks: list,
) -> Iterator[tuple[str, torch.Tensor, ExpertShard | None]]:
    """A rank's chunk parameters renamed from local to global layer numbers, each with the
    experts it holds (None for a parameter that is no expert's).

    The global number is what the layer module itself carries (`layer_number`, 1-based, set
    by megatron from the PP rank's and VPP stage's offset when the chunk was built), so this
    holds for any PP/VPP layout and for uneven first/last stages."""
    for chunk in model_chunks:
        model = unwrap_model(chunk)
        layers = model.decoder.layers
        for name, param in model.named_parameters():
            shard = None
            if name.startswith("decoder.layers."):
                local, rest = name[len("decoder.layers.") :].split(".", 1)
                layer = layers[int(local)]
                name = f"decoder.layers.{layer.layer_number - 1}.{rest}"
                if rest.startswith("mlp.experts."):
                    experts = layer.mlp.experts
                    count = experts.num_local_experts
                    shard = ExpertShard(count, experts.ep_group.rank() * count)
            yield name, param, shard


def per_expert(name: str, tensor: torch.Tensor, shard: ExpertShard):
    """An experts parameter as (name, tensor) per expert, named as megatron's SequentialMLP
    names them (`mlp.experts.local_experts.{e}.linear_fc1.weight`) with `e` the global expert
    number, whichever experts module holds them: SequentialMLP's own parameters renumbered, or
    views of the stacked `weight1` [E·2f, h] / `weight2` [E·h, f] of the grouped module
    (tandem_core.moe.TorchGroupedMLP: expert j's fc1 is rows j·2f:(j+1)·2f)."""
    head, _, tail = name.partition("mlp.experts.")
    if tail in ("weight1", "weight2"):
        fc = "linear_fc1" if tail == "weight1" else "linear_fc2"
        blocks = tensor.view(shard.local, -1, tensor.shape[1])
        for j in range(shard.local):  # indexing, not unbind: the views are written in place
            yield f"{head}mlp.experts.local_experts.{shard.offset + j}.{fc}.weight", blocks[j]
        return
    _, j, rest = tail.split(".", 2)  # local_experts.{j}.<rest>
    yield f"{head}mlp.experts.local_experts.{shard.offset + int(j)}.{rest}", tensor


def megatron_named_params(model_chunks: list, config=None) -> Iterator[tuple[str, torch.Tensor]]:
    """A rank's parameters under global layer numbering, experts one by one under global
    expert numbers (see `layer_named_params`, `per_expert`). `config` is accepted for API
    symmetry and not needed."""
    del config
    for name, param, shard in layer_named_params(model_chunks):
        if shard is None:
            yield name, param
        else:
            yield from per_expert(name, param, shard)


def with_every_expert(
    global_named_params: NamedTensors, args: ModelArgs, ep_group=None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The same pairs, each expert tensor completed by the other EP ranks' experts (one
    all-gather over EP per local expert tensor, in step on every EP rank): what an engine or an
    HF export needs, since each EP rank holds only num_experts / EP of every layer's experts."""
    size = 1 if ep_group is None else dist.get_world_size(ep_group)
    if size == 1:
        yield from global_named_params
        return
    rank, local = dist.get_rank(ep_group), args.num_experts // size
    for name, tensor, pattern, layer, expert in experts_in_step(global_named_params, rank, local):
        if expert is None:
            yield name, tensor
            continue
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.detach().contiguous(), group=ep_group)
        for r, part in enumerate(parts):
            e = expert + (r - rank) * local
            yield pattern.format(i=layer, e=e), part


def experts_in_step(named: NamedTensors, ep_rank: int, local: int):
    """(name, tensor, pattern, layer, expert) for each pair, checking that this EP rank's
    experts of each layer tensor come in ascending order: `with_every_expert` pairs the EP
    ranks' tensors by position, so any other order would load one expert's weights under
    another's name (an order by name did: 'local_experts.10' before 'local_experts.2')."""
    last: dict[tuple[str, int], int] = {}
    for name, tensor in named:
        pattern, layer, expert = split_layer(name)
        if expert is not None:
            j = expert - ep_rank * local
            if not 0 <= j < local or j <= last.get((pattern, layer), -1):
                raise RuntimeError(
                    f"{name}: expert {expert} out of order on EP rank {ep_rank} (its experts "
                    f"are {ep_rank * local}-{(ep_rank + 1) * local - 1}, in ascending order): "
                    "the EP gather pairs the ranks' experts by position"
                )
            last[pattern, layer] = j
        yield name, tensor, pattern, layer, expert


def _gather_tp(shard: torch.Tensor, group) -> list[torch.Tensor]:
    if group is None or dist.get_world_size(group) == 1:
        return [shard]
    shard = shard.detach().contiguous()
    shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, shard, group=group)
    return shards


def iter_hf_tensors(
    global_named_params: NamedTensors, args: ModelArgs, tp_group=None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, full tensor), one at a time, in the order of the input.

    Every rank of `tp_group` must consume the stream in step (the gathers are collectives)."""
    weights = weight_map(args)
    for name, shard in global_named_params:
        if name == "output_layer.weight" and args.tie_word_embeddings:
            continue  # HF ties lm_head to embed_tokens; the embedding is streamed once
        rule, hf_names = lookup(weights, name)
        layout = LAYOUTS[rule.layout]
        shards = _gather_tp(shard, tp_group) if layout.gathered else [shard.detach()]
        yield from zip(hf_names, layout.to_hf(shards, args), strict=True)


def bucket(
    pairs: Iterable[tuple[str, torch.Tensor]], bucket_mb: float
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group pairs into lists of at most `bucket_mb` MiB; a larger tensor travels alone."""
    limit = bucket_mb * 2**20
    current, size = [], 0
    for name, t in pairs:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            yield current
            current, size = [], 0
        current.append((name, t))
        size += nbytes
    if current:
        yield current


def stream_hf_weights(
    global_named_params: NamedTensors,
    args: ModelArgs,
    tp_group=None,
    bucket_mb: float | None = None,
):
    """HF-named full tensors for an engine's `load_weights`: pairs (bucket_mb None) or lists of
    pairs of at most `bucket_mb` MiB each. Lazy; see `iter_hf_tensors` for the TP contract."""
    pairs = iter_hf_tensors(global_named_params, args, tp_group)
    return pairs if bucket_mb is None else bucket(pairs, bucket_mb)
