"""Megatron-core GPT models built from layer specs Tandem owns.

Variation is a spec, not a flag inside a layer (STYLE habit 7):
- `local`: megatron's own local spec, but with Tandem's SP-capable RMSNorm (megatron's
  WrappedTorchNorm refuses sequence parallelism); the baseline.
- `sdpa`: the same with core attention through torch's fused
  `scaled_dot_product_attention` (flash kernels on GPU) and RoPE on q and k by one Triton
  launch each way on CUDA (`RotaryQK`, tandem_core/rope_kernel.py); the default without TE.
- `te`: megatron's transformer-engine spec, when transformer_engine imports.

Sequences reach these models right-padded (real tokens from position 0, see
`trainer/workers/sequences.py`), so plain causal attention is exact and no mask is needed; RoPE in megatron
uses positions 0..s-1 whatever position_ids say.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from tandem_core import cpu_compat, multi_tensor, rope_kernel, swiglu_kernel, wgrad_fusion
from tandem_core.config import ParallelConfig
from tandem_core.distributed import cp_chunks, cp_local_positions
from tandem_core.model_args import ModelArgs
from tandem_core.moe import DeviceIndexMoELayer, TorchGroupedMLP, fix_router_without_te
from tandem_core.registry import Registry


# ---- layers Tandem adds -----------------------------------------------------------------------
class RMSNorm(torch.nn.Module):
    """RMSNorm that supports sequence parallelism.

    With SP each TP rank normalises its own sequence slice; the weight's grads are then
    partial sums, so the weight carries `sequence_parallel=True` and megatron's grad
    finalisation all-reduces it over TP.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        device = "cpu" if config.use_cpu_initialization else cpu_compat.device()
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=device)
        )
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SDPACoreAttention(MegatronModule):
    """Causal core attention through torch's fused SDPA on megatron's [s, b, heads, dim]."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **_,
    ):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if softmax_scale is None:
            softmax_scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: no attention bias")
        if self.config.context_parallel_size > 1:
            return context_parallel_attention(
                query, key, value, self.softmax_scale, packed_seq_params
            )
        if packed_seq_params is not None:  # THD: [t, heads, dim], sequences back to back
            return packed_attention(query, key, value, packed_seq_params, self.softmax_scale)
        # Right-padded sequences only: causal attention is exact for the real tokens.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def packed_attention(query, key, value, packed, scale: float) -> torch.Tensor:
    """Causal attention within each packed sequence: [t, heads, dim] in, [t, heads·dim] out.

    CUDA in bf16/fp16: torch's variable-length flash kernel (`varlen_attn`, cu_seqlens).
    Elsewhere, the exact reference: one SDPA call with a block-diagonal causal mask, [t, t]
    booleans (fine for CPU tests and fp32 checks; FlexAttention's document masks would be the
    long-sequence fallback)."""
    cu = packed.cu_seqlens_q
    t = query.shape[0]
    flash = query.dtype in (torch.float16, torch.bfloat16)  # the kernel's dtypes
    if query.is_cuda and flash and _varlen_attn() is not None:
        extra = dict(_VARLEN_CAUSAL[_varlen_causal_key()])
        if "scale" in _varlen_params():
            extra["scale"] = scale
        elif scale != 1.0 / math.sqrt(query.shape[-1]):
            raise NotImplementedError("this torch's varlen_attn takes no softmax scale")
        if query.shape[1] != key.shape[1]:  # grouped K/V heads
            if "enable_gqa" in _varlen_params():
                extra["enable_gqa"] = True
            else:
                groups = query.shape[1] // key.shape[1]
                key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
        out = _varlen_attn()(
            query, key, value, cu, cu, packed.max_seqlen_q, packed.max_seqlen_kv, **extra
        )
        return out.reshape(t, -1)
    sequence = sequence_ids(cu)
    positions = torch.arange(t, device=query.device)
    allowed = (sequence[:, None] == sequence[None, :]) & (positions[None, :] <= positions[:, None])
    q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))  # [1, heads, t, dim]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out[0].transpose(0, 1).reshape(t, -1)


# Written by hand: megatron's context parallelism lives in transformer-engine's attention
# (ring exchange), which Tandem's fast path runs without.
def sequence_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[T]: the index of the packed sequence each position of the row belongs to."""
    cu = cu_seqlens.long()
    count = torch.arange(len(cu) - 1, device=cu.device)
    return torch.repeat_interleave(count, cu.diff(), output_size=int(cu[-1]))


