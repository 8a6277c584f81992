"""The transformers backend: `model.generate` with a static KV cache and SDPA, TP=1 per rank.

It runs wherever transformers runs, so it is both the fallback engine and the worked example
of docs/adding_a_backend.md: build the engine, turn token lists into token lists, and let
rollout/assemble.py do the rest.

Every rank holds the whole model and is its own rollout data-parallel group.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist

from archs import ARCHS
from rollout.assemble import build_output, prompt_token_lists
from rollout.base import BaseRollout, EngineParameters, experts_by_name, register_rollout
from rollout.sampling import SamplingSettings, checkpoint_defaults, resolve_sampling
from tandem_core import cpu_compat
from tandem_core.config import RolloutConfig
from tandem_core.protocol import Batch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_rollout("hf")
class HFRollout(BaseRollout):
    def __init__(
        self,
        cfg: RolloutConfig,
        model_path: Path,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        routed_experts: bool = False,
    ):
        from transformers import AutoModelForCausalLM

        if cfg.tensor_model_parallel_size != 1:
            raise ValueError(
                f"rollout.name=hf runs TP=1 per rank; got rollout.tensor_model_parallel_size="
                f"{cfg.tensor_model_parallel_size}"
            )
        self.cfg = cfg
        self.device = cpu_compat.device()
        self.eos_ids, self.pad_id, max_pos = checkpoint_defaults(model_path)
        self.max_model_len = max_model_len or max_pos
        if cfg.load_format == "dummy":  # random weights; the first sync overwrites them
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model_path)
            self.model = AutoModelForCausalLM.from_config(
                config, dtype=_DTYPES[dtype], attn_implementation="sdpa"
            )
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=_DTYPES[dtype], attn_implementation="sdpa"
            )
        self.model.to(self.device)
        self.model.eval()
        self._routers = _moe_routers(self.model) if routed_experts else None
        self._weight_bytes: dict[torch.nn.Parameter, int] = {}  # storage sizes during sleep 2
        # generate() fills every unset field from the checkpoint's generation_config.json
        # (e.g. Qwen's repetition_penalty=1.05, top_k=20) and then from transformers' own
        # defaults (top_k=50): start from a neutral config so only our settings apply.
        from transformers import GenerationConfig

        self.model.generation_config = GenerationConfig()
        self.dp_rank = dist.get_rank() if dist.is_initialized() else 0
        self.dp_size = dist.get_world_size() if dist.is_initialized() else 1
        # Our own RNG stream, so sampling neither consumes nor depends on the trainer's.
        self._rng = torch.Generator(device="cpu").manual_seed(cfg.seed + self.dp_rank)

    @torch.no_grad()
    def generate_sequences(self, prompts: Batch) -> Batch:
        s = resolve_sampling(
            self.cfg, prompts.meta_info, eos_token_ids=self.eos_ids, pad_token_id=self.pad_id
        )
        token_lists = prompt_token_lists(
            prompts, max_model_len=self.max_model_len, response_length=s.response_length
        )
        samples = [t for t in token_lists for _ in range(s.n)]
        if self._routers is None:
            return build_output(prompts, *self._generate(samples, s), s)
        with _RoutingRecorder(self._routers, len(samples)) as recorder:
            responses, log_probs = self._generate(samples, s)
        width = max(len(t) for t in samples)
        routed = recorder.per_sample(self.model.config.num_hidden_layers)
        routed = [r[width - len(t) :] for r, t in zip(routed, samples, strict=True)]
        return build_output(prompts, responses, log_probs, s, routed_experts=routed)

    def _generate(
        self, token_lists: list[list[int]], s: SamplingSettings
    ) -> tuple[list[list[int]], list[list[float]]]:
        from transformers import GenerationConfig

        width = max(len(t) for t in token_lists)
        ids = torch.full((len(token_lists), width), s.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, toks in enumerate(token_lists):
            ids[i, width - len(toks) :] = torch.tensor(toks)
            mask[i, width - len(toks) :] = 1
        gen = GenerationConfig(
            max_new_tokens=s.response_length,
            do_sample=not s.greedy,
            temperature=s.temperature if not s.greedy else None,
            top_p=s.top_p if not s.greedy else None,
            top_k=s.top_k if s.top_k > 0 else 0,  # 0: no top-k (None would mean 50)
            eos_token_id=list(s.eos_token_ids),
            pad_token_id=s.pad_token_id,
            cache_implementation="static",
            # Prompt widths change every step; recompiling per shape would cost more than
            # the compiled decode saves.
            disable_compile=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
        # transformers sizes the static cache to the longest of all earlier calls (to spare
        # recompiles, which are off here): a history-dependent length changes SDPA's reduction
        # and the last bits of the log-probs, so a resumed run would differ from a straight one.
        self.model.__dict__.pop("_previous_max_cache_length", None)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(s.seed if s.seed is not None else self._next_seed())
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=gen,
            )
        new = out.sequences[:, width:].cpu()
        # output_logits are the raw logits (before temperature/top-k/top-p): their
        # log-softmax is the same quantity vLLM returns with logprobs_mode="raw_logprobs".
        logits = torch.stack(out.logits, dim=1).float()
        token_logp = torch.log_softmax(logits, dim=-1).gather(
            -1, new.to(logits.device).unsqueeze(-1)
        )
        token_logp = token_logp.squeeze(-1).cpu()
        return new.tolist(), token_logp.tolist()

    def _next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._rng))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        # Experts may come one by one while transformers stacks them ([E, rows, cols]): the
        # architecture says where each one lives (archs/base.py `fused_name`).
        arch = ARCHS.get(self.model.config.model_type)
        fused_name = arch.fused_name if arch is not None else None
        with torch.no_grad():
            for name, tensor in weights:
                if name in params:
                    params[name].copy_(tensor)
                    continue
                where = fused_name(name) if fused_name else None
                if where is None or where[0] not in params:
                    raise KeyError(f"{name!r} is not a parameter of the HF rollout model")
                fused, expert, half = where
                rows = len(tensor)
                start = rows * half if half >= 0 else 0
                params[fused][expert, start : start + rows].copy_(tensor)

    def engine_parameters(self) -> EngineParameters | None:
        # transformers 5 stacks a MoE layer's experts ([E, 2I, H] gate/up, [E, H, I] down).
        params = experts_by_name(dict(self.model.named_parameters()))
        return EngineParameters(params, {"gate_up_proj": ["gate_proj", "up_proj"]}, tp_size=1)

    def sleep(self, level: int = 1) -> None:
        # The static cache lives only inside one generate call. Level 2 drops the weights too
        # (the next sync rewrites them) by emptying their storage: the parameter tensors stay,
        # so in-place copies reach them after wake_up. On CPU there is nothing to give back.
        if self.device.type != "cuda":
            return
        if level >= 2:
            for p in self.model.parameters():
                if p not in self._weight_bytes:  # a second sleep finds them already empty
                    self._weight_bytes[p] = p.untyped_storage().nbytes()
                    p.untyped_storage().resize_(0)
        torch.cuda.empty_cache()

    def wake_up(self, tags: list[str] | None = None) -> None:
        for p, nbytes in self._weight_bytes.items():
            p.untyped_storage().resize_(nbytes)
        self._weight_bytes.clear()


def _moe_routers(model) -> dict[int, torch.nn.Module]:
    """Layer index -> the MoE router of that decoder layer (transformers' `mlp.gate` that returns
    (logits, weights, expert ids), as Qwen3-MoE's does)."""
    routers = {}
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            routers[i] = gate
    if not routers:
        raise ValueError(f"{type(model).__name__} has no MoE routers to record experts from")
    return routers


class _RoutingRecorder:
    """Records the expert ids each router picks during one `generate` call (prefill, then one
    token per decode step), for routing replay (R3)."""

    def __init__(self, routers: dict[int, torch.nn.Module], rows: int):
        self.routers, self.rows = routers, rows
        self.steps: list[dict[int, torch.Tensor]] = []  # per forward: layer -> [rows, t, k]
        self.handles = []

    def __enter__(self):
        for i, gate in self.routers.items():
            self.handles.append(gate.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, layer: int):
        def record(module, inputs, output):
            ids = output[-1]  # [rows * t, k], row-major over the [rows, t] input
            if layer == min(self.routers):
                self.steps.append({})
            self.steps[-1][layer] = ids.reshape(self.rows, -1, ids.shape[-1]).cpu()

        return record

    def per_sample(self, num_layers: int) -> list[torch.Tensor]:
        """[tokens fed, num_layers, k] per row (layers without experts: zeros, as vLLM does)."""
        k = next(iter(self.steps[0].values())).shape[-1]
        tokens = sum(next(iter(step.values())).shape[1] for step in self.steps)
        out = torch.zeros(self.rows, tokens, num_layers, k, dtype=torch.int16)
        t = 0
        for step in self.steps:
            n = next(iter(step.values())).shape[1]
            for layer, ids in step.items():
                out[:, t : t + n, layer] = ids.to(torch.int16)
            t += n
        return list(out)
