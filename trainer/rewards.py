"""Rule-based rewards: a registry of scoring functions and a scorer that runs them safely.

A reward function has one signature:

    fn(solution_str, ground_truth, data_source=None, extra_info=None) -> float

Built-ins are registered by name (`@register_reward("arith")`); a user function is named by
its import path, `package.module:function`. A function may say what ground truths it compares
against as a `ground_truth_types` attribute (a tuple of types); the data files are then checked
row by row against it before the run starts (trainer/preflight.py).

`RewardScorer` calls the function in worker *processes*, each call under a timeout. A thread
cannot be stopped once a Python function hangs in it, and a signal alarm cannot interrupt C
code (a catastrophic regex, a sympy call in C); a process can always be killed. The workers
are plain `python -c` interpreters (not multiprocessing's fork/spawn): forking a trainer that
runs vLLM and NCCL threads risks deadlocks in the child, and spawn would re-import the
trainer's whole entry module in every worker. A worker that times out or dies is killed and
restarted; the call scores 0 and is counted, and the run goes on.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import pickle
import re
import select
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from tandem_core.lifetime import exit_when_orphaned
from tandem_core.registry import Registry

if TYPE_CHECKING:  # torch is imported lazily: reward workers stay light and start fast.
    import torch

    from tandem_core.config import RewardConfig
    from tandem_core.protocol import Batch

logger = logging.getLogger(__name__)

RewardFn = Callable[..., float]


REWARDS = Registry("reward")
SCALAR = (str, int, float)
"""What the built-in rewards compare a response against."""


def register_reward(name: str, ground_truth: tuple[type, ...] | None = SCALAR):
    """Decorator: `reward.name=<name>` scores with the function; `ground_truth` is the types
    its ground truths must have (None: not used, any value)."""

    def decorate(fn: RewardFn) -> RewardFn:
        fn.ground_truth_types = ground_truth
        return REWARDS.add(name, fn)

    return decorate


# ---- built-in rewards ------------------------------------------------------------------------
@register_reward("exact_match")
def exact_match(solution_str, ground_truth, data_source=None, extra_info=None) -> float:
    """1.0 when the response equals the ground truth up to surrounding whitespace."""
    return float(solution_str.strip() == str(ground_truth).strip())


_INTEGER = re.compile(r"-?\d+")


@register_reward("arith")
def arith(solution_str, ground_truth, data_source=None, extra_info=None) -> float:
    """1.0 when the last integer in the response equals the ground truth."""
    found = _INTEGER.findall(solution_str)
    if not found:
        return 0.0
    try:
        return float(int(found[-1]) == int(str(ground_truth).strip()))
    except ValueError:
        return float(found[-1] == str(ground_truth).strip())


@register_reward("arith_dense")
def arith_dense(solution_str, ground_truth, data_source=None, extra_info=None) -> float:
    """`arith`, plus partial credit for answering in digits: 1.0 when correct, otherwise
    0.5 × the share of the response's characters that are digits.

    A shaped reward for models that start from random weights (the tiny default run): exact
    answers are out of their reach at first, answering with digits is not, so the reward has
    a gradient to climb from step one. Correct answers still score exactly 1.0.
    """
    if arith(solution_str, ground_truth) == 1.0:
        return 1.0
    text = solution_str.strip()
    return 0.5 * sum(c.isdigit() for c in text) / len(text) if text else 0.0


@register_reward("math")
def math_verify_reward(solution_str, ground_truth, data_source=None, extra_info=None) -> float:
    """1.0 when math_verify finds the response's answer equal to the ground truth (LaTeX,
    fractions, \\boxed{}, sets, ... are compared symbolically)."""
    from math_verify import parse, verify

    gold = parse(str(ground_truth)) or parse(f"${ground_truth}$")
    if not gold:
        raise ValueError(f"math_verify cannot parse the ground truth {ground_truth!r}")
    return float(verify(gold, parse(solution_str)))


DEFAULT_FORMAT_PATTERN = r"<answer>.+?</answer>"


@register_reward("format", ground_truth=None)
def format_reward(solution_str, ground_truth, data_source=None, extra_info=None) -> float:
    """1.0 when the response contains the required pattern (a regex searched with DOTALL):
    `extra_info["format_pattern"]` when the sample gives one, else DEFAULT_FORMAT_PATTERN."""
    pattern = (extra_info or {}).get("format_pattern", DEFAULT_FORMAT_PATTERN)
    return float(re.search(pattern, solution_str, re.DOTALL) is not None)


# ---- resolving a function --------------------------------------------------------------------
def load_reward_fn(path: str) -> RewardFn:
    """The function named `package.module:function`; errors name the path and the cause."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {path!r} must be written 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ImportError(
            f"cannot import module {module_name!r} of reward function {path!r}: {e}"
        ) from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise AttributeError(f"reward function {path!r}: {module_name!r} has no {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise TypeError(f"reward function {path!r} is not callable (it is a {type(fn).__name__})")
    return fn


def resolve_reward_fn(spec: str) -> RewardFn:
    """A registered name (`arith`) or an import path (`package.module:function`)."""
    return load_reward_fn(spec) if ":" in spec else REWARDS[spec]


def ground_truth_types(cfg: RewardConfig) -> tuple[type, ...] | None:
    """What the configured reward compares a response against (None: it does not say)."""
    fn = load_reward_fn(cfg.fn) if cfg.fn is not None else REWARDS[cfg.name]
    return getattr(fn, "ground_truth_types", None)


def _as_score(value: Any) -> float:
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"reward function returned {value!r}")
    return score


