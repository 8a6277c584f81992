"""The tools of multi-turn rollouts: what a model may call between its turns, and the executor
that runs one turn's calls.

A `Tool` is its function-calling schema (what `tokenizer.apply_chat_template(..., tools=...)`
takes) plus a `run(arguments) -> str`. Tools are built by name from `TOOLS` (`calculator`,
`python`) or from a user import path, `package.module:attribute` (a Tool, or a function returning
one). `run` raises `ToolError` for bad input; `run_tool_calls` turns that, an unknown tool, a
malformed call, a timeout or any other exception into an "error: ..." result the model reads,
and never raises for a tool's fault.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import operator
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rollout.multi_turn.sandbox import (
    SandboxError,
    SandboxLimits,
    SandboxResult,
    run_python,
    sandbox_available,
)
from tandem_core.registry import Registry


class ToolError(Exception):
    """A call the tool refuses (bad arguments, a failure it reports); the model reads why."""


class ToolTimeout(ToolError):
    """The call ran past its time limit."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments: {"type": "object", "properties", "required"}
    run: Callable[[dict], str]
    timeout_s: float = 10.0  # the executor stops waiting for a call after this

    def schema(self) -> dict:
        """The OpenAI / HF function-calling schema of the tool."""
        function = {"name": self.name, "description": self.description}
        return {"type": "function", "function": function | {"parameters": self.parameters}}

    def check(self, arguments: Any) -> None:
        """Raise ToolError unless `arguments` fits the schema: the required names, no others
        (unless "additionalProperties" is true), each of its JSON type."""
        if not isinstance(arguments, dict):
            raise ToolError(f"tool {self.name!r} takes an object of arguments")
        properties = self.parameters.get("properties", {})
        for name in self.parameters.get("required", []):
            if name not in arguments:
                raise ToolError(f"tool {self.name!r}: missing argument {name!r}")
        for name, value in arguments.items():
            if name not in properties and self.parameters.get("additionalProperties") is True:
                continue
            if name not in properties:
                known = ", ".join(properties) or "none"
                raise ToolError(f"tool {self.name!r}: unexpected argument {name!r} (takes {known})")
            kind = properties[name].get("type")
            numeric = kind in ("integer", "number")  # bool is an int in Python, not in JSON
            if not isinstance(value, _JSON_TYPES.get(kind, object)) or (
                numeric and isinstance(value, bool)
            ):
                raise ToolError(f"tool {self.name!r}: argument {name!r} must be of type {kind}")


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
_JSON_TYPES |= {"array": list, "object": dict}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict | None = None
    error: str | None = None  # set by the parser when the call's text was malformed


@dataclass(frozen=True)
class ToolResult:
    name: str
    content: str
    status: str  # "ok" (the tool's answer), "error" (the call failed) or "timeout"
    seconds: float


TOOLS = Registry("tool")  # name -> builder(**options) -> Tool


def register_tool(name: str):
    """Decorator: `build_tool(name, **options)` calls the builder with the options it names."""
    return TOOLS.register(name)


def build_tool(spec: str, **options) -> Tool:
    """A registered tool by name, or `package.module:attribute`: a Tool (taken as it is) or a
    builder of one. `options` are the limits shared by all tools of a run (`timeout_s`,
    `memory_mb`, `cpu_time_s`, ...): each builder gets those it names (all with **kwargs)."""
    if ":" in spec:
        builder = _load(spec)
    elif spec in TOOLS:
        builder = TOOLS[spec]
    else:
        raise ValueError(TOOLS.unknown(spec))
    if isinstance(builder, Tool):
        return builder
    parameters = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        options = {name: value for name, value in options.items() if name in parameters}
    tool = builder(**options)
    if not isinstance(tool, Tool):
        raise ValueError(f"tool {spec!r} built a {type(tool).__name__}, not a Tool")
    return tool


def _load(spec: str):
    module_name, _, attr = spec.partition(":")
    registered = f"registered tools: {', '.join(TOOLS.names())}"
    try:
        value = importlib.import_module(module_name)
        for part in attr.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError, ValueError) as e:
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"tool {spec!r} cannot be loaded ({cause}); {registered}") from e
    if not (isinstance(value, Tool) or callable(value)):
        raise ValueError(f"tool {spec!r} is a {type(value).__name__}, not a Tool; {registered}")
    return value


# ---- running one turn's calls ----------------------------------------------------------------
def run_tool_calls(
    calls: list[ToolCall], tools: dict[str, Tool], max_concurrency: int
) -> list[ToolResult]:
    """Run the calls of one turn, at most `max_concurrency` at a time; results in call order."""
    if not calls:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_concurrency, len(calls)))) as pool:
        return list(pool.map(lambda call: _run_call(call, tools), calls))


def _run_call(call: ToolCall, tools: dict[str, Tool]) -> ToolResult:
    start = time.monotonic()
    status = "error"
    if call.error is not None:
        content = f"error: {call.error}"
    elif call.name not in tools:
        content = f"error: unknown tool {call.name!r}; available: {', '.join(sorted(tools))}"
    else:
        try:
            content, status = _run_with_timeout(tools[call.name], call.arguments or {}), "ok"
        except ToolTimeout as e:
            content, status = f"error: {e}", "timeout"
        except ToolError as e:
            content = f"error: {e}"
        except Exception as e:  # a tool's bug is the model's error message, not the run's crash
            content = f"error: {type(e).__name__}: {e}"
    return ToolResult(call.name, content, status, time.monotonic() - start)


