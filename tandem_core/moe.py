"""MoE experts for megatron-core that run all local experts with torch's grouped matmul.

megatron's MoE layer computes its routed experts with one of three modules: `SequentialMLP`
(a Python loop over the experts, one pair of GEMMs each), `GroupedMLP` (needs the
`grouped_gemm` CUDA extension and bf16) and `TEGroupedMLP` (needs transformer-engine). Neither
extension exists on Tandem's machines, and no library we keep runs grouped experts without
them; `torch._grouped_mm` (torch >= 2.11: the CUTLASS bf16 kernel on CUDA, with a slower
fallback for fp32; a reference kernel on CPU, bf16 and fp32) does the same job.
`TorchGroupedMLP` plugs it into megatron's `GroupedMLP`, keeping that class's attributes and
distributed-checkpoint format, so a checkpoint saved with `SequentialMLP` experts loads into it
and back.

Use it in the `experts` slot of megatron's MoE layer spec, e.g.
`get_gpt_layer_local_spec(num_experts=n, moe_grouped_gemm=True)` with the experts
`ModuleSpec(module=GroupedMLP)` replaced by `ModuleSpec(module=TorchGroupedMLP)`.

Parameter layout (`E` local experts, `f = moe_ffn_hidden_size / expert TP`, `h` hidden): each
expert's weights as `torch.nn.Linear` holds them, stacked expert after expert.
- `weight1` [E * 2f, h] (GLU) or [E * f, h]: rows j*2f:(j+1)*2f are expert j's fc1, i.e.
  `SequentialMLP`'s `local_experts.j.linear_fc1.weight` ([gate; up] on this expert-TP rank).
- `weight2` [E * h, f]: rows j*h:(j+1)*h are expert j's fc2, `local_experts.j.linear_fc2.weight`.
This is HF's per-expert layout and vLLM's fused `w13` [E, 2f, h] / `w2` [E, h, f], so a weight
sync copies a layer's experts as one contiguous block. megatron's `GroupedMLP` keeps the
transposes ([h, E * 2f], [E * f, h]), which made every expert a transposing copy of its own;
its checkpoint factories are reused here with the layouts converted at their ends. The grouped
GEMMs take [K, N] right-hand sides, so the forward passes transposed views: torch's grouped GEMM
reads column-major right-hand sides, and its backward writes their gradients in the parameter's
own layout (no transposing copy of the expert gradients).
`sequential_to_grouped` / `grouped_to_sequential` move one layer's weights between the two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe import experts as megatron_experts
from megatron.core.transformer.moe import token_dispatcher as megatron_dispatch
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.moe.router_replay import RouterReplayAction
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from tandem_core import distributed as D

# torch's grouped GEMMs (CPU and CUDA) demand 16-byte aligned row strides.
_ALIGN_BYTES = 16


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def expert_blocks(grouped: TorchGroupedMLP) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of `weight1` as [E, fc1 width, h] and `weight2` as [E, h, f]: expert j's fc1 and
    fc2 weights as `torch.nn.Linear` (and SequentialMLP) holds them."""
    n = grouped.num_local_experts
    w1, w2 = grouped.weight1, grouped.weight2
    return w1.view(n, -1, w1.shape[1]), w2.view(n, -1, w2.shape[1])


def expert_weights(grouped: TorchGroupedMLP) -> tuple[torch.Tensor, torch.Tensor]:
    """Per local expert, the right-hand sides of its fc1 and fc2 GEMMs, [E, h, fc1 width] and
    [E, f, h]: the blocks of `expert_blocks` transposed (views), which is GroupedMLP's layout."""
    n = grouped.num_local_experts
    return _to_grouped_layout(grouped.weight1, n), _to_grouped_layout(grouped.weight2, n)


# GroupedMLP's parameters are nominally [h, E * w] (weight1) and [E * f, h] (weight2), and hold
# per-expert blocks [h, w] / [f, h] one after the other in memory (its forward views them as
# [E, h, w] / [E, f, h]). TorchGroupedMLP holds each block transposed; these three move between.
def _grouped_blocks(t: torch.Tensor, n: int, hidden: int, fc1: bool) -> torch.Tensor:
    """GroupedMLP's per-expert blocks of `t`: [E, h, w] for weight1, [E, f, h] for weight2."""
    return t.view(n, hidden, -1) if fc1 else t.view(n, -1, hidden)


