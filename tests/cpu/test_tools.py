"""Multi-turn tools: the calculator, building tools by name or import path, the executor of one
turn's calls, and the python tool's sandbox (each of its walls proven by a program)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from rollout.multi_turn.sandbox import SandboxLimits, run_python, sandbox_available
from rollout.multi_turn.tools import (
    TOOLS,
    Tool,
    ToolCall,
    ToolError,
    build_tool,
    calculate,
    run_tool_calls,
)

LIMITS = SandboxLimits(cpu_time_s=1, wall_time_s=3, memory_mb=256, max_output_bytes=2000)
# for the tests that must not reach the wall time, even on a loaded machine
LONG_WALL = SandboxLimits(cpu_time_s=1, wall_time_s=20, memory_mb=256, max_output_bytes=2000)


# ---- calculator ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "expression,expect",
    [
        ("12*(3+4)", "84"),
        ("7/2", "3.5"),
        ("8/2", "4"),
        ("-8/2", "-4"),
        ("1/3", "0.333333333333"),
        ("7//2 + 7%2", "4"),
        ("-(2**3) + +1", "-7"),
        ("2**100", str(2**100)),
        (
            "123456789012345678901234567890 * 987654321",
            str(123456789012345678901234567890 * 987654321),
        ),
        ("99**100 // 99**99", "99"),
        ("0.1 + 0.2", "0.3"),
        ("2**-1", "0.5"),
        ("2 ** 0.5", "1.41421356237"),
    ],
)
def test_calculator(expression, expect):
    assert calculate(expression) == expect


@pytest.mark.parametrize(
    "expression,message",
    [
        ("__import__('os').system('true')", "not allowed"),
        ("(1).real", "not allowed"),
        ("abs(-1)", "not allowed"),
        ("x + 1", "not allowed"),
        ("True + 1", "not allowed"),
        ("1j * 2", "not allowed"),
        ("[1, 2]", "not allowed"),
        ("2**101", "exponents above 100 are refused"),
        ("9**99**99", "exponent"),
        ("(10**99)**11", "more than 1000 digits"),
        ("1e300 * 1e300", "too large"),
        ("(-8) ** 0.5", "not a real number"),
        ("1/0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("1 +", "invalid expression"),
        ("1" * 1001, "longer than 1000"),
    ],
)
def test_calculator_refuses(expression, message):
    with pytest.raises(ToolError, match=message):
        calculate(expression)


def test_calculator_through_the_executor():
    tools = {"calculator": build_tool("calculator")}
    calls = [
        ToolCall("calculator", {"expression": "12*(3+4)"}),
        ToolCall("calculator", {"expression": "1/0"}),
        ToolCall("calculator", {}),
        ToolCall("calculator", {"expression": "1", "precision": 3}),
        ToolCall("calculator", {"expression": 12}),
    ]
    results = run_tool_calls(calls, tools, max_concurrency=2)
    assert [(r.status, r.content) for r in results] == [
        ("ok", "84"),
        ("error", "error: division by zero"),
        ("error", "error: tool 'calculator': missing argument 'expression'"),
        ("error", "error: tool 'calculator': unexpected argument 'precision' (takes expression)"),
        ("error", "error: tool 'calculator': argument 'expression' must be of type string"),
    ]


# ---- building tools --------------------------------------------------------------------------
def test_schema():
    schema = build_tool("calculator").schema()
    assert schema["type"] == "function"
    function = schema["function"]
    assert function["name"] == "calculator" and function["description"]
    assert function["parameters"]["type"] == "object"
    assert function["parameters"]["required"] == ["expression"]
    assert function["parameters"]["properties"]["expression"]["type"] == "string"


@pytest.fixture
def user_tools(tmp_path, monkeypatch):
    """A user module on sys.path holding a Tool, a builder of one, and mistakes."""
    (tmp_path / "my_tools.py").write_text(
        textwrap.dedent(
            """
            from rollout.multi_turn.tools import Tool

            SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}}
            ECHO = Tool("echo", "Echo the text.", SCHEMA, lambda a: a.get("text", ""))
            NOT_A_TOOL = 3

            def make_upper(times=1):
                return Tool("upper", "Upper-case.", SCHEMA, lambda a: a["text"].upper() * times)

            def make_text():
                return "not a tool"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_tools"


