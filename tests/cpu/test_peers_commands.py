"""benchmarks/peers: the commands each system is started with, checked without the peers
installed (the runs themselves are GPU benchmarks; `--workload tiny` / `tiny2` are their CPU
smoke tests, which need TRL). A misspelt Tandem key or a layout Tandem refuses would
otherwise surface only on a GPU machine."""

import argparse
import json
import time
from pathlib import Path

import pytest

from benchmarks.peers import run
from trainer.config_check import load_config

PATHS = (Path("/m"), Path("/d/train.parquet"), Path("/d/val.parquet"), Path("/o"))
# where the commands point at files written at run time
RUN_TIME_KEYS = ("model.path", "model.random_init", "data.train_files", "data.val_files")


@pytest.mark.parametrize("workload", sorted(run.WORKLOADS))
def test_tandem_command_is_a_config_tandem_accepts(workload):
    w = run.WORKLOADS[workload]
    cmd = run.tandem_command(w, *PATHS)
    launcher = cmd[1 : cmd.index("trainer.main")]
    if w.gpus > 1:
        assert launcher[:2] == ["-m", "torch.distributed.run"]
        assert f"--nproc-per-node={w.gpus}" in launcher
    else:
        assert launcher == ["-m"]
    overrides = [o for o in cmd[cmd.index("trainer.main") + 1 :] if not o.startswith(RUN_TIME_KEYS)]
    cfg = load_config(overrides, world_size=w.gpus)
    assert cfg.model.preset == w.preset
    assert (cfg.data.train_batch_size, cfg.rollout.n) == (w.prompts, w.n)
    assert cfg.rollout.response_length == w.response_length
    assert cfg.actor.ppo_mini_batch_size == w.prompts  # one optimizer step per batch


def test_two_gpu_workload_starts_each_peer_on_both_gpus(monkeypatch):
    monkeypatch.setattr(run, "has_gpus", lambda: True)
    w = run.WORKLOADS["8b"]
    assert w.gpus == 2
    cfg = load_config([f"model={w.preset}", *w.tandem_parallel, "rollout=vllm"], world_size=w.gpus)
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.sequence_parallel
    trl = run.trl_command("python", w, PATHS[0], PATHS[1], PATHS[3])
    assert trl[1:4] == ["-m", "accelerate.commands.launch", "--num_processes=2"]
    assert "--use_fsdp" in trl and "--fsdp_version=2" in trl
    assert f"--fsdp_transformer_layer_cls_to_wrap={w.trl_fsdp_layer}" in trl
    # accelerate's and torchrun's parsers read an abbreviated flag (--n) as one of theirs
    script_flags = [a for a in trl[trl.index("benchmarks.peers.trl_grpo") + 1 :] if a[:2] == "--"]
    assert "--generations" in script_flags and "--no-vllm" not in script_flags
    verl = run.verl_command("/site", 600, w, PATHS[0], PATHS[1], PATHS[3])
    assert verl[verl.index("--gpus") + 1] == "2"


def test_cpu_smoke_runs_trl_under_torchrun_without_vllm(monkeypatch):
    monkeypatch.setattr(run, "has_gpus", lambda: False)
    trl = run.trl_command("python", run.WORKLOADS["tiny2"], PATHS[0], PATHS[1], PATHS[3])
    assert trl[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert trl[-1] == "--no-vllm"


def test_step_ratios_are_peer_over_tandem_medians_and_run_by_run():
    from benchmarks.peers.run import step_ratios

    runs = {
        "Tandem": [{"step_s": 4.0}, {"step_s": 5.0}, {"step_s": 4.5}],
        "TRL": [{"step_s": 8.0}, {"step_s": 6.0}, {"step_s": 9.0}],
    }
    (line,) = step_ratios(runs)
    assert line.startswith("- TRL / Tandem, seconds a step: 1.78× (medians of runs)"), line
    assert line.endswith("run by run 1.20 / 2.00 / 2.00×"), line
    assert step_ratios({"TRL": runs["TRL"]}) == []


def test_deadline_starts_no_system_that_would_not_finish(tmp_path, monkeypatch):
    """--deadline: a system is started only if its shortest earlier wall time (+15 %) fits in
    what is left; one never measured is started."""
    for r, jobs in enumerate([{"Tandem": 266.0, "TRL": 130.0}, {"Tandem": 108.0}]):
        (tmp_path / f"run{r}").mkdir()
        record = {name: {"gpu": "0", "wall_s": wall} for name, wall in jobs.items()}
        (tmp_path / f"run{r}" / "jobs.json").write_text(json.dumps(record))
    assert run.expected_wall_s(tmp_path, "Tandem") == 108.0
    assert run.expected_wall_s(tmp_path, "verl") is None
    now = time.monotonic()
    run.check_time_left(tmp_path, ["TRL"], 160, now)  # 149.5 s needed
    with pytest.raises(run.OutOfTime, match="TRL took ~150 s"):
        run.check_time_left(tmp_path, ["TRL"], 140, now)
    with pytest.raises(run.OutOfTime, match="Tandem and TRL"):
        run.check_time_left(tmp_path, ["Tandem", "TRL"], 140, now)
    run.check_time_left(tmp_path, ["verl"], 1, now)
    run.check_time_left(tmp_path, ["TRL"], None, now - 1e6)

    # run 1 on one GPU: TRL first (odd run), and it does not fit: nothing starts, Tandem's
    # record stays
    started = []
    monkeypatch.setattr(run, "run_jobs", lambda batch: started.append(batch) or {})
    args = argparse.Namespace(
        out=tmp_path, fresh=False, systems=["tandem", "trl"], trl_python="python",
        verl_site="/v", verl_timeout=1.0, deadline=140.0, started=now,
    )  # fmt: skip
    with pytest.raises(run.OutOfTime):
        run.run_once(1, args, run.WORKLOADS["0p5b"], PATHS[:3], ["0"])
    assert started == [] and (tmp_path / "run1" / "jobs.json").exists()
    args.deadline = 1000.0
    assert run.run_once(1, args, run.WORKLOADS["0p5b"], PATHS[:3], ["0"])["Tandem"]
    assert [name for ((name, *_),) in started] == ["TRL"]