def _from_grouped_layout(t: torch.Tensor, n: int, hidden: int, fc1: bool) -> torch.Tensor:
    """A tensor in GroupedMLP's layout, copied into TorchGroupedMLP's ([E * w, h] / [E * h, f])."""
    blocks = _grouped_blocks(t, n, hidden, fc1).transpose(1, 2)
    return blocks.reshape(-1, blocks.shape[-1])


def _to_grouped_layout(t: torch.Tensor, n: int) -> torch.Tensor:
    """A TorchGroupedMLP-shaped tensor (a parameter or an optimizer state) as the [E, h, w] /
    [E, f, h] view of GroupedMLP's blocks, without a copy: what its checkpoint factories `view`
    a parameter as before transposing it to the per-expert checkpoint tensors."""
    return t.view(n, -1, t.shape[1]).transpose(1, 2)


def fix_router_without_te() -> None:
    """Let megatron's MoE router run without transformer-engine (idempotent, a no-op with TE).

    megatron-core 0.16.1's `router_gating_linear` tests `te_general_gemm is not None`, but
    `moe_utils` binds that name only when transformer-engine imports: without TE every MoE
    forward (SequentialMLP's too) dies of a NameError. None is the value the check expects, and
    selects its plain `torch.mm` path. Call it before running a MoE layer.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `_grouped_mm`'s
    backward rejects strided gradients such as the expanded one of `out.sum()`."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # An empty tensor counts as contiguous whatever its strides, so T = 0 gets a fresh one.
        return grad.contiguous() if grad.numel() else grad.new_zeros(grad.shape)


@contextlib.contextmanager
def _grouped_gemm_check_skipped():
    """GroupedMLP.__init__ asserts that the `grouped_gemm` extension imports, though only its
    own forward (replaced below) uses it. The assert is a no-op for the duration of the
    constructor only, then restored."""
    gg = megatron_experts.gg
    saved = gg.assert_grouped_gemm_is_available
    gg.assert_grouped_gemm_is_available = lambda: None
    try:
        yield
    finally:
        gg.assert_grouped_gemm_is_available = saved


class TorchGroupedMLP(GroupedMLP):
    """megatron's `GroupedMLP` (same parameters, attributes and `sharded_state_dict`) with a
    forward through `torch._grouped_mm`: one GEMM for every local expert's fc1, one for fc2.

    The forward follows megatron's `MLP` as each expert of `SequentialMLP` runs it: fc1, GLU
    (`act(gate) * (up + glu_linear_offset)`, with `activation_func_clamp_value`), times the
    router probability, cast back, fc2; on CUDA with `bias_activation_fusion` and SwiGLU the
    same fused weighted-SwiGLU kernel as `MLP`. Its bf16-only assert is not inherited (the
    forward is replaced), so fp32 works. Where the grouped kernel cannot run (no
    `torch._grouped_mm`, or widths whose rows are not 16-byte aligned) it loops over the
    experts instead.
    """

    def __init__(self, num_local_experts, config, submodules=None, pg_collection=None):
        # `submodules` is accepted so that the class can replace SequentialMLP in a spec that
        # carries its MLPSubmodules; the experts here have no submodules.
        del submodules
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        with _grouped_gemm_check_skipped():
            super().__init__(num_local_experts, config, pg_collection=pg_collection)
        # GroupedMLP initialised its transposed blocks; the same values, each block transposed
        # (module docstring), with its tensor attributes. The expert-TP slices now run along
        # the other axis.
        for name, fc1 in (("weight1", True), ("weight2", False)):
            old = getattr(self, name)
            new = _from_grouped_layout(old.data, num_local_experts, config.hidden_size, fc1)
            new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
            new.__dict__.update(old.__dict__)
            if hasattr(old, "partition_dim"):
                new.partition_dim = 1 - old.partition_dim
            setattr(self, name, new)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """GroupedMLP's checkpoint tensors (per-expert, SequentialMLP's keys and shapes): its
        factories, handed this module's parameters (and optimizer states, which go through the
        same factories) as the views of its own layout, and merging back into this layout."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        n, hidden = self.num_local_experts, self.config.hidden_size

        def build(key, t, replica_id, flattened_range, *, parent):
            if flattened_range is None:  # GroupedMLP's factories build whole tensors only
                t = _to_grouped_layout(t, n)
            return parent(key, t, replica_id, flattened_range)

        def merge(sub_state_dict, *, parent, fc1):
            return _from_grouped_layout(parent(sub_state_dict), n, hidden, fc1)

        for name, fc1 in (("weight1", True), ("weight2", False)):
            factory = state[f"{prefix}{name}"]
            state[f"{prefix}{name}"] = dataclasses.replace(
                factory,
                build_fn=functools.partial(build, parent=factory.build_fn),
                merge_fn=functools.partial(merge, parent=factory.merge_fn, fc1=fc1),
            )
        return state

    @property
    def use_grouped_mm(self) -> bool:
        """Whether the grouped kernel can run: read at each forward, since megatron's
        Float16Module casts the weights to bf16 after construction (halving the byte widths)."""
        n, size = self.num_local_experts, self.weight1.element_size()
        widths = (self.config.hidden_size, self.weight1.shape[0] // n, self.weight2.shape[1])
        return grouped_mm_available() and all(w * size % _ALIGN_BYTES == 0 for w in widths)

    def _activation_with_probs(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """megatron MLP's activation and per-token scaling (mlp.py), probs [T, 1]."""
        config = self.config
        if config.bias_activation_fusion and config.gated_linear_unit:
            if config.activation_func is not F.silu:
                raise ValueError("bias_activation_fusion with GLU experts supports SwiGLU only")
            from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

            return weighted_bias_swiglu_impl(x, None, probs, config.activation_func_fp8_input_store)
        dtype = x.dtype
        if config.gated_linear_unit:
            x_glu, x_linear = torch.chunk(x, 2, dim=-1)
            if (val := config.activation_func_clamp_value) is not None:
                x_glu = x_glu.clamp(min=None, max=val)
                x_linear = x_linear.clamp(min=-val, max=val)
            x = config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)
        else:
            x = config.activation_func(x)
        return (x * probs).to(dtype)

    @staticmethod
    def _gmm(x, w, offs, counts):
        """Row block i of `x` (rows offs[i-1]:offs[i], or the i-th of `counts`) times `w[i]`,
        for every local expert: one grouped GEMM given `offs`, else a loop over `counts`."""
        if offs is not None:
            return _ContiguousGrad.apply(torch._grouped_mm(x.contiguous(), w, offs=offs))
        return torch.cat([xi @ w[i] for i, xi in enumerate(torch.split(x, counts))])

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ):
        """[T, h] tokens sorted by local expert, [E] counts summing to T, [T] probs ->
        ([T, h], None), as SequentialMLP."""
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            assert self.config.moe_router_topk == 1, "moe_apply_probs_on_input needs topk 1"
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        probs = probs.unsqueeze(-1)
        if self.use_grouped_mm:
            # Row ends per expert, on the device, without a host sync. Zero-token experts are
            # empty groups; an empty batch is T = 0 (the weights still get zero gradients).
            counts = None
            offs = torch.cumsum(
                tokens_per_expert.to(x.device, non_blocking=True), 0, dtype=torch.int32
            )
        else:
            offs, counts = None, tokens_per_expert.tolist()
        w1, w2 = expert_weights(self)
        fc1 = self._gmm(x, w1, offs, counts)
        if self.activation_recompute:
            # As GroupedMLP: the activation output is freed after fc2 and recomputed from the
            # fc1 output when fc2's backward needs it. fp8=None, not the default False: megatron
            # tests `fp8 is not None`, so False would take its transformer-engine FP8 path.
            self.activation_checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=None)
            act = self.activation_checkpoint.checkpoint(self._activation_with_probs, fc1, probs)
            out = self._gmm(act, w2, offs, counts)
            self.activation_checkpoint.discard_output_and_register_recompute(out)
        else:
            out = self._gmm(self._activation_with_probs(fc1, probs), w2, offs, counts)
        return out, None


