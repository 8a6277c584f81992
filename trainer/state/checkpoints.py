"""Checkpoints that a killed run resumes from exactly.

Layout of `output_dir/checkpoints/step_{N}/`:
    <role>/        one sharded component (`save_sharded(path)` / `load_sharded(path)`, collective):
                   a megatron role writes its model chunks, optimizer, LR scheduler there
    extra/rank_{r}.pt   this rank's plain state: every stateful component's `state_dict()`
                   (the loop's step and dataloader, RNG streams, the swap's generation RNG, ...)
    complete.json  written last: step, layout, every file with its size and CRC32

A save writes `.tmp_step_{N}` and renames it to `step_{N}` once `complete.json` is on disk,
so a `step_*` directory is either whole or was damaged afterwards; `latest_complete()`
re-checks sizes and checksums and falls back to the previous checkpoint, with a warning.

Exact resume needs every source of state: the sharded components and the stateful ones
the loop hands over (trainer/loop.py `fit`). Nothing else may carry state across steps. This
module knows no model: what a component writes is the component's business.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MARKER = "complete.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_"
_CRC_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    pass


class ShardedState(Protocol):
    """A component that writes its own directory, collectively (a megatron role)."""

    def save_sharded(self, path: Path) -> None: ...

    def load_sharded(self, path: Path) -> None: ...


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
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        if verify not in ("checksum", "size"):
            raise ValueError(f"verify must be 'checksum' or 'size', got {verify!r}")
        self.root = Path(output_dir) / "checkpoints"
        self.max_to_keep = max_to_keep
        self.verify = verify

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
    def save(self, step: int, workers: Mapping[str, ShardedState], extra_state: dict) -> Path:
        final = self.root / f"step_{step}"
        tmp = self.root / f"{_TMP_PREFIX}step_{step}"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that was interrupted
            tmp.mkdir(parents=True)
        _barrier()
        for role, worker in workers.items():
            worker.save_sharded(tmp / role)
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
    def load(self, path, workers: Mapping[str, ShardedState]) -> dict:
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
            worker.load_sharded(path / role)
        extra = path / "extra" / f"rank_{_rank()}.pt"
        if not extra.is_file():
            extra = path / "extra" / "rank_0.pt"
        return torch.load(extra, weights_only=False)

    # -- HF export --
    def export_hf(self, step: int, write: Callable[[Path], None]) -> Path:
        """`write(dir)` (collective) fills `output_dir/hf/step_{N}`, under a temporary name
        first so a half export is never mistaken for one."""
        out = self.root.parent / "hf" / f"step_{step}"
        tmp = out.with_name(f"{_TMP_PREFIX}{out.name}")
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        write(tmp)
        if _rank() == 0:
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        _barrier()
        return out
