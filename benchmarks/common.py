"""What every benchmark shares: device and dtype defaults, model directories, synthetic
batches, timing, child processes, tables, and a clear failure exit.

Defaults follow the device: on CUDA, bf16 and the GPU-sized arguments; on CPU, fp32 and the
small ones (`pick(cpu=..., gpu=...)`). Device code never names an ordinal: everything runs on
`cuda:current` (the first visible GPU, so `CUDA_VISIBLE_DEVICES=3` pins a benchmark to GPU 3).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch may have read it already
# vLLM engines live in the benchmark's own process (a world of one), as in the trainer.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

T = TypeVar("T")

RESULT_MARK = "BENCH_RESULT "
"""Prefix of the one stdout line a child process reports its results on (vLLM logs there too)."""

H100_BF16_DENSE_TFLOPS = 989.0
"""NVIDIA's nominal dense bf16 tensor-core peak of an H100/H200 SXM (no sparsity)."""


# ---- device ---------------------------------------------------------------------------------
def on_cuda() -> bool:
    return torch.cuda.is_available()


def pick(cpu, gpu):
    """The GPU default on a CUDA machine, else the CPU one."""
    return gpu if on_cuda() else cpu


def default_dtype() -> str:
    return pick("float32", "bfloat16")


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def world_size() -> int:
    """Ranks of this run (torchrun's WORLD_SIZE; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if on_cuda() else torch.device("cpu")


def device_name() -> str:
    if on_cuda():
        return f"{torch.cuda.get_device_name()} (cuda:{torch.cuda.current_device()})"
    return f"CPU, {torch.get_num_threads()} thread(s)"


def synchronize() -> None:
    if on_cuda():
        torch.cuda.synchronize()


# ---- timing ---------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call, with the device's queued work drained before and after."""
    synchronize()
    t0 = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t0


def timed_call(fn: Callable[[], T]) -> tuple[T, float]:
    """fn's result and the seconds it took (device drained before and after)."""
    out = []
    seconds = timed(lambda: out.append(fn()))
    return out[0], seconds


