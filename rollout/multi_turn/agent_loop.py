"""Multi-turn rollouts: conversations in which the model calls tools between its turns.

`AgentLoop` wraps any backend and is itself a `BaseRollout`, so the sharding manager, the loop
and every backend stay as they are (`build_rollout` wraps the engine when
`rollout.multi_turn.enable`). One `generate_sequences` call runs whole conversations:

    every round, all unfinished samples go to the engine in ONE call (it batches them)
    a model turn that ended with an end-of-turn token and wrote tool calls gets them run
    (the round's calls over the whole batch at once, bounded), and the tool turn's tokens
    (rendered by the model's chat template, rollout/multi_turn/chat.py) are appended
    a sample ends when it answers without a call, after `max_turns` model turns, or when its
    tokens after the prompt reach rollout.response_length (the conversation's budget)

A round's engine call asks for the most tokens any sample has left, cut so the longest context
still fits the engine; a sample that call cut short continues its turn in the next round.
The output is the single-turn layout (rollout/assemble.py) with the conversation as the
response: `response_mask` is 1 on the model's tokens only (prompt, tool results and template
tokens are never trained), `rollout_log_probs` are the model tokens', and the attention covers
every real token. Non-tensor `conversation` (the messages after the prompt) and
`final_response` (the last model turn's text) are what rewards see.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from rollout.assemble import build_conversation_output, prompt_token_lists
from rollout.base import BaseRollout, EngineParameters
from rollout.multi_turn.chat import ToolTurnRenderer, call_parser
from rollout.multi_turn.tools import Tool, ToolCall, ToolResult, run_tool_calls
from rollout.sampling import SAMPLING_KEY, SamplingSettings, resolve_sampling
from tandem_core.config import RolloutConfig
from tandem_core.protocol import Batch

CONVERSATION_COUNTS = ("num_turns", "num_tool_calls", "num_tool_errors", "num_tool_timeouts")
"""Per-sample counts the output carries as [B] tensors (metrics: `conversation_metrics`)."""


@dataclass
class Conversation:
    """One sample: its prompt, then model and tool tokens as they join the conversation."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)  # 1: a model token; 0: tool/template
    log_probs: list[float] = field(default_factory=list)
    turn: list[int] = field(default_factory=list)  # the open model turn's tokens
    messages: list[dict] = field(default_factory=list)  # after the prompt, for rewards
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_timeouts: int = 0
    tool_tokens: int = 0
    pending: list[ToolCall] = field(default_factory=list)  # the closed turn's calls, to run
    done: bool = False

    def add(self, tokens: list[int], log_probs: list[float] | None) -> None:
        self.tokens += tokens
        self.trained += [1 if log_probs is not None else 0] * len(tokens)
        self.log_probs += log_probs if log_probs is not None else [0.0] * len(tokens)


