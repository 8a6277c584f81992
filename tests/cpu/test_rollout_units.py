"""The backend-independent parts of rollout/: sampling settings, batch assembly, registry."""

from __future__ import annotations

import pytest
import torch

from rollout import ROLLOUTS, build_rollout, register_rollout
from rollout.assemble import build_output, cut_at_eos, prompt_token_lists
from rollout.base import BaseRollout
from rollout.sampling import checkpoint_defaults, resolve_sampling
from tandem_core.config import RolloutConfig
from tandem_core.protocol import Batch

PAD = 0


def _prompts(rows: list[list[int]], **meta) -> Batch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return Batch.from_dict(
        {"input_ids": ids, "attention_mask": mask, "position_ids": pos},
        {"gt": [f"g{i}" for i in range(len(rows))]},
        meta,
    )


def _settings(**over):
    return resolve_sampling(
        RolloutConfig(response_length=4), {"sampling": over}, eos_token_ids=(9,), pad_token_id=PAD
    )


def test_sampling_defaults_and_overrides():
    cfg = RolloutConfig(n=2, temperature=0.7, top_p=0.9, top_k=5, response_length=8, seed=3)
    s = resolve_sampling(cfg, {}, eos_token_ids=(9,), pad_token_id=PAD)
    assert (s.n, s.temperature, s.top_p, s.top_k, s.response_length) == (2, 0.7, 0.9, 5, 8)
    assert s.eos_token_ids == (9,) and s.seed is None and not s.greedy
    s = resolve_sampling(
        cfg,
        {
            "sampling": {"do_sample": False, "max_new_tokens": 3, "stop_token_ids": [4, 9]},
            "global_steps": 7,
        },  # other meta_info keys are the trainer's business
        eos_token_ids=(9,),
        pad_token_id=PAD,
    )
    assert s.greedy and s.response_length == 3 and s.eos_token_ids == (9, 4)


