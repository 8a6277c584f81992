"""Layout conversion megatron <-> HF, driven by each architecture's weight map (archs/):
import, export, and streaming to engines.

- `load_hf_into_megatron(chunks, hf_dir, args, config)`: fill a rank's chunks, reading only the
  slices it owns.
- `export_megatron_to_hf(chunks, args, config, out_dir, hf_source_dir)`: an HF directory.
- `megatron_named_params(chunks, config)`: a rank's params under global layer numbers.
- `stream_hf_weights(global_named_params, args, tp_group, bucket_mb)`: lazy HF-named full
  tensors (or buckets of them) for a rollout engine.
- `plan_direct_copies(global_named_params, args, engine_params, packed, train_tp, engine_tp)`:
  the tensors that map straight onto an engine sharded like megatron, as views copied in one go.
- `plan_full_tensor_copies(shapes, engine_params, packed)`: where whole HF tensors (FSDP2's
  gathered parameters) land in a TP-1 engine's parameters.
"""

from weight_loaders.direct_copy import DirectCopies, plan_direct_copies, plan_full_tensor_copies
from weight_loaders.hf_export import export_megatron_to_hf
from weight_loaders.hf_import import load_hf_into_megatron
from weight_loaders.names import WeightLoaderError, expected_hf_names, weight_map
from weight_loaders.stream import (
    bucket,
    iter_hf_tensors,
    megatron_named_params,
    stream_hf_weights,
    with_every_expert,
)
from weight_loaders.transforms import (
    LAYOUTS,
    deinterleave_qkv,
    fuse_gate_up,
    hf_to_megatron_shard,
    interleave_qkv,
    megatron_shards_to_hf,
    split_gate_up,
)

__all__ = [
    "LAYOUTS",
    "DirectCopies",
    "WeightLoaderError",
    "bucket",
    "deinterleave_qkv",
    "expected_hf_names",
    "export_megatron_to_hf",
    "fuse_gate_up",
    "hf_to_megatron_shard",
    "interleave_qkv",
    "iter_hf_tensors",
    "load_hf_into_megatron",
    "megatron_named_params",
    "megatron_shards_to_hf",
    "plan_direct_copies",
    "plan_full_tensor_copies",
    "split_gate_up",
    "stream_hf_weights",
    "weight_map",
    "with_every_expert",
]
