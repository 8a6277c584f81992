"""Rollout throughput of every registered backend, and of bare vLLM, side by side:

    python -m benchmarks.bench_rollout [--models qwen2_0p5b]
        [--backends vllm vllm-bare vllm-bare-seeded vllm-bare-dict-logprobs vllm-bare-no-logprobs]
        [--prompts 256] [--response-length 256]
        [--stop-at-eos] [--enforce-eager true|false]

Each (model, backend) runs in its own process (a world of one), so engines never share a
process's distributed state or memory. For each model, every backend generates from the same
chat prompts ("What is a + b?", tokenised once) with the same sampling (temperature 1, n 1,
no top-k/top-p); the table reports generated tokens (response-mask tokens for ours, output
token ids for bare vLLM) per second of wall time of one `generate` call: best of `--repeats`
after one warm-up call on 2 prompts, the device synchronised around each. "engine start" is
the engine's construction; the first engine on a fresh machine also pays one-off kernel
caches (seen: 80 s instead of 6-12 s on an H200), so compare starts only within one run.

`vllm-bare` is `vllm.LLM` + `LLM.generate` called directly, with the engine arguments that
rollout/vllm_rollout.py passes (skip_tokenizer_init, external_launcher in the same torch.
distributed world of one, enforce_eager, no prefix caching, raw_logprobs, seed, load_format,
sleep mode and gpu_memory_utilization through vllm_compat) and the same SamplingParams; its
prompts are token lists built before the clock starts. So the `vllm / vllm-bare` ratio is the
cost of our wrapper: prompt checks and assembly, the per-call seed, reading the log-probs and
building the output batch. `vllm-bare-seeded` is bare vLLM with one SamplingParams per prompt,
each with its own seed: what per-request seeds (one generator per sequence) would cost. Two
more rows are there on request: `vllm-bare-dict-logprobs` gets its log-probs as vLLM's default
{token: Logprob} dict per token instead of flat lists (`flat_logprobs`, what our backend asks
for), `vllm-bare-no-logprobs` none at all: what returning log-probs costs inside vLLM.

By default every response runs to `--response-length` tokens (EOS ignored: our backend gets
`eos_token_id=[]` in its per-call sampling overrides, bare vLLM `ignore_eos=True` and no stop
ids), so all sides generate the same number of tokens; `--stop-at-eos` stops them on the
checkpoint's EOS ids instead (the counts then differ; each side's actual count is reported).

Defaults: on CUDA the Qwen2.5-0.5B shape with random (dummy) weights in bf16, backends vllm,
vllm-bare and vllm-bare-seeded, 256 prompts × 256 new tokens, best of 2; on CPU tiny_llama
and SmolLM2-135M in fp32, every registered backend plus both bare variants, 64 prompts × 64
new tokens, one timed call.
"""

from __future__ import annotations

import argparse
import os
import random

from benchmarks import common as C

BARE = "vllm-bare"
BARE_SEEDED = "vllm-bare-seeded"
# Bare vLLM variants: SamplingParams fields that differ from our backend's.
BARE_VARIANTS = {
    BARE: {},
    BARE_SEEDED: {},  # + one seed per prompt
    "vllm-bare-dict-logprobs": {"flat_logprobs": False},
    "vllm-bare-no-logprobs": {"logprobs": None, "flat_logprobs": False},
}
BARE_KINDS = tuple(BARE_VARIANTS)
DEFAULT_BARE_KINDS = (BARE, BARE_SEEDED)