@dataclass
class PositionedPackedSeqParams(PackedSeqParams):
    """megatron's THD parameters plus `positions`: each of this rank's tokens' RoPE position
    in its own sequence, computed once per micro-batch (trainer/workers/sequences.py) instead
    of in every layer. Under CP the cu_seqlens describe the whole packed row."""

    positions: torch.Tensor | None = None


def context_parallel_attention(query, key, value, scale: float, packed=None) -> torch.Tensor:
    """Causal attention of this CP rank's two chunks of each sequence ([2c, b, heads, dim]:
    chunks r and 2·CP-1-r of 2·CP, megatron's load-balanced split) against the whole
    sequence's K/V, all-gathered over the CP group (autograd reduce-scatters their grads back).
    Chunk g attends to the first (g+1)·c keys, causal from the bottom-right corner. A packed
    row ([2c, heads, dim], `packed` its whole cu_seqlens) is cut as one sequence, and each
    query also keeps to its own packed sequence (an explicit mask)."""
    from megatron.core import parallel_state as mpu
    from torch.nn.attention.bias import causal_lower_right

    from tandem_core.distributed import all_gather_with_grad

    group = mpu.get_context_parallel_group()
    cp, rank = group.size(), group.rank()
    c = query.shape[0] // 2

    def whole(local):  # [2c, ...] per rank -> [2·CP·c, ...] in sequence order
        parts = all_gather_with_grad(local, group)
        order = [None] * (2 * cp)
        for j, part in enumerate(parts):
            first, second = cp_chunks(cp, j)
            order[first], order[second] = part[:c], part[c:]
        return torch.cat(order)

    if packed is not None:  # THD [t, h, d] -> one row [t, 1, h, d]
        query, key, value = (x[:, None] for x in (query, key, value))
    keys, values = whole(key), whole(value)
    sequence = None
    if packed is not None:
        sequence = sequence_ids(packed.cu_seqlens_q)
    outs = []
    for half, chunk in enumerate(cp_chunks(cp, rank)):
        q = query[half * c : (half + 1) * c].permute(1, 2, 0, 3)  # [b, h, c, d]
        seen = (chunk + 1) * c
        k, v = (x[:seen].permute(1, 2, 0, 3) for x in (keys, values))
        if sequence is None:
            mask = causal_lower_right(c, seen)
        else:
            q_pos = chunk * c + torch.arange(c, device=q.device)
            k_pos = torch.arange(seen, device=q.device)
            mask = (k_pos[None] <= q_pos[:, None]) & (
                sequence[q_pos][:, None] == sequence[k_pos][None]
            )
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        outs.append(out.permute(2, 0, 1, 3))  # [c, b, h, d]
    out = torch.cat(outs)
    if packed is not None:
        return out[:, 0].reshape(out.shape[0], -1)
    return out.reshape(out.shape[0], out.shape[1], -1)


@functools.cache
def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


@functools.cache
def _varlen_params() -> frozenset:
    return frozenset(inspect.signature(_varlen_attn()).parameters)


_VARLEN_CAUSAL = {"is_causal": {"is_causal": True}, "window_size": {"window_size": (-1, 0)}}


def _varlen_causal_key() -> str:
    """How this torch's varlen_attn asks for causal attention: 2.13 by a (-1, 0) window,
    earlier releases by is_causal."""
    return "is_causal" if "is_causal" in _varlen_params() else "window_size"


