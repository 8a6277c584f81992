"""Prompts: verl-style parquet files, a resumable seeded loader, and the built-in arithmetic task.

A parquet file has one row per prompt with the columns
- `prompt`: a list of chat messages `{"role", "content"}` (the key is configurable);
- `reward_model`: a struct whose `ground_truth` the reward function compares against;
- `data_source`: a string naming the task (rewards may dispatch on it);
- `extra_info` (optional): a struct passed to the reward function as a dict.

Every rank builds the same loader from the same seed, so all ranks see the same global batch
and each takes its data-parallel slice; nothing is communicated.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rollout.multi_turn.chat import render_prompt
from tandem_core.errors import InputError
from tandem_core.protocol import Batch

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("reward_model", "data_source")


class DataError(InputError):
    """Bad input data; the message names the file, and the row or column where it applies."""


@dataclass(frozen=True)
class PromptExample:
    input_ids: list[int]
    raw_prompt: str
    ground_truth: Any
    data_source: str
    extra_info: dict | None
    index: int
    """Position in the dataset (after filtering); stable for the same files and settings."""


def _read_table(path: str, prompt_key: str) -> pa.Table:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise DataError(f"{path}: cannot read as parquet: {e}") from e
    for column in (prompt_key, *REQUIRED_COLUMNS):
        if column not in schema.names:
            raise DataError(f"{path}: missing column {column!r} (columns: {schema.names})")
    reward_type = schema.field("reward_model").type
    if not pa.types.is_struct(reward_type) or reward_type.get_field_index("ground_truth") < 0:
        raise DataError(
            f"{path}: column 'reward_model' has no field 'ground_truth' ({reward_type})"
        )
    columns = [prompt_key, *REQUIRED_COLUMNS] + (
        ["extra_info"] if "extra_info" in schema.names else []
    )
    try:
        return pq.read_table(path, columns=columns)
    except Exception as e:
        raise DataError(f"{path}: cannot read as parquet: {e}") from e


def _as_messages(prompt: Any) -> list[dict]:
    # A bare string is accepted as one user turn; verl's files always hold message lists.
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


# ---- the columns' contract, row by row -------------------------------------------------------
def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def prompt_problem(prompt: Any) -> str | None:
    """Why a prompt cell is neither chat messages nor text (None: it is one of them)."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "empty prompt"
    if not isinstance(prompt, list | tuple):
        return f"expected chat messages or text, got {type(prompt).__name__}"
    for i, message in enumerate(prompt):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            return f"message {i} is not {{'role': str, 'content': str}}: {str(message)[:60]}"
    if not any(m["content"].strip() for m in prompt):
        return "empty prompt"
    return None


def row_problems(
    record: dict, prompt_key: str, ground_truth_types: tuple[type, ...] | None
) -> Iterator[str]:
    """'column <c>: <what>' for each cell of a row that breaks the columns' contract.

    ground_truth_types: what the run's reward function compares against (its
    `ground_truth_types`); None = not checked (a user function that declares nothing)."""
    problem = prompt_problem(record[prompt_key])
    if problem:
        yield f"column {prompt_key!r}: {problem}"
    reward = record["reward_model"]
    truth = reward.get("ground_truth") if isinstance(reward, dict) else None
    if ground_truth_types is None:
        pass
    elif truth is None:
        yield "column 'reward_model.ground_truth': null (the reward needs a ground truth)"
    elif isinstance(truth, bool) or not isinstance(truth, ground_truth_types):
        yield (
            f"column 'reward_model.ground_truth': expected {_type_names(ground_truth_types)},"
            f" got {type(truth).__name__} {str(truth)[:40]}"
        )
    source = record["data_source"]
    if source is not None and not isinstance(source, str):
        yield f"column 'data_source': expected str, got {type(source).__name__}"