# ---- token dispatch with its permutations as device index tensors -----------------------------
def _chunk_gather_index(sizes: torch.Tensor, order: torch.Tensor, total: int) -> torch.Tensor:
    """The rows of `torch.cat([chunks[i] for i in order])`, where `chunks` splits `total` rows
    by `sizes`, as one index into those rows, computed on the device (megatron's unfused
    `sort_chunks_by_idxs` splits by `sizes.tolist()`: a host synchronisation)."""
    sizes = sizes.to(torch.long)
    starts = torch.cumsum(sizes, 0) - sizes
    out_sizes = sizes[order]
    out_starts = torch.cumsum(out_sizes, 0) - out_sizes
    chunk = torch.repeat_interleave(
        torch.arange(order.numel(), device=sizes.device), out_sizes, output_size=total
    )
    return starts[order][chunk] + torch.arange(total, device=sizes.device) - out_starts[chunk]


class DeviceIndexDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's all-to-all token dispatcher whose token permutations are index tensors
    computed on the device, so that a MoE layer's forward synchronises with the host only where
    the all-to-all needs its split sizes: never at EP 1 and expert-TP 1, once at EP > 1.

    Without transformer-engine's fused permutation (`moe_permute_fusion`) megatron's dispatcher
    synchronises three times a layer (tests/multigpu counts them): `masked_select` twice
    (data-dependent output sizes) and the wait for the expert counts copied to the host; it then
    sorts the received chunks by local expert by splitting at those host counts (2 × E tensors,
    a `torch.cat`, at EP 1 the identity). A synchronisation drains the launch queue, and the
    device then idles while the host queues the next kernels. Here:
    - permutation 1 (tokens sorted by global expert): the routing map's nonzeros in
      [expert, token] order by `torch.nonzero_static`, its size known in advance (dropless
      top-k routes every token to exactly k distinct experts, replayed routings too:
      `rollout.assemble.routing_column`), the same order as `masked_select`;
    - permutation 2 and its inverse (received chunks between [rank, local expert] and [local
      expert, rank] order): one gather index (`_chunk_gather_index`), skipped at EP 1 and
      expert-TP 1 where it is the identity;
    - the expert counts stay on the device (the grouped experts read them there;
      `SequentialMLP` takes `.tolist()` itself).
    The numbers are megatron's: the same rows in the same order, the same gradients.
    Token dropping and padding (capacity factors) keep megatron's own dispatcher.
    """

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None):
        super().__init__(num_local_experts, local_expert_indices, config, pg_collection)
        if self.drop_and_pad or config.moe_expert_capacity_factor is not None:
            raise ValueError("DeviceIndexDispatcher: dropless routing only (no capacity factor)")
        if config.moe_permute_fusion or config.moe_router_padding_for_quantization:
            raise ValueError("DeviceIndexDispatcher: no fused permutation or padding")
        self._chunk_orders = None  # megatron's chunk orders, moved to the device at first use

    def _orders(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._chunk_orders is None:
            sort, restore = self.sort_input_by_local_experts, self.restore_output_by_local_experts
            self._chunk_orders = (sort.to(device), restore.to(device))
        return self._chunk_orders

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        tokens_per_expert = super().preprocess(routing_map)
        # only the all-to-all's split sizes go to the host
        communicates = self.ep_size > 1 or self.tp_size > 1
        self.cuda_sync_point = "before_ep_alltoall" if communicates else "no_sync"
        return tokens_per_expert

    def _maybe_dtoh_and_synchronize(self, point: str, tokens_per_expert=None):
        """megatron's, less the expert counts: those stay on the device."""
        if self.cuda_sync_point == "no_sync":
            return tokens_per_expert
        if point == self.cuda_dtoh_point:
            side = torch.cuda.current_stream() != self.cuda_dtoh_stream
            if side:
                self.cuda_dtoh_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.cuda_dtoh_stream):
                for name in ("input_splits", "output_splits", "output_splits_tp"):
                    value = megatron_dispatch.maybe_move_tensor_to_cpu(
                        getattr(self, name), as_numpy=True, record_stream=side
                    )
                    setattr(self, name, value)
            self.d2h_event = self.cuda_dtoh_stream.record_event()
        if point == self.cuda_sync_point:
            self.d2h_event.synchronize()
        return tokens_per_expert

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """megatron's, with permutation 1 by the routing map's static-size nonzeros."""
        self.hidden_shape = hidden_states.shape
        self.probs, self.routing_map = probs, routing_map
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        self.tokens_per_expert = self.preprocess(routing_map)
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_permutation_1", self.tokens_per_expert
        )
        self.hidden_shape_before_permute = hidden_states.shape
        num_tokens = routing_map.shape[0]
        # flat positions e * T + t of the [E, T] map's nonzeros: expert-major, tokens ascending.
        # A map with fewer than T * k (a replayed routing naming one expert twice) leaves -1s,
        # kept out of range so that the gather below fails instead of reading a wrong token.
        flat = torch.nonzero_static(routing_map.T.reshape(-1), size=self.num_out_tokens)[:, 0]
        token_index = torch.where(flat < 0, flat, flat % num_tokens)
        self.reversed_local_input_permutation_mapping = token_index
        permuted_probs = probs.T.reshape(-1)[flat]
        return hidden_states.index_select(0, token_index), permuted_probs

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        """megatron's, with permutation 2 (received chunks sorted by local expert) by one
        device gather."""
        if self.shared_experts is not None:
            self.shared_experts.linear_fc1_forward_and_act(global_input_tokens)
        if self.tp_size > 1:
            sizes = None if self.output_splits_tp is None else self.output_splits_tp.tolist()
            global_input_tokens = gather_from_sequence_parallel_region(
                global_input_tokens, group=self.tp_group, output_split_sizes=sizes
            )
            global_probs = gather_from_sequence_parallel_region(
                global_probs, group=self.tp_group, output_split_sizes=sizes
            )
        self._maybe_dtoh_and_synchronize("before_permutation_2", self.tokens_per_expert)
        if self._sorts_chunks():
            sort, _ = self._orders(global_input_tokens.device)
            index = _chunk_gather_index(
                self.num_global_tokens_per_local_expert.ravel(), sort, global_input_tokens.shape[0]
            )
            global_input_tokens = global_input_tokens.index_select(0, index)
            global_probs = global_probs.index_select(0, index)
        tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_finish", self.tokens_per_expert
        )
        self.tokens_per_expert = None
        return global_input_tokens, tokens_per_expert, global_probs

    def combine_preprocess(self, hidden_states):
        """megatron's, with its inverse of permutation 2 by one device gather."""
        if self._sorts_chunks():
            _, restore = self._orders(hidden_states.device)
            index = _chunk_gather_index(
                self.num_global_tokens_per_local_expert.T.ravel(), restore, hidden_states.shape[0]
            )
            hidden_states = hidden_states.index_select(0, index)
        if self.tp_size > 1:
            sizes = None if self.output_splits_tp is None else self.output_splits_tp.tolist()
            hidden_states = reduce_scatter_to_sequence_parallel_region(
                hidden_states.to(self.probs.dtype), group=self.tp_group, input_split_sizes=sizes
            ).to(hidden_states.dtype)
        return hidden_states

    def _sorts_chunks(self) -> bool:
        """Whether permutation 2 moves anything: tokens arrive from several ranks (EP or
        expert-TP) for several local experts."""
        return self.num_local_experts > 1 and self.ep_size * self.tp_size > 1