def _prompt_batch(model_path, count: int, seed: int = 0):
    import torch
    from transformers import AutoTokenizer

    from tandem_core.protocol import Batch

    tok = AutoTokenizer.from_pretrained(model_path)
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        msg = [
            {"role": "user", "content": f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}?"}
        ]
        text = tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
        rows.append(tok(text, add_special_tokens=False)["input_ids"])
    width = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((count, width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return Batch.from_dict({"input_ids": ids, "attention_mask": mask, "position_ids": pos})


def bench_ours(backend: str, src: C.ModelSource, prompts, opts) -> dict:
    from rollout import build_rollout
    from tandem_core.config import RolloutConfig

    cfg = RolloutConfig(
        name=backend,
        response_length=opts.response_length,
        temperature=1.0,
        seed=0,
        load_format=src.load_format,
        gpu_memory_utilization=opts.gpu_memory_utilization,
        enforce_eager=opts.enforce_eager,
    )
    ro, start_s = C.timed_call(
        lambda: build_rollout(cfg, src.hf_dir, dtype=opts.dtype, max_model_len=opts.max_model_len)
    )
    sampling = {} if opts.stop_at_eos else {"eos_token_id": []}  # [] = no EOS: fixed lengths

    def generate(batch, seed: int):
        batch = batch.index(slice(0, len(batch)))  # a copy: meta_info is per call
        batch.meta_info = {"sampling": {**sampling, "seed": seed}}
        return ro.generate_sequences(batch)

    generate(prompts.index(slice(0, 2)), seed=0)  # warm-up
    outs = []
    gen_s = C.best_of(lambda: outs.append(generate(prompts, seed=1)), opts.repeats)
    tokens = int(outs[-1]["response_mask"].sum())
    ro.sleep(1)
    return {"start_s": start_s, "gen_s": gen_s, "tokens": tokens}


def bench_bare(src: C.ModelSource, prompts, opts, kind: str) -> dict:
    """vllm.LLM + LLM.generate with the engine arguments and SamplingParams of
    rollout/vllm_rollout.py, changed as BARE_VARIANTS[kind] says; BARE_SEEDED: one
    SamplingParams per prompt, each with its own seed."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from rollout import vllm_compat
    from rollout.assemble import prompt_token_lists
    from rollout.sampling import checkpoint_defaults
    from tandem_core.config import RolloutConfig
    from tandem_core.distributed import init_distributed

    init_distributed()
    defaults = RolloutConfig()
    if not vllm_compat.on_cuda():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(defaults.cpu_kvcache_space_gb)
    from vllm import LLM, SamplingParams

    llm, start_s = C.timed_call(
        lambda: LLM(
            model=str(src.hf_dir),
            skip_tokenizer_init=True,
            dtype=opts.dtype,
            max_model_len=opts.max_model_len,
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher",
            enable_prefix_caching=defaults.enable_prefix_caching,
            logprobs_mode="raw_logprobs",
            seed=defaults.seed,
            load_format=src.load_format,
            **vllm_compat.platform_engine_kwargs(opts.gpu_memory_utilization, opts.enforce_eager),
        )
    )
    eos_ids, _, _ = checkpoint_defaults(src.hf_dir)
    requests = [
        {"prompt_token_ids": t}
        for t in prompt_token_lists(
            prompts, max_model_len=opts.max_model_len, response_length=opts.response_length
        )
    ]
    common = dict(
        n=1,
        temperature=1.0,
        max_tokens=opts.response_length,
        ignore_eos=True,
        stop_token_ids=list(eos_ids) if opts.stop_at_eos else None,
        logprobs=0,
        flat_logprobs=True,
        detokenize=False,
    )
    common.update(BARE_VARIANTS[kind])
    seeded = kind == BARE_SEEDED
    # Per-request seeds: prompt i gets 1 + i (its n samples would get 1 + i + j).
    params = [SamplingParams(**common, seed=1 + i) for i in range(len(requests))]
    if not seeded:
        params = SamplingParams(**common)
    llm.generate(requests[:2], params[:2] if seeded else params, use_tqdm=False)
    outs = []
    gen_s = C.best_of(
        lambda: outs.append(llm.generate(requests, params, use_tqdm=False)), opts.repeats
    )
    tokens = sum(len(s.token_ids) for out in outs[-1] for s in out.outputs)
    return {"start_s": start_s, "gen_s": gen_s, "tokens": tokens}


def main() -> None:
    from rollout import ROLLOUTS
    from tandem_core.config import RolloutConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models", nargs="+", default=C.pick(["tiny_llama", "smollm2_135m"], ["qwen2_0p5b"])
    )
    ap.add_argument(
        "--backends",
        nargs="+",
        default=C.pick([*sorted(ROLLOUTS), *DEFAULT_BARE_KINDS], ["vllm", *DEFAULT_BARE_KINDS]),
        help=f"registered backends ({', '.join(sorted(ROLLOUTS))}), {', '.join(BARE_KINDS)}",
    )
    ap.add_argument("--prompts", type=int, default=C.pick(64, 256))
    ap.add_argument("--response-length", type=int, default=C.pick(64, 256))
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--dtype", default=C.default_dtype(), choices=["float32", "bfloat16"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=C.pick(1, 2))
    ap.add_argument("--stop-at-eos", action="store_true")
    ap.add_argument(
        "--enforce-eager",
        type=lambda v: v.lower() in ("1", "true", "yes"),
        default=RolloutConfig().enforce_eager,
        help="true: no CUDA graphs; false (the config default): vLLM captures CUDA graphs",
    )
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    opts = ap.parse_args()

    if opts.one:
        model, backend = opts.one
        src = C.resolve_model(model)
        prompts = _prompt_batch(src.hf_dir, opts.prompts)
        if backend in BARE_KINDS:
            r = bench_bare(src, prompts, opts, backend)
        else:
            r = bench_ours(backend, src, prompts, opts)
        C.emit_result({**r, "tok_per_s": r["tokens"] / r["gen_s"]})
        return

    known = [*sorted(ROLLOUTS), *BARE_KINDS]
    unknown = set(opts.backends) - set(known)
    if unknown:
        raise SystemExit(f"unknown backends {sorted(unknown)}; known: {', '.join(known)}")
    for model in opts.models:
        C.resolve_model(model)  # build once, before the timed processes
    forwarded = [
        f"--{k.replace('_', '-')}={getattr(opts, k)}"
        for k in (
            "prompts",
            "response_length",
            "max_model_len",
            "dtype",
            "gpu_memory_utilization",
            "repeats",
            "enforce_eager",
        )
    ] + (["--stop-at-eos"] if opts.stop_at_eos else [])
    results = {}
    for model in opts.models:
        for backend in opts.backends:
            args = ["-m", "benchmarks.bench_rollout", *forwarded, "--one", model, backend]
            r = C.run_child(args, f"{model}/{backend}")
            results[model, backend] = r
            print(f"[bench_rollout] {model} {backend}: {r}", flush=True)

    eos = "stop at EOS" if opts.stop_at_eos else "EOS ignored (fixed lengths)"
    lines = [
        f"{opts.prompts} prompts × up to {opts.response_length} new tokens, {opts.dtype}, "
        f"temperature 1, {eos}, {'eager' if opts.enforce_eager else 'CUDA graphs'}; "
        f"{C.device_name()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')}",
        "",
    ]
    rows = []
    for (model, backend), r in results.items():
        vs = ""
        if backend != BARE and (model, BARE) in results:
            vs = f"{r['tok_per_s'] / results[model, BARE]['tok_per_s']:.3f}×"
        rows.append(
            [
                model,
                backend,
                f"{r['start_s']:.1f} s",
                f"{r['gen_s']:.2f} s",
                f"{r['tokens']:,}",
                f"{r['tok_per_s']:,.1f}",
                vs,
            ]
        )
    header = ["model", "backend", "engine start", "generate", "tokens", "tokens/s", "vs bare"]
    lines += [C.markdown_table(header, rows), ""]
    for model in opts.models:
        for name, other in (
            ("our vLLM backend", "vllm"),
            ("bare vLLM with our seeds", BARE_SEEDED),
            ("bare vLLM with dict log-probs", "vllm-bare-dict-logprobs"),
            ("bare vLLM without log-probs", "vllm-bare-no-logprobs"),
        ):
            if (model, other) not in results or (model, BARE) not in results:
                continue
            r, bare = results[model, other], results[model, BARE]
            line = (
                f"{model}: {name} / bare vLLM tokens/s = {r['tok_per_s'] / bare['tok_per_s']:.3f}"
            )
            if r["tokens"] == bare["tokens"]:
                line += f" ({1e3 * (r['gen_s'] - bare['gen_s']):+,.1f} ms a call)"
            lines.append(line)
    C.report("\n".join(lines))


if __name__ == "__main__":
    C.run_main(main)
