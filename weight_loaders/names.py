"""Megatron name -> HF names, through the architecture's weight map (archs/<arch>.py).

A weight map is data: megatron name pattern -> layout + HF name patterns, `{i}` the global
layer number. These functions apply it; nothing here chooses by architecture name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from archs import ARCHS, Rule, WeightMap
from tandem_core.model_args import ModelArgs


class WeightLoaderError(ValueError):
    """A checkpoint that cannot be converted; the message names the tensor."""


def weight_map(args: ModelArgs) -> WeightMap:
    return ARCHS[args.arch].weight_map


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def split_layer(name: str) -> tuple[str, int | None]:
    """'decoder.layers.7.mlp.linear_fc2.weight' -> ('decoder.layers.{i}.mlp.linear_fc2.weight', 7)."""
    m = _LAYER.match(name)
    if m is None:
        return name, None
    return f"decoder.layers.{{i}}.{m.group(2)}", int(m.group(1))


def lookup(weights: WeightMap, megatron_name: str) -> tuple[Rule, list[str]]:
    """The rule for a megatron name (global layer numbering) and its concrete HF names."""
    pattern, layer = split_layer(megatron_name)
    if pattern not in weights:
        raise WeightLoaderError(
            f"megatron parameter {megatron_name!r} has no HF counterpart in this architecture"
        )
    rule = weights[pattern]
    return rule, [h.format(i=layer) for h in rule.hf]


def expected_hf_names(args: ModelArgs) -> Iterator[str]:
    """Every HF tensor name a checkpoint of `args` must hold (lm_head only when untied)."""
    for pattern, rule in weight_map(args).items():
        if pattern == "output_layer.weight" and args.tie_word_embeddings:
            continue
        layers = range(args.num_layers) if "{i}" in pattern else [None]
        for i in layers:
            for h in rule.hf:
                yield h.format(i=i)