def test_build_tool(user_tools):
    shared = {"timeout_s": 2.0, "memory_mb": 256, "cpu_time_s": 1.0}  # what a run passes to all
    assert build_tool("calculator", **shared).timeout_s == 2.0
    echo = build_tool(f"{user_tools}:ECHO", **shared)  # a Tool is taken as it is
    assert echo.name == "echo" and echo.timeout_s == 10.0 and echo.run({"text": "hi"}) == "hi"
    upper = build_tool(f"{user_tools}:make_upper", times=2, **shared)  # gets `times` only
    assert upper.run({"text": "ab"}) == "ABAB"


def test_build_tool_errors(user_tools):
    with pytest.raises(ValueError, match="unknown tool 'search'; registered: calculator, python"):
        build_tool("search")
    for spec in ("no_such_pkg.tools:make", f"{user_tools}:missing", f"{user_tools}:NOT_A_TOOL"):
        with pytest.raises(ValueError, match=f"tool '{spec}'.*registered tools: calculator"):
            build_tool(spec)
    with pytest.raises(ValueError, match="built a str, not a Tool"):
        build_tool(f"{user_tools}:make_text")
    assert {"calculator", "python"} <= set(TOOLS)


def test_check_arguments():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"}}}
    tool = Tool("t", "T.", schema, str)
    tool.check({"n": 3, "x": 0.5})
    tool.check({"x": 2})
    for bad in ({"n": True}, {"n": 1.5}, {"x": "1"}, {"y": 1}, [1]):
        with pytest.raises(ToolError):
            tool.check(bad)
    Tool("t", "T.", schema | {"additionalProperties": True}, str).check({"y": 1})


def test_python_tool_is_never_unsandboxed(monkeypatch):
    reason = "unshare: Operation not permitted"
    monkeypatch.setattr("rollout.multi_turn.tools.sandbox_available", lambda: reason)
    with pytest.raises(ValueError, match=f"^tool python: cannot sandbox: {reason}$"):
        build_tool("python")


# ---- the executor ----------------------------------------------------------------------------
def _sleeper(name: str, seconds: float, counter: dict | None = None, timeout_s: float = 5.0):
    """A tool that sleeps, counting how many of its calls run at once."""
    lock = threading.Lock()

    def run(arguments: dict) -> str:
        if counter is not None:
            with lock:
                counter["now"] += 1
                counter["max"] = max(counter["max"], counter["now"])
        time.sleep(arguments.get("seconds", seconds))
        if counter is not None:
            with lock:
                counter["now"] -= 1
        return f"{name} {arguments.get('tag', '')}".strip()

    schema = {"type": "object", "properties": {"seconds": {"type": "number"}, "tag": {}}}
    return Tool(name, "Sleep.", schema, run, timeout_s=timeout_s)


def test_results_keep_call_order():
    tools = {"slow": _sleeper("slow", 0.3), "fast": _sleeper("fast", 0.0)}
    calls = [
        ToolCall("slow"),
        ToolCall("fast"),
        ToolCall("slow", {"seconds": 0.1}),
        ToolCall("fast"),
    ]
    start = time.monotonic()
    results = run_tool_calls(calls, tools, max_concurrency=4)
    assert [r.content for r in results] == ["slow", "fast", "slow", "fast"]
    assert all(r.status == "ok" for r in results)
    assert time.monotonic() - start < 0.6  # in parallel: about the slowest call
    assert results[0].seconds >= 0.3 > results[1].seconds


def test_concurrency_bound():
    counter = {"now": 0, "max": 0}
    tools = {"sleep": _sleeper("sleep", 0.05, counter)}
    calls = [ToolCall("sleep", {"tag": i}) for i in range(8)]
    results = run_tool_calls(calls, tools, max_concurrency=3)
    assert [r.content for r in results] == [f"sleep {i}" for i in range(8)]
    assert counter["max"] == 3


def test_unknown_and_malformed_calls():
    tools = {"calculator": build_tool("calculator"), "sleep": _sleeper("sleep", 0)}
    calls = [
        ToolCall("search", {"q": "x"}),
        ToolCall("calculator", None, error="arguments are not valid JSON: '{\"expr'"),
        ToolCall("calculator", {"expression": "2+2"}),
    ]
    results = run_tool_calls(calls, tools, max_concurrency=2)
    assert [(r.name, r.status) for r in results] == [
        ("search", "error"),
        ("calculator", "error"),
        ("calculator", "ok"),
    ]
    assert results[0].content == "error: unknown tool 'search'; available: calculator, sleep"
    assert results[1].content == "error: arguments are not valid JSON: '{\"expr'"
    assert results[2].content == "4"