class DeviceIndexMoELayer(MoELayer):
    """megatron's MoE layer with `DeviceIndexDispatcher` in place of its all-to-all dispatcher
    (MoELayer builds its dispatcher itself; the spec names this class instead)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        super().__init__(config, submodules, layer_number, pg_collection)
        if config.moe_token_dispatcher_type != "alltoall":
            raise ValueError("DeviceIndexMoELayer needs moe_token_dispatcher_type='alltoall'")
        shared = self.token_dispatcher.shared_experts
        self.token_dispatcher = DeviceIndexDispatcher(
            self.num_local_experts,
            self.local_expert_indices,
            config=config,
            pg_collection=pg_collection or get_default_pg_collection(),
        )
        if shared is not None:
            self.token_dispatcher.set_shared_experts(shared)


# ---- weights between SequentialMLP and TorchGroupedMLP, one layer (one rank's experts) -------
def _check_pair(seq: SequentialMLP, grouped: TorchGroupedMLP) -> None:
    """Raise unless `seq` and `grouped` hold the same experts' shapes (copy_ would broadcast)."""
    if seq.num_local_experts != grouped.num_local_experts:
        raise ValueError(
            f"{seq.num_local_experts} sequential experts vs {grouped.num_local_experts} grouped"
        )
    w1, w2 = expert_blocks(grouped)
    for j, expert in enumerate(seq.local_experts):
        fc1, fc2 = expert.linear_fc1, expert.linear_fc2
        if getattr(fc1, "bias", None) is not None or getattr(fc2, "bias", None) is not None:
            raise ValueError("grouped experts have no biases (add_bias_linear=False)")
        if fc1.weight.shape != w1[j].shape or fc2.weight.shape != w2[j].shape:
            raise ValueError(
                f"expert {j}: fc1 {tuple(fc1.weight.shape)}, fc2 {tuple(fc2.weight.shape)} do not "
                f"match grouped blocks {tuple(w1[j].shape)}, {tuple(w2[j].shape)}"
            )


