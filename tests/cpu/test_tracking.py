"""trainer/tracking.py: console line, tensorboard event files read back, metrics.jsonl across a
resume, wandb's missing-package error. (Rank-0-only writing is checked under torchrun in
test_checkpoint.py.)"""

from __future__ import annotations

import io
import math

import pytest

from trainer import tracking as T

STEPS = [
    {
        "actor/pg_loss": -0.0125,
        "actor/entropy": 2.5,
        "critic/score/mean": 0.25,
        "response_length/mean": 17.0,
        "timing_s/step": 1.5,
        "timing_s/gen": 0.75,
        "note": "not a number",
    },
    {
        "actor/pg_loss": 0.5,
        "actor/entropy": 2.25,
        "critic/score/mean": 0.5,
        "response_length/mean": 19.0,
        "timing_s/step": 1.25,
        "timing_s/gen": 0.5,
    },
    {"actor/pg_loss": 1e-6, "critic/score/mean": float("nan")},
]


def test_console_line():
    line = T.console_line(STEPS[0], step=3, total=20, eta_s=62)
    assert line == (
        "step 3/20 [###-----------------]  15% | score 0.25 | pg_loss -0.0125 | "
        "entropy 2.5 | resp_len 17 | s/step 1.5 | eta 0:01:02"
    )
    assert T.console_line({"actor/pg_loss": 1e-6}, 7, None) == "step 7 | pg_loss 1.000e-06"


def test_console_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = io.StringIO()
    cfg = {"trainer": {"total_steps": 3}, "logger": {"backends": ["console", "tensorboard"]}}
    with T.Tracker(["console", "tensorboard"], "tandem", "exp", tmp_path, cfg, stream=out) as t:
        for step, metrics in enumerate(STEPS, start=1):
            t.log(metrics, step)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("step 1/3 [#######-------------]  33% | score 0.25 | pg_loss")
    assert "eta 0:00:0" in lines[1] and lines[2].startswith("step 3/3 [####################] 100%")

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert "note" not in events.Tags()["scalars"]
    got = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in ("actor/pg_loss", "timing_s/gen", "critic/score/mean")
    }
    assert got["actor/pg_loss"] == [(1, pytest.approx(-0.0125)), (2, 0.5), (3, pytest.approx(1e-6))]
    assert got["timing_s/gen"] == [(1, 0.75), (2, 0.5)]
    assert math.isnan(got["critic/score/mean"][2][1])


def test_metrics_jsonl_across_a_resume(tmp_path):
    with T.Tracker([], "tandem", "exp", tmp_path) as t:
        t.log({"a": 1.0}, 1)
        t.log({"a": 2.0}, 2)
        t.log({"val/a": 9.0}, 2)  # a second record of the same step in the same run: merged
        t.log({"a": 3.0, "b": float("inf")}, 3)  # then killed; resumed from step 2's checkpoint
    with T.Tracker([], "tandem", "exp", tmp_path) as t:
        t.log({"a": 30.0}, 3)
        t.log({"a": 4.0}, 4)
    got = T.read_metrics(tmp_path / "metrics.jsonl")
    assert got == {1: {"a": 1.0}, 2: {"a": 2.0, "val/a": 9.0}, 3: {"a": 30.0}, 4: {"a": 4.0}}


def test_unknown_backend(tmp_path):
    with pytest.raises(T.TrackingError, match=r"unknown logger backend\(s\) \['mlflow'\]"):
        T.Tracker(["console", "mlflow"], "tandem", "exp", tmp_path)


def test_wandb_missing_is_a_clear_error(tmp_path):
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed here")
    with pytest.raises(T.TrackingError, match="pip install wandb"):
        T.Tracker(["console", "wandb"], "tandem", "exp", tmp_path)


def test_timed():
    timings: dict[str, float] = {}
    with T.timed("gen", timings):
        pass
    first = timings["timing_s/gen"]
    with T.timed("gen", timings):
        sum(range(10000))
    assert set(timings) == {"timing_s/gen"} and timings["timing_s/gen"] > first >= 0


def test_device_peak_memory_per_phase(monkeypatch):
    """The sampler's bookkeeping, on a fake device whose memory in use the test sets: a phase's
    peak is the highest value sampled while it was open (nested phases each get theirs), and
    peaks_gib() hands them over once."""
    import threading
    import time

    import torch

    used = {"bytes": 2 * 2**30}
    sampled = threading.Event()

    def mem_get_info(device=None):
        sampled.set()
        return 80 * 2**30 - used["bytes"], 80 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    mem = T.DevicePeakMemory(interval_s=0.001)

    def hold(n_bytes):  # keep a level long enough for the thread to see it
        used["bytes"] = n_bytes
        sampled.clear()
        assert sampled.wait(5)  # sampled at this level...
        time.sleep(0.01)  # ...and the sample booked

    with mem.phase("gen"):
        hold(30 * 2**30)
        with mem.phase("sync"):
            hold(40 * 2**30)
            hold(10 * 2**30)
        hold(20 * 2**30)
    with mem.phase("update"):
        hold(5 * 2**30)
    used["bytes"] = 3 * 2**30
    deadline = time.time() + 5
    while mem._wake.is_set() and time.time() < deadline:  # the thread goes idle
        time.sleep(0.001)
    peaks = mem.peaks_gib()
    assert peaks == {
        "memory/peak_gib/gen": 40.0,
        "memory/peak_gib/sync": 40.0,
        "memory/peak_gib/update": 20.0,  # its start: the level the previous phase left
    }
    assert mem.peaks_gib() == {}


def test_wandb_offline_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for step in (1, 2):  # a run, then its resume
        with T.Tracker(["wandb"], "tandem", "exp", tmp_path, {"trainer": {}}) as t:
            t.log({"actor/pg_loss": 0.5}, step)
    run_id = (tmp_path / "wandb_run_id").read_text()
    # offline-run-<time>-<id>[-k]: each resume writes beside the first, under the same id
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in r for r in runs), (run_id, runs)