def test_timeout_and_broken_tools():
    def broken(arguments):
        raise RuntimeError("disk on fire")

    tools = {
        "hang": _sleeper("hang", 30.0, timeout_s=0.3),
        "broken": Tool("broken", "Fails.", {"type": "object"}, broken),
        "exits": Tool("exits", "Exits.", {"type": "object"}, lambda a: sys.exit(3)),
        "number": Tool("number", "Not text.", {"type": "object"}, lambda a: 3),
    }
    calls = [ToolCall(name, {}) for name in ("hang", "broken", "exits", "number")]
    start = time.monotonic()
    results = run_tool_calls(calls, tools, max_concurrency=4)
    assert time.monotonic() - start < 1.5
    assert [r.status for r in results] == ["timeout", "error", "error", "error"]
    assert results[0].content == "error: tool 'hang' timed out after 0.3 s"
    assert 0.3 <= results[0].seconds < 1.0
    assert results[1].content == "error: RuntimeError: disk on fire"
    assert results[2].content == "error: tool 'exits' raised SystemExit"
    assert results[3].content == "error: tool 'number' returned a int, not text"


def test_timeout_frees_its_worker():
    """A call past its time gives its worker back: the calls queued behind it still run."""
    tools = {"hang": _sleeper("hang", 30.0, timeout_s=0.2), "fast": _sleeper("fast", 0.0)}
    start = time.monotonic()
    results = run_tool_calls([ToolCall("hang"), ToolCall("fast")], tools, max_concurrency=1)
    assert [r.status for r in results] == ["timeout", "ok"]
    assert time.monotonic() - start < 1.0


# ---- the python sandbox ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sandbox():
    """The sandbox must be available: CI runs on Linux machines where it is (a failure here
    says why it is not, rather than skipping the tests of its walls)."""
    if sys.platform != "linux":
        pytest.skip("the sandbox needs Linux namespaces")
    reason = sandbox_available()
    assert reason is None, f"the python sandbox is not available: {reason}"


def _run(code: str, limits: SandboxLimits = LIMITS):
    return run_python(textwrap.dedent(code), limits)


def test_python_prints(sandbox):
    result = _run("print(6 * 7)\nimport sys; print('oops', file=sys.stderr)")
    assert (result.stdout, result.returncode) == ("42\noops\n", 0)
    assert not result.timed_out and result.killed_reason is None and not result.truncated


def test_python_has_no_network(sandbox):
    with socket.socket() as server:  # the parent's localhost is not the sandbox's
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = _run(
            f"""
            import socket
            for address in [("1.1.1.1", 53), ("127.0.0.1", {port})]:
                with socket.socket() as s:
                    s.settimeout(1)
                    print(address[0], s.connect_ex(address) != 0)
            try:
                socket.getaddrinfo("pypi.org", 443)
                print("dns ok")
            except OSError:
                print("no dns")
            try:
                socket.socket(socket.AF_UNIX)  # a socket path would cross the namespace
                print("unix socket")
            except PermissionError:
                print("no unix socket")
            """
        )
    assert result.stdout == "1.1.1.1 True\n127.0.0.1 True\nno dns\nno unix socket\n"


def test_python_writes_only_its_directory(sandbox, tmp_path):
    target = tmp_path / "escaped.txt"
    result = _run(
        f"""
        import ctypes, os
        for path in [{str(target)!r}, "/tmp/escaped.txt", "/dev/shm/escaped.txt"]:
            try:
                open(path, "w").close()
                print("WROTE", path)
            except OSError as e:
                print(type(e).__name__, e.errno)
        with open("here.txt", "w") as f:
            f.write("data")
        print(open("here.txt").read(), os.getcwd() == os.path.realpath(os.environ["HOME"]))
        libc = ctypes.CDLL(None, use_errno=True)  # no capability left to undo a mount
        print(libc.mount(None, b"/", None, 32 | 4096, None), ctypes.get_errno())
        print(sorted(os.listdir("/dev")))
        """
    )
    devices = ["fd", "full", "null", "random", "stderr", "stdin", "stdout", "urandom", "zero"]
    assert result.stdout.splitlines() == [
        "OSError 30",  # EROFS
        "OSError 30",
        "FileNotFoundError 2",  # /dev is the sandbox's own
        "data True",
        "-1 1",  # EPERM: remounting / read-write
        str(devices),
    ]
    assert not target.exists() and not os.path.exists("/tmp/escaped.txt")