def _rotate_qk(q, k, freqs_q, freqs_k, interleaved: bool, sign: float):
    """megatron's own unfused RoPE on q and k by angle sign·θ (its fused RoPE needs
    transformer-engine)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    return (
        _apply_rotary_pos_emb_bshd(q, freqs_q * sign, interleaved),
        _apply_rotary_pos_emb_bshd(k, freqs_k * sign, interleaved),
    )


@functools.cache
def _rotate_qk_kernel():
    """On CUDA, `_rotate_qk` compiled for inference only: RotaryQK's fallback where the Triton
    kernel does not apply (freqs not one row per position). Autograd is `RotaryQK`'s, so
    inductor never partitions a joint forward/backward graph (with dynamic shapes that compile
    took ~46 s of a run's first update); each call costs 0.1-0.3 ms of host time."""
    if cpu_compat.cuda_available():
        return torch.compile(_rotate_qk, dynamic=True)
    return _rotate_qk


class RotaryQK(torch.autograd.Function):
    """RoPE on q and k. A rotation's transpose is the rotation by -θ (sin is odd and megatron's
    frequencies repeat each angle over its rotated pair), so backward is the forward kernel
    with the angles negated; the unrotated tail of a partial rotary dim passes through both."""

    @staticmethod
    def forward(ctx, q, k, freqs_q, freqs_k, interleaved: bool):
        ctx.save_for_backward(freqs_q, freqs_k)
        ctx.interleaved = interleaved
        return _rotate(q, k, freqs_q, freqs_k, interleaved, 1.0)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        freqs_q, freqs_k = ctx.saved_tensors
        grad_q, grad_k = _rotate(grad_q, grad_k, freqs_q, freqs_k, ctx.interleaved, -1.0)
        return grad_q, grad_k, None, None, None


def _rotate(q, k, freqs_q, freqs_k, interleaved: bool, sign: float):
    """The Triton kernel where it applies (CUDA, one angle row per position: tens of µs of
    host time a call), else the compiled `_rotate_qk` (~0.1-0.3 ms a call)."""
    if rope_kernel.usable(q, freqs_q) and rope_kernel.usable(k, freqs_k):
        return (
            rope_kernel.rotate(q, freqs_q, interleaved, sign),
            rope_kernel.rotate(k, freqs_k, interleaved, sign),
        )
    return _rotate_qk_kernel()(q, k, freqs_q, freqs_k, interleaved, sign)


class SDPASelfAttention(SelfAttention):
    """megatron's SelfAttention with RoPE applied right after the QKV split by `RotaryQK`.

    The rotary frequencies are held for the one forward call (megatron is handed None, so it
    applies nothing itself); recomputing core attention reuses the already-rotated q and k.
    Packed sequences (THD) take each token's angle from its position in its own sequence.
    Inference contexts and layers without RoPE take megatron's path."""

    def forward(self, hidden_states, *args, rotary_pos_emb=None, **kwargs):
        no_rope = self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1]
        if rotary_pos_emb is None or args or no_rope or kwargs.get("inference_context") is not None:
            return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)
        if not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb, rotary_pos_emb)
        packed = kwargs.get("packed_seq_params")
        if packed is not None:  # each packed sequence's positions restart at 0
            positions = packed.positions  # PositionedPackedSeqParams (ModelWorker builds it)
            rotary_pos_emb = tuple(freqs[positions] for freqs in rotary_pos_emb)
        self._rotary_pos_emb = rotary_pos_emb
        try:
            return super().forward(hidden_states, rotary_pos_emb=None, **kwargs)
        finally:
            self._rotary_pos_emb = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        qkv = super().get_query_key_value_tensors(*args, **kwargs)
        freqs = getattr(self, "_rotary_pos_emb", None)
        if freqs is None:
            return qkv
        query, key, *rest = qkv  # megatron splits q, k, v (+ gate) when handed no RoPE
        interleaved = self.config.rotary_interleaved
        if torch.compiler.is_compiling():  # a compiled layer (compile_dense_layers): dynamo
            # could not trace RotaryQK (then an autograd.Function around a compiled kernel) on
            # torch 2.11; inductor fuses the plain math instead (24-27 ms of the 1B update
            # against 9 for RotaryQK's kernels)
            return *_rotate_qk(query, key, freqs[0], freqs[1], interleaved, 1.0), *rest
        return *RotaryQK.apply(query, key, freqs[0], freqs[1], interleaved), *rest


# ---- specs ------------------------------------------------------------------------------------
EXPERTS = Registry("experts module")
"""model.moe_experts -> the experts slot of a mixture-of-experts layer, given megatron's MoE
MLP spec: sequential keeps megatron's SequentialMLP."""
EXPERTS.add("sequential", lambda mlp_spec: mlp_spec.submodules.experts)
EXPERTS.add("grouped", lambda mlp_spec: ModuleSpec(module=TorchGroupedMLP))


DISPATCHERS = Registry("token dispatcher")
"""model.moe_dispatcher -> the MoE layer class: device keeps megatron's all-to-all dispatcher
with its token permutations as device index tensors (no host synchronisation at EP 1);
megatron is its own (unfused without transformer-engine: three a layer)."""
DISPATCHERS.add("device", DeviceIndexMoELayer)
DISPATCHERS.add("megatron", MoELayer)


