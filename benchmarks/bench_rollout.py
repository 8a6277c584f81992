"""Rollout throughput of every registered backend, and of bare vLLM, side by side:

    python -m benchmarks.bench_rollout [--models qwen2_0p5b]
        [--backends vllm vllm-bare vllm-bare-seeded vllm-bare-dict-logprobs vllm-bare-no-logprobs]
        [--prompts 256] [--response-length 256]
        [--stop-at-eos] [--enforce-eager true|false] [--repeats 2] [--runs 3] [--same-engine]

Each (model, backend) runs in its own process (a world of one), so engines never share a
process's distributed state or memory. For each model, every backend generates from the same
chat prompts ("What is a + b?", tokenised once) with the same sampling (temperature 1, n 1,
no top-k/top-p); the table reports generated tokens (response-mask tokens for ours, output
token ids for bare vLLM) per second of wall time of one `generate` call: best of `--repeats`
after one warm-up call on 2 prompts, the device synchronised around each. "engine start" is
the engine's construction; the first engine on a fresh machine also pays one-off kernel
caches (seen: 80 s instead of 6-12 s on an H200), so compare starts only within one run.
Each process reports every timed call too, and the seconds Python's garbage collector ran
during them (0.02-0.04 s over four calls on an H200: not where processes differ).

`--runs N` starts every backend's process N times, the order reversed on odd runs, and
reports each run's ratio to bare vLLM and their min / median / max: on an H200 the same
engine's generate call took 1.7 s in one process and 2.6-2.7 s in the next, on one machine,
so one pair of processes does not measure our wrapper. `--same-engine` measures it without
that noise: our backend's process then also calls bare `LLM.generate` on the engine it holds
(the same requests and SamplingParams as `vllm-bare`), alternating with its own calls, and
the report gives the ratio of each pair.

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
import gc
import os
import random
import statistics
import time

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


def _timed_calls(fn, repeats: int) -> dict:
    """Best of `repeats` calls of `fn`, every call's seconds, and the time Python's garbage
    collector held the process during them (gc.callbacks): the generate loop is host-bound, so
    a process whose collector walked a larger heap would decode slower."""
    pause = {"s": 0.0, "t0": 0.0}

    def on_gc(phase, info):
        if phase == "start":
            pause["t0"] = time.perf_counter()
        else:
            pause["s"] += time.perf_counter() - pause["t0"]

    calls = []
    gc.callbacks.append(on_gc)
    try:
        for _ in range(max(repeats, 1)):
            calls.append(C.timed(fn))
    finally:
        gc.callbacks.remove(on_gc)
    return {
        "gen_s": min(calls),
        "calls_s": [round(c, 3) for c in calls],
        "gc_s": round(pause["s"], 3),
    }


def _spread(values: list[float], fmt: str) -> str:
    """One value as itself; several as min / median / max."""
    if len(values) == 1:
        return fmt.format(values[0])
    v = sorted(values)
    return " / ".join(fmt.format(x) for x in (v[0], statistics.median(v), v[-1]))


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


def _bare_requests(src: C.ModelSource, prompts, opts, kind: str = BARE):
    """Bare vLLM's inputs: token-list requests and SamplingParams (one per request for
    BARE_SEEDED), built as rollout/vllm_rollout.py builds them for this batch."""
    from vllm import SamplingParams

    from rollout.assemble import prompt_token_lists
    from rollout.sampling import checkpoint_defaults

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
    if kind == BARE_SEEDED:
        # Per-request seeds: prompt i gets 1 + i (its n samples would get 1 + i + j).
        return requests, [SamplingParams(**common, seed=1 + i) for i in range(len(requests))]
    return requests, SamplingParams(**common)


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
    timing = _timed_calls(lambda: outs.append(generate(prompts, seed=1)), opts.repeats)
    tokens = int(outs[-1]["response_mask"].sum())
    if opts.same_engine and backend == "vllm":
        timing.update(_same_engine(ro, lambda: generate(prompts, seed=1), src, prompts, opts))
    ro.sleep(1)
    return {"start_s": start_s, "tokens": tokens, **timing}


def _same_engine(ro, ours, src: C.ModelSource, prompts, opts) -> dict:
    """Our backend's call and bare `LLM.generate` on the engine it holds, alternating call by
    call: the wrapper's cost without the differences between engine processes."""
    requests, params = _bare_requests(src, prompts, opts)
    pairs = []
    for _ in range(max(opts.repeats, 1)):
        ours_s = C.timed(ours)
        bare_s = C.timed(lambda: ro.llm.generate(requests, params, use_tqdm=False))
        pairs.append((round(ours_s, 3), round(bare_s, 3)))
    return {"same_engine_pairs_s": pairs}


