"""Tool calls in and out of the chat template: the prompt that offers the tools, the parser of
the calls a model writes, and the tokens of a tool turn.

Token in, token out: a model's tokens join the conversation exactly as sampled (never decoded
and re-encoded), and only the text the template adds around tool results is tokenized. That
text is the difference between two renderings of one stand-in conversation, with and without
the tool messages, so it is whatever the model's own template writes (Qwen's `<tool_response>`
inside a user turn, a ChatML `tool` turn, Gemma's turns), generation prompt included.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Sequence

from rollout.multi_turn.tools import ToolCall, ToolResult
from tandem_core.registry import Registry

CALL_FORMATS = Registry("tool-call format")
"""rollout.multi_turn.format -> parser(text) -> list[ToolCall]."""


@CALL_FORMATS.register("hermes")
def parse_hermes_calls(text: str) -> list[ToolCall]:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, in order. A block
    that is not such a JSON object, or one left open, is a call with `error` set: the model
    gets the error back as the tool's answer."""
    calls = []
    for match in re.finditer(r"<tool_call>(.*?)(</tool_call>|$)", text, flags=re.DOTALL):
        body, closed = match.group(1).strip(), bool(match.group(2))
        if not closed:
            calls.append(ToolCall("", None, "<tool_call> without </tool_call>"))
            continue
        try:
            call = json.loads(body)
        except json.JSONDecodeError as err:
            calls.append(ToolCall("", None, f"the call is not JSON ({err.msg})"))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append(ToolCall("", None, 'a call is {"name": ..., "arguments": {...}}'))
            continue
        args = call.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(args, dict):
            calls.append(ToolCall(call["name"], None, "arguments must be a JSON object"))
            continue
        calls.append(ToolCall(call["name"], args, None))
    return calls


def call_parser(spec: str) -> Callable[[str], list[ToolCall]]:
    """A registered format by name, or a user's parser by import path (`package.module:fn`)."""
    if ":" not in spec:
        return CALL_FORMATS[spec]
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"rollout.multi_turn.format: {spec!r} cannot be loaded ({err}); registered:"
            f" {', '.join(CALL_FORMATS.names())}"
        ) from err


TOOLS_SYSTEM_PROMPT = (
    "You may call tools. Their JSON schemas:\n<tools>\n{schemas}\n</tools>\n"
    'To call one, write <tool_call>{{"name": "<tool name>", "arguments": {{...}}}}</tool_call>;'
    " its result comes back in the next message."
)
"""Offered when the model's template ignores `tools=` (a plain ChatML template): the Hermes
format, the one Qwen's templates teach, described in a system message of our own words."""


def render_prompt(tokenizer, messages: list[dict], tools: Sequence[dict] = ()) -> str:
    """The prompt text with the generation prompt; with `tools` (their schemas), the tools
    offered the template's own way or, when it has none, in a system message."""
    if not tools:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    plain = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    offered = tokenizer.apply_chat_template(
        messages, tools=list(tools), add_generation_prompt=True, tokenize=False
    )
    if offered != plain:
        return offered
    text = TOOLS_SYSTEM_PROMPT.format(schemas="\n".join(json.dumps(t) for t in tools))
    if messages and messages[0]["role"] == "system":
        merged = {"role": "system", "content": messages[0]["content"] + "\n\n" + text}
        messages = [merged, *messages[1:]]
    else:
        messages = [{"role": "system", "content": text}, *messages]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class ToolTurnRenderer:
    """The tokens that follow a model turn that called tools: the end of that turn as the
    template writes it after its end-of-turn token, the tool messages, and the next
    generation prompt."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # A stand-in conversation; the tool turn's text must not depend on what was said.
        self.before = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
        said = tokenizer.apply_chat_template(self.before, tokenize=False)
        # What the template writes after the assistant's end-of-turn token (ChatML's "\n"):
        # the model stopped at that token, so the rest belongs to the tool turn.
        tail = said[said.rindex("2") + 1 :]
        ends = [t for t in (tokenizer.eos_token, *tokenizer.all_special_tokens) if t]
        at = min((tail.index(t) + len(t) for t in ends if t in tail), default=len(tail))
        self.after_turn_end = tail[at:]
        self.said = said

    def tool_turn_ids(self, results: Sequence[ToolResult], max_chars: int) -> list[int]:
        messages = [
            {"role": "tool", "name": r.name, "content": _cut(r.content, max_chars)} for r in results
        ]
        text = self.tokenizer.apply_chat_template(
            self.before + messages, add_generation_prompt=True, tokenize=False
        )
        if not text.startswith(self.said):
            raise ValueError(
                "the chat template renders earlier turns differently once tool messages follow;"
                " multi-turn rollouts need a template whose turns are appended"
            )
        delta = self.after_turn_end + text[len(self.said) :]
        return self.tokenizer.encode(delta, add_special_tokens=False)


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"... [cut: {len(text) - max_chars} more characters]"
