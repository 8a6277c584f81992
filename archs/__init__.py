"""One module per architecture (llama, qwen2, mistral, qwen3, qwen3_moe), each holding everything the
architecture means: its HF-config reader, its HF ⇄ megatron weight map, the HF config it
writes for presets, and its presets (tiny test models, released shapes, real models).
Importing this package registers them; adding one is docs/adding_a_model.md.
"""

from archs import llama, mistral, qwen2, qwen3, qwen3_moe  # noqa: F401  (register them)
from archs.base import (
    ARCHS,
    PRESETS,
    Arch,
    Preset,
    Rule,
    UnsupportedModelError,
    WeightMap,
    model_args_from_hf,
)
from archs.checkpoints import (
    check_model_source,
    cut_to_layers,
    ensure_preset_dir,
    ensure_tiny_checkpoint,
    model_dir,
    read_model_args,
)

__all__ = [
    "ARCHS",
    "PRESETS",
    "Arch",
    "Preset",
    "Rule",
    "UnsupportedModelError",
    "WeightMap",
    "check_model_source",
    "cut_to_layers",
    "ensure_preset_dir",
    "ensure_tiny_checkpoint",
    "model_args_from_hf",
    "model_dir",
    "read_model_args",
]
