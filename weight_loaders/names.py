"""Megatron name -> HF names, through the architecture's weight map (archs/<arch>.py).

A weight map is data: megatron name pattern -> layout + HF name patterns, `{i}` the global
layer number. These functions apply it; nothing here chooses by architecture name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from archs import ARCHS, Rule, WeightMap, require_megatron
from tandem_core.model_args import ModelArgs


class WeightLoaderError(ValueError):
    """A checkpoint that cannot be converted; the message names the tensor."""


def weight_map(args: ModelArgs) -> WeightMap:
    """The map every megatron ⇄ HF conversion goes through; an architecture megatron does not
    build (archs/base.py `megatron_supported`) is refused here, naming it."""
    require_megatron(args)
    return ARCHS[args.arch].weight_map


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(.*\.experts\.local_experts)\.(\d+)\.(.+)$")


def split_layer(name: str) -> tuple[str, int | None, int | None]:
    """'decoder.layers.7.mlp.experts.local_experts.3.linear_fc2.weight' ->
    ('decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc2.weight', 7, 3): the pattern,
    the global layer number and the global expert number (None where there is none)."""
    m = _LAYER.match(name)
    if m is None:
        return name, None, None
    pattern, layer, expert = f"decoder.layers.{{i}}.{m.group(2)}", int(m.group(1)), None
    e = _EXPERT.match(pattern)
    if e is not None:
        pattern, expert = f"{e.group(1)}.{{e}}.{e.group(3)}", int(e.group(2))
    return pattern, layer, expert


def lookup(weights: WeightMap, megatron_name: str) -> tuple[Rule, list[str]]:
    """The rule for a megatron name (global layer and expert numbering) and its HF names."""
    pattern, layer, expert = split_layer(megatron_name)
    if pattern not in weights:
        raise WeightLoaderError(
            f"megatron parameter {megatron_name!r} has no HF counterpart in this architecture"
        )
    rule = weights[pattern]
    return rule, [h.format(i=layer, e=expert) for h in rule.hf]


def expected_hf_names(args: ModelArgs) -> Iterator[str]:
    """Every HF tensor name a checkpoint of `args` must hold (lm_head only when untied; MoE
    rules only on MoE layers, dense ones only on the others; experts by their own names)."""
    moe = args.moe_layer_pattern()
    for pattern, rule in weight_map(args).items():
        if pattern == "output_layer.weight" and args.tie_word_embeddings:
            continue
        layers = range(args.num_layers) if "{i}" in pattern else [None]
        for i in layers:
            if i is not None and rule.on is not None and rule.on != ("moe" if moe[i] else "dense"):
                continue
            experts = range(args.num_experts) if "{e}" in pattern else [None]
            for e in experts:
                for h in rule.hf:
                    yield h.format(i=i, e=e)