@torch.no_grad()
def sequential_to_grouped(seq: SequentialMLP, grouped: TorchGroupedMLP) -> None:
    """Copy `seq`'s local experts into `grouped` in place.

    SequentialMLP keeps expert j as an MLP whose `linear_fc1.weight` is [2f, h] (GLU; [f, h]
    without), rows [gate; up] of this expert-TP rank's slice, and `linear_fc2.weight` [h, f];
    TorchGroupedMLP stacks the same matrices (`expert_blocks`).
    """
    _check_pair(seq, grouped)
    w1, w2 = expert_blocks(grouped)
    for j, expert in enumerate(seq.local_experts):
        w1[j].copy_(expert.linear_fc1.weight)
        w2[j].copy_(expert.linear_fc2.weight)


@torch.no_grad()
def grouped_to_sequential(grouped: TorchGroupedMLP, seq: SequentialMLP) -> None:
    """The inverse of `sequential_to_grouped`: `grouped`'s experts into `seq`, in place."""
    _check_pair(seq, grouped)
    w1, w2 = expert_blocks(grouped)
    for j, expert in enumerate(seq.local_experts):
        expert.linear_fc1.weight.copy_(w1[j])
        expert.linear_fc2.weight.copy_(w2[j])


def moe_routers(chunk: torch.nn.Module) -> list[Router]:
    """The MoE routers of one model chunk, in layer order."""
    return [m for m in chunk.modules() if isinstance(m, Router)]