class AgentLoop(BaseRollout):
    def __init__(
        self,
        engine: BaseRollout,
        cfg: RolloutConfig,
        tokenizer,
        tools: dict[str, Tool],
        *,
        eos_token_ids: tuple[int, ...],
        pad_token_id: int,
        max_model_len: int,
    ):
        self.engine, self.rollout_cfg, self.cfg = engine, cfg, cfg.multi_turn
        self.tokenizer, self.tools = tokenizer, tools
        self.eos_ids, self.pad_id, self.max_model_len = eos_token_ids, pad_token_id, max_model_len
        self.parse_calls = call_parser(self.cfg.format)
        self.renderer = ToolTurnRenderer(tokenizer)
        self.supports_tensor_parallel = engine.supports_tensor_parallel
        self.tp_size, self.dp_rank, self.dp_size = engine.tp_size, engine.dp_rank, engine.dp_size
        self.tool_group = _tool_groups(engine.tp_size) if engine.tp_size > 1 else None

    # ---- the hooks are the engine's -------------------------------------------------------
    def wake_up(self, tags: list[str] | None = None) -> None:
        self.engine.wake_up(tags)

    def sleep(self, level: int = 1) -> None:
        self.engine.sleep(level)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.engine.load_weights(weights)

    def engine_parameters(self) -> EngineParameters | None:
        return self.engine.engine_parameters()

    # ---- conversations --------------------------------------------------------------------
    def generate_sequences(self, prompts: Batch) -> Batch:
        s = resolve_sampling(
            self.rollout_cfg,
            prompts.meta_info,
            eos_token_ids=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        budget = s.response_length
        samples = prompts.repeat(s.n, interleave=True)
        token_lists = prompt_token_lists(
            samples, max_model_len=self.max_model_len, response_length=budget
        )
        convs = [Conversation(prompt=ids) for ids in token_lists]
        for round_no in range(budget):  # every round adds at least one token to each sample
            active = [c for c in convs if not c.done]
            if not active:
                break
            self._generate_round(active, s, prompts.meta_info, round_no)
            self._run_tools([c for c in active if c.pending], budget)
        out = build_conversation_output(
            samples, [(c.tokens, c.trained, c.log_probs) for c in convs], s
        )
        for key in CONVERSATION_COUNTS:  # num_turns -> Conversation.turns, ...
            counts = [getattr(c, key.removeprefix("num_")) for c in convs]
            out[key] = torch.tensor(counts, dtype=torch.float32)
        out["tool_tokens"] = torch.tensor([c.tool_tokens for c in convs], dtype=torch.float32)
        out["conversation"] = [c.messages for c in convs]
        out["final_response"] = [_final_text(c) for c in convs]
        return out

    def _generate_round(self, active, s: SamplingSettings, meta: dict, round_no: int) -> None:
        """One engine call for every unfinished sample; each sample's new tokens are appended
        and its turn closed when it ended (end-of-turn token or budget)."""
        left = [s.response_length - len(c.tokens) for c in active]
        longest = max(len(c.prompt) + len(c.tokens) for c in active)
        width = min(max(left), self.max_model_len - longest)
        contexts = [c.prompt + c.tokens for c in active]
        over = dict(meta.get(SAMPLING_KEY) or {}, n=1, response_length=width)
        if s.seed is not None:  # a distinct, reproducible draw per round
            over["seed"] = s.seed + 7919 * round_no
        out = self.engine.generate_sequences(_left_padded(contexts, s.pad_token_id, over))
        mask = out["response_mask"].bool().cpu()
        tokens, log_probs = out["responses"].cpu(), out["rollout_log_probs"].cpu()
        eos = set(s.eos_token_ids)
        for i, c in enumerate(active):
            new = tokens[i][mask[i]].tolist()[: left[i]]
            c.add(new, log_probs[i][mask[i]].tolist()[: len(new)])
            c.turn += new
            ended = bool(new) and new[-1] in eos
            if not ended and len(c.tokens) < s.response_length and len(new) == width:
                continue  # cut by this call's width only: the turn goes on next round
            self._close_turn(c, ended, s.response_length)

    def _close_turn(self, c: Conversation, ended: bool, budget: int) -> None:
        text = self.tokenizer.decode(c.turn, skip_special_tokens=True)
        c.turns += 1
        c.turn = []
        calls = self.parse_calls(text) if ended else []
        c.messages.append({"role": "assistant", "content": text})
        if not calls or len(c.tokens) >= budget or c.turns >= self.cfg.max_turns:
            c.done = True
            return
        c.pending = calls  # run after the round, with every sample's calls
        c.messages[-1]["tool_calls"] = [{"name": x.name, "arguments": x.arguments} for x in calls]

    def _run_tools(self, waiting: list[Conversation], budget: int) -> None:
        """The round's calls, all samples at once (bounded), results appended as a tool turn;
        a tool turn that leaves no room for an answer ends its sample."""
        if not waiting:
            return
        results = self._results([call for c in waiting for call in c.pending])
        at = 0
        for c in waiting:
            got, at = results[at : at + len(c.pending)], at + len(c.pending)
            c.pending = []
            c.tool_calls += len(got)
            c.tool_errors += sum(r.status == "error" for r in got)
            c.tool_timeouts += sum(r.status == "timeout" for r in got)
            c.messages += [{"role": "tool", "name": r.name, "content": r.content} for r in got]
            ids = self.renderer.tool_turn_ids(got, self.cfg.max_tool_response_chars)
            if len(c.tokens) + len(ids) >= budget:  # no room left to answer after the results
                c.done = True
                continue
            c.add(ids, None)
            c.tool_tokens += len(ids)

    def _results(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Run on the first rank of each engine and shared with its other TP ranks, which must
        feed the engine the same tokens (a timeout could differ between ranks)."""
        if self.tool_group is None:
            return run_tool_calls(calls, self.tools, self.cfg.tool_concurrency)
        group, leader = self.tool_group
        payload = [
            run_tool_calls(calls, self.tools, self.cfg.tool_concurrency)
            if dist.get_rank() == leader
            else None
        ]
        dist.broadcast_object_list(payload, src=leader, group=group)
        return payload[0]


def conversation_metrics(batch: Batch) -> dict[str, float]:
    """Means over the batch's samples: turns, tool calls, errors and timeouts per sample, model
    tokens per turn, and the share of the response budget that tool turns took."""
    if "num_turns" not in batch:
        return {}
    turns = batch["num_turns"]
    model_tokens = batch["response_mask"].sum(-1).float()
    metrics = {
        f"multi_turn/{k.removeprefix('num_')}": float(batch[k].mean()) for k in CONVERSATION_COUNTS
    }
    metrics["multi_turn/tokens_per_turn"] = float(model_tokens.sum() / turns.sum().clamp(min=1))
    width = batch["responses"].shape[1]
    metrics["multi_turn/tool_token_share"] = float(batch["tool_tokens"].mean() / width)
    return metrics


def _tool_groups(tp: int):
    """(this rank's engine group, its first rank): gloo groups over each engine's TP ranks,
    made by every rank in the same order (new_group is collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for first in range(0, world, tp):
        group = dist.new_group(list(range(first, first + tp)), backend="gloo")
        if first <= rank < first + tp:
            mine = (group, first)
    return mine


def _left_padded(contexts: list[list[int]], pad: int, sampling: dict) -> Batch:
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for row, c in enumerate(contexts):
        ids[row, width - len(c) :] = torch.tensor(c, dtype=torch.long)
        mask[row, width - len(c) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tensors = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    return Batch.from_dict(tensors, meta_info={SAMPLING_KEY: sampling})


def _final_text(c: Conversation) -> str:
    said = [m["content"] for m in c.messages if m["role"] == "assistant"]
    return said[-1] if said else ""
