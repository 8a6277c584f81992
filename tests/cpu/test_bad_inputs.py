"""A catalogue of bad inputs (config, rewards, model directories, data files, checkpoints), each
given to the command as a user would: refused before any process group, model or engine
exists, in one line naming the key and the file, row or checkpoint, exit status 2, no
traceback, in seconds. Most run in-process (`trainer.main.main`), so the catalogue stays
cheap; a few run as real commands. Disk and signal faults are at the end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import archs
from archs import ensure_tiny_checkpoint
from tandem_core.errors import InputError
from trainer import main as entry
from trainer.config_check import load_config
from trainer.state.checkpoints import CheckpointManager, run_identity

REPO = Path(__file__).resolve().parents[2]
PROG = "python -m trainer.main: error: "


# ---- files the catalogue points at ------------------------------------------------------------
def write_rows(path: Path, rows: list[dict] | None = None, table: pa.Table | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table if table is not None else pa.Table.from_pylist(rows), path)
    return str(path)


def good_row(**changes) -> dict:
    row = {
        "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
        "reward_model": {"ground_truth": 5},
        "data_source": "arith",
    }
    return {**row, **changes}


@pytest.fixture(scope="module")
def files(tmp_path_factory, cache_dir):
    """Every bad file and directory of the catalogue, written once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    d = root / "data"
    f = {
        "good": write_rows(d / "good.parquet", [good_row() for _ in range(16)]),
        "missing": str(d / "nope.parquet"),
        "text": str(d / "text.parquet"),
        "no_prompt": write_rows(d / "no_prompt.parquet", [{"reward_model": {"ground_truth": 1}, "data_source": "a"}]),
        "no_reward": write_rows(d / "no_reward.parquet", [{"prompt": "hi", "data_source": "a"}]),
        "no_truth_field": write_rows(d / "no_truth_field.parquet", [{"prompt": "hi", "reward_model": {"style": "rule"}, "data_source": "a"}]),
        "empty": write_rows(d / "empty.parquet", table=pa.Table.from_pylist([good_row()]).slice(0, 0)),
        "prompt_int": write_rows(d / "prompt_int.parquet", [good_row(prompt=7)] * 3),
        "prompt_bytes": write_rows(d / "prompt_bytes.parquet", [good_row(prompt=b"hi")] * 3),
        "prompt_blank": write_rows(d / "prompt_blank.parquet", [good_row(prompt="hi"), good_row(prompt="  ")]),
        "no_content": write_rows(d / "no_content.parquet", [good_row(prompt=[{"role": "user"}])]),
        "message_str": write_rows(d / "message_str.parquet", [good_row(prompt=["hi", "there"])]),
        "truth_list": write_rows(d / "truth_list.parquet", [good_row(reward_model={"ground_truth": [1, 2]})]),
        "truth_null": write_rows(d / "truth_null.parquet", [good_row(), good_row(reward_model={"ground_truth": None})]),
        "source_int": write_rows(d / "source_int.parquet", [good_row(data_source=3)]),
        "few": write_rows(d / "few.parquet", [good_row() for _ in range(3)]),
    }  # fmt: skip
    Path(f["text"]).write_text("not parquet\n")
    tiny = ensure_tiny_checkpoint("tiny_llama", cache_dir)
    m = root / "models"

    def model_variant(name, edit=None, drop=()):
        out = m / name
        shutil.copytree(tiny, out)
        for file in drop:
            (out / file).unlink()
        if edit is not None:
            cfg = json.loads((out / "config.json").read_text())
            edit(cfg)
            (out / "config.json").write_text(json.dumps(cfg))
        return str(out)

    f.update(
        model_ok=str(tiny),
        model_none=str(m / "nowhere"),
        model_no_config=model_variant("no_config", drop=["config.json"]),
        model_no_weights=model_variant("no_weights", drop=["model.safetensors"]),
        model_no_tokenizer=model_variant("no_tokenizer", drop=["tokenizer.json"]),
        model_gpt2=model_variant("gpt2", lambda c: c.update(model_type="gpt2")),
        model_no_type=model_variant("no_type", lambda c: c.pop("model_type")),
        model_scaling=model_variant(
            "scaling", lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0})
        ),
        model_no_layers=model_variant("no_layers", lambda c: c.pop("num_hidden_layers")),
        model_gelu=model_variant("gelu", lambda c: c.update(hidden_act="gelu")),
    )
    bad_json = Path(model_variant("bad_json"))
    (bad_json / "config.json").write_text("{not json")
    f["model_bad_json"] = str(bad_json)
    sharded = Path(model_variant("sharded"))
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    f["model_missing_shard"] = str(sharded)
    f["reward_module"] = write_reward_module(root)
    return f