def check_data_file(
    path: str, prompt_key: str, ground_truth_types: tuple[type, ...] | None
) -> tuple[int, str | None]:
    """(rows, problem) of one parquet file against the columns' contract: the problem (None:
    there is none) names the file, the first row and column that break it, and how many more
    rows do."""
    try:
        records = _read_table(path, prompt_key).to_pylist()
    except DataError as err:
        return 0, str(err)
    if not records:
        return 0, f"{path}: no rows"
    bad = [
        (row, problem)
        for row, record in enumerate(records)
        for problem in row_problems(record, prompt_key, ground_truth_types)
    ]
    if not bad:
        return len(records), None
    row, problem = bad[0]
    more = f" (and {len(bad) - 1} more problems)" if len(bad) > 1 else ""
    return len(records), f"{path}: row {row}, {problem}{more}"


class RLDataset:
    """Prompts of one or more parquet files, rendered with the tokenizer's chat template
    (with the generation prompt; `tools`: their schemas offered, for multi-turn rollouts) and
    tokenized once at construction.

    A prompt longer than `max_prompt_length` tokens is dropped (`overlong_prompt="filter"`,
    counted in `num_filtered`) or is an error naming its file and row (`"error"`).
    """

    def __init__(
        self,
        files: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer,
        max_prompt_length: int,
        overlong_prompt: str = "filter",
        prompt_key: str = "prompt",
        ground_truth_types: tuple[type, ...] | None = None,
        tools: Sequence[dict] = (),
    ):
        if overlong_prompt not in ("filter", "error"):
            raise ValueError(
                f"overlong_prompt must be 'filter' or 'error', got {overlong_prompt!r}"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; prompts are chat messages")
        files = [files] if isinstance(files, str | os.PathLike) else list(files)
        if not files:
            raise ValueError("RLDataset needs at least one parquet file")
        self.files = [str(f) for f in files]
        self.examples: list[PromptExample] = []
        self.num_filtered = 0
        for file in self.files:
            for row, record in enumerate(_read_table(file, prompt_key).to_pylist()):
                problem = next(row_problems(record, prompt_key, ground_truth_types), None)
                if problem:
                    raise DataError(f"{file}: row {row}, {problem}")
                messages = _as_messages(record[prompt_key])
                text = render_prompt(tokenizer, messages, tools)
                # The template already wrote every special token the model expects.
                ids = tokenizer.encode(text, add_special_tokens=False)
                if len(ids) > max_prompt_length:
                    if overlong_prompt == "error":
                        raise DataError(
                            f"{file}: row {row}, column {prompt_key!r}: {len(ids)} tokens,"
                            f" longer than data.max_prompt_length={max_prompt_length}"
                        )
                    self.num_filtered += 1
                    continue
                self.examples.append(
                    PromptExample(
                        input_ids=ids,
                        raw_prompt=text,
                        ground_truth=(record["reward_model"] or {}).get("ground_truth"),
                        data_source=record["data_source"],
                        extra_info=record.get("extra_info"),
                        index=len(self.examples),
                    )
                )
        if self.num_filtered:
            logger.warning(
                "dropped %d of %d prompts of %s: longer than data.max_prompt_length=%d tokens",
                self.num_filtered,
                self.num_filtered + len(self.examples),
                ", ".join(self.files),
                max_prompt_length,
            )
        if not self.examples:
            raise DataError(
                f"{', '.join(self.files)}: no prompt left: all {self.num_filtered} are longer than"
                f" data.max_prompt_length={max_prompt_length} tokens"
            )
        self.max_prompt_length = max_prompt_length
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PromptExample:
        return self.examples[i]


def collate_prompts(
    examples: Sequence[PromptExample], pad_token_id: int, length: int, uids: Sequence[str]
) -> Batch:
    """Left-padded `input_ids` / `attention_mask` / `position_ids` [B, length] (the rollout
    contract: the last prompt token sits in the last column) plus the per-prompt fields."""
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, length - n :] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, length - n :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return Batch.from_dict(
        {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids},
        {
            "raw_prompt": [ex.raw_prompt for ex in examples],
            "ground_truth": [ex.ground_truth for ex in examples],
            "data_source": [ex.data_source for ex in examples],
            "extra_info": [ex.extra_info for ex in examples],
            "index": [ex.index for ex in examples],
            "uid": list(uids),
        },
    )