@pytest.mark.parametrize(
    "over,words",
    [
        ({"n": 0}, "n must be >= 1"),
        ({"temprature": 1.0}, "temprature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"response_length": 0}, "response_length"),
        ({"max_new_tokens": 3, "response_length": 4}, "disagree"),
        ({"eos_token_id": "x"}, "eos_token_id"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_sampling_rejects_bad_settings(over, words):
    with pytest.raises(ValueError, match=words):
        _settings(**over)


def test_prompt_checks_name_the_problem():
    ok = _prompts([[5, 6, 7], [8]])
    assert prompt_token_lists(ok, max_model_len=7, response_length=4) == [[5, 6, 7], [8]]
    with pytest.raises(ValueError, match="row 0 is too long"):
        prompt_token_lists(ok, max_model_len=6, response_length=4)
    bad = _prompts([[5, 6, 7], [8]])
    bad.tensors["attention_mask"][1] = 0
    with pytest.raises(ValueError, match="empty prompt in row 1"):
        prompt_token_lists(bad, max_model_len=64, response_length=4)
    right = _prompts([[5, 6, 7], [8, 9, 10]])
    right.tensors["attention_mask"][1] = torch.tensor([1, 1, 0])
    with pytest.raises(ValueError, match="not left-padded"):
        prompt_token_lists(right, max_model_len=64, response_length=4)
    with pytest.raises(ValueError, match="lacks"):
        prompt_token_lists(
            ok.select(["input_ids", "attention_mask"]), max_model_len=64, response_length=4
        )


def test_build_output_layout():
    prompts = _prompts([[5, 6, 7], [8]])
    s = _settings(n=2)
    responses = [[1, 9, 2, 2], [1, 2, 3, 4, 5], [9], [3, 3]]  # eos, overlong, eos first, short
    logps = [[-0.1, -0.2, -0.3, -0.4], [-1.0] * 5, [-0.5], [-0.6, -0.7]]
    out = build_output(prompts, responses, logps, s)
    assert out["responses"].tolist() == [[1, 9, 0, 0], [1, 2, 3, 4], [9, 0, 0, 0], [3, 3, 0, 0]]
    assert out["response_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert out["rollout_log_probs"][0].tolist() == pytest.approx([-0.1, -0.2, 0, 0])
    assert out["prompts"].tolist() == [[5, 6, 7], [5, 6, 7], [0, 0, 8], [0, 0, 8]]
    assert out["input_ids"][2].tolist() == [0, 0, 8, 9, 0, 0, 0]
    assert out["attention_mask"][2].tolist() == [0, 0, 1, 1, 0, 0, 0]
    assert out["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert out["position_ids"][3].tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert list(out["gt"]) == ["g0", "g0", "g1", "g1"]
    assert cut_at_eos([9, 9], s) == 1 and cut_at_eos([], s) == 0


def test_checkpoint_defaults(tiny_ckpt):
    eos, pad, max_pos = checkpoint_defaults(tiny_ckpt("tiny_qwen2"))
    assert eos == (3,) and pad == 0 and max_pos == 512


def test_registry_builds_by_name_and_rejects_unknown(tiny_ckpt):
    assert {"hf", "vllm"} <= set(ROLLOUTS)
    with pytest.raises(KeyError, match="unknown rollout backend 'nope'; registered: hf, vllm"):
        build_rollout(RolloutConfig(name="nope"), tiny_ckpt())
    with pytest.raises(ValueError, match="already registered"):

        @register_rollout("hf")
        class Other(BaseRollout):
            def generate_sequences(self, prompts):
                return prompts

    ro = build_rollout(RolloutConfig(name="hf"), tiny_ckpt("tiny_qwen2"), max_model_len=32)
    assert type(ro).__name__ == "HFRollout" and ro.max_model_len == 32
    with pytest.raises(ValueError, match="tensor_model_parallel_size"):
        build_rollout(
            RolloutConfig(name="hf", tensor_model_parallel_size=2), tiny_ckpt("tiny_qwen2")
        )


def test_hf_log_probs_do_not_depend_on_earlier_calls(tiny_ckpt):
    """A resumed run must equal a straight one: the same prompts and seed give bit-identical
    samples and log-probs whatever longer generations came before."""
    rollout = build_rollout(RolloutConfig(name="hf", response_length=8), tiny_ckpt("tiny_llama"))
    short = _prompts([[5, 6, 7], [8, 9]], sampling={"seed": 3})
    long = _prompts([list(range(5, 60))], sampling={"seed": 4, "response_length": 40})
    first = rollout.generate_sequences(short)
    rollout.generate_sequences(long)
    again = rollout.generate_sequences(short)
    assert torch.equal(first["responses"], again["responses"])
    assert torch.equal(first["rollout_log_probs"], again["rollout_log_probs"])


def _vllm_samples(responses, logps):
    """vLLM `CompletionOutput`s as our backend asks for them (logprobs=0, flat_logprobs), their
    log-probs written by vLLM's own code."""
    from vllm.logprobs import append_logprobs_for_next_position, create_sample_logprobs
    from vllm.outputs import CompletionOutput

    samples = []
    for i, (toks, lps) in enumerate(zip(responses, logps, strict=True)):
        flat = create_sample_logprobs(flat_logprobs=True)
        for tok, lp in zip(toks, lps, strict=True):
            append_logprobs_for_next_position(flat, [tok], [lp], [None], 1, 0)
        samples.append(CompletionOutput(i, "", list(toks), None, flat))
    return samples


def _build_output_row_by_row(prompts, responses, logps, s, routed):
    """build_output as one row at a time: cut_at_eos per row, then the shared column helpers
    (the reference its vectorised assembly must equal bit for bit)."""
    from rollout.assemble import routing_column, with_responses

    rows, width = len(responses), s.response_length
    resp = torch.full((rows, width), s.pad_token_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    logp = torch.zeros((rows, width), dtype=torch.float32)
    for i, (toks, lps) in enumerate(zip(responses, logps, strict=True)):
        keep = cut_at_eos(toks, s)
        resp[i, :keep] = torch.tensor(toks[:keep], dtype=torch.long)
        mask[i, :keep] = 1
        logp[i, :keep] = torch.tensor(lps[:keep], dtype=torch.float32)
    out = with_responses(prompts.repeat(s.n, interleave=True), resp, mask, mask, logp)
    out["routed_experts"] = routing_column(routed, out["attention_mask"][:, :-width], mask)
    return out


def test_build_output_equals_row_by_row_and_reads_vllm_samples():
    """build_output's vectorised assembly equals a row-by-row one bit for bit (EOS cuts, any of
    several ids; overlong and short rows; n > 1; routed experts), from plain lists and from
    vLLM's samples as our backend asks for them (flat log-probs)."""
    from rollout.vllm_rollout import sampled_tokens

    g = torch.Generator().manual_seed(0)
    cases = [  # (prompts, responses, n, R, eos ids)
        ([[5, 6, 7], [8]], [[1, 9, 2, 2], [1, 2, 3, 4, 5], [9], [3, 3]], 2, 4, [9]),
        (
            [[5, 6, 7], [8], [4, 4]],
            [torch.randint(1, 20, (k,), generator=g).tolist() for k in (16, 3, 0, 16, 9, 16)],
            2,
            16,
            [9, 13],
        ),
    ]
    for rows, responses, n, width, eos in cases:
        s = _settings(n=n, response_length=width, eos_token_id=eos)
        # float32 values, as vLLM hands them out
        logps = [(-torch.rand(len(r), generator=g) * 9).tolist() for r in responses]
        routed = [torch.randint(1, 8, (4 + len(r), 2, 2), dtype=torch.int16) for r in responses]
        want = _build_output_row_by_row(_prompts(rows), responses, logps, s, routed)
        from_lists = build_output(_prompts(rows), responses, logps, s, routed_experts=routed)
        samples = sampled_tokens(_vllm_samples(responses, logps))
        from_vllm = build_output(_prompts(rows), *samples, s, routed_experts=routed)
        for got in (from_lists, from_vllm):
            assert set(got.keys()) == set(want.keys())
            for key in want.keys():
                if isinstance(want[key], torch.Tensor):
                    assert got[key].dtype == want[key].dtype, key
                    assert torch.equal(got[key], want[key]), key
            assert list(got["gt"]) == list(want["gt"])

    bad = _vllm_samples([[1, 2]], [[-0.5, -0.25]])
    bad[0].token_ids = [1, 3]
    with pytest.raises(RuntimeError, match="not those of its sampled tokens"):
        sampled_tokens(bad)
    with pytest.raises(RuntimeError, match="returned 1 log-probs for 2 tokens"):
        build_output(_prompts([[5]]), [[1, 2]], [[-0.5]], _settings(n=1, response_length=4))