def write_reward_module(root: Path) -> str:
    pkg = root / "user_rewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text(
        "def strict(solution_str, ground_truth, data_source=None, extra_info=None):\n"
        "    return float(solution_str.strip() == ground_truth)\n"
        "strict.ground_truth_types = (str,)\n"
        "NOT_CALLABLE = 3\n"
    )
    (pkg / "broken.py").write_text("import nonexistent_dependency_xyz\n")
    return str(root)


def checkpoint_dir(
    root: Path, name: str, overrides: list[str], damage=None, steps=(1, 2), world: int = 1
) -> Path:
    """An output directory holding real (model-free) checkpoints of the run `overrides` names."""
    out = root / name
    cfg = load_config(overrides, world_size=world)
    identity = run_identity(cfg, archs.read_model_args(cfg.model), world)
    manager = CheckpointManager(out, max_to_keep=5, identity=identity)
    for step in steps:
        manager.save(step, {}, {"step": step})
    for step in steps:
        if damage is not None:
            damage(manager.root / f"step_{step}")
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "grpo": checkpoint_dir(root, "grpo", []),
        "qwen2": checkpoint_dir(root, "qwen2", ["model=tiny_qwen2"]),
        "ppo": checkpoint_dir(root, "ppo", ["algorithm=ppo"]),
        "no_marker": checkpoint_dir(
            root, "no_marker", [], lambda p: (p / "complete.json").unlink()
        ),
        "short": checkpoint_dir(
            root, "short", [], lambda p: (p / "extra" / "rank_0.pt").write_bytes(b"x")
        ),
        "done": checkpoint_dir(root, "done", [], steps=(4,)),
        "dp2": checkpoint_dir(root, "dp2", [], world=2),
    }


