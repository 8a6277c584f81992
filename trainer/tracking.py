"""Metrics out of the run: a console line per step, tensorboard, wandb, and metrics.jsonl.

Only global rank 0 writes; on other ranks a Tracker accepts calls and does nothing, so the
loop needs no rank checks. Metric names follow verl (`actor/pg_loss`, `critic/vf_loss`,
`response_length/mean`, `timing_s/gen`, ...); the tracker passes them through unchanged.

`output_dir/metrics.jsonl` is always written, one JSON record per `log` call, after a
`{"event": "start"}` record per Tracker: the run's own record, which a resumed run appends to.
Steps between the last checkpoint and a crash are logged twice; `read_metrics` lets the later
run's records of a step replace the earlier run's, which is what the resumed run computed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import torch.distributed as dist

from tandem_core.registry import Registry

LOGGERS = Registry("logger")
"""logger.backends name -> Backend class."""
register_backend = LOGGERS.register


class TrackingError(RuntimeError):
    pass


class Backend:
    """One destination. Built with the Tracker's arguments, given only numeric metrics."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


# ---- console ---------------------------------------------------------------------------------
CONSOLE_KEYS = (
    ("critic/score/mean", "score"),
    ("val/score/mean", "val_score"),
    ("actor/pg_loss", "pg_loss"),
    ("actor/entropy", "entropy"),
    ("actor/ppo_kl", "ppo_kl"),
    ("actor/kl_loss", "kl_loss"),
    ("critic/vf_loss", "vf_loss"),
    ("actor/grad_norm", "grad_norm"),
    ("response_length/mean", "resp_len"),
    ("timing_s/step", "s/step"),
)
"""(metric, short label) shown on the console line, in this order, when present."""


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def console_line(
    metrics: Mapping[str, float],
    step: int,
    total: int | None,
    eta_s: float | None = None,
    width: int = 20,
) -> str:
    """`step 3/20 [###-----------------]  15% | score 0.25 | pg_loss -0.01 | ... | eta 0:01:02`"""
    if total:
        done = min(max(step / total, 0.0), 1.0)
        filled = int(round(done * width))
        head = f"step {step}/{total} [{'#' * filled}{'-' * (width - filled)}] {done:4.0%}"
    else:
        head = f"step {step}"
    parts = [head] + [
        f"{label} {_fmt(metrics[key])}" for key, label in CONSOLE_KEYS if key in metrics
    ]
    if eta_s is not None:
        parts.append(f"eta {_duration(eta_s)}")
    return " | ".join(parts)


@register_backend("console")
class ConsoleBackend(Backend):
    def __init__(self, total_steps: int | None = None, stream: TextIO | None = None, **_):
        self.total = total_steps
        self.stream = stream
        self._last: tuple[int, float] | None = None  # (step, time) of the previous line
        self._per_step: float | None = None

    def log(self, metrics, step):
        now = time.monotonic()
        if self._last is not None and step > self._last[0]:
            dt = (now - self._last[1]) / (step - self._last[0])
            # A running average: one slow step (validation, checkpoint) should not swing it.
            self._per_step = dt if self._per_step is None else 0.8 * self._per_step + 0.2 * dt
        self._last = (step, now)
        eta = self._per_step * (self.total - step) if self._per_step and self.total else None
        print(
            console_line(metrics, step, self.total, eta), file=self.stream or sys.stdout, flush=True
        )


# ---- tensorboard -----------------------------------------------------------------------------
@register_backend("tensorboard")
class TensorboardBackend(Backend):
    def __init__(self, output_dir, **_):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log(self, metrics, step):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()  # a killed run keeps every step it logged

    def close(self):
        self.writer.close()


# ---- wandb -----------------------------------------------------------------------------------
@register_backend("wandb")
class WandbBackend(Backend):
    """Online with WANDB_API_KEY, else offline (sync later with `wandb sync`). The run id is kept
    in output_dir so a resumed run continues the same wandb run."""

    def __init__(self, project, experiment, output_dir, config_dict=None, **_):
        try:
            import wandb
        except ImportError as e:
            raise TrackingError(
                "logger.backends includes 'wandb' but the wandb package is not installed: "
                "`pip install wandb`, or remove wandb from logger.backends"
            ) from e
        out = Path(output_dir)
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        mode = os.environ.get("WANDB_MODE") or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline"
        )
        self.run = wandb.init(
            project=project,
            name=experiment,
            id=run_id,
            resume="allow",
            dir=str(out),
            config=dict(config_dict or {}),
            mode=mode,
        )

    def log(self, metrics, step):
        self.run.log(dict(metrics), step=step)

    def close(self):
        self.run.finish()


