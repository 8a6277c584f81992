"""Every benchmark, one after the other, on whatever device this machine has:
`make bench` (CPU) and `make bench-gpu` run this. Each runs in its own process so engines and
process groups never share state; their tables go to stdout for BENCHMARKS.md."""

import subprocess
import sys

BENCHMARKS = [
    ["benchmarks.bench_weight_stream"],
    ["benchmarks.bench_logprob"],
    ["benchmarks.bench_rollout"],
    ["benchmarks.bench_swap"],
]

if __name__ == "__main__":
    failed = []
    for module in BENCHMARKS:
        print(f"=== python -m {' '.join(module)}", flush=True)
        if subprocess.run([sys.executable, "-m", *module]).returncode != 0:
            failed.append(module[0])
    if failed:
        sys.exit(f"benchmarks failed: {failed}")