def _local_layer_spec(
    config: TransformerConfig, moe: bool, experts: str, dispatcher: str
) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts if moe else None,
        normalization="RMSNorm",
        qk_layernorm=config.qk_layernorm,
    )
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if config.qk_layernorm:  # per-head norms of q and k (Qwen3); megatron sums their grads
        attention = spec.submodules.self_attention.submodules  # over TP (finalize_model_grads)
        attention.q_layernorm = attention.k_layernorm = RMSNorm
    if moe:
        spec.submodules.mlp.submodules.experts = EXPERTS[experts](spec.submodules.mlp)
        spec.submodules.mlp.module = DISPATCHERS[dispatcher]
    return spec


def _local_layers(config: TransformerConfig, vp_stage: int | None) -> list[bool]:
    """Whether each layer this PP stage (VPP chunk) builds is a mixture-of-experts layer."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    pattern = config.moe_layer_freq if config.num_moe_experts else [0] * config.num_layers
    return [bool(pattern[i]) for i in range(offset, offset + count)]


def get_local_block_spec(
    config: TransformerConfig,
    vp_stage: int | None,
    experts: str = "grouped",
    dispatcher: str = "device",
) -> TransformerBlockSubmodules:
    layers = [
        _local_layer_spec(config, moe, experts, dispatcher)
        for moe in _local_layers(config, vp_stage)
    ]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=RMSNorm)


def get_sdpa_block_spec(
    config: TransformerConfig,
    vp_stage: int | None,
    experts: str = "grouped",
    dispatcher: str = "device",
) -> TransformerBlockSubmodules:
    block = get_local_block_spec(config, vp_stage, experts, dispatcher)
    for spec in block.layer_specs:
        spec.submodules.self_attention.module = SDPASelfAttention
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return block


def get_te_block_spec(
    config: TransformerConfig,
    vp_stage: int | None,
    experts: str = "grouped",
    dispatcher: str = "device",
):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)


LAYER_SPECS = Registry("layer spec")
LAYER_SPECS.add("local", get_local_block_spec)
LAYER_SPECS.add("sdpa", get_sdpa_block_spec)
LAYER_SPECS.add("te", get_te_block_spec)


def resolve_layer_spec(name: str) -> str:
    if name == "auto":
        te = importlib.util.find_spec("transformer_engine") is not None
        return "te" if te and cpu_compat.cuda_available() else "sdpa"
    LAYER_SPECS[name]  # an unknown name raises, listing the known ones
    return name


# ---- config and model -------------------------------------------------------------------------
def moe_config_fields(args: ModelArgs, aux_loss_coeff: float, z_loss_coeff: float) -> dict:
    """megatron's mixture-of-experts settings for `args` (none for a dense model).

    The router: a softmax over the experts' logits, top-k. Renormalising the top k (Qwen3-MoE's
    norm_topk_prob) is megatron's default order, top-k of the logits then a softmax over those k
    (the same numbers); without it, megatron's pre-softmax order (softmax over all, top-k).
    Tokens reach experts by megatron's all-to-all dispatcher (gloo has all_to_all on CPU)."""
    if not args.is_moe:
        return {"moe_token_dispatcher_type": "alltoall"}  # dense: only to pass its own check
    return dict(
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_router_topk=args.moe_router_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not args.moe_norm_topk_prob,
        moe_layer_freq=args.moe_layer_pattern(),
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff else "none",
        moe_aux_loss_coeff=aux_loss_coeff,
        moe_z_loss_coeff=z_loss_coeff or None,
        moe_router_dtype="fp32",
        moe_permute_fusion=False,
    )


