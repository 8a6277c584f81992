"""Run state: exact round trips of real megatron workers under torchrun (their own state is
trainer/workers/checkpoint.py), then trainer/state/: the manager's bookkeeping (atomic commit, damaged checkpoints, keep-last-K), RNG and stop signals.

The torchrun test leaves real torch_dist checkpoints behind; the damage tests below work on
copies of them, so a flipped byte lands in real megatron shard files.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.state import checkpoints as C
from trainer.state.rng import capture_rng_state, restore_rng_state
from trainer.state.signals import install_signal_handlers

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = ("tp2", "pp2_vpp2", "dp2")
# In the slow set: plain PP 2 (the interleaved chunks above hold PP 2 and more) and DP 2 without
# the distributed optimizer (the default is with it)
MORE_LAYOUTS = ("pp2", "dp2_plain")


def _roundtrip(tmp_path_factory, tiny_ckpt, layouts) -> tuple[Path, dict]:
    """Run the 2-rank round trip for each layout in one process; the worker asserts bitwise
    equality."""
    from conftest import run_torchrun

    tiny_ckpt("tiny_llama")  # built once here, not by two ranks at once
    out = tmp_path_factory.mktemp("ckpt_roundtrip")
    return out, run_torchrun("ckpt_roundtrip.py", 2, str(out), *layouts)


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory, tiny_ckpt) -> tuple[Path, dict]:
    return _roundtrip(tmp_path_factory, tiny_ckpt, LAYOUTS)


@pytest.fixture(scope="module")
def roundtrip_more(tmp_path_factory, tiny_ckpt) -> tuple[Path, dict]:
    return _roundtrip(tmp_path_factory, tiny_ckpt, MORE_LAYOUTS)


def _check_bitwise(r: dict) -> None:
    # Every parameter and optimizer tensor moved in step 2, and the resumed run matched all.
    assert r["changed_by_step2"] == r["tensors"] > 100
    assert r["metrics"]["actor/grad_norm"] > 0 and r["metrics"]["critic/vf_loss0"] > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_is_bitwise(roundtrip, layout):
    _check_bitwise(roundtrip[1][layout])


@pytest.mark.slow
@pytest.mark.parametrize("layout", MORE_LAYOUTS)
def test_resume_is_bitwise_in_more_layouts(roundtrip_more, layout):
    _check_bitwise(roundtrip_more[1][layout])


def test_checkpoint_layout_on_disk(roundtrip):
    out, _ = roundtrip
    mgr = C.CheckpointManager(out / "pp2_vpp2", max_to_keep=2)
    assert [s for s, _ in mgr.step_dirs()] == [2, 1]
    manifest = json.loads((out / "pp2_vpp2/checkpoints/step_2" / C.MARKER).read_text())
    assert manifest["step"] == 2 and manifest["roles"] == ["actor", "critic"]
    assert manifest["identity"]["layout"] == {
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 2,
        "virtual_pipeline_model_parallel_size": 2,
        "data_parallel_size": 1,
    }
    assert manifest["identity"]["model"]["arch"] == "llama" and manifest["identity"]["roles"]
    files = manifest["files"]
    assert {"extra/rank_0.pt", "extra/rank_1.pt", "actor/metadata.json"} <= set(files)
    assert any(f.startswith("critic/") and f.endswith(".distcp") for f in files)
    assert not list((out / "pp2_vpp2/checkpoints").glob(".tmp_*"))


def test_hf_export_loads_in_transformers(roundtrip, tiny_ckpt):
    from transformers import AutoModelForCausalLM

    out, _ = roundtrip
    src = AutoModelForCausalLM.from_pretrained(tiny_ckpt("tiny_llama"), torch_dtype=torch.float32)
    for layout in ("tp2", "pp2_vpp2"):
        hf_dir = out / layout / "hf" / "step_2"
        assert not list(hf_dir.parent.glob(".tmp_*"))
        got = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
        trained = dict(got.named_parameters())
        moved = [n for n, p in src.named_parameters() if not torch.equal(p, trained[n])]
        assert len(moved) == len(trained), "every tensor was trained for 4 optimizer steps"


def test_tracker_writes_from_rank0_only(roundtrip):
    out, _ = roundtrip
    lines = (out / "tracker" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x).get("event") for x in lines] == ["start", None]
    assert json.loads(lines[1]) == {"step": 1, "actor/pg_loss": 0.0}  # rank 0's value


# ---- damaged checkpoints (copies of the real ones) -------------------------------------------
@pytest.fixture
def two_ckpts(roundtrip, tmp_path) -> C.CheckpointManager:
    out, _ = roundtrip
    shutil.copytree(out / "dp2", tmp_path / "run")
    return C.CheckpointManager(tmp_path / "run", max_to_keep=2)


def _a_shard(path: Path) -> Path:
    return sorted((path / "actor").glob("*.distcp"))[0]


def test_flipped_byte_falls_back_with_warning(two_ckpts, caplog):
    assert two_ckpts.latest_complete()[0][0] == 2
    shard = _a_shard(two_ckpts.root / "step_2")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="trainer.state.checkpoints"):
        assert two_ckpts.latest_complete()[0] == (1, two_ckpts.root / "step_1")
    assert "checksum mismatch in actor/" in caplog.text and "step_2" in caplog.text
    # verify="size" trusts same-size files: the cheap mode misses a flipped byte.
    assert C.CheckpointManager(two_ckpts.root.parent, verify="size").latest_complete()[0][0] == 2


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _a_shard(p).write_bytes(_a_shard(p).read_bytes()[:-10]), "bytes, "),
        (lambda p: _a_shard(p).unlink(), "is missing"),
        (lambda p: (p / C.MARKER).unlink(), f"no {C.MARKER}"),
        (lambda p: (p / C.MARKER).write_text("{not json"), f"unreadable {C.MARKER}"),
    ],
)
def test_partial_checkpoint_falls_back(two_ckpts, caplog, damage, message):
    damage(two_ckpts.root / "step_2")
    with caplog.at_level(logging.WARNING, logger="trainer.state.checkpoints"):
        assert two_ckpts.latest_complete()[0][0] == 1
    assert message in caplog.text


def test_nothing_usable(two_ckpts):
    for _, path in two_ckpts.step_dirs():
        (path / C.MARKER).unlink()
    latest, skipped = two_ckpts.latest_complete()
    assert latest is None and [p.name for p, _ in skipped] == ["step_2", "step_1"]
    assert all("no complete.json" in problem for _, problem in skipped)
    assert C.CheckpointManager(two_ckpts.root.parent / "elsewhere").latest_complete() == (None, [])


# ---- bookkeeping without models (single process, no process group) ---------------------------
def test_keep_last_k_and_never_more(tmp_path, caplog):
    mgr = C.CheckpointManager(tmp_path, max_to_keep=2)
    for step in (1, 2, 3, 4):
        mgr.save(step, {}, {"step": step})
    assert [s for s, _ in mgr.step_dirs()] == [4, 3]
    # An interrupted save leaves a temp dir: never a candidate, removed by the next save.
    (mgr.root / ".tmp_step_5").mkdir()
    (mgr.root / ".tmp_step_5" / "junk").write_text("x")
    assert mgr.latest_complete()[0][0] == 4
    mgr.save(5, {}, {"step": 5})
    assert not list(mgr.root.glob(".tmp_*"))
    assert [s for s, _ in mgr.step_dirs()] == [5, 4]
    # step_5 damaged afterwards: the run resumes from step 4, and its save of step 5 sets the
    # damaged directory aside (renamed, not removed) and never removes step 4.
    (mgr.root / "step_5" / "extra" / "rank_0.pt").unlink()
    assert mgr.latest_complete()[0][0] == 4
    with caplog.at_level(logging.WARNING, logger="trainer.state.checkpoints"):
        mgr.save(5, {}, {"step": 5, "again": True})
    assert mgr.load(mgr.root / "step_5", {})["again"] is True
    assert [s for s, _ in mgr.step_dirs()] == [5, 4]
    assert len(list(mgr.root.glob("damaged_step_5_*"))) == 1 and "aside" in caplog.text


def test_rotation_leaves_damaged_and_newer_directories(tmp_path):
    mgr = C.CheckpointManager(tmp_path, max_to_keep=1)
    for step in (1, 2, 3):
        mgr.save(step, {}, {})
    (mgr.root / "step_3" / C.MARKER).unlink()  # damaged after the fact
    (mgr.root / "step_9").mkdir()  # someone else's, or a crash's: not ours to remove
    mgr.save(2, {}, {"again": True})  # resumed from step_1... saved step 2 again
    assert [s for s, _ in mgr.step_dirs()] == [9, 3, 2]  # only complete older ones rotate


def test_a_failed_save_names_the_cause_and_keeps_the_previous(tmp_path):
    import errno

    class Full:
        def save_sharded(self, path):
            path.mkdir(parents=True)
            (path / "shard").write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / "shard"))

    class Fine:
        def save_sharded(self, path):
            path.mkdir(parents=True)
            (path / "shard").write_bytes(b"y" * 100)

    mgr = C.CheckpointManager(tmp_path, max_to_keep=2)
    mgr.save(1, {"actor": Fine()}, {"step": 1})
    before = {p: p.read_bytes() for p in (mgr.root / "step_1").rglob("*") if p.is_file()}
    with pytest.raises(C.CheckpointError) as info:
        mgr.save(2, {"actor": Full()}, {"step": 2})
    message = str(info.value)
    assert "step_2" in message and "No space left on device" in message and "shard" in message
    assert not (mgr.root / "step_2").exists() and not list(mgr.root.glob(".tmp_*"))
    after = {p: p.read_bytes() for p in (mgr.root / "step_1").rglob("*") if p.is_file()}
    assert after == before  # the previous checkpoint, bitwise
    assert mgr.latest_complete()[0][0] == 1  # a rerun resumes from it


def test_a_save_without_room_is_refused_before_writing(tmp_path, monkeypatch):
    mgr = C.CheckpointManager(tmp_path)
    mgr.save(1, {}, {"payload": "x" * 10_000})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        C.shutil,
        "disk_usage",
        lambda path: usage._replace(free=1000),  # 1 kB free
    )
    with pytest.raises(C.CheckpointError, match=r"not enough space on .*checkpoints.*free"):
        mgr.save(2, {}, {"payload": "x" * 10_000})
    assert [s for s, _ in mgr.step_dirs()] == [1] and not list(mgr.root.glob(".tmp_*"))


def test_load_checks_roles(tmp_path):
    mgr = C.CheckpointManager(tmp_path)
    path = mgr.save(1, {}, {"k": 1})
    with pytest.raises(C.CheckpointRefused, match=r"no state for \['actor'\]"):
        mgr.load(path, {"actor": object()})


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        C.CheckpointManager(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="verify"):
        C.CheckpointManager(tmp_path, verify="md5")


# ---- RNG ------------------------------------------------------------------------------------
def _draws(gen):
    return (random.random(), float(np.random.rand()), torch.rand(4), torch.rand(2, generator=gen))


def test_rng_state_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    state = capture_rng_state({"rollout": gen})
    torch.save(state, tmp_path / "rng.pt")  # what save() does with extra_state
    want = _draws(gen)
    _draws(gen)  # move every stream on
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=False), {"rollout": gen})
    got = _draws(gen)
    assert got[:2] == want[:2]
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    with pytest.raises(KeyError, match="'critic'"):
        restore_rng_state(state, {"critic": gen})


# ---- stop signals ---------------------------------------------------------------------------
def test_signal_handler_sets_flag():
    before = signal.getsignal(signal.SIGUSR1)
    stop = install_signal_handlers()
    try:
        assert not stop.requested and not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1" and stop.agreed()
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


def _repo_env() -> dict:
    """This process's environment with the repo first on the import path of a child Python."""
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _gone(pid: int) -> bool:
    """No such process, or a zombie left for init to reap."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


SECOND_CTRL_C_DURING_A_SAVE = """
import multiprocessing, subprocess, sys, time
from trainer.state.signals import install_signal_handlers
install_signal_handlers()
queue = multiprocessing.get_context("spawn").Manager().Queue()  # as megatron's async writer
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
pids = [child.pid for child in multiprocessing.active_children()] + [sleeper.pid]
print("ready", *pids, flush=True)
while True:
    time.sleep(0.01)
