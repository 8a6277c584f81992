"""verl 0.9.1's GRPO (FSDP2 actor and reference, vLLM async rollout, `--gpus` GPUs) on Tandem's
GRPO workload; writes per-step times and verl's logged metrics to a JSON file in trl_grpo.py's
shape.

    python -m benchmarks.peers.verl_grpo --model DIR --train-file arith_train.parquet --out verl.json

verl runs as its own process, `python -m verl.trainer.main_ppo <overrides>`, with `--site`
first on its PYTHONPATH: verl 0.9.1 pins transformers <5.11 and tensordict <=0.10.0, and
transformers 5.9 checks tokenizers <=0.23.0 at import, so that folder holds transformers 5.9.0,
tokenizers 0.22.2 and tensordict 0.10.0 (install_verl.sh writes it). Tandem and TRL never see it.

What verl reads, written into `--work`:
- `model/`: the checkpoint the other systems read, every file linked (the same bytes). Its
  tokenizer is Tandem's character tokenizer, spelled in the byte-level alphabet so that
  transformers 5's Qwen2Tokenizer keeps " " and "\\n" (archs/checkpoints.py); verl's prompt
  builder for qwen2 refuses a tokenizer whose "\\n" is not one token, which is checked here.
- `reward.py`: `compute_score` calling Tandem's `trainer.rewards.arith`.
- the task is Tandem's parquet itself: its columns (data_source, prompt, ability, reward_model,
  extra_info) are verl's.
verl's metrics come from its `file` logger (JSONL, one line per step; the console's
`step:N - key:value - ...` lines are the fallback).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SITE = "/tmp/verlsite"
SITE_PACKAGES = ("transformers", "tokenizers", "tensordict")
"""What `--site` holds (install_verl.sh): put before everything else on verl's path."""

REWARD = '''"""Tandem's `arith` reward for verl (written by benchmarks/peers/verl_grpo.py)."""
import sys

sys.path.append({repo!r})  # appended: Tandem's packages never shadow verl's
from trainer.rewards import arith


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return arith(solution_str, ground_truth)
'''


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF directory (weights and tokenizer)")
    p.add_argument("--train-file", required=True, help="Tandem's arith_train.parquet")
    p.add_argument("--out", required=True, help="JSON file of the results")
    p.add_argument(
        "--work", default=None, help="verl's inputs, log, metrics; default: beside --out"
    )
    p.add_argument("--site", default=DEFAULT_SITE, help="folder first on verl's PYTHONPATH")
    p.add_argument("--python", default=sys.executable, help="the Python verl is installed in")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=32, help="prompts per optimizer step")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--response-length", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--kl-coef", type=float, default=0.001, help="k3 KL in the loss; 0: no ref")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    p.add_argument("--gpus", type=int, default=1, help="GPUs of this node verl trains on")
    p.add_argument("--timeout", type=float, default=1200, help="seconds before verl is killed")
    p.add_argument("--dry-run", action="store_true", help="write the inputs, print the command")
    p.add_argument("extra", nargs="*", help="more hydra overrides for verl")
    return p.parse_args(argv)