# ---- the tracker -----------------------------------------------------------------------------
def _is_logging_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _numeric(metrics: Mapping) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v)  # python/numpy numbers and one-element tensors
        except (TypeError, ValueError):
            continue
    return out


class Tracker:
    """`Tracker(["console", "tensorboard"], project, experiment, output_dir, config_dict)`;
    `.log(metrics, step)` once per step; `.close()` (or use it as a context manager).

    `total_steps` drives the console progress bar (default: config_dict["trainer"]["total_steps"]).
    """

    def __init__(
        self,
        backends,
        project: str,
        experiment: str,
        output_dir,
        config_dict: Mapping | None = None,
        total_steps: int | None = None,
        stream: TextIO | None = None,
    ):
        unknown = [b for b in backends if b not in LOGGERS]
        if unknown:
            raise TrackingError(f"unknown logger backend(s) {unknown}; known: {LOGGERS.names()}")
        self.active = _is_logging_rank()
        self.backends: list[Backend] = []
        self._jsonl = None
        if not self.active:
            return
        if total_steps is None and config_dict is not None:
            total_steps = (config_dict.get("trainer") or {}).get("total_steps")
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=project,
            experiment=experiment,
            output_dir=out,
            config_dict=config_dict,
            total_steps=total_steps,
            stream=stream,
        )
        self.backends = [LOGGERS[name](**kwargs) for name in backends]
        self._jsonl = open(out / "metrics.jsonl", "a")
        self._jsonl.write(json.dumps({"event": "start", "time": time.time()}) + "\n")

    def log(self, metrics: Mapping, step: int) -> None:
        if not self.active:
            return
        numeric = _numeric(metrics)
        record = {
            "step": step,
            **{k: (v if math.isfinite(v) else str(v)) for k, v in numeric.items()},
        }
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for b in self.backends:
            b.log(numeric, step)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def read_metrics(path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: metrics}: records of one step within a run are merged, a later
    run's (a resume) replace an earlier run's (see module docstring)."""
    steps: dict[int, dict[str, float]] = {}
    run_steps: set[int] = set()  # steps already logged by the current run
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("event") == "start":
            run_steps = set()
            continue
        step = record.pop("step")
        if step not in run_steps:
            steps[step] = {}
            run_steps.add(step)
        steps[step].update({k: float(v) for k, v in record.items()})
    return steps


@contextmanager
def timed(name: str, sink: dict[str, float]):
    """`with timed("gen", timings):` adds the block's wall time to timings["timing_s/gen"]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        key = f"timing_s/{name}"
        sink[key] = sink.get(key, 0.0) + time.perf_counter() - start


class DevicePeakMemory:
    """Peak GPU memory in use per named phase: what `python -m trainer.plan` estimates.

    "In use" is the device's total minus its free memory (cudaMemGetInfo), so it counts
    everything on this GPU: torch's allocator, vLLM's own memory pool, NCCL buffers and the
    CUDA context; torch's allocator statistics would miss the engine's pool. A daemon thread
    samples it every `interval_s` while at least one phase is open (never outside one, so it
    stays clear of the engine's CUDA-graph capture at start). Phases may nest. Without CUDA
    every call is a no-op and `peaks_gib()` is empty.
    """

    def __init__(self, interval_s: float = 0.005):
        import threading

        import torch

        self.enabled = torch.cuda.is_available()
        self.interval_s = interval_s
        self._open: dict[str, int] = {}  # phase -> peak bytes so far
        self._peaks: dict[str, int] = {}  # closed phases since the last peaks_gib()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        if self.enabled:
            self._device = torch.cuda.current_device()
            threading.Thread(target=self._sample_forever, daemon=True).start()

    def _used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(self._device)
        return total - free

    def _sample_forever(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                if not self._open:  # idle until the next phase opens
                    self._wake.clear()
                    continue
            used = self._used()
            with self._lock:
                for name, peak in self._open.items():
                    self._open[name] = max(peak, used)
            time.sleep(self.interval_s)

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        import torch

        torch.cuda.synchronize()
        with self._lock:
            self._open[name] = self._used()
            self._wake.set()
        try:
            yield
        finally:
            torch.cuda.synchronize()  # the phase's kernels have run (and allocated) by now
            used = self._used()
            with self._lock:
                peak = max(self._open.pop(name), used)
                self._peaks[name] = max(self._peaks.get(name, 0), peak)

    def peaks_gib(self) -> dict[str, float]:
        """`memory/peak_gib/<phase>` of the phases closed since the last call; resets them."""
        with self._lock:
            peaks, self._peaks = self._peaks, {}
        return {f"memory/peak_gib/{k}": v / 2**30 for k, v in peaks.items()}