"""


def test_second_ctrl_c_kills_the_processes_it_started():
    """A second Ctrl-C during a checkpoint save: exit 130 at once, and the children (megatron's
    writer's Manager, a worker) die with the process instead of holding its output pipe open."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SECOND_CTRL_C_DURING_A_SAVE],
        env=_repo_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        ready = proc.stdout.readline().split()
        assert ready[:1] == ["ready"], ready
        children = [int(pid) for pid in ready[1:]]
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)  # EOF: nothing holds the pipe any more
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output
    assert "exiting now" in output and "Traceback" not in output, output
    assert all(_gone(pid) for pid in children), children


WRITER_MANAGER = """
import multiprocessing, os
from megatron.core.dist_checkpointing.strategies import filesystem_async
from trainer.workers.checkpoint import writer_results_queue
queue = writer_results_queue()
assert filesystem_async._get_write_results_queue() is queue  # what megatron's writer uses
queue.put("written")
assert queue.get() == "written"
print(*[child.pid for child in multiprocessing.active_children()], flush=True)
os.kill(os.getpid(), 9)
"""


def test_checkpoint_writer_manager_dies_with_a_killed_trainer():
    """megatron's writer keeps a spawned Manager for the run; after kill -9 of the trainer it
    must not live on as an orphan."""
    # an orphan would hold inherited pipes open: read one line, wait for the exit, not for EOF
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_MANAGER], env=_repo_env(), stdout=subprocess.PIPE, text=True
    )
    pids = proc.stdout.readline().split()
    assert proc.wait(timeout=120) == -signal.SIGKILL and len(pids) == 1, pids
    manager = int(pids[0])
    try:
        deadline = time.monotonic() + 10
        while not _gone(manager):
            assert time.monotonic() < deadline, f"the writer's Manager {manager} outlived us"
            time.sleep(0.05)
    finally:
        if not _gone(manager):
            os.kill(manager, signal.SIGKILL)
        proc.stdout.close()


def _reached(progress: Path, step: int) -> bool:
    """The worker rewrites its progress file in place: read it once, and an empty read (caught
    between truncate and write) is not a step."""
    text = progress.read_text() if progress.exists() else ""
    return text.isdigit() and int(text) >= step


def test_sigterm_on_one_rank_checkpoints_all_and_exits_cleanly(tmp_path):
    """SIGTERM to rank 1 only: both ranks save the same step and torchrun exits 0."""
    env = {**_repo_env(), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(REPO / "tests/cpu/workers/ckpt_sigterm.py"),
        str(tmp_path),
    ]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        progress = tmp_path / "progress"
        while not _reached(progress, 3):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the loop never reached step 3"
            time.sleep(0.05)
        os.kill(int((tmp_path / "pid_1").read_text()), signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    (step, path), _ = C.CheckpointManager(tmp_path).latest_complete()
    assert step >= 3
    extras = [torch.load(path / "extra" / f"rank_{r}.pt", weights_only=False) for r in (0, 1)]
    assert [e["step"] for e in extras] == [step, step]
    assert [e["signal"] for e in extras] == [None, "SIGTERM"]
    assert "rank 0: stopped by a peer" in output and "rank 1: stopped by SIGTERM" in output