# ---- the catalogue: (name, overrides, the message's start, what it must also name) ----------
# Overrides may name a file of `files` as {name} and a checkpoint directory as <name>.
CATALOGUE = [
    # config values checked only inside megatron or at first use before
    ("betas one value", ["actor.optim.betas=[0.9]"], "actor.optim.betas", "two values"),
    ("betas three values", ["critic.optim.betas=[0.9,0.9,0.9]"], "critic.optim.betas", "two values"),
    ("betas out of range", ["actor.optim.betas=[0.9,1.5]"], "actor.optim.betas", "[0, 1)"),
    ("te without transformer-engine", ["model.layer_spec=te"], "model.layer_spec", "transformer_engine"),
    ("algorithm name", ["algorithm.name=bogus"], "algorithm.name", "grpo"),
    ("resume mode", ["trainer.resume=maybe"], "trainer.resume", "auto, must, never"),
    ("resume as a boolean", ["trainer.resume=false"], "trainer.resume", "false = never"),
    ("discard without never", ["trainer.discard_checkpoints=true"], "trainer.discard_checkpoints", "never"),
    ("unknown key", ["trainer.totl_steps=3"], "trainer.totl_steps", "unknown key"),
    ("wrong type", ["rollout.n=many"], "rollout.n", "many"),
    ("negative lr", ["actor.optim.lr=-1"], "actor.optim.lr", "[0, inf)"),
    ("zero steps", ["trainer.total_steps=0"], "trainer.total_steps", "[1, inf)"),
    ("top_p above one", ["rollout.top_p=1.5"], "rollout.top_p", "(0, 1]"),
    ("layout larger than the world", ["parallel=tp2"], "parallel.tensor_model_parallel_size × parallel.pipeline_model_parallel_size", "world size 1"),
    ("missing group option", ["algorithm=ppo2"], "algorithm", "ppo"),
    ("model group option", ["model=tiny_gpt"], "model", "tiny_llama"),
    ("unknown option", ["--fast"], "--fast", "unknown option"),
    # names a registry owns
    ("policy loss", ["actor.policy_loss=ppo"], "actor.policy_loss", "vanilla"),
    ("advantage estimator", ["algorithm.adv_estimator=ppo"], "algorithm.adv_estimator", "gae"),
    ("kl estimator", ["actor.kl_loss_type=k5"], "actor.kl_loss_type", "low_var_kl"),
    ("kl penalty", ["algorithm.kl_penalty=k5"], "algorithm.kl_penalty", "k3"),
    ("rollout backend", ["rollout.name=sglang"], "rollout.name", "vllm"),
    ("training strategy", ["actor.strategy=deepspeed"], "actor.strategy", "megatron, fsdp2"),
    ("gemma3 on megatron", ["model=gemma3_270m", "actor.strategy=megatron"], "actor.strategy", "gemma3_text: Tandem's megatron model does not build"),
    ("fsdp2 setting under megatron", ["actor.param_offload=true"], "actor.param_offload", "an fsdp2 setting"),
    ("reward name", ["reward.name=gsm8k"], "reward.name", "arith"),
    ("logger", ["logger.backends=[mlflow]"], "logger.backends", "tensorboard"),
    ("model preset", ["model.preset=llama4"], "model.preset", "llama3_1b"),
    ("shape preset without weights", ["model.preset=llama2_7b"], "model.preset", "random_init"),
    ("layers of a tiny preset", ["model.num_layers=1"], "model.num_layers", "shape preset"),
    ("more layers than the shape", ["model.preset=llama3_1b", "model.random_init=true", "model.num_layers=99"], "model.num_layers", "1..16"),
    # reward functions
    ("reward fn without colon", ["reward.fn=user_rewards.scores"], "reward.fn", "package.module:function"),
    ("reward fn module missing", ["reward.fn=user_rewards.nope:f"], "reward.fn", "cannot import"),
    ("reward fn module broken", ["reward.fn=user_rewards.broken:f"], "reward.fn", "nonexistent_dependency_xyz"),
    ("reward fn attribute missing", ["reward.fn=user_rewards.scores:lenient"], "reward.fn", "has no"),
    ("reward fn not callable", ["reward.fn=user_rewards.scores:NOT_CALLABLE"], "reward.fn", "not callable"),
    # model directories
    ("model dir missing", ["model.path={model_none}"], "model.path", "nowhere"),
    ("model dir without config", ["model.path={model_no_config}"], "model.path", "config.json"),
    ("config not json", ["model.path={model_bad_json}"], "model.path", "unreadable"),
    ("config without model_type", ["model.path={model_no_type}"], "model.path", "model_type"),
    ("unknown architecture", ["model.path={model_gpt2}"], "model.path", "gpt2"),
    ("rope scaling", ["model.path={model_scaling}"], "model.path", "rope_scaling"),
    ("config lacks a key", ["model.path={model_no_layers}"], "model.path", "num_hidden_layers"),
    ("activation", ["model.path={model_gelu}"], "model.path", "hidden_act"),
    ("model dir without weights", ["model.path={model_no_weights}"], "model.path", "no weights"),
    ("model dir without tokenizer", ["model.path={model_no_tokenizer}"], "model.path", "no tokenizer"),
    ("index lists a missing shard", ["model.path={model_missing_shard}"], "model.path", "model-00002-of-00002"),
    # data files
    ("data file missing", ["data.train_files=[{missing}]"], "data.train_files", "nope.parquet: no such data file"),
    ("data not parquet", ["data.train_files=[{text}]"], "data.train_files", "cannot read as parquet"),
    ("no prompt column", ["data.train_files=[{no_prompt}]"], "data.train_files", "missing column 'prompt'"),
    ("no reward column", ["data.train_files=[{no_reward}]"], "data.train_files", "missing column 'reward_model'"),
    ("no ground truth field", ["data.train_files=[{no_truth_field}]"], "data.train_files", "no field 'ground_truth'"),
    ("zero rows", ["data.train_files=[{empty}]"], "data.train_files", "empty.parquet: no rows"),
    ("prompt is an int", ["data.train_files=[{prompt_int}]"], "data.train_files", "row 0, column 'prompt': expected chat messages or text, got int (and 2 more problems)"),
    ("prompt is bytes", ["data.train_files=[{prompt_bytes}]"], "data.train_files", "got bytes"),
    ("prompt is blank", ["data.train_files=[{prompt_blank}]"], "data.train_files", "row 1, column 'prompt': empty prompt"),
    ("message without content", ["data.train_files=[{no_content}]"], "data.train_files", "message 0 is not"),
    ("messages are strings", ["data.train_files=[{message_str}]"], "data.train_files", "message 0 is not"),
    ("ground truth is a list", ["data.train_files=[{truth_list}]"], "data.train_files", "column 'reward_model.ground_truth': expected str or int or float, got list"),
    ("ground truth is null", ["data.train_files=[{truth_null}]"], "data.train_files", "row 1, column 'reward_model.ground_truth': null"),
    ("ground truth of the user reward's type", ["data.train_files=[{good}]", "reward.fn=user_rewards.scores:strict"], "data.train_files", "expected str, got int"),
    ("data source is an int", ["data.train_files=[{source_int}]"], "data.train_files", "column 'data_source'"),
    ("fewer rows than a batch", ["data.train_files=[{few}]"], "data.train_batch_size", "few.parquet"),
    ("bad validation file", ["data.train_files=[{good}]", "data.val_files=[{prompt_int}]"], "data.val_files", "prompt_int.parquet: row 0"),
    ("prompt key", ["data.train_files=[{good}]", "data.prompt_key=question"], "data.train_files", "missing column 'question'"),
    # checkpoints already in the output directory
    ("resume never over checkpoints", ["trainer.resume=never", "trainer.output_dir=<grpo>"], "trainer.resume", "discard_checkpoints"),
    ("resume must without any", ["trainer.resume=must", "trainer.output_dir=<nowhere>"], "trainer.resume", "no checkpoint"),
    ("all checkpoints without marker", ["trainer.output_dir=<no_marker>"], "trainer.resume", "step_2: no complete.json"),
    ("all checkpoints short", ["trainer.output_dir=<short>"], "trainer.resume", "rank_0.pt has 1 bytes"),
    ("another model's checkpoint", ["trainer.output_dir=<qwen2>"], "trainer.resume", "arch qwen2 (this run: llama)"),
    ("another layout's checkpoint", ["trainer.output_dir=<dp2>"], "trainer.resume", "data_parallel_size 2 (this run: 1)"),
    ("a critic's checkpoint", ["trainer.output_dir=<ppo>"], "trainer.resume", "holds the roles ['actor', 'critic']"),
]  # fmt: skip