def bench_bare(src: C.ModelSource, prompts, opts, kind: str) -> dict:
    """vllm.LLM + LLM.generate with the engine arguments and SamplingParams of
    rollout/vllm_rollout.py, changed as BARE_VARIANTS[kind] says; BARE_SEEDED: one
    SamplingParams per prompt, each with its own seed."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from rollout import vllm_compat
    from tandem_core.config import RolloutConfig
    from tandem_core.distributed import init_distributed

    init_distributed()
    defaults = RolloutConfig()
    if not vllm_compat.on_cuda():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(defaults.cpu_kvcache_space_gb)
    from vllm import LLM

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
    requests, params = _bare_requests(src, prompts, opts, kind)
    seeded = kind == BARE_SEEDED
    llm.generate(requests[:2], params[:2] if seeded else params, use_tqdm=False)
    outs = []
    timing = _timed_calls(
        lambda: outs.append(llm.generate(requests, params, use_tqdm=False)), opts.repeats
    )
    tokens = sum(len(s.token_ids) for out in outs[-1] for s in out.outputs)
    return {"start_s": start_s, "tokens": tokens, **timing}


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
    ap.add_argument("--repeats", type=int, default=C.pick(1, 2), help="timed calls a process")
    ap.add_argument(
        "--runs", type=int, default=1, help="processes per backend, the order alternating"
    )
    ap.add_argument(
        "--same-engine",
        action="store_true",
        help="our backend's process also times bare LLM.generate on its engine, calls alternating",
    )
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
    ]
    forwarded += [
        f"--{k}" for k in ("stop-at-eos", "same-engine") if getattr(opts, k.replace("-", "_"))
    ]
    # runs[r][model, backend]: run r's result; odd runs take the backends in reverse order,
    # since whichever engine starts first on a fresh machine also pays its one-off caches.
    runs: list[dict] = []
    for r in range(opts.runs):
        order = opts.backends if r % 2 == 0 else opts.backends[::-1]
        results = {}
        for model in opts.models:
            for backend in order:
                args = ["-m", "benchmarks.bench_rollout", *forwarded, "--one", model, backend]
                res = C.run_child(args, f"{model}/{backend}")
                results[model, backend] = res
                print(f"[bench_rollout] run {r} {model} {backend}: {res}", flush=True)
        runs.append(results)

    eos = "stop at EOS" if opts.stop_at_eos else "EOS ignored (fixed lengths)"
    lines = [
        f"{opts.prompts} prompts × up to {opts.response_length} new tokens, {opts.dtype}, "
        f"temperature 1, {eos}, {'eager' if opts.enforce_eager else 'CUDA graphs'}; "
        f"{C.device_name()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')}; "
        f"{opts.runs} run(s), each backend in a process of its own per run, "
        f"best of {opts.repeats} calls each",
        "",
    ]
    rows = []
    for r, results in enumerate(runs):
        for (model, backend), res in results.items():
            vs = ""
            if backend != BARE and (model, BARE) in results:
                vs = f"{res['tok_per_s'] / results[model, BARE]['tok_per_s']:.3f}×"
            rows.append(
                [
                    r,
                    model,
                    backend,
                    f"{res['start_s']:.1f} s",
                    f"{res['gen_s']:.2f} s",
                    " ".join(f"{c:.2f}" for c in res["calls_s"]),
                    f"{res['tokens']:,}",
                    f"{res['tok_per_s']:,.1f}",
                    vs,
                ]
            )
    header = [
        "run",
        "model",
        "backend",
        "engine start",
        "generate",
        "every call s",
        "tokens",
        "tokens/s",
        "vs bare",
    ]
    lines += [C.markdown_table(header, rows), ""]
    for model in opts.models:
        for name, other in (
            ("our vLLM backend", "vllm"),
            ("bare vLLM with our seeds", BARE_SEEDED),
            ("bare vLLM with dict log-probs", "vllm-bare-dict-logprobs"),
            ("bare vLLM without log-probs", "vllm-bare-no-logprobs"),
        ):
            pairs = [
                (res[model, other], res[model, BARE])
                for res in runs
                if (model, other) in res and (model, BARE) in res
            ]
            if not pairs:
                continue
            ratios = [o["tok_per_s"] / b["tok_per_s"] for o, b in pairs]
            line = f"{model}: {name} / bare vLLM tokens/s = {_spread(ratios, '{:.3f}')}"
            if all(o["tokens"] == b["tokens"] for o, b in pairs):
                extra = [1e3 * (o["gen_s"] - b["gen_s"]) for o, b in pairs]
                line += f" ({_spread(extra, '{:+,.1f}')} ms a call)"
            lines.append(line)
        same = [
            p for res in runs for p in res.get((model, "vllm"), {}).get("same_engine_pairs_s", [])
        ]
        if same:
            ratios = [bare_s / ours_s for ours_s, bare_s in same]
            extra = [1e3 * (ours_s - bare_s) for ours_s, bare_s in same]
            lines.append(
                f"{model}: our vLLM backend / bare LLM.generate on the same engine, calls "
                f"alternating = {_spread(ratios, '{:.3f}')} ({_spread(extra, '{:+,.1f}')} ms a "
                f"call; {len(same)} pairs)"
            )
    if opts.runs > 1:
        lines.append("(min / median / max over runs, each run's ratio from its own processes)")
    C.report("\n".join(lines))


if __name__ == "__main__":
    C.run_main(main)