class PromptLoader:
    """Batches of prompts in a per-epoch order drawn from (seed, epoch), resumable exactly.

    `iter(loader)` yields the rest of the current epoch, then moves to the next epoch;
    `next_batch()` does the same one batch at a time and rolls over epochs on its own.
    `state_dict()` is (epoch, position): a loader given it yields exactly the batches the
    original would have yielded next. Each prompt's `uid` ("epoch.position") is unique over
    the run, so samples of one prompt group together and never with another draw of it.
    """

    def __init__(
        self,
        dataset: RLDataset,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if drop_last and len(dataset) < batch_size:
            raise ValueError(
                f"the dataset has {len(dataset)} prompts, fewer than one batch of {batch_size}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # prompts of the current epoch already yielded

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.dataset))
        # A SeedSequence of (seed, epoch): an epoch's order needs no state from earlier ones.
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def _epoch_end(self) -> int:
        return len(self) * self.batch_size if self.drop_last else len(self.dataset)

    def next_batch(self) -> Batch:
        if self.position >= self._epoch_end():
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order(self.epoch)
        stop = min(self.position + self.batch_size, len(self.dataset))
        picked = [self.dataset[int(i)] for i in order[self.position : stop]]
        uids = [f"{self.epoch}.{p}" for p in range(self.position, stop)]
        batch = collate_prompts(
            picked, self.dataset.pad_token_id, self.dataset.max_prompt_length, uids
        )
        batch.meta_info["epoch"] = self.epoch
        self.position = stop
        return batch

    def __iter__(self) -> Iterator[Batch]:
        if self.position >= self._epoch_end():
            self.epoch, self.position = self.epoch + 1, 0
        while self.position < self._epoch_end():
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"loader state was saved with seed {state['seed']}, this loader has {self.seed}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---- the built-in verifiable task ------------------------------------------------------------
ARITH_TEMPLATE = "What is {a} {op} {b}? Answer with the number only."


def _arith_problem(k: int, span: int) -> tuple[int, str, int]:
    """The k-th distinct problem: first every a + b, then every a - b with a >= b (a
    subtraction with a negative result is left out, so each difference appears once)."""
    if k < span * span:
        a, b = divmod(k, span)
        return a, "+", b
    j = k - span * span  # a triangular index: j = a(a+1)/2 + b, 0 <= b <= a
    a = (math.isqrt(8 * j + 1) - 1) // 2
    return a, "-", j - a * (a + 1) // 2


def _arith_rows(problems: list[int], span: int, split: str) -> list[dict]:
    rows = []
    for i, k in enumerate(problems):
        a, op, b = _arith_problem(k, span)
        answer = a + b if op == "+" else a - b
        rows.append(
            {
                "data_source": "arith",
                "prompt": [{"role": "user", "content": ARITH_TEMPLATE.format(a=a, op=op, b=b)}],
                "ability": "arithmetic",
                "reward_model": {"style": "rule", "ground_truth": str(answer)},
                "extra_info": {"split": split, "index": i},
            }
        )
    return rows


def _write_parquet_atomic(rows: list[dict], path: Path) -> None:
    # Several ranks may write the same (deterministic) file at once: write aside, then rename.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)


def write_arith_task(
    out_dir: str | os.PathLike, n_train: int, n_val: int, max_operand: int = 20, seed: int = 0
) -> tuple[Path, Path]:
    """Write train/val parquet files of distinct additions and subtractions of operands in
    [0, max_operand], e.g. "What is 13 + 7? Answer with the number only." -> "20".
    No problem appears twice (val never repeats train). Deterministic for a seed."""
    span = max_operand + 1
    space = span * span + span * (span + 1) // 2
    if n_train + n_val > space:
        raise ValueError(
            f"{n_train + n_val} problems requested, but operands up to {max_operand} give only "
            f"{space} distinct ones; raise max_operand"
        )
    # Sampling without replacement: no problem twice, and val never repeats train.
    picked = np.random.default_rng(seed).choice(space, n_train + n_val, replace=False).tolist()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, val = out / "arith_train.parquet", out / "arith_val.parquet"
    _write_parquet_atomic(_arith_rows(picked[:n_train], span, "train"), train)
    _write_parquet_atomic(_arith_rows(picked[n_train:], span, "val"), val)
    return train, val