# ---- what verl reads ------------------------------------------------------------------------
def check_tokenizer(model: Path) -> None:
    """verl's qwen2 prompt builder needs spaces and newlines to survive a round trip."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    text = "What is 1 + 2?\n"
    if tok.decode(tok.encode(text)) != text:
        raise SystemExit(
            f"{model}: its tokenizer loses spaces or newlines (rebuild the checkpoint)"
        )


def write_inputs(model: Path, work: Path) -> tuple[Path, Path]:
    """verl's model directory (the shared checkpoint's files, linked) and its reward file."""
    check_tokenizer(model)
    vmodel = work / "model"
    vmodel.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        if f.is_file():
            link = vmodel / f.name
            link.unlink(missing_ok=True)
            link.symlink_to(f.resolve())
    reward = work / "reward.py"
    reward.write_text(REWARD.format(repo=str(REPO)))
    return vmodel, reward


def verl_overrides(a: argparse.Namespace, model: Path, reward: Path, work: Path) -> list[str]:
    """Hydra overrides of verl's ppo_trainer.yaml: Tandem's GRPO workload, FSDP2 without
    flash-attn (sdpa, padded batches), vLLM async (rollout TP 1: an engine per GPU); one
    optimizer step per batch."""
    samples = a.prompts * a.n
    if samples % a.micro_batch:
        raise SystemExit(f"--micro-batch {a.micro_batch} must divide {samples} samples")
    kl = a.kl_coef > 0
    o = {
        "algorithm.adv_estimator": "grpo",
        "algorithm.use_kl_in_reward": False,
        "data.train_files": a.train_file,
        "data.val_files": a.train_file,  # never read: no validation
        "data.train_batch_size": a.prompts,
        "data.max_prompt_length": a.max_prompt_length,
        "data.max_response_length": a.response_length,
        "data.filter_overlong_prompts": False,
        "data.truncation": "error",
        "actor_rollout_ref.model.path": model,
        # no flash-attn on the GPU machines: sdpa, and the padded (not packed) batches
        "actor_rollout_ref.model.use_remove_padding": False,
        "+actor_rollout_ref.model.override_config.attn_implementation": "sdpa",
        "actor_rollout_ref.model.enable_gradient_checkpointing": False,
        "actor_rollout_ref.actor.strategy": "fsdp2",
        "actor_rollout_ref.actor.optim.lr": a.lr,
        "actor_rollout_ref.actor.optim.weight_decay": 0.0,  # verl's default is 0.01
        # one optimizer step per batch: the mini-batch is every prompt (verl multiplies by n)
        "actor_rollout_ref.actor.ppo_mini_batch_size": a.prompts,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": a.micro_batch,
        "actor_rollout_ref.actor.ppo_epochs": 1,
        "actor_rollout_ref.actor.use_dynamic_bsz": False,
        "actor_rollout_ref.actor.clip_ratio": 0.2,
        "actor_rollout_ref.actor.use_kl_loss": kl,
        "actor_rollout_ref.actor.kl_loss_coef": a.kl_coef,
        "actor_rollout_ref.actor.kl_loss_type": "low_var_kl",
        "actor_rollout_ref.actor.entropy_coeff": 0,
        "actor_rollout_ref.actor.loss_agg_mode": "seq-mean-token-mean",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": a.micro_batch,
        "actor_rollout_ref.rollout.name": "vllm",
        "actor_rollout_ref.rollout.mode": "async",
        "actor_rollout_ref.rollout.n": a.n,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": 1,
        "actor_rollout_ref.rollout.gpu_memory_utilization": a.gpu_memory_utilization,
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": a.micro_batch,
        # verl masks vLLM's logits to the tokenizer's 101 ids, where a random model hits EOS
        # every ~100 tokens; Tandem and TRL sample 151,936 ids and (nearly) never do
        "actor_rollout_ref.rollout.ignore_eos": True,
        "actor_rollout_ref.rollout.enforce_eager": False,
        "actor_rollout_ref.rollout.load_format": "dummy",
        "actor_rollout_ref.rollout.max_model_len": a.max_model_len,
        "actor_rollout_ref.rollout.agent.num_workers": 1,
        "reward.custom_reward_function.path": reward,
        "reward.custom_reward_function.name": "compute_score",
        "reward.num_workers": 1,
        "trainer.use_v1": True,
        "trainer.critic_warmup": 0,
        "trainer.logger": "[console,file]",
        "trainer.project_name": "tandem_peers",
        "trainer.experiment_name": "verl_grpo",
        "trainer.n_gpus_per_node": a.gpus,
        "trainer.nnodes": 1,
        "trainer.val_before_train": False,
        "trainer.test_freq": -1,
        "trainer.save_freq": -1,
        "trainer.resume_mode": "disable",
        "trainer.total_training_steps": a.steps,
        "trainer.total_epochs": 1,
        "trainer.default_local_dir": work / "ckpt",
    }
    return [f"{k}={v}" for k, v in o.items()] + list(a.extra)


def verl_env(site: str, work: Path) -> dict[str, str]:
    """`site` first on the path, the repository off it (its top-level packages, `rollout`,
    `trainer`, `tests`, ..., are no business of verl's; the reward file finds Tandem's)."""
    env = dict(os.environ)
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    path = [site] if Path(site).is_dir() else []
    path += [p for p in inherited if Path(p).resolve() != REPO]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update(
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        VERL_USE_EXTERNAL_PLUGINS="none",
        VERL_FILE_LOGGER_PATH=str(work / "metrics.jsonl"),
        RAY_DEDUP_LOGS="0",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


# ---- what verl logged -----------------------------------------------------------------------
CONSOLE_STEP = re.compile(r"\bstep:(\d+) - (.*)$")
NUMBER = re.compile(r"^(?:np\.\w+\()?([-+\w.]+)\)?$")
"""A console value: pprint of a Python or numpy number ("1.5", "np.float64(1.5)", "True")."""


def read_file_logger(path: Path) -> dict[int, dict]:
    """verl's `file` logger: one `{"step": N, "data": {...}}` per line."""
    steps = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            steps.setdefault(int(row["step"]), {}).update(row["data"])
    return steps


