"""Where the device waits for the host: one profiled call's idle time, each gap credited to
what the host was running when it launched the kernel that ended the gap.

A step whose kernels are queued faster than the device runs them has no gaps, and its time is
the device's. A gap opens when the queue runs dry: after a synchronisation (`.item()`, a
host copy), or wherever the host takes longer to queue a kernel than the device to run the
previous ones. Such a step's time follows the host's speed, which is what varies between hosts
and processes; this says where. torch.profiler records the kernels and the host's operators;
the crediting below is written by hand (the profiler has no such view).

    python -m benchmarks.bench_mfu --specs sdpa --gaps 25
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
WINDOW = "host_gaps.call"
"""The annotation around the profiled call: its span is the window the gaps are counted in."""
QUEUED = "(queued before the gap: a stream wait or launch latency)"
TAIL = "(after the last kernel)"


@dataclass
class GapReport:
    wall_us: float
    busy_us: float
    kernels: int
    gaps: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    """what the host ran when it launched the kernel after a gap -> the gaps' lengths (µs)"""

    @property
    def idle_us(self) -> float:
        return max(self.wall_us - self.busy_us, 0.0)

    @property
    def host_bound_us(self) -> float:
        return sum(sum(v) for k, v in self.gaps.items() if k not in (QUEUED, TAIL))


def _enclosing(ranges: list[tuple[float, float, str, str]], times: list[float]) -> dict:
    """For each time, the (start, end, name, cat) ranges of one thread that contain it,
    outermost first. A thread's ranges nest, so a sweep with a stack finds them."""
    ranges = sorted(ranges, key=lambda r: (r[0], -r[1]))
    found, stack, i = {}, [], 0
    for t in sorted(set(times)):
        while i < len(ranges) and ranges[i][0] <= t:
            while stack and stack[-1][1] < ranges[i][0]:
                stack.pop()
            stack.append(ranges[i])
            i += 1
        while stack and stack[-1][1] < t:
            stack.pop()
        found[t] = [r for r in stack if r[1] >= t]
    return found


def _host_state(stack: list[tuple[float, float, str, str]]) -> str:
    """'innermost annotation / the outermost operator inside it' of what the launching thread
    was running."""
    notes = [r for r in stack if r[3] == "user_annotation" and r[2] != WINDOW]
    since = notes[-1][0] if notes else float("-inf")
    ops = [r[2] for r in stack if r[3] == "cpu_op" and r[0] >= since]
    op = ops[0] if ops else "-"
    # an autograd node's name carries the node: keep it, drop the engine's prefix
    op = op.removeprefix("autograd::engine::evaluate_function: ")
    return f"{notes[-1][2] if notes else '-'} / {op}"


def analyse(trace: dict) -> GapReport:
    """A chrome trace of torch.profiler (`export_chrome_trace`) whose call was wrapped in
    `record_function(WINDOW)` -> its idle gaps by host state."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    window = next(
        e for e in events if e.get("name") == WINDOW and e.get("cat") == "user_annotation"
    )
    lo, hi = float(window["ts"]), float(window["ts"]) + float(window["dur"])
    device = sorted(
        (e for e in events if e.get("cat") in DEVICE_CATS and lo <= float(e["ts"]) <= hi),
        key=lambda e: float(e["ts"]),
    )
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})
    }
    ranges = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation"):
            start = float(e["ts"])
            ranges[(e["pid"], e["tid"])].append(
                (start, start + float(e["dur"]), e["name"], e["cat"])
            )

    report = GapReport(wall_us=hi - lo, busy_us=0.0, kernels=len(device))
    pending = []  # (gap µs, thread, launch time) of the host-bound gaps
    busy_end = lo
    for k in device:
        start, end = float(k["ts"]), float(k["ts"]) + float(k["dur"])
        if start > busy_end:
            launch = launches.get(k.get("args", {}).get("correlation"))
            if launch is not None and float(launch["ts"]) >= busy_end:
                pending.append(
                    (start - busy_end, (launch["pid"], launch["tid"]), float(launch["ts"]))
                )
            else:
                report.gaps[QUEUED].append(start - busy_end)
        report.busy_us += max(end - max(start, busy_end), 0.0)
        busy_end = max(busy_end, end)
    if hi > busy_end:
        report.gaps[TAIL].append(hi - busy_end)

    by_thread = defaultdict(list)
    for gap, thread, t in pending:
        by_thread[thread].append((gap, t))
    for thread, items in by_thread.items():
        stacks = _enclosing(ranges[thread], [t for _, t in items])
        for gap, t in items:
            report.gaps[_host_state(stacks[t])].append(gap)
    return report


def markdown(report: GapReport, top: int) -> str:
    from benchmarks.common import markdown_table

    rows = sorted(report.gaps.items(), key=lambda kv: -sum(kv[1]))
    table = [
        [
            key[:100].replace("|", "/"),
            len(v),
            f"{sum(v) / 1e3:,.2f}",
            f"{100 * sum(v) / report.wall_us:.1f} %",
        ]
        for key, v in rows[:top]
    ]
    head = (
        f"one call: {report.wall_us / 1e3:,.1f} ms; the device busy {report.busy_us / 1e3:,.1f} ms "
        f"({report.kernels:,} kernels and copies), idle {report.idle_us / 1e3:,.1f} ms, of which "
        f"{report.host_bound_us / 1e3:,.1f} ms waiting for the host to launch the next kernel\n\n"
    )
    header = ["host was in (annotation / operator) when the gap ended", "gaps", "ms", "of the call"]
    return head + markdown_table(header, table)


def profile_host_gaps(fn: Callable[[], object], top: int, tag: str = "call") -> str:
    """Profile one call of fn (CUDA) and return its idle-gap table (markdown). With
    TANDEM_GAPS_TRACE=<folder>, the raw trace is kept there too as <tag>.json.gz."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks.common import synchronize

    synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function(WINDOW):
            fn()
            torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
        keep = os.environ.get("TANDEM_GAPS_TRACE")  # the raw trace too, for a closer look
        if keep:
            os.makedirs(keep, exist_ok=True)
            with gzip.open(os.path.join(keep, f"{tag}.json.gz"), "wt") as f:
                json.dump(trace, f)
    finally:
        os.unlink(path)
    return markdown(analyse(trace), top)