# ---- worker processes ------------------------------------------------------------------------
# Messages are length-prefixed pickles over the worker's stdin / a private copy of its stdout.


def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj)
    view = memoryview(struct.pack("<I", len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(fd: int) -> Any:
    """The next message, or raises EOFError when the other side is gone."""
    header = _read_exact(fd, 4)
    data = None if header is None else _read_exact(fd, struct.unpack("<I", header)[0])
    if data is None:
        raise EOFError
    return pickle.loads(data)


def _serve() -> None:
    """Worker main loop: `python -c 'from trainer.rewards import _serve; _serve()' SPEC PID`.
    Its stdin closing ends it, and so does its parent (PID) dying: a process the trainer
    forked may hold a copy of the pipe and keep it open after a kill -9."""
    exit_when_orphaned(int(sys.argv[2]))
    out_fd = os.dup(1)
    os.dup2(2, 1)  # a print() in a reward function goes to stderr, never into the protocol
    fn = resolve_reward_fn(sys.argv[1])
    _send(out_fd, ("ready", None))
    while True:
        try:
            args = _recv(0)
        except EOFError:  # the trainer closed the pipe or exited
            return
        try:
            reply = ("ok", _as_score(fn(*args)))
        except Exception as e:
            reply = ("error", f"{type(e).__name__}: {e}")
        _send(out_fd, reply)


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Worker:
    def __init__(self, spec: str, startup_timeout_s: float):
        env = {
            **os.environ,
            # The parent's import path, so `package.module:function` resolves the same way.
            "PYTHONPATH": os.pathsep.join([_PACKAGE_ROOT] + [p or os.getcwd() for p in sys.path]),
            "OMP_NUM_THREADS": "1",
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from trainer.rewards import _serve; _serve()",
                spec,
                str(os.getpid()),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.fd_in = self.proc.stdin.fileno()
        self.fd_out = self.proc.stdout.fileno()
        ready, _, _ = select.select([self.fd_out], [], [], startup_timeout_s)
        if not ready:
            self.kill()
            raise RuntimeError(f"reward worker for {spec!r} did not start in {startup_timeout_s}s")
        try:
            _recv(self.fd_out)
        except EOFError:
            self.kill()
            raise RuntimeError(
                f"reward worker for {spec!r} exited at start (its stderr is above)"
            ) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class RewardItem(NamedTuple):
    solution_str: str
    ground_truth: Any
    data_source: str | None = None
    extra_info: dict | None = None


class RewardScorer:
    """Scores responses with one reward function in `num_workers` processes, each call under
    `timeout_s`. A call that raises or times out scores 0.0 and is counted in the metrics
    `reward/num_errors` / `reward/num_timeouts`. Workers start on first use; `close()` (or a
    `with` block) stops them."""

    def __init__(
        self,
        name: str = "arith",
        fn: str | None = None,
        timeout_s: float = 5.0,
        num_workers: int | None = None,
        startup_timeout_s: float = 60.0,
    ):
        self._workers: list[_Worker] = []
        self.spec = fn or name
        resolve_reward_fn(self.spec)  # fail at construction, in the trainer, with a clear error
        if timeout_s <= 0:
            raise ValueError(f"reward timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.num_workers = num_workers or max(1, min(4, os.cpu_count() or 1))
        self.startup_timeout_s = startup_timeout_s

    @classmethod
    def from_config(cls, cfg: RewardConfig, num_workers: int | None = None) -> RewardScorer:
        return cls(name=cfg.name, fn=cfg.fn, timeout_s=cfg.timeout_s, num_workers=num_workers)

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit; the workers also exit when their stdin closes
            pass

    def _restart(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self.spec, self.startup_timeout_s)

    def score(self, items: Sequence[RewardItem | tuple]) -> tuple[list[float], dict[str, float]]:
        """Scores of `items` (RewardItem or (solution, ground_truth[, data_source[, extra]])),
        in order, and metrics."""
        if not self._workers:
            self._workers = [
                _Worker(self.spec, self.startup_timeout_s) for _ in range(self.num_workers)
            ]
        scores = [0.0] * len(items)
        errors = timeouts = 0
        pending = deque(range(len(items)))
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (item, deadline)
        while pending or busy:
            for slot in range(len(self._workers)):
                if slot not in busy and pending:
                    i = pending.popleft()
                    try:
                        _send(self._workers[slot].fd_in, tuple(RewardItem(*items[i])))
                    except BrokenPipeError:  # died since its last call: restart and resend
                        self._restart(slot)
                        _send(self._workers[slot].fd_in, tuple(RewardItem(*items[i])))
                    busy[slot] = (i, time.monotonic() + self.timeout_s)
            wait = max(0.0, min(deadline for _, deadline in busy.values()) - time.monotonic())
            by_fd = {self._workers[slot].fd_out: slot for slot in busy}
            readable, _, _ = select.select(list(by_fd), [], [], wait)
            for fd in readable:
                slot = by_fd[fd]
                i, _ = busy.pop(slot)
                try:
                    kind, value = _recv(fd)
                except EOFError:  # the function killed its worker (sys.exit, segfault, ...)
                    kind, value = "error", "the reward worker died"
                    self._restart(slot)
                if kind == "ok":
                    scores[i] = value
                else:
                    errors += 1
                    if errors <= 3:
                        logger.warning("reward %s failed on item %d: %s", self.spec, i, value)
            now = time.monotonic()
            for slot, (i, deadline) in list(busy.items()):
                if now >= deadline:
                    del busy[slot]
                    timeouts += 1
                    logger.warning(
                        "reward %s timed out after %.1fs on item %d", self.spec, self.timeout_s, i
                    )
                    self._restart(slot)
        metrics = {
            "reward/mean": sum(scores) / max(len(scores), 1),
            "reward/num_errors": float(errors),
            "reward/num_timeouts": float(timeouts),
        }
        return scores, metrics

    def score_batch(
        self,
        batch: Batch,
        tokenizer,
        response_key: str = "responses",
        mask_key: str = "response_mask",
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """token_level_scores [B, R]: each response's score at its last real token, zero
        elsewhere (a response with no token carries none). Decodes `responses` under
        `response_mask`; reads non-tensors `ground_truth`, `data_source`, `extra_info`. A
        multi-turn batch is scored on `final_response` (the last model turn), and each
        extra_info gains the `conversation` (the messages after the prompt, tool calls and
        results included)."""
        import torch

        responses = batch[response_key]
        device = responses.device
        # One device-to-host copy, not one per row.
        responses, mask = responses.cpu(), batch[mask_key].bool().cpu()
        n = len(batch)
        sources = batch.non_tensors.get("data_source", [None] * n)
        extras = batch.non_tensors.get("extra_info", [None] * n)
        if "final_response" in batch.non_tensors:  # multi-turn: the last model turn answers
            texts = list(batch.non_tensors["final_response"])
            extras = [
                {**(extra or {}), "conversation": conversation}
                for extra, conversation in zip(extras, batch["conversation"], strict=True)
            ]
        else:
            texts = tokenizer.batch_decode(
                [row[m].tolist() for row, m in zip(responses, mask, strict=True)],
                skip_special_tokens=True,
            )
        items = [
            RewardItem(t, g, s, e)
            for t, g, s, e in zip(texts, batch["ground_truth"], sources, extras, strict=True)
        ]
        scores, metrics = self.score(items)
        token_level_scores = torch.zeros(responses.shape, dtype=torch.float32)
        # the last token the model wrote (tool output may sit between a response's tokens)
        columns = torch.arange(1, mask.shape[1] + 1)
        last = (mask * columns).max(-1).values
        rows = torch.nonzero(last > 0, as_tuple=True)[0]
        token_level_scores[rows, last[rows] - 1] = torch.tensor(scores)[rows]
        return token_level_scores.to(device), metrics
