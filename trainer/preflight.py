"""What a checked config names on disk, checked before distributed init and before anything is
built: the model directory, the data files (every row against the columns' contract), the
library a layer spec needs, and the output directory's checkpoints against `trainer.resume`.

`check_inputs` raises one ConfigError, a line per problem, each naming its key and then the
file, row or checkpoint. Reading is all it does: nothing is written, moved or removed (the one
exception, `trainer.discard_checkpoints=true`, is the user's explicit word, carried out by
`discard_checkpoints` after the check passed).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from tandem_core.config import ConfigError, TandemConfig
from tandem_core.model_args import ModelArgs
from trainer import rewards
from trainer.data import check_data_file
from trainer.state.checkpoints import CheckpointManager, identity_mismatches, run_identity

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""Any of these makes a directory's tokenizer loadable (with tokenizer_config.json beside)."""


def check_inputs(cfg: TandemConfig, world_size: int, model_args: ModelArgs) -> int | None:
    """Raise one ConfigError listing every problem; else the step of the checkpoint the run
    will resume from (None: it starts at step 0)."""
    in_checkpoints, resume_step = _checkpoints(cfg, world_size, model_args)
    problems = [*_model_dir(cfg), *_layer_spec(cfg), *_data(cfg), *in_checkpoints]
    if problems:
        raise ConfigError("\n".join(problems))
    return resume_step


def _model_dir(cfg: TandemConfig) -> Iterator[str]:
    if cfg.model.path is None:
        return
    root = Path(cfg.model.path)
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        yield (
            f"model.path: {root} has no tokenizer (none of {', '.join(TOKENIZER_FILES)});"
            " save the tokenizer beside the model (tokenizer.save_pretrained)"
        )
    if cfg.model.random_init:
        return
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            yield f"model.path: unreadable {index}: {err}"
            return
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            yield f"model.path: {root} lacks {missing[0]} (listed in {index.name})"
    elif not (root / "model.safetensors").is_file():
        yield (
            f"model.path: {root} has no weights (no model.safetensors or its index); "
            "set model.random_init=true to train from random weights"
        )


def _layer_spec(cfg: TandemConfig) -> Iterator[str]:
    if cfg.model.layer_spec == "te" and importlib.util.find_spec("transformer_engine") is None:
        yield (
            "model.layer_spec: 'te' needs transformer_engine, which is not installed here;"
            " use auto or sdpa"
        )


def _data(cfg: TandemConfig) -> Iterator[str]:
    expected = rewards.ground_truth_types(cfg.reward)
    data = cfg.data
    rows, broken = 0, False
    for key, files in (("data.train_files", data.train_files), ("data.val_files", data.val_files)):
        for file in files:
            found, problem = check_data_file(file, data.prompt_key, expected)
            if problem:
                broken = True
                yield f"{key}: {problem}"
            if key == "data.train_files":
                rows += found
    if data.train_files and not broken and rows < data.train_batch_size:
        yield (
            f"data.train_batch_size: {data.train_batch_size} is more than the {rows} prompts of"
            f" data.train_files ({', '.join(data.train_files)})"
        )


def _checkpoints(
    cfg: TandemConfig, world_size: int, model_args: ModelArgs
) -> tuple[list[str], int | None]:
    """Problems with the output directory's checkpoints under `trainer.resume`, and the step
    the run will resume from (None: from the start)."""
    t = cfg.trainer
    manager = CheckpointManager(t.output_dir, t.max_ckpt_to_keep)
    found = manager.scan()
    complete = [(step, path) for step, path, problem in found if problem is None]
    damaged = [(path, problem) for _, path, problem in found if problem is not None]
    if t.resume == "never":
        if found and not t.discard_checkpoints:
            return [
                f"trainer.resume: 'never', but {manager.root} holds {len(found)} checkpoint(s)"
                f" (newest {found[0][1].name}); set trainer.discard_checkpoints=true to delete"
                " them, or pick another trainer.output_dir"
            ], None
        return [], None
    if t.discard_checkpoints:
        return ["trainer.discard_checkpoints: only with trainer.resume=never"], None
    if not complete:
        if damaged:
            listed = "; ".join(f"{path.name}: {problem}" for path, problem in damaged)
            return [
                f"trainer.resume: no complete checkpoint in {manager.root} ({listed}); to start"
                " over set trainer.resume=never trainer.discard_checkpoints=true"
            ], None
        if t.resume == "must":
            return [f"trainer.resume: 'must', but {manager.root} holds no checkpoint"], None
        return [], None
    step, path = complete[0]
    saved = manager.saved_identity(path)
    problems = identity_mismatches(saved, run_identity(cfg, model_args, world_size))
    return [f"trainer.resume: {path} {problem}" for problem in problems], step


def discard_checkpoints(cfg: TandemConfig) -> None:
    """`trainer.resume=never trainer.discard_checkpoints=true`: the user asked for it."""
    root = CheckpointManager(cfg.trainer.output_dir).root
    if root.is_dir():
        shutil.rmtree(root)