def test_python_disk_is_bounded(sandbox):
    limits = SandboxLimits(cpu_time_s=2, wall_time_s=20, memory_mb=256, disk_mb=16)
    result = _run(
        """
        import errno, os
        try:
            with open("big", "wb") as f:
                f.write(bytes(9 << 20))  # RLIMIT_FSIZE: 8 MB a file
        except OSError as e:
            print(errno.errorcode[e.errno])
        os.remove("big")
        try:
            for i in range(10):
                with open(f"part{i}", "wb") as f:
                    f.write(bytes(4 << 20))
        except OSError as e:
            print(errno.errorcode[e.errno], i)
        """,
        limits,
    )
    assert result.stdout == "EFBIG\nENOSPC 3\n"  # 16 MB: three parts of 4 MB and main.py


def test_python_cannot_see_or_signal_the_host(sandbox):
    result = _run(
        f"""
        import os
        print(os.getpid(), sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
        try:
            os.kill({os.getpid()}, 0)
            print("sees the host")
        except ProcessLookupError:
            print("alone")
        """
    )
    assert result.stdout == "2 [1, 2]\nalone\n"


def test_python_wall_time(sandbox):
    start = time.monotonic()
    result = _run("print('start', flush=True)\nimport time\ntime.sleep(100)")
    assert 3.0 <= time.monotonic() - start < 5.0
    assert result.timed_out and result.killed_reason == "wall time"
    assert result.stdout == "start\n"


def test_python_cpu_time(sandbox):
    result = _run("while True:\n    pass", LONG_WALL)
    assert not result.timed_out and result.killed_reason == "cpu time"
    assert result.returncode == -signal.SIGXCPU


def test_python_memory(sandbox):
    result = _run("x = bytearray(1 << 30)")
    assert result.killed_reason == "memory" and result.returncode == 1
    assert "MemoryError" in result.stdout


def test_python_output_limit(sandbox):
    result = _run("while True:\n    print('y' * 99)", LONG_WALL)
    assert result.truncated and result.killed_reason == "output limit"
    assert result.stdout == ("y" * 99 + "\n") * 20


def test_python_leaves_nothing_behind(sandbox):
    # a background process holding the output pipe dies with the namespace's init
    code = "import os, subprocess\nsubprocess.Popen(['sleep', '30'])\nprint(os.getcwd())"
    result = _run(code, LONG_WALL)
    assert not result.timed_out and result.returncode == 0
    workdir = result.stdout.strip()
    assert workdir.startswith(tempfile.gettempdir()) and not os.path.exists(workdir)


def test_python_tool(sandbox):
    python = build_tool("python", timeout_s=2, cpu_time_s=1, memory_mb=256, max_output_bytes=1000)
    assert python.schema()["function"]["parameters"]["required"] == ["code"]
    calls = [
        ToolCall("python", {"code": "print(sum(range(10)))"}),
        ToolCall("python", {"code": "raise SystemExit(2)"}),
        ToolCall("python", {"code": "1/0"}),
        ToolCall("python", {"code": "pass"}),
        ToolCall("python", {"code": "print('z' * 5000)"}),
        ToolCall("python", {"code": "x = bytearray(1 << 30)"}),
        ToolCall("python", {"code": "import time\ntime.sleep(10)"}),
    ]
    results = run_tool_calls(calls, {"python": python}, max_concurrency=4)
    assert [r.status for r in results] == ["ok", "ok", "ok", "ok", "ok", "error", "timeout"]
    assert results[0].content == "45\n"
    assert results[1].content == "\n[exit status 2]"
    assert results[2].content.endswith("ZeroDivisionError: division by zero\n\n[exit status 1]")
    assert results[3].content == "(no output)"
    assert (
        results[4].content
        == "z" * 1000 + "\n[output truncated at 1000 bytes; the program was stopped]"
    )
    assert results[5].content.startswith("error: the program ran out of its 256 MB")
    assert results[6].content.startswith("error: the program ran past 2 s")
