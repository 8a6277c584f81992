"""Checkpoints that a killed run resumes from exactly, and the stop signal that asks for one.

Layout of `output_dir/checkpoints/step_{N}/`:
    <role>/        megatron `dist_checkpointing` (torch_dist) of one ModelWorker: its model
                   chunks, optimizer (distributed or not), LR scheduler, skip counter
    extra/rank_{r}.pt   this rank's `extra_state` (dataloader, KL controller, RNG, ...)
    complete.json  written last: step, layout, every file with its size and CRC32

A save writes `.tmp_step_{N}` and renames it to `step_{N}` once `complete.json` is on disk,
so a `step_*` directory is either whole or was damaged afterwards; `latest_complete()`
re-checks sizes and checksums and falls back to the previous checkpoint, with a warning.

Exact resume needs every source of state: the workers (here), the `extra_state` the loop
passes (`PromptLoader.state_dict()`, KL controller, `capture_rng_state(...)` including the
rollout's own generator), and the step. Nothing else may carry state across steps.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tandem_core import cpu_compat
from trainer.megatron_worker import ModelWorker, set_adam_kernel, torch_adams

log = logging.getLogger(__name__)

MARKER = "complete.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_"
_CRC_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    pass


# ---- small distributed helpers (a single process without a process group works too) -------
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(obj):
    """rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_dicts(local: dict) -> dict:
    """Union of every rank's dict, on every rank."""
    if not dist.is_initialized():
        return dict(local)
    parts = [None] * _world()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- file manifest: what complete.json promises ----------------------------------------------
def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _list_files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MARKER
    )


def _checksums(root: Path, files: list[str]) -> dict[str, str]:
    """CRC32 of every file, the reading split over the ranks (a 70B checkpoint is ~1 TB)."""
    mine = {f: _crc32(root / f) for i, f in enumerate(files) if i % _world() == _rank()}
    return _gather_dicts(mine)