def resolve(overrides: list[str], files: dict, ckpts: dict, tmp_path: Path) -> list[str]:
    out = []
    for o in overrides:
        o = o.format(**files) if "{" in o else o
        if "<" in o:
            key, name = o.split("=<")
            name = name.rstrip(">")
            o = f"{key}={ckpts.get(name, tmp_path / name)}"
        out.append(o)
    if not any(o.startswith("trainer.output_dir") for o in out):
        out.append(f"trainer.output_dir={tmp_path / 'run'}")
    return out


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def nothing_built(monkeypatch):
    """Any attempt to start distributed, build a model or start an engine fails the test."""
    import tandem_core.distributed as D
    import trainer.build as build

    def forbidden(*args, **kwargs):
        raise AssertionError("something was built for a refused input")

    monkeypatch.setattr(D, "init_distributed", forbidden)
    monkeypatch.setattr(build, "build_components", forbidden)


@pytest.mark.parametrize("name, overrides, key, detail", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_is_refused_in_one_line(
    name, overrides, key, detail, files, ckpts, tmp_path, capsys, monkeypatch, nothing_built
):
    monkeypatch.syspath_prepend(files["reward_module"])
    monkeypatch.delenv("TANDEM_DEBUG", raising=False)
    argv = resolve(overrides, files, ckpts, tmp_path)
    before = {k: tree_digest(v) for k, v in ckpts.items()}
    started = time.monotonic()
    status = entry.main(argv)
    seconds = time.monotonic() - started
    out, err = capsys.readouterr()
    assert status == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(PROG + key), lines[0]
    assert detail in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert seconds < 10, seconds
    assert {k: tree_digest(v) for k, v in ckpts.items()} == before  # no byte changed on disk
    assert not (tmp_path / "run").exists()


def test_the_catalogue_is_large_enough():
    assert len(CATALOGUE) >= 60
    assert len({c[0] for c in CATALOGUE}) == len(CATALOGUE)


def test_good_inputs_pass_the_same_checks(files, ckpts, tmp_path, monkeypatch):
    """The controls: the same checks accept the good file, the good model directory, a
    directory with weights under random_init, a resumable checkpoint and a user reward."""
    from trainer.preflight import check_inputs

    monkeypatch.syspath_prepend(files["reward_module"])
    for overrides, resume_step in [
        ([f"data.train_files=[{files['good']}]"], None),
        ([f"model.path={files['model_ok']}"], None),
        ([f"model.path={files['model_no_weights']}", "model.random_init=true"], None),
        ([f"trainer.output_dir={ckpts['grpo']}"], 2),
        ([f"trainer.output_dir={ckpts['grpo']}", "trainer.resume=must"], 2),
        ([f"trainer.output_dir={ckpts['grpo']}", "trainer.resume=never",
          "trainer.discard_checkpoints=true"], None),
        (["reward.fn=user_rewards.scores:strict"], None),
    ]:  # fmt: skip
        argv = overrides + (
            [] if "output_dir" in str(overrides) else [f"trainer.output_dir={tmp_path}"]
        )
        cfg = load_config(argv, world_size=1)
        assert check_inputs(cfg, 1, archs.read_model_args(cfg.model)) == resume_step, overrides


def test_a_finished_run_says_so(ckpts, capsys, nothing_built):
    status = entry.main([f"trainer.output_dir={ckpts['done']}", "trainer.total_steps=4"])
    out, err = capsys.readouterr()
    assert status == 0 and "step 4" in out and "nothing to train" in out, (out, err)


def command(*args: str, timeout: int = 60):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TANDEM_DEBUG": ""},
    )
    return proc, time.monotonic() - started


