"""Rollout throughput of every registered backend, side by side: `python -m benchmarks.bench_rollout`.

Each (model, backend) runs in its own process (a world of one), so engines never share a
process's distributed state or memory. For each model, each backend generates the same chat prompts
("What is a + b?") with the same sampling settings; the table reports generated tokens
(response-mask tokens, EOS included) per second of wall time, after one warm-up call.
Run with OMP_NUM_THREADS set to the cores you want used.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
_MARK = "BENCH_RESULT "


def _model_path(name: str):
    from tandem_core.smollm2 import ensure_smollm2_checkpoint
    from tandem_core.tiny_models import ensure_tiny_checkpoint

    return ensure_smollm2_checkpoint() if name == "smollm2_135m" else ensure_tiny_checkpoint(name)


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


def bench(backend: str, model_path, prompts, response_length: int, max_model_len: int) -> dict:
    from rollout import build_rollout
    from tandem_core.config import RolloutConfig

    cfg = RolloutConfig(name=backend, response_length=response_length, temperature=1.0, seed=0)
    t = time.perf_counter()
    ro = build_rollout(cfg, model_path, dtype="float32", max_model_len=max_model_len)
    start_s = time.perf_counter() - t
    ro.generate_sequences(prompts.index(slice(0, 2)))  # warm-up
    prompts.meta_info = {"sampling": {"seed": 1}}
    t = time.perf_counter()
    out = ro.generate_sequences(prompts)
    gen_s = time.perf_counter() - t
    tokens = int(out["response_mask"].sum())
    ro.sleep(1)
    return {"start_s": start_s, "gen_s": gen_s, "tokens": tokens, "tok_per_s": tokens / gen_s}


def _run_one(model: str, backend: str, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_rollout",
        "--one",
        model,
        backend,
        "--prompts",
        str(args.prompts),
        "--response-length",
        str(args.response_length),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{model}/{backend} failed:\n{proc.stderr[-4000:]}")
    # vLLM logs to stdout too: find our line by its marker.
    line = next(x for x in proc.stdout.splitlines() if x.startswith(_MARK))
    return json.loads(line[len(_MARK) :])


def main() -> None:
    from rollout import registered_rollouts

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["tiny_llama", "smollm2_135m"])
    ap.add_argument("--backends", nargs="+", default=sorted(registered_rollouts()))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--response-length", type=int, default=64)
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        model, backend = args.one
        path = _model_path(model)
        r = bench(backend, path, _prompt_batch(path, args.prompts), args.response_length, 512)
        print(_MARK + json.dumps(r), flush=True)
        return

    for model in args.models:
        _model_path(model)  # build once, before the timed processes
    rows = []
    for model in args.models:
        for backend in args.backends:
            r = _run_one(model, backend, args)
            rows.append((model, backend, r))
            print(f"[bench_rollout] {model} {backend}: {r}", flush=True)
    print(
        f"\nprompts={args.prompts} response_length={args.response_length} fp32 sampling "
        f"threads={os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    print(f"{'model':<14} {'backend':<8} {'start s':>8} {'gen s':>7} {'tokens':>7} {'tok/s':>8}")
    for model, backend, r in rows:
        print(
            f"{model:<14} {backend:<8} {r['start_s']:>8.1f} {r['gen_s']:>7.2f} "
            f"{r['tokens']:>7d} {r['tok_per_s']:>8.1f}"
        )


if __name__ == "__main__":
    main()
