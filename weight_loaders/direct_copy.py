"""Direct weight copies: a rank's megatron shards straight into a rollout engine's parameters.

The general sync (stream.py) gathers every tensor over training TP, converts it to HF layout and
hands it to the engine's loader, which slices it again for the engine's TP: one Python call
chain per tensor, every iteration. When the engine is sharded like megatron (same TP, the HF
row order inside each of its parameters), most of that is a fixed mapping from a piece of one
megatron shard to a piece of one engine parameter. This module computes that mapping once, as
two lists of views, and each later sync copies them at the device's copy bandwidth (see
`CopyRuns`: on CUDA one Triton launch for them all):

- replicated tensors (norms) map for any pair of TP sizes;
- row, column and fused gate/up tensors map block for block at equal TP;
- megatron's per-group interleaved QKV maps as three contiguous blocks per query group;
- the vocab maps at TP 1 (the real rows) or when both sides pad the vocab alike;
- when the engine's TP divides training's (k = train/engine), engine rank j holds exactly the
  shards of training TP ranks jk .. jk+k-1: those tensors are all-gathered over training TP in
  buckets (one flat buffer each way, reused), then copied from the gathered views the same way;
- under training expert parallelism, where a rank holds 1/EP of every layer's experts and an
  engine that holds whole experts (TP 1) holds all of them stacked as the grouped experts stack
  theirs, each layer's fc1 (and fc2) is all-gathered over EP straight into the engine's
  stacked tensor: one collective a tensor, no copy;
- under the engine's expert parallelism (its TP ranks hold whole experts, some each), the
  experts this rank holds whole in training are copied into the engine's pieces of the same
  global experts, when that covers every expert the engine rank holds (training EP equal to
  the engine's, or no training EP): local copies, no collective.

What does not map (an engine TP larger than training's or not dividing it, different vocab
padding, an engine parameter whose shape disagrees) stays with the engine's loader. An engine
describes its parameters by name, plus the fused ("packed") modules that stack several HF
modules (vLLM's `packed_modules_mapping`, e.g. qkv_proj = [q_proj, k_proj, v_proj]); packed or
not, each engine parameter holds its HF tensors' rows for its TP rank, concatenated.

Written by hand because no library maps megatron's layouts onto another engine's parameters;
the views stay valid as long as both sides keep their storage (megatron's DDP buffers and
AllGatherPPModel's stage buffers do; so do vLLM's parameters across sleep and wake).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tandem_core.model_args import ModelArgs
from weight_loaders import copy_kernel
from weight_loaders.copy_kernel import RangeCopy
from weight_loaders.names import lookup, split_layer, weight_map
from weight_loaders.transforms import LAYOUTS

log = logging.getLogger(__name__)


@dataclass
class _Bucket:
    """Tensors gathered together: packed into the flat send buffer, all-gathered, then copied
    from views of the receive buffer into the engine."""

    numel: int
    pack_dst: list[torch.Tensor]  # views of the send buffer
    pack_src: list[torch.Tensor]  # this rank's shards
    dst: list[torch.Tensor] = field(default_factory=list)
    src: list[torch.Tensor] = field(default_factory=list)  # views of the receive buffer
    names: list[str] = field(default_factory=list)
    runs: CopyRuns | None = None  # planned while the buffers hold memory


@dataclass
class _GatherStage:
    """Bucketed all-gather over training TP; its two flat buffers hold memory only during a
    sync (released by resizing their storage, so the planned views stay valid)."""

    group: object
    send: torch.Tensor
    recv: torch.Tensor
    buckets: list[_Bucket]

    def run(self, each_bucket: Callable[[_Bucket], None]) -> None:
        """Gather bucket by bucket, calling `each_bucket` while its gathered views are filled."""
        world = dist.get_world_size(self.group)
        regrow_storage(self.send)
        regrow_storage(self.recv)
        try:
            for b in self.buckets:
                torch._foreach_copy_(b.pack_dst, b.pack_src)
                dist.all_gather_into_tensor(
                    self.recv[: world * b.numel], self.send[: b.numel], group=self.group
                )
                each_bucket(b)
        finally:
            release_storage(self.send)
            release_storage(self.recv)


@dataclass
class _ExpertGather:
    """One MoE layer's fc1 or fc2: this rank's experts (back to back in the grouped experts'
    stack) all-gathered over EP into the engine's stacked tensor, whose expert order is the
    ranks' order (rank r holds experts r·L … r·L + L - 1)."""

    group: object
    dst: torch.Tensor  # flat view of the engine's stack: every expert of the layer
    src: torch.Tensor  # flat view of this rank's experts
    names: list[str]  # the megatron name of every expert's tensor, global expert order

    def run(self, keep: Callable[[str], bool] | None = None) -> None:
        if keep is None:
            dist.all_gather_into_tensor(self.dst, self.src, group=self.group)
            return
        # A filtered sync (tests of the stale-weights detector) writes the kept experts only;
        # the gather still runs on every rank, being a collective.
        for name, dst, got in zip(self.names, *self._gathered(), strict=True):
            if keep(name):
                dst.copy_(got)

    def mismatch(self) -> str | None:
        pieces = zip(self.names, *self._gathered(), strict=True)
        return next((n for n, dst, got in pieces if not torch.equal(dst, got)), None)

    def _gathered(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The engine's per-expert pieces and the same pieces freshly gathered, apart."""
        got = torch.empty_like(self.dst)
        dist.all_gather_into_tensor(got, self.src, group=self.group)
        n = len(self.names)
        return self.dst.chunk(n), got.chunk(n)


@dataclass
class DirectCopies:
    """Pairs of views (engine piece, megatron piece), the gathered ones, and the megatron
    tensors left over for the engine's loader."""

    dst: list[torch.Tensor] = field(default_factory=list)
    src: list[torch.Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # the megatron tensor of each pair
    remaining: list[str] = field(default_factory=list)
    gather: _GatherStage | None = None
    experts: list[_ExpertGather] = field(default_factory=list)  # gathered over training EP
    runs: CopyRuns | None = None  # the pairs as copied when no filter is given

    @property
    def planned(self) -> set[str]:
        """The megatron tensors synced by direct copies (gathered ones included)."""
        gathered = [n for b in self.gather.buckets for n in b.names] if self.gather else []
        experts = [n for g in self.experts for n in g.names]
        return set(self.names) | set(gathered) | set(experts)

    @property
    def nbytes(self) -> int:
        """Bytes written into the engine per sync (gathered tensors included)."""
        pairs = (
            self.src + [t for b in self.gather.buckets for t in b.dst] if self.gather else self.src
        )
        pairs = pairs + [g.dst for g in self.experts]
        return sum(t.nbytes for t in pairs)

    @torch.no_grad()
    def copy(self, keep: Callable[[str], bool] | None = None) -> None:
        """Every pair (or those whose megatron name `keep` accepts), then each gathered bucket's
        (the gathers run regardless: they are collectives)."""
        if keep is None:
            (self.runs or CopyRuns.plan(self.dst, self.src)).copy()
        else:
            _copy_pairs(self.dst, self.src, self.names, keep)
        if self.gather is not None:
            if keep is None:
                self.gather.run(lambda b: (b.runs or CopyRuns.plan(b.dst, b.src)).copy())
            else:
                self.gather.run(lambda b: _copy_pairs(b.dst, b.src, b.names, keep))
        for layer in self.experts:
            layer.run(keep)

    @torch.no_grad()
    def first_mismatch(self) -> str | None:
        """The first megatron tensor whose engine pieces differ from it (None: all equal)."""
        found = _mismatch(self.dst, self.src, self.names)
        if self.gather is not None:
            gathered: list[str] = []
            self.gather.run(lambda b: gathered.append(_mismatch(b.dst, b.src, b.names)))
            found = found or next((n for n in gathered if n), None)
        for layer in self.experts:  # every EP rank gathers, whatever it found so far
            differs = layer.mismatch()
            found = found or differs
        return found


BIG_COPY_BYTES = 4 * 2**20
"""A run this large gets its own `copy_` (the device's full copy bandwidth, and its launch is
shorter than the copy); smaller contiguous runs share one `torch._foreach_copy_` launch."""


@dataclass
class CopyRuns:
    """The pairs as one sync copies them, in as few launches as their layouts allow.

    Pairs are merged while both sides agree: pieces back to back in one storage become one flat
    piece (a fused gate/up block), and equally shaped pieces at an even spacing in one storage
    become one strided view with a leading dimension (megatron's per-group QKV rows into the
    engine's q, k, v blocks; every expert's share of the gate and up rows into an engine TP
    rank's stacked w13). Every expert of a layer into an engine that holds them all is one flat
    piece per tensor: the grouped experts stack them as vLLM does.

    On CUDA every contiguous piece (a strided view as the pieces it covers) goes into one
    launch of copy_kernel.RangeCopy, checked at its first copy to write every piece (if it
    cannot, a warning says why and torch copies those pieces from then on); what it cannot
    take (a cast, an unaligned piece), and everything on CPU or without Triton, is copied by
    torch: runs of `BIG_COPY_BYTES` or more get one `copy_` each, the small rest share one
    `_foreach_copy_` (a small strided view as the pieces it covers: alone it would cost a launch
    of its own). On an H200 the whole sync ran at 1.06–1.09× one contiguous copy of the same
    bytes with the kernel, 1.52–1.92× by that torch path (bench_swap)."""

    big: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    small_dst: list[torch.Tensor] = field(default_factory=list)
    small_src: list[torch.Tensor] = field(default_factory=list)
    ranges: RangeCopy | None = None
    ranges_checked: bool = False

    @classmethod
    def plan(
        cls, dst: list[torch.Tensor], src: list[torch.Tensor], one_launch: bool | None = None
    ) -> CopyRuns:
        """Cut while both sides hold memory (views of a released buffer all look alike).
        `one_launch`: take RangeCopy for what it fits (default: where `copy_kernel.usable`)."""
        runs, ranged = cls(), []
        if one_launch is None:
            one_launch = bool(dst) and copy_kernel.usable(dst[0].device)
        for d, s, parts in merge_pairs(list(zip(dst, src, strict=True))):
            if one_launch and RangeCopy.fits(d, s):
                ranged.append((d, s))
            elif one_launch and all(RangeCopy.fits(*p) for p in parts):
                ranged += parts
            elif d.nbytes >= BIG_COPY_BYTES:
                runs.big.append((d, s))
            elif d.is_contiguous() and s.is_contiguous():
                runs.small_dst.append(d)
                runs.small_src.append(s)
            else:
                runs.small_dst += [p[0] for p in parts]
                runs.small_src += [p[1] for p in parts]
        if ranged:
            runs.ranges = RangeCopy(ranged)
        return runs

    @property
    def launches(self) -> int:
        return len(self.big) + bool(self.small_dst) + bool(self.ranges)

    def copy(self) -> None:
        # The kernel and the foreach first: the device works through them while the host queues
        # the big copies.
        if self.ranges is not None and self.ranges_checked:
            self.ranges.copy()
        elif self.ranges is not None:
            failed = self.ranges.copy_checked()
            self.ranges_checked = True
            if failed:
                log.warning("weight sync: the one-launch range copy is off (%s)", failed)
                self.small_dst += [d for d, _ in self.ranges.pairs]
                self.small_src += [s for _, s in self.ranges.pairs]
                self.ranges = None
        if self.small_dst:
            torch._foreach_copy_(self.small_dst, self.small_src)
        for d, s in self.big:
            d.copy_(s)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    ptr = a.untyped_storage().data_ptr()
    return ptr != 0 and ptr == b.untyped_storage().data_ptr() and a.dtype == b.dtype


def _follows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`b` starts where `a` ends, in the same storage, both contiguous."""
    return (
        a.is_contiguous()
        and b.is_contiguous()
        and _same_storage(a, b)
        and a.storage_offset() + a.numel() == b.storage_offset()
    )


def _back_to_back(tensors: list[torch.Tensor]) -> bool:
    """All contiguous, each starting where the one before it ends (`_follows`)."""
    return tensors[0].is_contiguous() and all(
        _follows(a, b) for a, b in itertools.pairwise(tensors)
    )


def _flat_span(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One flat view from `a`'s first element to `b`'s last (`_follows(a, b)`)."""
    return a.as_strided((a.numel() + b.numel(),), (1,), a.storage_offset())


def _next_in_stack(stack: torch.Tensor, step: int, count: int, b: torch.Tensor) -> bool:
    """`b` is shaped like one of `count` pieces spaced `step` apart from `stack`'s start."""
    elem = stack if count == 1 else stack[0]
    return (
        _same_storage(stack, b)
        and b.shape == elem.shape
        and b.stride() == elem.stride()
        and b.storage_offset() == stack.storage_offset() + count * step
    )


def _stacked(first: torch.Tensor, step: int, count: int) -> torch.Tensor:
    elem = first if count == 1 else first[0]
    return first.as_strided(
        (count + 1, *elem.shape), (step, *elem.stride()), first.storage_offset()
    )


def merge_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """`pairs` (engine piece, megatron piece) merged where both sides allow it: flat spans of
    back-to-back pieces, then stacks of evenly spaced ones, again until nothing merges (stacks
    of stacks: an expert's gate and up rows, then all experts). A merged view covers exactly
    the elements of the pieces it replaces, in the same order on both sides. Yields
    (engine view, megatron view, the pairs it covers)."""
    items = [(d, s, [(d, s)]) for d, s in pairs]
    while True:
        merged = _merge_once(_merge_once(items, stack=False), stack=True)
        if len(merged) == len(items):
            return merged
        items = merged


def _merge_once(items, stack: bool):
    out: list[list] = []  # [dst, src, covered pairs, count, dst step, src step]
    for d, s, parts in items:
        if out:
            pd, ps, pparts, count, dstep, sstep = out[-1]
            if not stack and _follows(pd, d) and _follows(ps, s):
                out[-1] = [_flat_span(pd, d), _flat_span(ps, s), pparts + parts, 1, 0, 0]
                continue
            if stack and count == 1:  # a second piece sets the spacing
                dstep = d.storage_offset() - pd.storage_offset()
                sstep = s.storage_offset() - ps.storage_offset()
            if (
                stack
                and dstep > 0  # as_strided takes no negative strides
                and sstep > 0
                and _next_in_stack(pd, dstep, count, d)
                and _next_in_stack(ps, sstep, count, s)
            ):
                out[-1] = [
                    _stacked(pd, dstep, count),
                    _stacked(ps, sstep, count),
                    pparts + parts,
                    count + 1,
                    dstep,
                    sstep,
                ]
                continue
        out.append([d, s, parts, 1, 0, 0])
    return [(d, s, parts) for d, s, parts, *_ in out]


def _copy_pairs(dst, src, names, keep) -> None:
    if keep is not None:
        chosen = [i for i, n in enumerate(names) if keep(n)]
        dst, src = [dst[i] for i in chosen], [src[i] for i in chosen]
    if dst:
        torch._foreach_copy_(dst, src)


def _mismatch(dst, src, names) -> str | None:
    return next((n for n, d, s in zip(names, dst, src, strict=True) if not torch.equal(d, s)), None)


# A buffer whose memory comes and goes while the tensor, and every view of it, stays valid
# (AllGatherPPModel's foreign stages use the same pair).
def regrow_storage(buf: torch.Tensor) -> None:
    """Give a released buffer its memory back (contents undefined); no-op when it has it."""
    if buf.untyped_storage().size() == 0:
        buf.untyped_storage().resize_(buf.numel() * buf.element_size())


def release_storage(buf: torch.Tensor) -> torch.Tensor:
    """Free the buffer's memory, keeping the tensor (and its views) for a later regrow."""
    buf.untyped_storage().resize_(0)
    return buf


def engine_target(
    hf_name: str, params: dict[str, torch.Tensor], packed: dict[str, list[str]]
) -> tuple[str, int, int] | None:
    """(engine parameter, position among its packed members, member count) of an HF tensor."""
    if hf_name in params:
        return hf_name, 0, 1
    module_path, _, kind = hf_name.rpartition(".")  # 'model.layers.0.self_attn.q_proj', 'weight'
    parent, _, module = module_path.rpartition(".")
    for fused, members in packed.items():
        name = f"{parent}.{fused}.{kind}" if parent else f"{fused}.{kind}"
        if module in members and name in params:
            return name, list(members).index(module), len(members)
    return None


def _tile(dst: torch.Tensor, srcs: list[torch.Tensor], dim: int):
    """`srcs` paired with consecutive blocks of `dst` along `dim`; None unless they tile `dst`
    exactly (same other dims, dtype and device)."""
    pairs, start = [], 0
    for s in srcs:
        same = s.dim() == dst.dim() and all(
            s.shape[d] == dst.shape[d] for d in range(dst.dim()) if d != dim
        )
        if not same or s.dtype != dst.dtype or s.device != dst.device:
            return None
        pairs.append((dst.narrow(dim, start, s.shape[dim]), s))
        start += s.shape[dim]
    return pairs if start == dst.shape[dim] else None


def _first_rows(blocks: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    out = []
    for b in blocks:
        if n <= 0:
            break
        out.append(b[:n])
        n -= b.shape[0]
    return out


def plan_tensor(
    megatron_name: str,
    shards: list[torch.Tensor],
    args: ModelArgs,
    params: dict[str, torch.Tensor],
    packed: dict[str, list[str]],
    engine_tp: int,
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The (engine view, shard view) pairs that fill this tensor's engine pieces from
    `shards`, the training TP shards that make up the engine rank's slice, in TP order (one
    shard at equal TP); None when they do not tile the engine's parameters."""
    rule, hf_names = lookup(weight_map(args), megatron_name)
    layout = LAYOUTS[rule.layout]
    per_shard = [layout.local_rows(s.detach(), args) for s in shards]
    blocks = [[b for rows in per_shard for b in rows[i]] for i in range(len(hf_names))]
    # Each engine parameter's HF tensors, in its packed order; all members must be here.
    by_param: dict[str, dict[int, list[torch.Tensor]]] = {}
    sizes: dict[str, int] = {}
    for hf_name, rows in zip(hf_names, blocks, strict=True):
        target = engine_target(hf_name, params, packed)
        if target is None:
            return None
        name, position, count = target
        by_param.setdefault(name, {})[position] = rows
        sizes[name] = count
    pairs = []
    for name, members in by_param.items():
        if len(members) != sizes[name]:
            return None  # a packed parameter this tensor fills only in part
        dst = params[name]
        srcs = [block for _, rows in sorted(members.items()) for block in rows]
        if rule.layout == "vocab" and dst.shape[0] != sum(b.shape[0] for b in srcs):
            if engine_tp != 1:
                return None  # the two sides pad the vocab differently: the TP splits differ
            # Engine TP 1: the real rows; neither side's padding rows are ever read.
            dst, srcs = dst[: args.vocab_size], _first_rows(srcs, args.vocab_size)
        found = _tile(dst, srcs, layout.split_dim)
        if found is None:
            return None
        pairs += found
    return pairs


def plan_direct_copies(
    named_shards: Iterable[tuple[str, torch.Tensor]],
    args: ModelArgs,
    params: dict[str, torch.Tensor],
    packed: dict[str, list[str]],
    train_tp: int,
    engine_tp: int,
    tp_group=None,
    tp_rank: int = 0,
    bucket_mb: float = 256,
    ep_size: int = 1,
    ep_group=None,
    engine_ep: bool = False,
) -> DirectCopies:
    """Direct copies for every tensor of `named_shards` (megatron names under global layer
    and expert numbering, this rank's TP shards) that maps onto `params`; the rest in
    `remaining`.

    Decided from names and shapes alone, so every rank of a TP group plans alike. Gathered
    copies need `tp_group` (training TP) and this rank's `tp_rank` in it. Under training EP
    (`ep_size` > 1) this rank holds only its share of the experts while the engine holds all
    of them: with `ep_group` each layer's experts are gathered over EP into the engine's stack
    (`_ExpertGather`) where the layouts allow; the rest, and all of them without `ep_group`,
    stay with the loader, whose stream gathers them over EP. `engine_ep`: the engine's ranks
    hold whole experts, some each (`_plan_engine_experts`); decided with every rank."""
    plan = DirectCopies()
    can_gather = tp_group is not None and train_tp > engine_tp > 0 and train_tp % engine_tp == 0
    to_gather: list[tuple[str, torch.Tensor]] = []
    local_experts: list[tuple[str, torch.Tensor]] = []
    for name, shard in named_shards:
        if name == "output_layer.weight" and args.tie_word_embeddings:
            continue  # the engine ties it to the embedding, which is copied
        if (engine_ep or ep_size > 1) and split_layer(name)[2] is not None:
            local_experts.append((name, shard))
            continue
        replicated = not LAYOUTS[lookup(weight_map(args), name)[0].layout].gathered
        if replicated or train_tp == engine_tp:
            pairs = plan_tensor(name, [shard], args, params, packed, engine_tp)
        elif can_gather and (not to_gather or shard.dtype == to_gather[0][1].dtype):
            to_gather.append((name, shard))
            continue
        else:
            pairs = None
        if pairs is None:
            plan.remaining.append(name)
            continue
        for dst, src in pairs:
            plan.dst.append(dst)
            plan.src.append(src)
            plan.names.append(name)
    if to_gather:
        k = train_tp // engine_tp
        needed = range(tp_rank % engine_tp * k, (tp_rank % engine_tp + 1) * k)
        plan.gather = _plan_gather(
            to_gather, args, params, packed, train_tp, engine_tp, needed, tp_group, bucket_mb
        )
        planned = {n for b in plan.gather.buckets for n in b.names}
        plan.remaining += [n for n, _ in to_gather if n not in planned]
    if engine_ep:
        pairs = _plan_engine_experts(local_experts, args, params, packed)
        for dst, src, name in pairs if pairs is not None else []:
            plan.dst.append(dst)
            plan.src.append(src)
            plan.names.append(name)
        if pairs is None:
            plan.remaining += [n for n, _ in local_experts]
        local_experts = []
    if local_experts and ep_group is not None:
        plan.experts = _plan_expert_gathers(
            local_experts, args, params, packed, engine_tp, ep_group
        )
    gathered = {n for g in plan.experts for n in g.names}
    plan.remaining += [n for n, _ in local_experts if n not in gathered]
    plan.runs = CopyRuns.plan(plan.dst, plan.src)
    return plan


ENGINE_EXPERT = re.compile(r"\.experts\.\d+\.(gate_up_proj|down_proj)\.weight$")
"""The per-expert pieces `rollout.base.experts_by_name` adds to an engine's parameters."""


def _plan_engine_experts(
    experts: list[tuple[str, torch.Tensor]], args, params, packed
) -> list[tuple[torch.Tensor, torch.Tensor, str]] | None:
    """(engine piece, training tensor, name) for every expert this rank holds in training that
    the engine rank holds too, each whole on both sides; experts the engine rank does not hold
    are another engine rank's and need nothing here. None, on every rank alike, unless each
    rank's pairs fill every expert piece its engine rank holds: then all experts go to the
    loader (its stream gathers them, a collective every rank must join)."""
    hf_names = weight_map(args)
    pairs, filled = [], set()
    ok = True
    for name, shard in experts:
        targets = [engine_target(h, params, packed) for h in lookup(hf_names, name)[1]]
        if all(t is None for t in targets):
            continue  # another engine rank's expert
        found = plan_tensor(name, [shard], args, params, packed, 1)
        if found is None:
            ok = False
            break
        pairs += [(dst, src, name) for dst, src in found]
        filled.update(t[0] for t in targets if t is not None)
    ok = ok and all(n in filled for n in params if ENGINE_EXPERT.search(n))
    device = experts[0][1].device if experts else next(iter(params.values())).device
    agreed = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return pairs if agreed.item() else None


def _plan_expert_gathers(
    local_experts, args, params, packed, engine_tp, group
) -> list[_ExpertGather]:
    """One `_ExpertGather` per MoE layer's fc1 and fc2 whose layouts allow it, agreed by every
    rank of `group` (each gather is a collective: a tensor gathered by some ranks and streamed
    by others would hang the sync)."""
    tensors: dict[tuple[str, int], list[tuple[int, torch.Tensor]]] = {}
    for name, shard in local_experts:
        pattern, layer, expert = split_layer(name)
        tensors.setdefault((pattern, layer), []).append((expert, shard))
    found = [
        _plan_expert_gather(pattern, layer, members, args, params, packed, engine_tp, group)
        for (pattern, layer), members in tensors.items()
    ]
    device = local_experts[0][1].device
    agreed = torch.tensor([g is not None for g in found], dtype=torch.int32, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    return [g for g, ok in zip(found, agreed.tolist(), strict=True) if g is not None and ok]


def _plan_expert_gather(
    pattern, layer, members, args, params, packed, engine_tp, group
) -> _ExpertGather | None:
    """This rank's L experts of one layer's fc1 (or fc2), numbered r·L … r·L + L - 1 on EP
    rank r, lying back to back; every expert of the layer (this rank's tensors as the shape for
    the others') mapping onto engine pieces that lie back to back in expert order, each
    expert's pieces covering its tensor in order: then one all-gather fills the engine."""
    members = sorted(members, key=lambda m: m[0])
    shards = [s for _, s in members]
    count, first = len(shards), members[0][0]
    if (
        engine_tp != 1  # an engine TP rank holds a slice of each expert
        or [e for e, _ in members] != list(range(first, first + count))
        or first != dist.get_rank(group) * count
        or not _back_to_back(shards)
    ):
        return None
    shape_of, numel = shards[0], shards[0].numel()
    names = [pattern.format(i=layer, e=e) for e in range(count * dist.get_world_size(group))]
    pieces = []
    for name in names:
        pairs = plan_tensor(name, [shape_of], args, params, packed, engine_tp)
        if pairs is None:
            return None
        srcs = [src for _, src in pairs]  # must cover the tensor in order, unchanged
        if not (
            _same_storage(srcs[0], shape_of)
            and srcs[0].storage_offset() == shape_of.storage_offset()
            and _back_to_back(srcs)
            and sum(s.numel() for s in srcs) == numel
        ):
            return None
        pieces += [dst for dst, _ in pairs]
    if not _back_to_back(pieces):
        return None
    first_dst = pieces[0]
    dst = first_dst.as_strided((len(names) * numel,), (1,), first_dst.storage_offset())
    src = shape_of.as_strided((count * numel,), (1,), shape_of.storage_offset())
    return _ExpertGather(group, dst, src, names)


def _plan_gather(
    to_gather, args, params, packed, train_tp, engine_tp, needed, group, bucket_mb
) -> _GatherStage:
    """Buckets of at most `bucket_mb` MiB (a larger tensor alone) sharing one send buffer and
    one receive buffer (train_tp times as large), sized for the largest bucket; `needed` are
    the training TP ranks whose shards make up this rank's engine slice."""
    limit = max(int(bucket_mb * 2**20) // to_gather[0][1].element_size(), 1)
    groups, current, size = [], [], 0
    for name, shard in to_gather:
        if current and size + shard.numel() > limit:
            groups.append(current)
            current, size = [], 0
        current.append((name, shard))
        size += shard.numel()
    groups.append(current)
    largest = max(sum(s.numel() for _, s in g) for g in groups)
    ref = to_gather[0][1]
    # Views are cut while the buffers hold memory (a view of an empty storage is refused).
    send = torch.empty(largest, dtype=ref.dtype, device=ref.device)
    recv = torch.empty(train_tp * largest, dtype=ref.dtype, device=ref.device)
    buckets = []
    for members in groups:
        numel = sum(s.numel() for _, s in members)
        bucket = _Bucket(numel, [], [])
        offset = 0
        for name, shard in members:
            n = shard.numel()
            bucket.pack_dst.append(send[offset : offset + n].view(shard.shape))
            bucket.pack_src.append(shard.detach())
            gathered = [
                recv[r * numel + offset : r * numel + offset + n].view(shard.shape) for r in needed
            ]
            offset += n
            pairs = plan_tensor(name, gathered, args, params, packed, engine_tp)
            for dst, src in pairs or []:
                bucket.dst.append(dst)
                bucket.src.append(src)
                bucket.names.append(name)
        # torch's copies: the gathered views point into buffers regrown at every sync, where a
        # range table would be rebuilt every time
        bucket.runs = CopyRuns.plan(bucket.dst, bucket.src, one_launch=False)
        buckets.append(bucket)
    return _GatherStage(group, release_storage(send), release_storage(recv), buckets)


# ---- full HF tensors (FSDP2: every rank gathers each whole tensor) ----------------------------
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")
"""HF tensors an engine may pad in rows (vLLM pads the vocabulary to a multiple of 64)."""


def plan_full_tensor_copies(
    shapes: dict[str, torch.Size],
    params: dict[str, torch.Tensor],
    packed: dict[str, list[str]],
) -> dict[str, torch.Tensor]:
    """For a TP-1 engine: HF name -> the engine view a whole HF tensor of that name fills
    (a block of rows of a packed parameter, the real rows of a padded vocabulary). Names that
    do not map (a packed parameter some of whose members are absent, a shape that disagrees)
    are left out: the engine's loader takes them."""
    members: dict[str, dict[int, str]] = {}
    counts: dict[str, int] = {}
    for name in shapes:
        target = engine_target(name, params, packed)
        if target is not None:
            engine_name, position, counts[engine_name] = target
            members.setdefault(engine_name, {})[position] = name
    plan = {}
    for engine_name, by_position in members.items():
        dst, count = params[engine_name], counts[engine_name]
        if len(by_position) != count or dst.dim() == 0:
            continue  # a packed parameter whose members are not all HF tensors here
        start, views = 0, {}
        for _, name in sorted(by_position.items()):
            rows = shapes[name][0]
            views[name] = dst.narrow(0, start, rows)
            start += rows
        padded = count == 1 and name.endswith(VOCAB_TENSORS) and start <= dst.shape[0]
        if start != dst.shape[0] and not padded:
            continue
        if all(v.shape == shapes[n] for n, v in views.items()):
            plan.update(views)
    return plan
