"""Checkpoints that a killed run resumes from exactly, and that no other run deletes.

Layout of `output_dir/checkpoints/step_{N}/`:
    <role>/        one sharded component (`save_sharded(path)` / `load_sharded(path)`, collective):
                   a megatron role writes its model chunks, optimizer, LR scheduler there
    extra/rank_{r}.pt   this rank's plain state: every stateful component's `state_dict()`
                   (the loop's step and dataloader, RNG streams, the swap's generation RNG, ...)
    complete.json  written last: step, what the checkpoint is of (`run_identity`: model shape,
                   roles, parallel layout, algorithm, Tandem version), every file with its size
                   and CRC32

A save writes `.tmp_step_{N}` and renames it to `step_{N}` once `complete.json` is on disk,
so a `step_*` directory is either whole or was damaged afterwards; `latest_complete()`
re-checks sizes and checksums and falls back to the previous checkpoint, with a warning. A save
checks first that the directory is writable and has room for a checkpoint as large as the last
one; a save that fails anyway names the path and the cause, removes its partial directory and
leaves every earlier checkpoint as it was.

Deletion: a save removes only complete checkpoints older than the `max_to_keep` newest (its
own rotation, never the newest complete one) and partial `.tmp_*` saves; damaged directories
are left for the user (a later save of the same step moves one aside, renamed, not removed).
What else may start or resume in an output directory is trainer.resume's business
(trainer/preflight.py).

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
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from tandem_core.config import TandemConfig, uses_critic
from tandem_core.errors import InputError, RunFailure
from tandem_core.model_args import ModelArgs

log = logging.getLogger(__name__)

MARKER = "complete.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_"
_CRC_CHUNK = 16 << 20
SPACE_MARGIN = 1.1
"""A save needs this many times the size of the last checkpoint free on the filesystem."""


class CheckpointError(RunFailure):
    """A save or load that failed; the message names the checkpoint's path and the cause."""


class CheckpointRefused(InputError):
    """A checkpoint this run must not resume from: of another model, roles or layout, or none
    left that passes verification. The message names the checkpoint and each difference."""


class ShardedState(Protocol):
    """A component that writes its own directory, collectively (a megatron role)."""

    def save_sharded(self, path: Path) -> None: ...

    def load_sharded(self, path: Path) -> None: ...


# ---- what a checkpoint is of -----------------------------------------------------------------
def tandem_version() -> str:
    try:
        return version("tandem")
    except PackageNotFoundError:  # a checkout run without installing it
        return "unknown"


def run_identity(cfg: TandemConfig, model_args: ModelArgs, world_size: int) -> dict[str, Any]:
    """What a checkpoint of this run holds: compared field by field before a resume."""
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    return {
        "model": asdict(model_args),
        "roles": ["actor", "critic"] if uses_critic(cfg.algorithm) else ["actor"],
        "layout": {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
            "data_parallel_size": world_size // (tp * pp),
        },
        "algorithm": cfg.algorithm.name,
        "tandem_version": tandem_version(),
    }


def identity_mismatches(saved: dict | None, now: dict) -> list[str]:
    """Why a checkpoint written as `saved` cannot be resumed by a run that is `now`, one
    sentence per kind of difference, each naming the fields; [] when it can. The algorithm's
    name and Tandem's version may differ (a warning); a checkpoint without an identity (written
    before they were recorded) is not compared."""
    if saved is None:
        return []
    # Compared as JSON holds them (a tuple field reads back as a list).
    saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(now))
    problems = []
    model = [
        f"{key} {value} (this run: {now['model'].get(key)})"
        for key, value in saved["model"].items()
        if now["model"].get(key) != value
    ]
    if model:
        problems.append(f"is of another model: {', '.join(model)}")
    if saved["roles"] != now["roles"]:
        problems.append(
            f"holds the roles {saved['roles']}, this run trains {now['roles']}"
            " (algorithm.adv_estimator gae trains a critic, the GRPO family none)"
        )
    layout = [
        f"{key} {value} (this run: {now['layout'].get(key)})"
        for key, value in saved["layout"].items()
        if now["layout"].get(key) != value
    ]
    if layout:
        problems.append(
            f"was written at another parallel layout: {', '.join(layout)}; megatron's "
            "distributed optimizer state is saved per layout (dp_reshardable): resume with"
            " the checkpoint's layout, or start in another trainer.output_dir"
        )
    for key in ("algorithm", "tandem_version"):
        if saved.get(key) != now.get(key):
            log.warning(
                "checkpoint written with %s %s; this run: %s", key, saved.get(key), now[key]
            )
    return problems


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


