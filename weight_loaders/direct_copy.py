"""Direct weight copies: a rank's megatron shards straight into a rollout engine's parameters.

The general sync (stream.py) gathers every tensor over training TP, converts it to HF layout and
hands it to the engine's loader, which slices it again for the engine's TP: one Python call
chain per tensor, every iteration. When the engine is sharded like megatron (same TP, the HF
row order inside each of its parameters), most of that is a fixed mapping from a piece of one
megatron shard to a piece of one engine parameter. This module computes that mapping once, as
two lists of views, and each later sync is one `torch._foreach_copy_`:

- replicated tensors (norms) map for any pair of TP sizes;
- row, column and fused gate/up tensors map block for block at equal TP;
- megatron's per-group interleaved QKV maps as three contiguous blocks per query group;
- the vocab maps at TP 1 (the real rows) or when both sides pad the vocab alike.

What does not map (different TP sizes, different vocab padding, an engine parameter whose shape
disagrees) stays with the engine's loader. An engine describes its parameters by name, plus the
fused ("packed") modules that stack several HF modules (vLLM's `packed_modules_mapping`, e.g.
qkv_proj = [q_proj, k_proj, v_proj]); packed or not, each engine parameter holds its HF
tensors' rows for its TP rank, concatenated.

Written by hand because no library maps megatron's layouts onto another engine's parameters;
the views stay valid as long as both sides keep their storage (megatron's DDP buffers and
AllGatherPPModel's stage buffers do; so do vLLM's parameters across sleep and wake).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from tandem_core.models import ModelArgs
from weight_loaders.core import get_arch, lookup
from weight_loaders.transforms import LAYOUTS


@dataclass
class DirectCopies:
    """Pairs of views (engine piece, megatron piece), and the megatron tensors left over."""

    dst: list[torch.Tensor] = field(default_factory=list)
    src: list[torch.Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # the megatron tensor of each pair
    remaining: list[str] = field(default_factory=list)  # megatron names for the engine's loader

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.src)

    @torch.no_grad()
    def copy(self, keep: Callable[[str], bool] | None = None) -> None:
        """Every pair (or those whose megatron name `keep` accepts): one fused copy."""
        if keep is None:
            dst, src = self.dst, self.src
        else:
            chosen = [i for i, n in enumerate(self.names) if keep(n)]
            dst, src = [self.dst[i] for i in chosen], [self.src[i] for i in chosen]
        if dst:
            torch._foreach_copy_(dst, src)

    def first_mismatch(self) -> str | None:
        """The first megatron tensor whose engine pieces differ from it (None: all equal)."""
        for name, d, s in zip(self.names, self.dst, self.src, strict=True):
            if not torch.equal(d, s):
                return name
        return None


def _engine_target(
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


def _row_pairs(dst: torch.Tensor, srcs: list[torch.Tensor]):
    """`srcs` paired with consecutive row blocks of `dst`; None unless they tile `dst` exactly
    (same trailing shape, dtype and device)."""
    pairs, start = [], 0
    for s in srcs:
        if s.shape[1:] != dst.shape[1:] or s.dtype != dst.dtype or s.device != dst.device:
            return None
        pairs.append((dst[start : start + s.shape[0]], s))
        start += s.shape[0]
    return pairs if start == dst.shape[0] else None


def plan_tensor(
    megatron_name: str,
    shard: torch.Tensor,
    args: ModelArgs,
    params: dict[str, torch.Tensor],
    packed: dict[str, list[str]],
    train_tp: int,
    engine_tp: int,
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The (engine view, shard view) pairs that fill this tensor's engine pieces, or None when
    they are not a fixed local mapping."""
    rule, hf_names = lookup(get_arch(args.arch).weight_map, megatron_name)
    if rule.layout != "replicated" and train_tp != engine_tp:
        return None
    blocks = LAYOUTS[rule.layout].local_rows(shard.detach(), args)
    # Each engine parameter's HF tensors, in its packed order; all members must be here.
    by_param: dict[str, dict[int, list[torch.Tensor]]] = {}
    sizes: dict[str, int] = {}
    for hf_name, rows in zip(hf_names, blocks, strict=True):
        target = _engine_target(hf_name, params, packed)
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
        if rule.layout == "vocab" and dst.shape[0] != srcs[0].shape[0]:
            if train_tp != 1:
                return None  # the two sides pad the vocab differently: the TP splits differ
            # TP 1: the real rows; neither side's padding rows are ever read.
            dst, srcs = dst[: args.vocab_size], [srcs[0][: args.vocab_size]]
        found = _row_pairs(dst, srcs)
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
) -> DirectCopies:
    """Direct copies for every tensor of `named_shards` (megatron names under global layer
    numbering, this rank's TP shards) that maps onto `params`; the rest in `remaining`.

    Decided from names and shapes alone, so every rank of a TP group plans alike."""
    plan = DirectCopies()
    for name, shard in named_shards:
        if name == "output_layer.weight" and args.tie_word_embeddings:
            continue  # the engine ties it to the embedding, which is copied
        pairs = plan_tensor(name, shard, args, params, packed, train_tp, engine_tp)
        if pairs is None:
            plan.remaining.append(name)
            continue
        for dst, src in pairs:
            plan.dst.append(dst)
            plan.src.append(src)
            plan.names.append(name)
    return plan