def _problem(path: Path, verify: str) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (None: it can). Collective for checksums;
    the size/marker part runs on rank 0 only and its verdict is shared."""
    problem, files = None, []
    if _rank() == 0:
        marker = path / MARKER
        try:
            manifest = json.loads(marker.read_text())
            files = manifest["files"]
        except FileNotFoundError:
            problem = f"no {MARKER} (an interrupted or foreign save)"
        except (ValueError, KeyError, TypeError) as e:
            problem = f"unreadable {MARKER}: {e}"
        else:
            for name, want in files.items():
                f = path / name
                if not f.is_file():
                    problem = f"{name} is missing"
                    break
                if f.stat().st_size != want["size"]:
                    problem = f"{name} has {f.stat().st_size} bytes, {want['size']} were written"
                    break
    problem, files = _from_rank0((problem, files))
    if problem is None and verify == "checksum":
        recorded = sorted(n for n in files if files[n]["crc32"] is not None)
        got = _checksums(path, recorded)
        bad = [n for n in recorded if got[n] != files[n]["crc32"]]
        if bad:
            problem = f"checksum mismatch in {bad[0]}" + (
                f" (+{len(bad) - 1} more)" if bad[1:] else ""
            )
    return problem


# ---- one ModelWorker through dist_checkpointing ---------------------------------------------
def _chunk_key(i: int, n: int) -> str:
    # megatron's own naming: "model" for one chunk, "model0", "model1", ... for VPP.
    return "model" if n == 1 else f"model{i}"


def _sharded_state_dict(worker: ModelWorker, sharding: str, is_loading: bool) -> dict:
    from megatron.core.utils import unwrap_model

    metadata = {"distrib_optim_sharding_type": sharding, "chained_optim_avoid_prefix": True}
    chunks = unwrap_model(worker.chunks)
    state = {
        _chunk_key(i, len(chunks)): c.sharded_state_dict(metadata=metadata)
        for i, c in enumerate(chunks)
    }
    if worker.optimizer is not None:
        state["optimizer"] = worker.optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata=metadata
        )
        state["scheduler"] = worker.scheduler.state_dict()
    state["worker"] = {"skipped_in_a_row": worker._skipped_in_a_row}
    return state


def save_worker(worker: ModelWorker, path: Path, sharding: str = "dp_reshardable") -> None:
    """One role into `path` (collective). `sharding` picks the distributed optimizer's format:
    dp_reshardable (Megatron-LM's default: no communication; megatron documents resharding over
    DP only) or fully_reshardable (gathered on DP rank 0; documented to reshard over TP/PP too).
    Only resuming with the same layout is tested here."""
    from megatron.core import dist_checkpointing

    if worker.offloaded:
        raise CheckpointError("save a worker while its weights are on the device (not offloaded)")
    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    with cpu_compat.megatron_device_scope():
        state = _sharded_state_dict(worker, sharding, is_loading=False)
        dist_checkpointing.save(state, str(path), sharded_strategy=("torch_dist", 1))


def load_worker(worker: ModelWorker, path: Path, sharding: str = "dp_reshardable") -> None:
    """Restore what `save_worker` wrote into an already-built worker of the same layout."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    # no_grad: in fp32 the distributed optimizer's main params are views of the model's.
    with cpu_compat.megatron_device_scope(), torch.no_grad():
        if worker.optimizer is not None:
            # torch's load replaces the param groups with the saved ones, kernel flag included;
            # this run's flag wins, as its LR schedule does (_load_scheduler)
            adams = torch_adams(worker.optimizer)
            fused = all(g.get("fused", False) for a in adams for g in a.param_groups)
            _init_empty_adam_state(worker.optimizer)
        template = _sharded_state_dict(worker, sharding, is_loading=True)
        state = dist_checkpointing.load(template, str(path))
        chunks = unwrap_model(worker.chunks)
        for i, c in enumerate(chunks):
            c.load_state_dict(state[_chunk_key(i, len(chunks))], strict=True)
        if worker.optimizer is not None:
            worker.optimizer.load_state_dict(state["optimizer"])
            _untie_adam_steps(worker.optimizer)
            set_adam_kernel(worker.optimizer, fused)
            _load_scheduler(worker.scheduler, state["scheduler"])
    worker._skipped_in_a_row = int(state["worker"]["skipped_in_a_row"])


