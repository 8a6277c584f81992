"""Multi-turn rollouts with tools (`rollout.multi_turn.enable=true`): `AgentLoop` runs whole
conversations over any backend; tools.py holds the tools and their executor, sandbox.py the
python tool's sandbox, chat.py the call format and the chat-template rendering."""

from __future__ import annotations

from pathlib import Path

from rollout.base import BaseRollout
from rollout.multi_turn.agent_loop import AgentLoop, conversation_metrics
from rollout.multi_turn.chat import CALL_FORMATS, call_parser, render_prompt
from rollout.multi_turn.tools import TOOLS, Tool, build_tool
from rollout.sampling import checkpoint_defaults
from tandem_core.config import MultiTurnConfig, RolloutConfig


def build_tools(cfg: MultiTurnConfig) -> dict[str, Tool]:
    """The configured tools by name, each with the configured limits."""
    tools = [build_tool(spec, **tool_options(cfg)) for spec in cfg.tools]
    return {tool.name: tool for tool in tools}


def tool_options(cfg: MultiTurnConfig) -> dict:
    return {
        "timeout_s": cfg.tool_timeout_s,
        "memory_mb": cfg.python_memory_mb,
        "cpu_time_s": cfg.python_cpu_time_s,
    }


def build_agent_loop(
    engine: BaseRollout, cfg: RolloutConfig, model_path: Path, max_model_len: int | None
) -> AgentLoop:
    """The engine wrapped for conversations: the checkpoint's tokenizer (its chat template
    renders the tool turns), eos and pad ids; `max_model_len` None: its max positions."""
    from transformers import AutoTokenizer

    eos, pad, max_positions = checkpoint_defaults(model_path)
    return AgentLoop(
        engine,
        cfg,
        AutoTokenizer.from_pretrained(model_path),
        build_tools(cfg.multi_turn),
        eos_token_ids=eos,
        pad_token_id=pad,
        max_model_len=max_model_len or max_positions,
    )


__all__ = [
    "AgentLoop",
    "CALL_FORMATS",
    "TOOLS",
    "build_agent_loop",
    "build_tools",
    "call_parser",
    "conversation_metrics",
    "render_prompt",
]
