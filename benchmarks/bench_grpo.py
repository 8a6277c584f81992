"""A training run's iteration, phase by phase: `python -m trainer.main` (under torchrun for
`--nproc` > 1) for a few steps, then, from its metrics.jsonl, each phase's seconds over the
measured steps (min / median / max, pooled over `--runs`), the train/rollout log-prob gap and
the peak device memory. `--compare KEY=A,B` runs the same command once per value, side by side
(each value `--runs` times, the values alternating), so one table shows what the key changes.

    python -m benchmarks.bench_grpo [--nproc 2] [--steps 5] [--first 2] [--runs 1]
        [--compare KEY=A,B] [-- hydra overrides of trainer.main]
    # routing replay on and off at EP 2 on two GPUs (issue 20's R3 and breakdown rows)
    python -m benchmarks.bench_grpo --nproc 2 --compare actor.router_replay=true,false -- \\
        model=qwen3_30b_a3b model.num_layers=4 parallel.expert_model_parallel_size=2

Every run starts from the same weights and seeds, so step 1 samples the same batch under
every value: its gap is the like-for-like comparison (later steps follow their own updates).
The phases are the trainer's own timers (`timing_s/<phase>`; `gen` holds swap_enter, sync,
generate and swap_exit); a phase a run does not have is left blank. No checkpoint is written
(`trainer.save_freq=0`, `trainer.save_at_end=false`) and nothing is validated
(`trainer.test_freq=0`): what is timed is the iteration. Runs go to `--out`
(`runs/bench_grpo/<value>/run<i>`), replaced each time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks import common as C

PHASES = [
    ("step", "step"),
    ("gen", "generation, all of it"),
    ("swap_enter", "  swap enter"),
    ("sync", "    of which the weight sync"),
    ("generate", "  generate"),
    ("swap_exit", "  swap exit"),
    ("old_log_prob", "old log-probs"),
    ("ref", "reference log-probs"),
    ("values", "values"),
    ("adv", "advantages"),
    ("update_critic", "critic update"),
    ("update_actor", "actor update"),
]
GAP = "rollout/logprob_abs_diff"
FIXED = ["trainer.save_freq=0", "trainer.save_at_end=false", "trainer.test_freq=0"]


def run_once(opts, overrides: list[str], out: Path) -> dict[int, dict[str, float]]:
    from trainer.tracking import read_metrics

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={opts.nproc}"]
    argv = [sys.executable, *(launcher if opts.nproc > 1 else []), "-m", "trainer.main"]
    argv += [*overrides, *FIXED, f"trainer.total_steps={opts.steps}"]
    argv += [f"trainer.output_dir={out}", "trainer.resume=never"]
    print("[bench_grpo] " + " ".join(argv[1:]), flush=True)
    with open(out / "train.log", "w") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = (out / "train.log").read_text()[-4000:]
        raise RuntimeError(f"trainer.main exited {code} ({out / 'train.log'}):\n{tail}")
    return read_metrics(out / "metrics.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=1, help="ranks (torchrun when > 1)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--first", type=int, default=2, help="first measured step (the rest warm)")
    ap.add_argument("--runs", type=int, default=1, help="runs of each value")
    ap.add_argument("--compare", metavar="KEY=A,B", help="one column per value of KEY")
    ap.add_argument("--out", default="runs/bench_grpo")
    ap.add_argument("overrides", nargs="*", help="hydra overrides of trainer.main (after --)")
    opts = ap.parse_args()
    if not 1 <= opts.first <= opts.steps:
        ap.error(f"--first {opts.first}: a step from 1 to --steps ({opts.steps})")
    key, values = None, [""]
    if opts.compare:
        key, sep, listed = opts.compare.partition("=")
        values = [v for v in listed.split(",") if v]
        if not sep or not key or not values:
            ap.error(f"--compare {opts.compare!r}: expected KEY=A,B")
        if any(o.split("=")[0] == key for o in opts.overrides):
            ap.error(f"--compare sets {key}; leave it out of the overrides")

    runs: dict[str, list[dict[int, dict[str, float]]]] = {v: [] for v in values}
    for i in range(opts.runs):
        for value in values if i % 2 == 0 else values[::-1]:
            extra = [f"{key}={value}"] if key else []
            out = Path(opts.out) / (value or "run") / f"run{i}"
            runs[value].append(run_once(opts, [*opts.overrides, *extra], out))

    measured = range(opts.first, opts.steps + 1)

    def pooled(value: str, metric: str) -> list[float]:
        return [run[s][metric] for run in runs[value] for s in measured if metric in run.get(s, {})]

    header = ["phase (s, min / median / max)"] + [f"{key}={v}" if key else "" for v in values]
    rows = [
        [label] + [C.spread(pooled(v, f"timing_s/{phase}")) for v in values]
        for phase, label in PHASES
        if any(pooled(v, f"timing_s/{phase}") for v in values)
    ]
    rows.append(
        ["train/rollout log-prob gap, step 1 (the same batch)"]
        + [
            C.spread([run[1][GAP] for run in runs[v] if GAP in run.get(1, {})], fmt="{:.5f}")
            for v in values
        ]
    )
    rows.append(
        [f"gap, steps {opts.first}-{opts.steps}"]
        + [C.spread(pooled(v, GAP), fmt="{:.5f}") for v in values]
    )
    peaks = {
        v: [
            max(m for k, m in run[s].items() if k.startswith("memory/peak_gib/"))
            for run in runs[v]
            for s in measured
            if any(k.startswith("memory/peak_gib/") for k in run.get(s, {}))
        ]
        for v in values
    }
    if any(peaks.values()):
        rows.append(
            ["peak device memory, GiB (max over phases)"]
            + [C.spread(peaks[v], fmt="{:.1f}") for v in values]
        )
    lines = [
        f"python -m trainer.main {' '.join(opts.overrides)} ({opts.nproc} rank(s), "
        f"{C.device_name()}): steps {opts.first}-{opts.steps} of {opts.steps}, "
        f"{opts.runs} run(s) per column",
        "",
        C.markdown_table(header, rows),
    ]
    if key and len(values) == 2:
        first = [run[1][GAP] for v in values for run in runs[v][:1] if GAP in run.get(1, {})]
        if len(first) == 2 and first[1] > 0:
            lines += [
                "",
                f"step-1 gap, {key}={values[0]} over {values[1]}: {first[0] / first[1]:.3f}",
            ]
    C.report("\n".join(lines))


if __name__ == "__main__":
    C.run_main(main)