def _init_empty_adam_state(optimizer) -> None:
    """A fresh worker (a restarted trainer) has no Adam state yet; megatron-core 0.16.1's
    DistributedOptimizer.state_dict then asserts (it reads torch's `step`), so loading into it
    fails. Give it torch's own zero-step state; the checkpoint then overwrites every value."""
    for inner in torch_adams(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(
                        step=torch.tensor(0.0, dtype=torch.float32),
                        exp_avg=torch.zeros_like(p),
                        exp_avg_sq=torch.zeros_like(p),
                    )


def _untie_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam step count, equal to the saved one.

    megatron-core 0.16.1's DistributedOptimizer.load_state_dict, with torch's AdamW (no TE/apex),
    hands all parameters ONE shared `step` tensor, then overwrites it with the template's stale
    value; torch then increments the shared tensor once per parameter per step, so the bias
    correction after a resume would be wrong. The saved count survives in param_groups."""
    for inner in torch_adams(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state and "step" in state:
                    old = state["step"]
                    state["step"] = torch.tensor(
                        float(group["step"]), dtype=old.dtype, device=old.device
                    )


def _load_scheduler(scheduler, saved: dict) -> None:
    """The step count comes from the checkpoint; the schedule's shape from this run's config,
    so a resumed run may change total_steps or the LR (megatron would assert instead)."""
    changed = {
        k: (v, saved[k])
        for k, v in scheduler.state_dict().items()
        if k != "num_steps" and k in saved and v != saved[k]
    }
    if changed:
        log.warning(
            "LR schedule differs from the checkpoint's; using this run's values "
            "(field: (now, saved)): %s",
            changed,
        )
    # megatron's load_state_dict adds the saved step count to the current one: start at 0.
    scheduler.num_steps = 0
    override = scheduler.override_opt_param_scheduler
    scheduler.override_opt_param_scheduler = True
    try:
        scheduler.load_state_dict(saved)
    finally:
        scheduler.override_opt_param_scheduler = override


# ---- RNG -------------------------------------------------------------------------------------
def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """This rank's RNG streams: python, numpy, torch CPU, torch CUDA (current device), megatron's
    tracker (dropout/init streams), and any named generators (e.g. a rollout's own)."""
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "megatron": {
            k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()
        },
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if cpu_compat.cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict, generators: Mapping[str, torch.Generator] | None = None):
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["megatron"]:
        tensor_parallel.get_cuda_rng_tracker().set_states(
            {k: v.clone() for k, v in state["megatron"].items()}
        )
    if cpu_compat.cuda_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(
                f"the checkpoint has no RNG state for generator {name!r} "
                f"(it has {sorted(state['generators'])})"
            )
        g.set_state(state["generators"][name])


# ---- the manager -----------------------------------------------------------------------------
def _layout() -> dict:
    from megatron.core import parallel_state as mpu

    layout = {"world_size": _world()}
    if mpu.model_parallel_is_initialized():
        layout.update(
            tp=mpu.get_tensor_model_parallel_world_size(),
            pp=mpu.get_pipeline_model_parallel_world_size(),
            dp=mpu.get_data_parallel_world_size(),
        )
    return layout


class CheckpointManager:
    """Saves, finds and loads `output_dir/checkpoints/step_{N}`; keeps the newest `max_to_keep`.

    `save` and `load` are collective; so is `latest_complete` once torch.distributed is
    initialised (every rank gets the same answer). `verify`: "checksum" (CRC32 of every file,
    read back in parallel) or "size" (cheaper, misses flipped bytes).
    """

    def __init__(
        self,
        output_dir,
        max_to_keep: int = 2,
        verify: str = "checksum",
        optim_sharding: str = "dp_reshardable",
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        if verify not in ("checksum", "size"):
            raise ValueError(f"verify must be 'checksum' or 'size', got {verify!r}")
        self.root = Path(output_dir) / "checkpoints"
        self.max_to_keep = max_to_keep
        self.verify = verify
        self.optim_sharding = optim_sharding

    def step_dirs(self) -> list[tuple[int, Path]]:
        """Every `step_N` directory, newest first (complete or not)."""
        if not self.root.is_dir():
            return []
        found = [
            (int(m.group(1)), p)
            for p in self.root.iterdir()
            if p.is_dir() and (m := _STEP_DIR.match(p.name))
        ]
        return sorted(found, reverse=True)

    # -- save --
    def save(self, step: int, workers: Mapping[str, ModelWorker], extra_state: dict) -> Path:
        final = self.root / f"step_{step}"
        tmp = self.root / f"{_TMP_PREFIX}step_{step}"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that was interrupted
            tmp.mkdir(parents=True)
        _barrier()
        for role, worker in workers.items():
            save_worker(worker, tmp / role, self.optim_sharding)
        (tmp / "extra").mkdir(exist_ok=True)
        torch.save(extra_state, tmp / "extra" / f"rank_{_rank()}.pt")
        _barrier()
        files = _from_rank0(_list_files(tmp) if _rank() == 0 else None)
        # CRC32s only when they will be checked: reading a 70B checkpoint back costs minutes.
        crcs = _checksums(tmp, files) if self.verify == "checksum" else {}
        if _rank() == 0:
            manifest = {
                "step": step,
                "layout": _layout(),
                "roles": sorted(workers),
                "files": {
                    f: {"size": (tmp / f).stat().st_size, "crc32": crcs.get(f)} for f in files
                },
            }
            self._commit(tmp, final, manifest)
            self._prune(step)
        _barrier()
        return final

    def _commit(self, tmp: Path, final: Path, manifest: dict) -> None:
        marker = tmp / MARKER
        with open(marker.with_suffix(".part"), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker.with_suffix(".part"), marker)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again after a resume from an older one
            stale = final.with_name(f"{_TMP_PREFIX}old_{final.name}")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(tmp, final)
        _fsync_dir(self.root)

    def _prune(self, step: int) -> None:
        """Keep `step` and the newest max_to_keep-1 older complete checkpoints. Directories of
        later steps are left-overs of a run this one resumed before; they would shadow this
        run's checkpoints at the next resume, so they go too."""
        kept = 0
        for s, path in self.step_dirs():
            if s > step:
                log.warning(
                    "removing %s: newer than the step just saved (%d), left over from "
                    "before this run resumed",
                    path,
                    step,
                )
            elif (path / MARKER).is_file() and kept < self.max_to_keep:
                kept += 1
                continue
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)

    # -- find --
    def latest_complete(self) -> tuple[int, Path] | None:
        """(step, path) of the newest checkpoint that passes verification, else None. Skipped
        ones (no marker, missing/short files, checksum mismatch) are named in a warning."""
        candidates = _from_rank0(self.step_dirs() if _rank() == 0 else None)
        for step, path in candidates:
            problem = _problem(path, self.verify)
            if problem is None:
                return step, path
            if _rank() == 0:
                log.warning("skipping checkpoint %s: %s", path, problem)
        return None

    # -- load --
    def load(self, path, workers: Mapping[str, ModelWorker]) -> dict:
        """Restore `workers` from the checkpoint at `path`; returns this rank's extra_state."""
        path = Path(path)
        manifest = json.loads((path / MARKER).read_text())
        missing = sorted(set(workers) - set(manifest["roles"]))
        if missing:
            raise CheckpointError(f"{path} has no state for {missing} (it has {manifest['roles']})")
        now = _layout()
        if manifest["layout"] != now:
            log.warning(
                "checkpoint %s was written with layout %s, this run has %s: models and "
                "optimizers are resharded, per-rank state (RNG) is not exact",
                path,
                manifest["layout"],
                now,
            )
        for role, worker in workers.items():
            load_worker(worker, path / role, self.optim_sharding)
        extra = path / "extra" / f"rank_{_rank()}.pt"
        if not extra.is_file():
            extra = path / "extra" / "rank_0.pt"
        return torch.load(extra, weights_only=False)

    # -- HF export --
    def export_hf(self, step: int, worker: ModelWorker, hf_source_dir) -> Path:
        """The worker's model as an HF directory `output_dir/hf/step_{N}` (collective), written
        under a temporary name first so a half export is never mistaken for one."""
        import weight_loaders

        out = self.root.parent / "hf" / f"step_{step}"
        tmp = out.with_name(f"{_TMP_PREFIX}{out.name}")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        weight_loaders.export_megatron_to_hf(
            worker.chunks, worker.args, worker.config, tmp, hf_source_dir
        )
        if _rank() == 0:
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        _barrier()
        return out


# ---- stop signals ----------------------------------------------------------------------------
class StopRequest:
    """Set by SIGTERM/SIGUSR1 (slurm's pre-emption and time-limit warnings). The loop checks it
    once per step, at a point where every rank is, saves, and exits cleanly."""

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any rank was signalled (collective): the signal may reach ranks at
        different steps, the checkpoint must be taken by all at the same one."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=cpu_compat.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def install_signal_handlers(signals=(signal.SIGTERM, signal.SIGUSR1)) -> StopRequest:
    """Route `signals` to a StopRequest flag (main thread only, as Python requires)."""
    stop = StopRequest()
    for signum in signals:
        stop._previous[signum] = signal.signal(signum, stop._handle)
    return stop