def build_transformer_config(
    args: ModelArgs,
    parallel: ParallelConfig,
    dtype: str = "float32",
    moe_aux_loss_coeff: float = 0.0,
    moe_z_loss_coeff: float = 0.0,
    recompute: bool = False,
) -> TransformerConfig:
    """`recompute`: megatron's full activation recompute, every layer its own checkpoint (only
    each layer's input is kept; the backward reruns the layer's forward)."""
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    wgrad_fusion.install()
    swiglu_kernel.install()  # megatron's SwiGLU by Triton on CUDA (host time)
    multi_tensor.install()  # the optimizer's grad norm without a sync per gradient
    return TransformerConfig(
        **moe_config_fields(args, moe_aux_loss_coeff, moe_z_loss_coeff),
        **(
            dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
            if recompute
            else {}
        ),
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=args.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=args.qkv_bias,
        qk_layernorm=args.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # megatron's own fused SwiGLU (a torch.compile'd kernel), on CUDA; on CPU it would
        # compile C++ at every start for nothing the tests measure. Its fused bias-dropout-add
        # stays off: without linear biases or dropout it is the same single add, plus ~0.1 ms
        # of host time per call for the compiled region (twice a layer, forward and backward).
        bias_activation_fusion=cpu_compat.cuda_available(),
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # Weight gradients accumulated by their GEMM into megatron's fp32 main_grad
        # (tandem_core/wgrad_fusion.py stands in for apex's extension). A layer trained
        # outside megatron's DDP, which gives each weight its main_grad, must turn it off.
        gradient_accumulation_fusion=True,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        use_cpu_initialization=not cpu_compat.cuda_available(),
        params_dtype=torch_dtype,
        pipeline_dtype=torch_dtype,
        bf16=torch_dtype == torch.bfloat16,
        variable_seq_lengths=True,
        # Activations of the pipeline stay in fp32 on CPU tests so equality checks are tight.
        deallocate_pipeline_outputs=True,
        # The interleaved (VPP) schedule's batched p2p posts both directions between the same
        # two ranks (PP=2) in an order that swaps same-shape activations and gradients; megatron-
        # LM runs VPP with overlapped, unbatched p2p (which splits the directions), so do we.
        overlap_p2p_comm=parallel.virtual_pipeline_model_parallel_size is not None,
        batch_p2p_comm=parallel.virtual_pipeline_model_parallel_size is None,
    )


