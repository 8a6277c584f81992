"""One module per architecture (llama, qwen2, mistral, qwen3, qwen3_moe, gemma3), each holding
everything the architecture means: its HF-config reader, its HF ⇄ megatron weight map, the HF
config it writes for presets, and its presets (tiny test models, released shapes, real models).
Gemma 3 has no weight map: megatron does not build it, the fsdp2 strategy trains it.
Importing this package registers them; adding one is docs/adding_a_model.md.
"""

from archs import gemma3, llama, mistral, qwen2, qwen3, qwen3_moe  # noqa: F401  (register them)
from archs.base import (
    ARCHS,
    NO_MEGATRON,
    PRESETS,
    Arch,
    Preset,
    Rule,
    UnsupportedModelError,
    WeightMap,
    megatron_supported,
    model_args_from_hf,
    require_megatron,
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
    "NO_MEGATRON",
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
    "megatron_supported",
    "model_args_from_hf",
    "model_dir",
    "read_model_args",
    "require_megatron",
]