def replay_routing(routers: list, routing: torch.Tensor | None, sequence_parallel: bool) -> None:
    """Routing replay (R3) for one model chunk's forward: each router takes the experts
    `routing` ([b, s, layers, k], the engine's choice per token and global layer) names for
    its layer, through megatron's `RouterReplay`; its gates are still its own softmax over
    those experts, so gradients reach it. `routing=None`: the routers pick their own top-k.

    megatron routes tokens in [s, b] order, a sequence-parallel rank its own slice of s.
    """
    for router in routers:
        replay = router.router_replay
        replay.clear_indices()
        if routing is None:
            replay.clear_router_replay_action()
            continue
        ids = routing[:, :, router.layer_number - 1].transpose(0, 1)  # [s, b, k]
        if sequence_parallel:
            ids = ids.chunk(D.tp_size())[D.tp_rank()]
        replay.set_target_indices(ids.reshape(-1, ids.shape[-1]).long())
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


class ExpertLoad:
    """Tokens routed to each expert of each MoE layer while the model trains, for the per-layer
    load-balance metrics (forward hooks on megatron's routers; forward-only passes are not
    counted). Padding positions are routed too and counted with the rest.

    `metrics()` sums the counts over the ranks that route distinct tokens (data-parallel ranks,
    pipeline stages' own layers, and the sequence-parallel slices when SP is on; without SP a
    TP group routes the same tokens, so its rank 0 speaks for it) and returns, per layer, the
    busiest expert's tokens over the mean (1 = perfectly balanced), then resets."""

    def __init__(self, chunks: list, num_layers: int, num_experts: int, sequence_parallel: bool):
        self.counts = None
        self.shape = (num_layers, num_experts)
        self.sequence_parallel = sequence_parallel
        for chunk in chunks:
            for router in moe_routers(chunk):
                router.register_forward_hook(self._count)

    def _count(self, router, inputs, output) -> None:
        if not router.training:
            return
        routing_map = output[1]
        if self.counts is None:
            self.counts = torch.zeros(self.shape, dtype=torch.float64, device=routing_map.device)
        self.counts[router.layer_number - 1] += routing_map.sum(0).to(torch.float64).detach()

    def metrics(self) -> dict[str, float]:
        if self.counts is None:
            self.counts = torch.zeros(self.shape, dtype=torch.float64)
        counts, self.counts = self.counts, None
        if not self.sequence_parallel and D.tp_rank() != 0:
            counts = torch.zeros_like(counts)
        if dist.is_initialized():
            dist.all_reduce(counts)
        out = {}
        for layer, per_expert in enumerate(counts.tolist()):
            total = sum(per_expert)
            if total:
                out[f"moe/max_load/layer_{layer}"] = max(per_expert) * len(per_expert) / total
        if out:
            out["moe/max_load"] = max(out.values())
        return out