@pytest.mark.parametrize(
    "name", ["prompt is an int", "model dir without weights", "resume never over checkpoints"]
)
def test_as_a_command(name, files, ckpts, tmp_path):
    _, overrides, key, detail = next(c for c in CATALOGUE if c[0] == name)
    proc, seconds = command(*resolve(overrides, files, ckpts, tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PROG + key) and detail in lines[0]
    assert "Traceback" not in proc.stderr
    assert seconds < 30, seconds  # a bound on a hang (9-10 s seen with the 2 cores shared)


# ---- one run at a time in an output directory ---------------------------------------------------
def test_a_second_run_in_the_same_output_dir_is_refused(tmp_path, capsys, nothing_built):
    from trainer.state.run_lock import exclusive_output_dir

    out = tmp_path / "run"
    with exclusive_output_dir(out):  # the first run, training
        status = entry.main([f"trainer.output_dir={out}"])
    _, err = capsys.readouterr()
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PROG + f"trainer.output_dir={out}"), err
    assert f"another run is using it (pid {os.getpid()} on " in lines[0], lines[0]
    with exclusive_output_dir(out):  # the first run ended: the directory is free again
        pass


def test_the_lock_dies_with_its_run(tmp_path):
    """kill -9 leaves no stale lock: the kernel drops it with its holder."""
    from trainer.state.run_lock import exclusive_output_dir

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from trainer.state.run_lock import exclusive_output_dir\n"
         f"with exclusive_output_dir({str(out)!r}):\n"
         "    print('held', flush=True)\n"
         "    time.sleep(60)"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"another run is using it \\(pid {holder.pid} on "):
            with exclusive_output_dir(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_output_dir(out):
        pass
