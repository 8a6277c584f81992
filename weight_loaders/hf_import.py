"""HF safetensors -> this rank's megatron chunks, reading only the slices this rank owns.

Every parameter of the rank's chunks (any TP/PP/VPP layout) is named globally, looked up in the
architecture's weight map, and filled from lazy `safe_open(...).get_slice(...)` reads of the
rows/columns its TP rank owns: a 70B import reads about 70B / (TP·PP) per rank.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from archs import ARCHS
from tandem_core.model_args import ModelArgs
from tandem_core.models import ValueHead
from weight_loaders.names import WeightLoaderError, expected_hf_names, lookup, weight_map
from weight_loaders.stream import megatron_named_params, unwrap_model
from weight_loaders.transforms import LAYOUTS

# Buffers some old checkpoints saved; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ExpertSlice:
    """One expert's tensor inside a stacked expert tensor [E, rows, cols], sliced lazily like
    safetensors' own slices: `half` 0/1 picks half of the rows (gate, up), -1 all of them."""

    def __init__(self, stacked, expert: int, half: int):
        self.stacked, self.expert, self.half = stacked, expert, half
        _, rows, cols = stacked.get_shape()
        self.rows = rows // 2 if half >= 0 else rows
        self.shape = [self.rows, cols]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: tuple[slice, slice]) -> torch.Tensor:
        rows, cols = index
        start, stop, _ = rows.indices(self.rows)
        base = self.rows * max(self.half, 0)
        return self.stacked[self.expert, base + start : base + stop, cols]


class SafetensorsCheckpoint:
    """Lazy access to the tensors of an HF directory (sharded with an index, or one file).
    `fused_name` (the architecture's, archs/base.py): per-expert names are also found inside
    stacked expert tensors, so either expert layout reads the same."""

    def __init__(self, hf_dir: str | Path, stack: ExitStack, fused_name=None):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            self.files = json.loads(index.read_text())["weight_map"]
        else:
            single = self.dir / "model.safetensors"
            if not single.exists():
                raise WeightLoaderError(f"no model.safetensors(.index.json) in {self.dir}")
            with safe_open(single, framework="pt") as f:
                self.files = {name: single.name for name in f.keys()}
        self.fused_name = fused_name
        self._stack = stack
        self._handles = {}

    def names(self) -> set[str]:
        return {n for n in self.files if not n.endswith(_IGNORED_SUFFIXES)}

    def _stacked(self, name: str) -> tuple[str, int, int] | None:
        where = self.fused_name(name) if self.fused_name else None
        return where if where is not None and where[0] in self.files else None

    def _slice(self, name: str):
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(
                safe_open(self.dir / file, framework="pt")
            )
        return self._handles[file].get_slice(name)

    def slice(self, name: str):
        if name in self.files:
            return self._slice(name)
        stacked = self._stacked(name)
        if stacked is None:
            raise WeightLoaderError(f"tensor {name!r} is missing from the checkpoint {self.dir}")
        fused, expert, half = stacked
        return ExpertSlice(self._slice(fused), expert, half)


def check_names(ckpt_names: set[str], args: ModelArgs, fused_name=None) -> None:
    """The checkpoint holds exactly the tensors `args` implies (lm_head tolerated when tied:
    some tied checkpoints store the copy, and HF ignores it); experts in either layout."""
    expected = set(expected_hf_names(args))
    stacked = {}
    for name in expected - ckpt_names:
        where = fused_name(name) if fused_name else None
        if where is not None and where[0] in ckpt_names:
            stacked[name] = where[0]
    missing = sorted(expected - ckpt_names - set(stacked))
    extra = sorted(
        ckpt_names
        - expected
        - set(stacked.values())
        - ({"lm_head.weight"} if args.tie_word_embeddings else set())
    )
    if missing:
        raise WeightLoaderError(
            f"tensor {missing[0]!r} is missing from the checkpoint "
            f"({len(missing)} missing: {missing[:5]})"
        )
    if extra:
        raise WeightLoaderError(
            f"checkpoint tensor {extra[0]!r} has no place in a {args.arch} "
            f"model of this config ({len(extra)} unexpected: {extra[:5]})"
        )


def load_hf_into_megatron(model_chunks: list, hf_dir, args: ModelArgs, config) -> None:
    """Fill this rank's GPTModel chunks in place from an HF safetensors directory."""
    from megatron.core import parallel_state as mpu

    tp, rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    if args.num_query_groups % tp:
        raise WeightLoaderError(
            f"num_key_value_heads={args.num_query_groups} is not divisible by TP={tp}"
        )
    weights = weight_map(args)
    with ExitStack() as stack:
        fused_name = ARCHS[args.arch].fused_name
        ckpt = SafetensorsCheckpoint(hf_dir, stack, fused_name)
        check_names(ckpt.names(), args, fused_name)
        for chunk in model_chunks:
            model = unwrap_model(chunk)
            value_head = model.post_process and isinstance(model.output_layer, ValueHead)
            for name, param in megatron_named_params([chunk], config):
                if name == "output_layer.weight" and value_head:
                    continue  # a critic's fresh value head has no HF counterpart
                source = name
                if name == "output_layer.weight" and args.tie_word_embeddings:
                    # A tied model's last PP stage holds its own copy of the embedding.
                    source = "embedding.word_embeddings.weight"
                rule, hf_names = lookup(weights, source)
                with torch.no_grad():
                    param.copy_(
                        _read_shard(ckpt, rule.layout, hf_names, name, param, args, tp, rank)
                    )


def _read_shard(ckpt, layout_name, hf_names, megatron_name, param, args, tp, rank):
    layout = LAYOUTS[layout_name]
    shard_shape = tuple(param.shape)
    slices = [ckpt.slice(h) for h in hf_names]
    expected = layout.hf_shapes(shard_shape, args, tp)
    for h, sl, want in zip(hf_names, slices, expected, strict=True):
        have = tuple(sl.get_shape())
        if have != tuple(want):
            raise WeightLoaderError(
                f"tensor {h!r}: checkpoint shape {list(have)} but the config implies "
                f"{list(want)} (megatron {megatron_name} shard {list(shard_shape)}, TP={tp})"
            )
    index = layout.shard_index(expected, args, tp, rank)
    parts = [sl[i] for sl, i in zip(slices, index, strict=True)]
    shard = layout.assemble(parts, shard_shape, args)
    if tuple(shard.shape) != shard_shape:
        raise WeightLoaderError(
            f"{megatron_name}: built shard {list(shard.shape)} from {hf_names} but the "
            f"megatron parameter is {list(shard_shape)}"
        )
    return shard.to(param.dtype)
