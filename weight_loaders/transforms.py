"""The layout transforms between HF tensors and megatron tensor-parallel shards: pure functions.

A megatron parameter has one of a few layouts; each layout answers five questions, all pure
(tensors and shapes in, tensors and shapes out; no process groups, no files):

- `hf_shapes(shard_shape, args, tp)`: the full HF shapes a TP shard of this shape implies
  (checked against the checkpoint before reading, so a disagreement names both shapes);
- `shard_index(hf_shapes, args, tp, rank)`: which slice of each HF tensor TP rank `rank` owns
  (the importer reads exactly these slices, lazily, from safetensors);
- `assemble(parts, shard_shape, args)`: the megatron shard from those slices;
- `to_hf(shards, args)`: the full HF tensors from the shards of all TP ranks (export, stream);
- `local_rows(shard, args)`: this shard's blocks of each HF tensor along `split_dim`, as views
  (no copy) in HF order; what direct weight copies read.

The two real transforms are named functions: `interleave_qkv`/`deinterleave_qkv` (megatron's
`linear_qkv` stores, per query group, that group's query heads then its one key head then its
one value head) and `fuse_gate_up`/`split_gate_up` (megatron's `linear_fc1` holds [gate; up]
per TP rank, and its GLU applies the activation to the first half).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tandem_core.model_args import ModelArgs
from tandem_core.registry import Registry

Shape = tuple[int, ...]
Index = tuple[slice, ...]


# ---- the named transforms ---------------------------------------------------------------------
def interleave_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """[q heads; k heads; v heads] (HF) -> per group [its q heads, its k head, its v head].

    Works for weights ([rows, hidden]) and biases ([rows]); `num_groups` is the number of
    query groups in these tensors (all of them, or one TP rank's).
    """
    rest = q.shape[1:]
    parts = [t.reshape(num_groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def deinterleave_qkv(
    qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `interleave_qkv` for `num_heads` query heads in `num_groups` groups."""
    rest = qkv.shape[1:]
    q_rows = num_heads // num_groups * head_dim
    grouped = qkv.reshape(num_groups, q_rows + 2 * head_dim, *rest)
    q, k, v = torch.split(grouped, [q_rows, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """One TP rank's `linear_fc1`: its gate rows, then its up rows."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def pad_vocab(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows up to `rows`: megatron's padded vocab entries never win (their logit is 0 and
    every consumer masks them out), and zeros keep round trips exact."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


# ---- index helpers ----------------------------------------------------------------------------
def _rows(start: int, stop: int, ndim: int) -> Index:
    return (slice(start, stop),) + (slice(None),) * (ndim - 1)


def _cat(shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    # One shard (TP=1) is already the whole tensor: no copy.
    return shards[0] if len(shards) == 1 else torch.cat(list(shards), dim=dim)


def _even_split(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what}={n} is not divisible by tensor parallel size {tp}")
    return n // tp


# ---- layouts ----------------------------------------------------------------------------------
class Layout:
    """How one megatron parameter relates to its HF tensor(s); see the module docstring."""

    def hf_shapes(self, shard_shape: Shape, args: ModelArgs, tp: int) -> list[Shape]:
        raise NotImplementedError

    def shard_index(
        self, hf_shapes: Sequence[Shape], args: ModelArgs, tp: int, rank: int
    ) -> list[Index]:
        raise NotImplementedError

    def assemble(
        self, parts: Sequence[torch.Tensor], shard_shape: Shape, args: ModelArgs
    ) -> torch.Tensor:
        return parts[0]

    def to_hf(self, shards: Sequence[torch.Tensor], args: ModelArgs) -> list[torch.Tensor]:
        raise NotImplementedError

    def local_rows(self, shard: torch.Tensor, args: ModelArgs) -> list[list[torch.Tensor]]:
        """Per HF tensor, the contiguous blocks of it (along `split_dim`) this shard holds."""
        return [[shard]]

    # Replicated tensors need no gather; the streamer asks.
    gathered: bool = True
    # The dimension TP splits (rows, except a row-parallel linear's input columns).
    split_dim: int = 0


LAYOUTS = Registry("weight layout")
"""layout name (what a weight map's Rule names) -> its Layout instance."""


def register_layout(name: str) -> Callable[[type[Layout]], type[Layout]]:
    def wrap(cls: type[Layout]) -> type[Layout]:
        LAYOUTS.add(name, cls())
        return cls

    return wrap


@register_layout("replicated")
class Replicated(Layout):
    """Norm weights: every TP rank holds the whole tensor."""

    gathered = False

    def hf_shapes(self, shard_shape, args, tp):
        return [tuple(shard_shape)]

    def shard_index(self, hf_shapes, args, tp, rank):
        return [tuple(slice(None) for _ in hf_shapes[0])]

    def to_hf(self, shards, args):
        return [shards[0]]


@register_layout("column")
class Column(Layout):
    """ColumnParallelLinear: output rows split evenly over TP."""

    def hf_shapes(self, shard_shape, args, tp):
        return [(shard_shape[0] * tp, *shard_shape[1:])]

    def shard_index(self, hf_shapes, args, tp, rank):
        n = _even_split(hf_shapes[0][0], tp, "rows")
        return [_rows(rank * n, (rank + 1) * n, len(hf_shapes[0]))]

    def to_hf(self, shards, args):
        return [_cat(shards, 0)]


@register_layout("row")
class Row(Layout):
    """RowParallelLinear: input columns split evenly over TP."""

    split_dim = 1

    def hf_shapes(self, shard_shape, args, tp):
        return [(shard_shape[0], shard_shape[1] * tp)]

    def shard_index(self, hf_shapes, args, tp, rank):
        n = _even_split(hf_shapes[0][1], tp, "columns")
        return [(slice(None), slice(rank * n, (rank + 1) * n))]

    def to_hf(self, shards, args):
        return [_cat(shards, 1)]


@register_layout("vocab")
class Vocab(Layout):
    """Embedding / output layer: rows of the vocab padded to `padded_vocab_size(tp)`, then split
    over TP; the HF tensor has the real vocab only."""

    def hf_shapes(self, shard_shape, args, tp):
        return [(args.vocab_size, *shard_shape[1:])]

    def shard_index(self, hf_shapes, args, tp, rank):
        per_rank = args.padded_vocab_size(tp) // tp
        vocab = hf_shapes[0][0]
        start, stop = min(rank * per_rank, vocab), min((rank + 1) * per_rank, vocab)
        return [_rows(start, stop, len(hf_shapes[0]))]

    def assemble(self, parts, shard_shape, args):
        return pad_vocab(parts[0], shard_shape[0])

    def to_hf(self, shards, args):
        return [_cat(shards, 0)[: args.vocab_size]]


@register_layout("qkv")
class QKV(Layout):
    """`linear_qkv` weight or bias from q_proj, k_proj, v_proj: TP rank r owns query groups
    [r·g/tp, (r+1)·g/tp), i.e. one contiguous row range of each of q, k and v."""

    def hf_shapes(self, shard_shape, args, tp):
        hd, rest = args.kv_channels, tuple(shard_shape[1:])
        return [
            (args.num_attention_heads * hd, *rest),
            (args.num_query_groups * hd, *rest),
            (args.num_query_groups * hd, *rest),
        ]

    def shard_index(self, hf_shapes, args, tp, rank):
        groups = _even_split(args.num_query_groups, tp, "num_key_value_heads")
        q_rows = args.num_attention_heads // args.num_query_groups * args.kv_channels
        kv_rows = args.kv_channels
        ndim = len(hf_shapes[0])
        g0, g1 = rank * groups, (rank + 1) * groups
        return [
            _rows(g0 * q_rows, g1 * q_rows, ndim),
            _rows(g0 * kv_rows, g1 * kv_rows, ndim),
            _rows(g0 * kv_rows, g1 * kv_rows, ndim),
        ]

    def assemble(self, parts, shard_shape, args):
        q, k, v = parts
        return interleave_qkv(q, k, v, k.shape[0] // args.kv_channels)

    def local_rows(self, shard, args):
        # Per query group: its q heads, its k head, its v head; each a contiguous block.
        q_rows = args.num_attention_heads // args.num_query_groups * args.kv_channels
        kv_rows = args.kv_channels
        grouped = shard.view(-1, q_rows + 2 * kv_rows, *shard.shape[1:])
        q, k, v = ([], [], [])
        for g in grouped:
            q.append(g[:q_rows])
            k.append(g[q_rows : q_rows + kv_rows])
            v.append(g[q_rows + kv_rows :])
        return [q, k, v]

    def to_hf(self, shards, args):
        # TP ranks hold contiguous groups, so the concatenated shards are the full interleave.
        full = _cat(shards, 0)
        return list(
            deinterleave_qkv(
                full, args.num_attention_heads, args.num_query_groups, args.kv_channels
            )
        )


@register_layout("gate_up")
class GateUp(Layout):
    """`linear_fc1` from gate_proj and up_proj: each TP rank holds [its gate rows; its up rows]."""

    def hf_shapes(self, shard_shape, args, tp):
        ffn = shard_shape[0] // 2 * tp
        return [(ffn, *shard_shape[1:])] * 2

    def shard_index(self, hf_shapes, args, tp, rank):
        n = _even_split(hf_shapes[0][0], tp, "intermediate_size")
        return [_rows(rank * n, (rank + 1) * n, len(hf_shapes[0]))] * 2

    def assemble(self, parts, shard_shape, args):
        return fuse_gate_up(*parts)

    def local_rows(self, shard, args):
        gate, up = split_gate_up(shard)
        return [[gate], [up]]

    def to_hf(self, shards, args):
        halves = [split_gate_up(s) for s in shards]
        return [_cat([h[0] for h in halves], 0), _cat([h[1] for h in halves], 0)]


# ---- whole-tensor conveniences (tests, and anyone holding full HF tensors) --------------------
def hf_to_megatron_shard(
    layout: str,
    hf_tensors: Sequence[torch.Tensor],
    shard_shape: Shape,
    args: ModelArgs,
    tp: int,
    rank: int,
) -> torch.Tensor:
    """TP rank `rank`'s megatron shard from full HF tensors (the importer does the same with
    lazy slices instead of full tensors)."""
    lay = LAYOUTS[layout]
    index = lay.shard_index([tuple(t.shape) for t in hf_tensors], args, tp, rank)
    return lay.assemble([t[i] for t, i in zip(hf_tensors, index, strict=True)], shard_shape, args)


def megatron_shards_to_hf(
    layout: str, shards: Sequence[torch.Tensor], args: ModelArgs
) -> list[torch.Tensor]:
    return LAYOUTS[layout].to_hf(shards, args)
