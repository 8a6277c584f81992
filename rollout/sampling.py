"""Sampling settings of one `generate_sequences` call: config defaults + per-call overrides.

Overrides travel in `batch.meta_info["sampling"]` (a dict), e.g. validation passes
`{"do_sample": False}` and a GRPO step may pass `{"n": 8}`. Keeping them in one sub-dict lets
us reject a misspelt key (`"temprature"`) instead of silently sampling with the default,
while the rest of meta_info stays free for the trainer's own bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tandem_core.config import RolloutConfig

SAMPLING_KEY = "sampling"


@dataclass(frozen=True)
class SamplingSettings:
    n: int
    """Samples per prompt; the samples of one prompt are adjacent in the output."""
    temperature: float
    """0 or do_sample=False: greedy."""
    top_p: float
    top_k: int
    """-1: no top-k."""
    response_length: int
    """Max new tokens; also the width R of `responses`."""
    eos_token_ids: tuple[int, ...]
    """Generation stops after any of these (the token is kept and masked in)."""
    pad_token_id: int
    seed: int | None
    """Per-call seed (reproducible call); None continues the backend's own RNG stream."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# The keys a caller may override, and what each becomes.
_OVERRIDABLE = {
    "n",
    "temperature",
    "top_p",
    "top_k",
    "response_length",
    "max_new_tokens",
    "seed",
    "do_sample",
    "eos_token_id",
    "stop_token_ids",
    "pad_token_id",
}


def _ids(value: Any, key: str) -> tuple[int, ...]:
    values = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(v, int) and v >= 0 for v in values):
        raise ValueError(f"sampling {key!r} must be token ids (non-negative ints), got {value!r}")
    return tuple(values)


def resolve_sampling(
    cfg: RolloutConfig,
    meta_info: dict[str, Any],
    *,
    eos_token_ids: tuple[int, ...],
    pad_token_id: int,
) -> SamplingSettings:
    """Merge `meta_info["sampling"]` over the config; model eos/pad ids are the defaults."""
    over = dict(meta_info.get(SAMPLING_KEY) or {})
    unknown = sorted(set(over) - _OVERRIDABLE)
    if unknown:
        raise ValueError(
            f"unknown sampling keys {unknown} in meta_info[{SAMPLING_KEY!r}]; "
            f"known: {sorted(_OVERRIDABLE)}"
        )
    if "max_new_tokens" in over and "response_length" in over:
        if over["max_new_tokens"] != over["response_length"]:
            raise ValueError("sampling max_new_tokens and response_length disagree")
    length = over.get("response_length", over.get("max_new_tokens", cfg.response_length))

    temperature = float(over.get("temperature", cfg.temperature))
    if over.get("do_sample", True) is False:
        temperature = 0.0
    eos = _ids(over.get("eos_token_id", eos_token_ids), "eos_token_id")
    stops = _ids(over.get("stop_token_ids", ()), "stop_token_ids")
    settings = SamplingSettings(
        n=int(over.get("n", cfg.n)),
        temperature=temperature,
        top_p=float(over.get("top_p", cfg.top_p)),
        top_k=int(over.get("top_k", cfg.top_k)),
        response_length=int(length),
        eos_token_ids=tuple(dict.fromkeys(eos + stops)),
        pad_token_id=_ids(over.get("pad_token_id", pad_token_id), "pad_token_id")[0],
        seed=over.get("seed", None),
    )
    check_sampling(settings)
    return settings


def check_sampling(s: SamplingSettings) -> None:
    if s.n < 1:
        raise ValueError(f"sampling n must be >= 1, got {s.n}")
    if s.response_length < 1:
        raise ValueError(f"sampling response_length must be >= 1, got {s.response_length}")
    if s.temperature < 0:
        raise ValueError(f"sampling temperature must be >= 0, got {s.temperature}")
    if not 0.0 < s.top_p <= 1.0:
        raise ValueError(f"sampling top_p must be in (0, 1], got {s.top_p}")
    if s.top_k == 0 or s.top_k < -1:
        raise ValueError(f"sampling top_k must be -1 (off) or >= 1, got {s.top_k}")
    if s.seed is not None and not isinstance(s.seed, int):
        raise ValueError(f"sampling seed must be an int or None, got {s.seed!r}")


def checkpoint_defaults(model_path) -> tuple[tuple[int, ...], int, int]:
    """(eos ids, pad id, max positions) of an HF checkpoint directory, from its JSON files.

    generation_config.json wins over config.json, as in transformers. Without a pad id the
    first eos pads (padding is masked out, so its value only has to be a valid token).
    """
    import json
    from pathlib import Path

    path = Path(model_path)
    cfg = json.loads((path / "config.json").read_text())
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    if eos is None:
        raise ValueError(f"{path} names no eos_token_id; pass sampling eos_token_id")
    eos_ids = _ids(eos, "eos_token_id")
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    pad_id = eos_ids[0] if pad is None else _ids(pad, "pad_token_id")[0]
    return eos_ids, pad_id, int(cfg.get("max_position_embeddings", 2048))