def best_of(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    for _ in range(warmup):
        fn()
    return min(timed(fn) for _ in range(max(repeats, 1)))


def interleaved_best(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best of `repeats` for each function, run in turns so machine noise hits all alike."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn))
    return best


def host_launch_us(n: int = 2000) -> float:
    """This process's host time per queued device op (µs): `n` one-element adds, timed on
    the host before the device drains them. What a launch-bound step's time follows."""
    x = torch.zeros(1, device=device())
    synchronize()
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1)
        best = min(best, time.perf_counter() - t0)
        synchronize()
    return round(best / n * 1e6, 2)


def profile_kernels(fn: Callable[[], object], top: int) -> str:
    """Markdown table of the `top` kernels (CPU: operators) by self device time in one call of
    fn, each with its share of the call's wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if on_cuda() else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        wall = timed(fn)
    events = [e for e in prof.key_averages() if _self_device_us(e) > 0]
    events.sort(key=_self_device_us, reverse=True)
    total = sum(_self_device_us(e) for e in events)
    rows = [
        [
            e.key[:90].replace("|", "/"),
            e.count,
            f"{_self_device_us(e) / 1e3:,.1f}",
            f"{100 * _self_device_us(e) / 1e6 / wall:.1f} %",
        ]
        for e in events[:top]
    ]
    rows.append(
        [
            "(all kernels)",
            sum(e.count for e in events),
            f"{total / 1e3:,.1f}",
            f"{100 * total / 1e6 / wall:.1f} %",
        ]
    )
    return markdown_table(["kernel", "calls", "ms", "of the step"], rows)


def _self_device_us(event) -> float:
    if on_cuda():
        return getattr(event, "self_device_time_total", 0.0) or 0.0
    return event.self_cpu_time_total


# ---- models -----------------------------------------------------------------------------------
SMOLLM2_NAMES = ("smollm2", "smollm2_135m")


@dataclass(frozen=True)
class ModelSource:
    name: str
    hf_dir: Path
    """HF directory: config.json + tokenizer (+ weights unless random_init)."""
    random_init: bool
    """A shape preset: megatron initialises, engines start with dummy weights."""

    @property
    def weights_dir(self) -> Path | None:
        """What build_model_worker loads weights from (None: megatron's random init)."""
        return None if self.random_init else self.hf_dir

    @property
    def load_format(self) -> str:
        return "dummy" if self.random_init else "auto"


def model_names() -> list[str]:
    from archs import PRESETS

    return [*PRESETS.names(), *(n for n in SMOLLM2_NAMES if n not in PRESETS)]


def resolve_model(name: str, layers: int | None = None) -> ModelSource:
    """tiny presets and SmolLM2-135M: real local checkpoints; the other shape presets
    (qwen2_0p5b, llama3_1b, llama2_7b, ...): a weightless directory, random weights.
    `layers`: a shape preset cut to its first `layers` layers (what fits one device)."""
    from archs import PRESETS, ensure_preset_dir

    if name in SMOLLM2_NAMES:
        return ModelSource(name, ensure_preset_dir("smollm2_135m"), False)
    if name not in PRESETS:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(model_names())}")
    shape_only = PRESETS[name].kind == "shape"
    if layers is None:
        return ModelSource(name, ensure_preset_dir(name, weights=not shape_only), shape_only)
    if not shape_only:
        raise SystemExit(f"--layers cuts a shape preset; {name!r} has weights")
    return ModelSource(
        f"{name}_{layers}l", ensure_preset_dir(name, weights=False, layers=layers), True
    )


def init_world(parallel=None):
    """A world of one (or torchrun's), and megatron's groups; returns the ParallelConfig."""
    from tandem_core.config import ParallelConfig
    from tandem_core.distributed import init_distributed, init_model_parallel

    parallel = parallel or ParallelConfig()
    init_distributed()
    init_model_parallel(parallel)
    return parallel


# ---- synthetic batches ------------------------------------------------------------------------
def rollout_batch(
    vocab: int, rows: int, prompt_len: int, resp_len: int, *, full: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Left-padded prompts and right-padded responses of mixed lengths (real lengths drawn in
    [len/2, len]), or all of full length with `full`. Host tensors, fixed seed."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, prompt_len + resp_len), generator=g)
    if full:
        p_real = torch.full((rows,), prompt_len)
        r_real = torch.full((rows,), resp_len)
    else:
        p_real = torch.randint(prompt_len // 2, prompt_len + 1, (rows,), generator=g)
        r_real = torch.randint(resp_len // 2, resp_len + 1, (rows,), generator=g)
    pos = torch.arange(prompt_len + resp_len)
    prompt_mask = (pos[None, :prompt_len] >= (prompt_len - p_real)[:, None]).long()
    resp_mask = (pos[None, :resp_len] < r_real[:, None]).long()
    attn = torch.cat([prompt_mask, resp_mask], dim=1)
    ids = ids * attn
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
        "responses": ids[:, prompt_len:],
        "response_mask": resp_mask,
    }


def training_batch(
    vocab: int, rows: int, prompt_len: int, resp_len: int, *, n: int = 1, full: bool = True
):
    """A rollout batch plus what update_policy reads: old log-probs near a random model's
    (-log vocab, so ratios stay near 1 and no step is skipped) and random advantages."""
    from tandem_core.protocol import Batch

    data = rollout_batch(vocab, rows, prompt_len, resp_len, full=full)
    g = torch.Generator().manual_seed(1)
    data["old_log_probs"] = torch.full((rows, resp_len), -math.log(vocab))
    data["advantages"] = torch.randn(rows, resp_len, generator=g)
    return Batch.from_dict(data, meta_info={"n": n})


# ---- child processes (one engine or one model per process) ------------------------------------
def emit_result(result: dict) -> None:
    """Hand `result` to the parent (from rank 0 only under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(RESULT_MARK + json.dumps(result), flush=True)


def ranks_or_relaunch(module: str, nproc: int) -> None:
    """A benchmark asked for `nproc` ranks (`--ep 2`, ...) and started alone: run it again
    under torchrun with that many, exit with its status. Under torchrun, or for one rank,
    return: this process is one of the ranks."""
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        if world_size() != max(nproc, 1):
            raise SystemExit(f"{module}: asked for {nproc} ranks, launched with {world_size()}")
        return
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    argv = [*launcher, f"--nproc-per-node={nproc}", "-m", module, *sys.argv[1:]]
    sys.exit(subprocess.run(argv).returncode)


def run_child(args: list[str], what: str, nproc: int = 1) -> dict:
    """Run `python <args>` (under torchrun with `nproc` > 1) and return the dict it emitted; a
    failure names `what` and shows the child's last output."""
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-6000:]).strip()
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_MARK) :])


# ---- output -----------------------------------------------------------------------------------
def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """min / median / max of `values` ("" for none)."""
    if not values:
        return ""
    v = sorted(values)
    return " / ".join(fmt.format(x) for x in (v[0], statistics.median(v), v[-1]))


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


REPORT_FILE_ENV = "TANDEM_BENCH_REPORT"
"""When set, `report` also appends there (run_all collects every benchmark's report)."""


def report(text: str) -> None:
    """Print the benchmark's final report (the lines for BENCHMARKS.md); under torchrun, rank
    0's only."""
    if rank() != 0:
        return
    print("\n" + text, flush=True)
    path = os.environ.get(REPORT_FILE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


def run_main(main: Callable[[], None]) -> None:
    """Run a benchmark's main; any failure exits 1 with the benchmark's name and the reason
    on stderr (after the traceback), so run_all and make see it."""
    name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "benchmark"
    try:
        main()
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 (reported, then exit 1)
        traceback.print_exc()
        print(f"\n{name} FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