class ValueHead(torch.nn.Module):
    """hidden → 1 scalar per token; replicated over TP (megatron's output layer would need the
    output size to divide TP). Mimics ColumnParallelLinear's call signature for GPTModel."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        device = "cpu" if config.use_cpu_initialization else cpu_compat.device()
        self.weight = torch.nn.Parameter(
            torch.zeros(1, config.hidden_size, dtype=config.params_dtype, device=device)
        )

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # The head is replicated: its input grad is split back over the sequence, not summed.
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return F.linear(hidden, self.weight), None


class ResponseRowsGPTModel(GPTModel):
    """megatron's GPTModel whose output layer can run on chosen positions only.

    RL losses need the logits of the positions that predict response tokens; the prompt's are
    thrown away. `model(ids, pos, None, response_index=idx)` ([b, R] positions per row) feeds
    the output layer those rows only and returns [b, R, v/tp]: the LM head (a 150k-vocab matmul,
    a quarter of a 0.5B model's FLOPs) and the log-softmax skip the prompt. With sequence
    parallelism the hidden states are gathered first and the layer runs unsharded over the
    sequence for that call, as megatron's own last-token inference path does.
    """

    def forward(self, *args, response_index: torch.Tensor | None = None, **kwargs):
        self._response_index = response_index
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._response_index = None

    def _postprocess(self, hidden_states, **kwargs):
        index = getattr(self, "_response_index", None)
        if index is None or not self.post_process:
            return super()._postprocess(hidden_states=hidden_states, **kwargs)
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        layer = self.output_layer
        sequence_parallel = layer.sequence_parallel
        if sequence_parallel:
            # Gradients come back summed over TP from the (now unsharded) layer: split, not sum.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False
            )
        # hidden [s, b, h] → [R, b, h]: row j of sequence i is position index[i, j]; a packed
        # micro-batch is one row [t, 1, h] and index holds positions in it.
        cp = self.config.context_parallel_size
        if cp > 1:
            hidden_states = local_response_rows(hidden_states, index, cp)
        elif hidden_states.shape[1] == 1:
            hidden_states = hidden_states[:, 0][index.t()]
        else:
            rows = index.t()[:, :, None].expand(-1, -1, hidden_states.shape[-1])
            hidden_states = hidden_states.gather(0, rows)
        layer.sequence_parallel = False
        try:
            return super()._postprocess(hidden_states=hidden_states, **kwargs)
        finally:
            layer.sequence_parallel = sequence_parallel


def local_response_rows(hidden, index, cp: int):
    """[N, 1, h]: the hidden states at the response positions `index` ([b, R], whole-sequence
    positions) that this CP rank holds, in row-major order of `index` (sequences.
    AlignedMicroBatch.local_response_rows is the same mask). Each CP rank runs the output layer
    on its own rows only; the [b, R] results are summed over CP after the log-softmax
    (trainer/workers/sequences.py rows_over_context_parallel), never the [R, vocab] logits."""
    from megatron.core import parallel_state as mpu

    rank = mpu.get_context_parallel_rank()
    local, mine = cp_local_positions(index, hidden.shape[0] // 2, cp, rank)
    rows = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
    if hidden.shape[1] == 1:  # one (packed) row: every index points into it
        rows = torch.zeros_like(rows)
    return hidden[local[mine], rows[mine]][:, None]


def build_gpt_model(
    args: ModelArgs,
    config: TransformerConfig,
    layer_spec: str = "sdpa",
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    value_head: bool = False,
    experts: str = "grouped",
    dispatcher: str = "device",
) -> GPTModel:
    """One model chunk (the layers this PP stage / VPP chunk owns). `experts` and `dispatcher`:
    the mixture-of-experts layers' experts module (EXPERTS: grouped | sequential) and token
    dispatch (DISPATCHERS: device | megatron)."""
    spec_name = resolve_layer_spec(layer_spec)
    if config.num_moe_experts:
        fix_router_without_te()
    with cpu_compat.megatron_device_scope():
        spec = LAYER_SPECS[spec_name](config, vp_stage, experts, dispatcher)
        model = ResponseRowsGPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=args.padded_vocab_size(config.tensor_model_parallel_size),
            max_sequence_length=args.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=args.tie_word_embeddings and not value_head,
            position_embedding_type="rope",
            rotary_base=int(args.rope_theta),
            vp_stage=vp_stage,
        )
        if value_head and post_process:
            model.output_layer = ValueHead(config)
        if cpu_compat.cuda_available():
            model.cuda(torch.cuda.current_device())
    return model


# ---- compiled layers --------------------------------------------------------------------------
def compile_dense_layers(chunks, backend: str = "inductor") -> int:
    """Each dense decoder layer's forward through torch.compile, as torchtitan compiles each
    block: the norms, residual adds, RoPE and SwiGLU fuse, and AOT autograd runs the layer's
    backward as compiled calls, so a step launches fewer kernels and spends less host time on
    each. On request (actor.compile_layers=true): on the 1B update it measured level with eager
    layers (BENCHMARKS.md).

    At TP 1 and CP 1, at any PP, DP, packing or recompute (tests/cpu/test_actor.py). Under TP
    megatron's linear layers overlap their backward collectives with `async_op=True`, which
    dynamo cannot trace (two breaks a layer); CP's all-gathered attention fails to trace.
    Mixture-of-experts layers stay eager: their token dispatch sizes depend on the data. The
    linear layers' fused weight-gradient accumulation (it writes main_grad and marks the
    weight) also breaks the graph around each GEMM's backward. Returns how many layers were
    compiled."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    _megatron_traceable()
    compiled = 0
    for chunk in chunks:
        for layer in chunk.modules():
            if not isinstance(layer, TransformerLayer) or isinstance(layer.mlp, MoELayer):
                continue
            if (
                layer.config.tensor_model_parallel_size > 1
                or layer.config.context_parallel_size > 1
            ):
                continue
            layer.forward = torch.compile(layer.forward, dynamic=True, backend=backend)
            compiled += 1
    return compiled


@functools.cache
def _megatron_traceable() -> None:
    """megatron's RowParallelLinear asks for its TP group with `tp_group=None` on every forward,
    and `get_tensor_model_parallel_group_if_none` then calls `warnings.warn`, which dynamo cannot
    trace: the layer's graph would break in two inside megatron's offloading context manager.
    In compiled code only, the same lookup without the deprecation warning stands in for it."""
    from megatron.core import parallel_state, utils

    @torch.compiler.substitute_in_graph(utils.get_tensor_model_parallel_group_if_none)
    def tp_group_if_none(tp_group, is_expert=False, check_initialized=True):
        if not torch.distributed.is_initialized():
            return None
        if tp_group is not None or not parallel_state.is_initialized():
            return tp_group
        if is_expert:
            return parallel_state.get_expert_tensor_parallel_group(check_initialized)
        return parallel_state.get_tensor_model_parallel_group(check_initialized)
