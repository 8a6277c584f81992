"""The batch protocol every stage of an iteration passes along.

A `Batch` holds three things, as verl's DataProto does:
- `tensors`: a TensorDict whose entries share the leading batch dimension;
- `non_tensors`: per-sample Python values (ground truth, data source, ...) as numpy object
  arrays of the same length;
- `meta_info`: a plain dict for the whole batch (sampling settings, metrics, flags).

Every operation here keeps the three in step, so a batch can be split for data parallelism,
repeated for n samples per prompt, padded to a divisor and back, and moved over a process group.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tensordict import TensorDict


def _as_object_array(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype == object:
        return values
    arr = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):  # one by one: lists (a conversation) stay one element
        arr[i] = value
    return arr


@dataclass
class Batch:
    tensors: TensorDict
    non_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    meta_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        n = len(self)
        for key, value in self.non_tensors.items():
            self.non_tensors[key] = _as_object_array(value)
            if len(self.non_tensors[key]) != n:
                raise ValueError(
                    f"non-tensor field {key!r} has {len(self.non_tensors[key])} rows, "
                    f"the tensors have {n}"
                )

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls,
        tensors: dict[str, torch.Tensor] | None = None,
        non_tensors: dict[str, Any] | None = None,
        meta_info: dict[str, Any] | None = None,
    ) -> Batch:
        tensors = dict(tensors or {})
        non_tensors = {k: _as_object_array(v) for k, v in (non_tensors or {}).items()}
        if tensors:
            sizes = {k: v.shape[0] for k, v in tensors.items()}
        else:
            sizes = {k: len(v) for k, v in non_tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch fields disagree on the batch size: {sizes}")
        n = next(iter(sizes.values()), 0)
        return cls(TensorDict(tensors, batch_size=[n]), non_tensors, dict(meta_info or {}))

    def __len__(self) -> int:
        return int(self.tensors.batch_size[0]) if self.tensors.batch_size else 0

    def __getitem__(self, key: str):
        if key in self.tensors.keys():
            return self.tensors[key]
        if key in self.non_tensors:
            return self.non_tensors[key]
        raise KeyError(f"batch has no field {key!r}; fields: {sorted(self.keys())}")

    def __setitem__(self, key: str, value):
        if isinstance(value, torch.Tensor):
            self.tensors[key] = value
        else:
            arr = _as_object_array(value)
            if len(arr) != len(self):
                raise ValueError(f"field {key!r} has {len(arr)} rows, the batch has {len(self)}")
            self.non_tensors[key] = arr

    def __contains__(self, key: str) -> bool:
        return key in self.tensors.keys() or key in self.non_tensors

    def keys(self) -> list[str]:
        return list(self.tensors.keys()) + list(self.non_tensors)

    # ---- selection and combination ------------------------------------------------------
    def select(
        self, keys: list[str] | None = None, non_tensor_keys: list[str] | None = None
    ) -> Batch:
        """A new batch with only the named fields (None keeps all of that kind)."""
        tensors = self.tensors.select(*keys) if keys is not None else self.tensors.clone(False)
        names = self.non_tensors.keys() if non_tensor_keys is None else non_tensor_keys
        non = {k: self.non_tensors[k] for k in names}
        return Batch(tensors, non, copy.copy(self.meta_info))

    def index(self, idx) -> Batch:
        """Rows by a slice, an index list/array/tensor, or a boolean mask."""
        if isinstance(idx, torch.Tensor):
            idx_t = idx
        elif isinstance(idx, slice):
            idx_t = torch.arange(len(self))[idx]
        else:
            arr = np.asarray(idx)
            # An empty list is float64 to numpy; any non-boolean index means row numbers.
            idx_t = torch.as_tensor(arr if arr.dtype == np.bool_ else arr.astype(np.int64))
        if idx_t.dtype == torch.bool:
            idx_t = idx_t.nonzero(as_tuple=True)[0]
        idx_np = idx_t.cpu().numpy()
        tensors = self.tensors[idx_t]
        non = {k: v[idx_np] for k, v in self.non_tensors.items()}
        return Batch(tensors, non, copy.copy(self.meta_info))

    def union(self, other: Batch) -> Batch:
        """Merge fields of two batches of the same rows. A field present in both must be equal."""
        if len(self) != len(other):
            raise ValueError(f"cannot union batches of {len(self)} and {len(other)} rows")
        tensors = self.tensors.clone(False)
        for key in other.tensors.keys():
            value = other.tensors[key]
            if key in tensors.keys() and not torch.equal(tensors[key], value):
                raise ValueError(f"union conflict on tensor field {key!r}: values differ")
            tensors[key] = value
        non = dict(self.non_tensors)
        for key, value in other.non_tensors.items():
            if key in non and not np.array_equal(non[key], value):
                raise ValueError(f"union conflict on non-tensor field {key!r}: values differ")
            non[key] = value
        meta = dict(self.meta_info)
        for key, value in other.meta_info.items():
            if key in meta and meta[key] != value:
                raise ValueError(f"union conflict on meta_info {key!r}: {meta[key]!r} != {value!r}")
            meta[key] = value
        return Batch(tensors, non, meta)

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        """Rows of several batches one after the other; meta_info of the first."""
        if not batches:
            raise ValueError("concat of an empty list of batches")
        keys = [sorted(b.keys()) for b in batches]
        if any(k != keys[0] for k in keys):
            raise ValueError(f"concat of batches with different fields: {keys}")
        tensors = torch.cat([b.tensors for b in batches], dim=0)
        non = {
            k: np.concatenate([b.non_tensors[k] for b in batches]) for k in batches[0].non_tensors
        }
        return Batch(tensors, non, copy.copy(batches[0].meta_info))

    def split(self, size: int) -> list[Batch]:
        """Consecutive pieces of `size` rows; the last may be shorter."""
        if size <= 0:
            raise ValueError(f"split size must be positive, got {size}")
        return [self.index(slice(i, i + size)) for i in range(0, len(self), size)]

    def chunk(self, chunks: int) -> list[Batch]:
        """`chunks` equal pieces. Uneven sizes are an error: pad_to_divisor first."""
        if chunks <= 0 or len(self) % chunks != 0:
            raise ValueError(
                f"cannot chunk a batch of {len(self)} rows into {chunks} equal pieces; "
                "use pad_to_divisor() first"
            )
        return self.split(len(self) // chunks)

    def repeat(self, times: int, interleave: bool = True) -> Batch:
        """Each row `times` times; interleaved keeps copies of one row adjacent (n samples)."""
        if times < 1:
            raise ValueError(f"repeat times must be >= 1, got {times}")
        n = len(self)
        if interleave:
            idx = torch.arange(n).repeat_interleave(times)
        else:
            idx = torch.arange(n).repeat(times)
        return self.index(idx)

    # ---- padding ------------------------------------------------------------------------
    def pad_to_divisor(self, divisor: int) -> tuple[Batch, int]:
        """Append copies of the first rows until len % divisor == 0. Returns (batch, pad)."""
        if divisor <= 0:
            raise ValueError(f"divisor must be positive, got {divisor}")
        if len(self) == 0:
            raise ValueError("cannot pad an empty batch")
        pad = (-len(self)) % divisor
        if pad == 0:
            return self, 0
        idx = torch.arange(pad) % len(self)
        return Batch.concat([self, self.index(idx)]), pad

    def unpad(self, pad: int) -> Batch:
        return self if pad == 0 else self.index(slice(0, len(self) - pad))

    # ---- devices and process groups -----------------------------------------------------
    def to(self, device) -> Batch:
        return Batch(self.tensors.to(device), self.non_tensors, self.meta_info)

    def all_gather(self, group=None) -> Batch:
        """Concatenate the batches of every rank in `group`, in rank order (rows may differ)."""
        world = dist.get_world_size(group)
        if world == 1:
            return self
        parts: list[Batch | None] = [None] * world
        dist.all_gather_object(parts, self.to("cpu"), group=group)
        device = next(iter(self.tensors.values())).device if len(self.tensors.keys()) else "cpu"
        return Batch.concat(parts).to(device)

    def scatter(self, group=None, src_rank_in_group: int = 0) -> Batch:
        """Split the source rank's batch into equal pieces, one per rank of `group`."""
        world = dist.get_world_size(group)
        if world == 1:
            return self
        rank = dist.get_rank(group)
        pieces = self.to("cpu").chunk(world) if rank == src_rank_in_group else None
        out: list[Batch | None] = [None]
        src = (
            dist.get_global_rank(group, src_rank_in_group)
            if group is not None
            else src_rank_in_group
        )
        dist.scatter_object_list(out, pieces, src=src, group=group)
        return out[0]

    def broadcast(self, group=None, src_rank_in_group: int = 0) -> Batch:
        """The source rank's batch on every rank of `group`."""
        if dist.get_world_size(group) == 1:
            return self
        box = [self.to("cpu") if dist.get_rank(group) == src_rank_in_group else None]
        src = (
            dist.get_global_rank(group, src_rank_in_group)
            if group is not None
            else src_rank_in_group
        )
        dist.broadcast_object_list(box, src=src, group=group)
        return box[0]
