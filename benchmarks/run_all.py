"""Every benchmark of a set, one after the other, each in its own process (so engines and
process groups never share state); their reports are printed again together at the end, for
BENCHMARKS.md. Exits non-zero, naming them, when any benchmark failed (the others still run).

    python -m benchmarks.run_all                 # the CPU set (`make bench`)
    python -m benchmarks.run_all --gpu           # the GPU set (`make bench-gpu`), CUDA only
    python -m benchmarks.run_all --gpu --only mfu,rollout
    python -m benchmarks.run_all --gpu2          # the two-GPU set (`make bench-gpu2`)

Each benchmark picks its own defaults from the device (bf16 and GPU-sized shapes on CUDA; see
each script's docstring). To pin the run to one GPU: CUDA_VISIBLE_DEVICES=N. The two-GPU set is
the mixture-of-experts table at expert parallelism 2 (Qwen3-30B-A3B's shape cut to what two
GPUs hold): the update with grouped experts against megatron's SequentialMLP and its MFU, the
weight sync against one contiguous device copy, routing replay's log-prob gap, and a GRPO
iteration's phases with replay on and off. Each starts its own torchrun.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common as C

CPU_SET = {
    "weight_stream": ["benchmarks.bench_weight_stream"],
    "logprob": ["benchmarks.bench_logprob"],
    "rollout": ["benchmarks.bench_rollout"],
    "swap": ["benchmarks.bench_swap"],
    "mfu": ["benchmarks.bench_mfu", "--model", "tiny_llama"],
}
GPU_SET = {
    "mfu": ["benchmarks.bench_mfu"],
    "logprob": ["benchmarks.bench_logprob"],
    "swap": ["benchmarks.bench_swap"],
    "rollout": ["benchmarks.bench_rollout"],
}

# GRPO on Qwen3-30B-A3B's first 4 layers at EP 2: 32 prompts × 8 samples × 256 tokens, one
# optimizer step a batch, micro-batches of 16 (the peers' 0.5B workload, benchmarks/peers)
MOE_EP2 = ["algorithm=grpo", "rollout=vllm", "model=qwen3_30b_a3b", "model.num_layers=4"]
MOE_EP2 += ["parallel.expert_model_parallel_size=2", "data.train_batch_size=32", "rollout.n=8"]
MOE_EP2 += ["rollout.response_length=256", "data.max_prompt_length=128", "model.max_seq_len=512"]
MOE_EP2 += ["actor.ppo_mini_batch_size=32", "actor.micro_batch_size=16"]
MOE_EP2 += ["rollout.gpu_memory_utilization=0.35"]
GPU2_SET = {
    "moe": ["benchmarks.bench_moe", "--ep", "2", "--layers", "12", "--batch", "32"]
    + ["--micro-batch", "16"],
    "swap": ["benchmarks.bench_swap", "--model", "qwen3_30b_a3b", "--layers", "4", "--ep", "2"],
    "swap_engine_ep": ["benchmarks.bench_swap", "--model", "qwen3_30b_a3b", "--layers", "4"]
    + ["--ep", "2", "--engine-ep"],
    "r3": ["benchmarks.bench_r3", "--ep", "2"],
    "grpo": ["benchmarks.bench_grpo", "--nproc", "2", "--compare", "actor.router_replay=true,false"]
    + ["--", *MOE_EP2],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU set (needs CUDA)")
    ap.add_argument("--gpu2", action="store_true", help="the two-GPU set (needs 2 CUDA GPUs)")
    ap.add_argument("--only", default="", help="comma-separated names from the set")
    opts = ap.parse_args()

    benchmarks = GPU2_SET if opts.gpu2 else GPU_SET if opts.gpu else CPU_SET
    wanted = 2 if opts.gpu2 else 1 if opts.gpu else 0
    seen = torch.cuda.device_count()  # 0 without CUDA
    if seen < wanted:
        print(f"run_all: this set needs {wanted} CUDA GPU(s); {seen} visible")
        return 2
    names = [n for n in opts.only.split(",") if n] or list(benchmarks)
    unknown = [n for n in names if n not in benchmarks]
    if unknown:
        print(f"run_all: unknown benchmark(s) {unknown}; this set has {list(benchmarks)}")
        return 2

    reports, failed = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            module = benchmarks[name]
            print(f"=== {name}: python -m {' '.join(module)}", flush=True)
            report = Path(tmp) / f"{name}.md"
            env = {**os.environ, C.REPORT_FILE_ENV: str(report)}
            t0 = time.perf_counter()
            code = subprocess.run([sys.executable, "-m", *module], env=env).returncode
            wall = time.perf_counter() - t0
            if code != 0:
                failed.append(name)
                text = f"FAILED (exit {code}) after {wall:.0f} s: see its output above"
            else:
                text = report.read_text().rstrip() if report.exists() else "(no report)"
                text += f"\n\n({wall:.0f} s wall)"
            reports[name] = (module, text)

    print("\n\n######## reports ########", flush=True)
    for name, (module, text) in reports.items():
        print(f"\n### {name} — `python -m {' '.join(module)}`\n\n{text}")
    if failed:
        print(f"\nbenchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