def _run_with_timeout(tool: Tool, arguments: dict) -> str:
    """`tool.run(arguments)` in a daemon thread, waited for at most `tool.timeout_s`. A thread
    cannot be killed: one past its time is abandoned, so it holds neither the turn, a worker of
    the pool, nor the interpreter's exit (tools that can hang, like `python`, stop themselves)."""
    tool.check(arguments)
    outcome: list = []

    def target() -> None:
        try:
            outcome.append(tool.run(arguments))
        except Exception as e:  # re-raised in the caller's thread
            outcome.append(e)
        except BaseException as e:  # SystemExit & co. of a tool end its call, not the run
            outcome.append(ToolError(f"tool {tool.name!r} raised {type(e).__name__}"))

    thread = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
    thread.start()
    thread.join(tool.timeout_s)
    if not outcome:
        raise ToolTimeout(f"tool {tool.name!r} timed out after {tool.timeout_s:g} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    if not isinstance(outcome[0], str):
        raise ToolError(f"tool {tool.name!r} returned a {type(outcome[0]).__name__}, not text")
    return outcome[0]


# ---- calculator ------------------------------------------------------------------------------
MAX_EXPRESSION_CHARS = 1000
MAX_EXPONENT = 100
MAX_INT = 10**1000  # results of more than 1000 digits are refused
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}  # fmt: skip
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> str:
    """Evaluate arithmetic (numbers, + - * / // % **, unary signs, parentheses) without eval:
    integers stay exact, `/` gives an integer when it divides exactly, floats show 12 digits."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
    except SyntaxError as e:
        raise ToolError(f"invalid expression: {e.msg}") from e
    except ZeroDivisionError as e:
        raise ToolError("division by zero") from e
    except (OverflowError, RecursionError) as e:
        raise ToolError("result too large") from e
    return str(value) if isinstance(value, int) else f"{value:.12g}"


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponents above {MAX_EXPONENT} are refused")
        if isinstance(node.op, ast.Div) and isinstance(left, int) and isinstance(right, int):
            if right != 0 and left % right == 0:
                return _checked(left // right)
        return _checked(_BINARY[type(node.op)](left, right))
    raise ToolError(f"not allowed in an expression: {ast.unparse(node)!r}")


def _checked(value: Any) -> int | float:
    if isinstance(value, complex):
        raise ToolError("the result is not a real number")
    if isinstance(value, int) and abs(value) >= MAX_INT:
        raise ToolError("the result has more than 1000 digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("result too large")
    return value


@register_tool("calculator")
def build_calculator(timeout_s: float = 5.0) -> Tool:
    parameters = {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. 12*(3+4)/5"}},
        "required": ["expression"],
    }
    description = "Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses."
    return Tool("calculator", description, parameters, lambda a: calculate(a["expression"]),
                timeout_s)  # fmt: skip


# ---- python ----------------------------------------------------------------------------------
@register_tool("python")
def build_python(
    timeout_s: float = 10.0,
    cpu_time_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 4096,
    disk_mb: int = 64,
) -> Tool:
    """Runs code in the sandbox (sandbox.py), `timeout_s` its wall time; refuses to be built
    where the sandbox cannot be made."""
    reason = sandbox_available()
    if reason is not None:
        raise ValueError(f"tool python: cannot sandbox: {reason}")
    limits = SandboxLimits(cpu_time_s, timeout_s, memory_mb, max_output_bytes, disk_mb)

    def run(arguments: dict) -> str:
        try:
            return _python_output(run_python(arguments["code"], limits), limits)
        except SandboxError as e:
            raise ToolError(str(e)) from e

    parameters = {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "a Python 3 program"}},
        "required": ["code"],
    }
    description = (
        "Run a Python 3 program and return what it prints (stdout and stderr). No network; "
        f"files only in the current directory; {timeout_s:g} s and {memory_mb} MB at most."
    )
    # the sandbox kills the program at timeout_s; the executor's limit only backs it up
    return Tool("python", description, parameters, run, timeout_s=timeout_s + 10)


def _python_output(result: SandboxResult, limits: SandboxLimits) -> str:
    """The model's view of a run: the output, and why it stopped when it did not end well. The
    program's own failure (a traceback, an exit status) is a normal result; limits are not."""
    text = result.stdout
    if result.truncated:
        text += f"\n[output truncated at {limits.max_output_bytes} bytes; the program was stopped]"
    if result.killed_reason == "wall time":
        raise ToolTimeout(f"the program ran past {limits.wall_time_s:g} s; its output:\n{text}")
    if result.killed_reason == "cpu time":
        raise ToolTimeout(f"the program used {limits.cpu_time_s:g} s of CPU; its output:\n{text}")
    if result.killed_reason == "memory":
        raise ToolError(f"the program ran out of its {limits.memory_mb} MB; its output:\n{text}")
    if result.killed_reason and result.killed_reason != "output limit":
        text += f"\n[killed by {result.killed_reason}]"
    elif result.returncode != 0 and not result.truncated:
        text += f"\n[exit status {result.returncode}]"
    return text or "(no output)"