def _manifest_problem(path: Path) -> tuple[str | None, dict]:
    """Why the checkpoint at `path` is incomplete by its marker and file sizes (None: it is
    complete), and its manifest. Reads only the manifest and the file sizes."""
    marker = path / MARKER
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MARKER} (an interrupted or foreign save)", {}
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER}: {e}", {}
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing", manifest
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size} bytes, {want['size']} were written", manifest
    return None, manifest


def _problem(path: Path, verify: str) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (None: it can). Collective for checksums;
    the size/marker part runs on rank 0 only and its verdict is shared."""
    problem, files = None, {}
    if _rank() == 0:
        problem, manifest = _manifest_problem(path)
        files = manifest.get("files", {})
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


def _size(n_bytes: float) -> str:
    if n_bytes >= 2**30:
        return f"{n_bytes / 2**30:.1f} GiB"
    return f"{n_bytes / 2**20:.1f} MiB"


def _save_failure(err: BaseException, tmp: Path) -> str:
    """The cause of a failed save in words: the OS error when there is one; torch's writer
    hides a full disk behind its own message ('unexpected pos ...'), so free space is read."""
    cause = err
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return f"{cause.strerror} ({cause.filename or tmp})"
    try:
        free = shutil.disk_usage(tmp.parent).free
    except OSError:
        free = None
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if free is not None and free < 64 << 20:
        return f"no space left on device ({_size(free)} free on {tmp.parent})"
    return first


# ---- the manager -----------------------------------------------------------------------------
class CheckpointManager:
    """Saves, finds and loads `output_dir/checkpoints/step_{N}`; keeps the newest `max_to_keep`.

    `save` and `load` are collective; so is `latest_complete` once torch.distributed is
    initialised (every rank gets the same answer). `verify`: "checksum" (CRC32 of every file,
    read back in parallel) or "size" (cheaper, misses flipped bytes). `identity`: what this
    run's checkpoints are of (`run_identity`), written into each and compared at load.
    """

    def __init__(
        self,
        output_dir,
        max_to_keep: int = 2,
        verify: str = "checksum",
        identity: dict | None = None,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        if verify not in ("checksum", "size"):
            raise ValueError(f"verify must be 'checksum' or 'size', got {verify!r}")
        self.root = Path(output_dir) / "checkpoints"
        self.max_to_keep = max_to_keep
        self.verify = verify
        self.identity = identity

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

    def scan(self) -> list[tuple[int, Path, str | None]]:
        """(step, path, problem) of every `step_N` directory, newest first, by marker and file
        sizes only (no checksums, no collectives): what the pre-launch check reads."""
        return [(step, path, _manifest_problem(path)[0]) for step, path in self.step_dirs()]

    @staticmethod
    def saved_identity(path: Path) -> dict | None:
        """What the checkpoint at `path` says it is of (None: written before that was kept)."""
        return _manifest_problem(path)[1].get("identity")

    # -- save --
    def save(self, step: int, workers: Mapping[str, ShardedState], extra_state: dict) -> Path:
        final = self.root / f"step_{step}"
        tmp = self.root / f"{_TMP_PREFIX}step_{step}"
        refusal = None
        if _rank() == 0:
            refusal = self._prepare(tmp)
        refusal = _from_rank0(refusal)
        if refusal:
            raise CheckpointError(f"cannot save checkpoint {final}: {refusal}")
        try:
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
                    "identity": self.identity,
                    "roles": sorted(workers),
                    "files": {
                        f: {"size": (tmp / f).stat().st_size, "crc32": crcs.get(f)} for f in files
                    },
                }
                self._commit(tmp, final, manifest)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # torch.distributed.checkpoint's own is a BaseException
            reason = _save_failure(err, tmp)
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"saving checkpoint {final} failed: {reason}; it was removed, the earlier"
                " checkpoints are intact"
            ) from err
        if _rank() == 0:
            self._prune(step)
        _barrier()
        return final

    def _prepare(self, tmp: Path) -> str | None:
        """Rank 0, before a save: a fresh temporary directory, and room for a checkpoint as
        large as the last one. Returns why the save cannot start (None: it can)."""
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a save of this step that was interrupted
            tmp.mkdir(parents=True)
        except OSError as err:
            return f"{err.strerror} ({err.filename})"
        last = next((path for _, path, bad in self.scan() if bad is None), None)
        if last is None:
            return None
        files = json.loads((last / MARKER).read_text())["files"]
        needed = SPACE_MARGIN * sum(f["size"] for f in files.values())
        free = shutil.disk_usage(self.root).free
        if free < needed:
            shutil.rmtree(tmp, ignore_errors=True)
            return (
                f"not enough space on {self.root}: {_size(free)} free, about {_size(needed)}"
                f" needed (the last checkpoint, {last.name}, took {_size(needed / SPACE_MARGIN)})"
            )
        return None

    def _commit(self, tmp: Path, final: Path, manifest: dict) -> None:
        marker = tmp / MARKER
        with open(marker.with_suffix(".part"), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker.with_suffix(".part"), marker)
        _fsync_dir(tmp)
        if final.exists():
            # Only a damaged directory can be here (a resume starts from the newest complete
            # one): set aside, not removed.
            aside = final.with_name(f"damaged_{final.name}_{int(time.time())}")
            log.warning("moving the damaged %s aside to %s", final, aside.name)
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(self.root)

    def _prune(self, step: int) -> None:
        """Keep the `max_to_keep` newest complete checkpoints up to `step` (the one just
        saved among them); older complete ones go, and partial saves. Nothing newer than
        `step` and nothing damaged is touched."""
        kept = 0
        for s, path in self.step_dirs():
            if s > step or not (path / MARKER).is_file():
                continue
            if kept < self.max_to_keep:
                kept += 1
                continue
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)

    # -- find --
    def latest_complete(self) -> tuple[tuple[int, Path] | None, list[tuple[Path, str]]]:
        """((step, path) of the newest checkpoint that passes verification, or None) and the
        (path, problem) of each newer one skipped (no marker, missing/short files, checksum
        mismatch), which is also named in a warning."""
        candidates = _from_rank0(self.step_dirs() if _rank() == 0 else None)
        skipped = []
        for step, path in candidates:
            problem = _problem(path, self.verify)
            if problem is None:
                return (step, path), skipped
            skipped.append((path, problem))
            if _rank() == 0:
                log.warning("skipping checkpoint %s: %s", path, problem)
        return None, skipped

    # -- load --
    def load(self, path, workers: Mapping[str, ShardedState]) -> dict:
        """Restore `workers` from the checkpoint at `path`; returns this rank's extra_state."""
        path = Path(path)
        manifest = json.loads((path / MARKER).read_text())
        missing = sorted(set(workers) - set(manifest["roles"]))
        if missing:
            raise CheckpointRefused(
                f"{path} has no state for {missing} (it has {manifest['roles']})"
            )
        if self.identity is not None:
            problems = identity_mismatches(manifest.get("identity"), self.identity)
            if problems:
                raise CheckpointRefused("\n".join(f"{path} {p}" for p in problems))
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