def read_console(text: str) -> dict[int, dict]:
    """verl's console logger: `step:N - key:value - key:value ...` per step, possibly behind
    Ray's `(TaskRunnerV1 pid=...)` prefix."""
    steps = {}
    for line in text.splitlines():
        m = CONSOLE_STEP.search(line)
        if not m:
            continue
        metrics = {}
        for field in m.group(2).split(" - "):
            key, _, value = field.rpartition(":")
            num = NUMBER.match(value.strip())
            if key and num:
                v = num.group(1)
                try:
                    metrics[key] = float({"True": 1, "False": 0}.get(v, v))
                except ValueError:
                    pass
        steps.setdefault(int(m.group(1)), {}).update(metrics)
    return steps


def to_steps(logged: dict[int, dict]) -> list[dict]:
    """trl_grpo.py's shape: per step the seconds (`timing_s/step`: the step without logging),
    the phases (`timing_s/*`) and everything verl logged."""
    out = []
    for step in sorted(logged):
        m = logged[step]
        if "timing_s/step" not in m:
            continue
        phases = {k.removeprefix("timing_s/"): v for k, v in m.items() if k.startswith("timing_s/")}
        out.append({"step": step, "seconds": m["timing_s/step"], "phases": phases, "logs": m})
    return out


def site_versions(site: str) -> dict[str, str]:
    """The versions verl ran with: `--site`'s packages over the interpreter's own."""
    found = {}
    for name in ("verl", "ray", "vllm", "torch", *SITE_PACKAGES):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    for dist in importlib.metadata.distributions(path=[site]):
        found[dist.metadata["Name"].lower()] = dist.version
    return found


def run_verl(cmd: list[str], env: dict, work: Path, log: Path, timeout: float) -> int:
    """verl, output to `log`; on timeout it is killed with every process under it (Ray's
    workers, vLLM's engine). It stays in this process group, so whatever kills the caller's
    group kills it too (a new session would outlive the GPU machine's command)."""
    import psutil

    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
            for p in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            proc.wait()
            print(f"[verl_grpo] killed after {timeout:.0f} s", flush=True)
            return -9


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    args.train_file = str(Path(args.train_file).resolve())
    model, reward = write_inputs(Path(args.model).resolve(), work)
    overrides = verl_overrides(args, model, reward, work)
    (work / "overrides.txt").write_text("\n".join(overrides) + "\n")
    cmd = [args.python, "-m", "verl.trainer.main_ppo", *overrides]
    env = verl_env(args.site, work)
    print(f"[verl_grpo] PYTHONPATH={env['PYTHONPATH']} {' '.join(cmd)}", flush=True)
    if args.dry_run:
        return
    if not Path(args.site).is_dir():
        print(
            f"[verl_grpo] warning: {args.site} missing: verl gets the interpreter's own "
            "transformers and tensordict",
            flush=True,
        )
    log = work / "verl.log"
    metrics = work / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    start = time.perf_counter()
    rc = run_verl(cmd, env, work, log, args.timeout)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    logged = read_file_logger(metrics) if metrics.exists() else read_console(text)
    steps = to_steps(logged)
    if rc != 0 or len(steps) < args.steps:
        tail = "".join(text.splitlines(keepends=True)[-60:])
        raise SystemExit(f"[verl_grpo] verl exit {rc}, {len(steps)} steps logged; {log}:\n{tail}")
    result = {
        "system": "verl",
        "versions": site_versions(args.site),
        "wall_seconds": wall,
        "init_seconds": wall - sum(s["seconds"] for s in steps),
        "settings": overrides,
        "steps": steps,
    }
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"[verl_grpo] {len(steps)} steps -> {out}", flush=True)


if __name__ == "__main__":
    main()
