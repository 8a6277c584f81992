"""AllGatherPPModel: every rank of a pipeline group holds the whole model (its TP shard)
while generating, then gives the foreign stages back.

Each stage's parameters live in contiguous per-dtype buffers: the owner's are megatron DDP's
own `param_data` buffers (the trained parameters are views into them, so gathering copies
nothing on the owner), and every other rank keeps a same-sized buffer per foreign stage whose
views carry the owner's parameter names under global layer numbers. Gathering is one
broadcast per buffer from its owner; releasing resizes the foreign storages to 0 and the next
gather grows them again in place, so the buffers, and any views of them, keep their identity.

Why buffers and views rather than megatron modules for the foreign stages: the rollout
engine runs its own model and only needs the tensors; building foreign megatron chunks would
spend memory and start-up time on modules nothing calls. A megatron-native generation backend
would wrap these same views in modules (`stage_views`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tandem_core import cpu_compat
from weight_loaders.direct_copy import regrow_storage, release_storage
from weight_loaders.stream import (
    ExpertShard,
    layer_named_params,
    megatron_named_params,
    per_expert,
)


@dataclass(frozen=True)
class ParamSlot:
    name: str  # megatron name under global layer numbering
    start: int
    shape: tuple[int, ...]
    experts: ExpertShard | None = None  # the experts an experts tensor holds


@dataclass(frozen=True)
class BufferSpec:
    dtype: torch.dtype
    numel: int
    slots: tuple[ParamSlot, ...]


def _ddp_buffers(chunk) -> list:
    from megatron.core.distributed import DistributedDataParallel

    return list(chunk.buffers) if isinstance(chunk, DistributedDataParallel) else []


def _own_buffers(chunks) -> tuple[list[torch.Tensor], list[BufferSpec]]:
    """This stage's contiguous buffers and their index (DDP param_data, or a packed copy)."""
    buffers, specs = [], []
    for chunk in chunks:
        names = {p: (n, shard) for n, p, shard in layer_named_params([chunk])}
        ddp_buffers = _ddp_buffers(chunk)
        if ddp_buffers and all(b.param_data is not None for b in ddp_buffers):
            for b in ddp_buffers:
                slots = tuple(
                    ParamSlot(*names[p][:1], start, tuple(p.shape), names[p][1])
                    for p, (start, _end, _bucket) in b.param_index_map.items()
                )
                buffers.append(b.param_data)
                specs.append(BufferSpec(b.param_data.dtype, b.param_data.numel(), slots))
        else:
            # No distributed optimizer: DDP keeps no param buffer; pack one (one copy of this
            # stage, rebuilt at each gather).
            by_dtype: dict[torch.dtype, list] = {}
            for p, (n, shard) in names.items():
                by_dtype.setdefault(p.dtype, []).append((n, p, shard))
            for dtype, items in by_dtype.items():
                slots, start = [], 0
                for n, p, shard in items:
                    slots.append(ParamSlot(n, start, tuple(p.shape), shard))
                    start += p.numel()
                flat = torch.cat([p.detach().reshape(-1) for _, p, _ in items])
                buffers.append(flat)
                specs.append(BufferSpec(dtype, start, tuple(slots)))
    return buffers, specs


class AllGatherPPModel:
    """The whole model's parameters on every rank of `pp_group` (see module docstring)."""

    def __init__(self, own_chunks: list, pp_group=None):
        self.own_chunks = own_chunks
        self.group = pp_group
        self.pp_size = dist.get_world_size(pp_group) if pp_group is not None else 1
        self.pp_rank = dist.get_rank(pp_group) if pp_group is not None else 0
        _, own_specs = _own_buffers(own_chunks)
        specs: list[list[BufferSpec] | None] = [None] * self.pp_size
        if self.pp_size > 1:
            dist.all_gather_object(specs, own_specs, group=pp_group)
        else:
            specs = [own_specs]
        self.specs: list[list[BufferSpec]] = specs
        self.owners = [
            dist.get_global_rank(pp_group, r) if pp_group is not None else r
            for r in range(self.pp_size)
        ]
        device = cpu_compat.device()
        # Foreign buffers keep their shape while their storage is released (resized to 0) and
        # re-grown in place, so views of them, cached by a weight-sync plan, stay valid.
        self.foreign: dict[int, list[torch.Tensor]] = {
            stage: [
                release_storage(torch.empty(s.numel, dtype=s.dtype, device=device))
                for s in stage_specs
            ]
            for stage, stage_specs in enumerate(specs)
            if stage != self.pp_rank
        }

    # ---- gather / release -------------------------------------------------------------------
    def gather(self) -> None:
        """Fill every foreign stage's buffers from their owners: one broadcast per buffer."""
        if self.pp_size == 1:
            return  # the whole model is the own stage
        own, _ = _own_buffers(self.own_chunks)
        for stage in range(self.pp_size):
            bufs = own if stage == self.pp_rank else self.foreign[stage]
            for buf in bufs:
                regrow_storage(buf)  # a no-op on the owner's own buffers
                dist.broadcast(buf, src=self.owners[stage], group=self.group)

    def release(self) -> None:
        """Give back the foreign stages' memory (storage resized to 0)."""
        for bufs in self.foreign.values():
            for buf in bufs:
                release_storage(buf)

    def foreign_bytes(self) -> int:
        """Bytes the foreign stages hold now (0 once released)."""
        return sum(b.untyped_storage().size() for bufs in self.foreign.values() for b in bufs)

    # ---- views ------------------------------------------------------------------------------
    def stage_views(self, stage: int) -> Iterator[tuple[str, torch.Tensor]]:
        """A foreign stage's parameters as views of its buffers (valid while gathered)."""
        for buf, spec in zip(self.foreign[stage], self.specs[stage], strict=True):
            for slot in spec.slots:
                n = 1
                for d in slot.shape:
                    n *= d
                view = buf[slot.start : slot.start + n].view(slot.shape)
                if slot.experts is None:
                    yield slot.name, view
                else:
                    yield from per_expert(slot.name, view, slot.experts)

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The whole model (this rank's TP shard) under global layer numbering, in model
        order: embedding, layers 0..L-1, final norm, output layer. The own stage is the live
        trained parameters; foreign stages are views of their buffers."""
        items = list(megatron_named_params(self.own_chunks))
        for stage in self.foreign:
            items += self.stage_views(stage)
        # A stable sort by section and layer: within a layer the order stays the module's,
        # the same on every rank. Consumers that gather over EP pair the ranks' tensors by
        # position (weight_loaders.stream.with_every_expert), and sorting by name would not
        # keep experts in step: 'local_experts.10' sorts before 'local_experts.2', so EP rank
        # 0's 2nd expert would meet EP rank 1's 65th where there are 128 experts.
        yield from sorted(items, key=lambda kv: _model_order(kv[0]))


def _model_order(name: str) -> tuple[int, int]:
    if name.startswith("embedding."):
        return (0, 0)
    if name.startswith("decoder.layers."):
        return (1, int(name.split(".")[2]))
    if name.startswith("decoder."):
        return (2, 0)
    return (3, 0)
