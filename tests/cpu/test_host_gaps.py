"""benchmarks/host_gaps.py: idle gaps credited to what the host ran, on a trace of known shape."""

from benchmarks import host_gaps as H


def _x(cat, name, ts, dur, tid=1, **args):
    return {
        "ph": "X",
        "cat": cat,
        "name": name,
        "ts": ts,
        "dur": dur,
        "pid": 0,
        "tid": tid,
        "args": args,
    }


def _kernel(ts, dur, corr, launch_ts, tid=1):
    return [
        _x("kernel", f"k{corr}", ts, dur, tid=7, correlation=corr),
        _x("cuda_runtime", "cudaLaunchKernel", launch_ts, 1, tid=tid, correlation=corr),
    ]


def test_gaps_are_credited_to_the_launching_host_state():
    events = [
        _x("user_annotation", H.WINDOW, 0, 100),
        _x("user_annotation", "tandem.forward", 2, 10),
        _x("cpu_op", "aten::linear", 3, 5),
        _x("cpu_op", "aten::mm", 4, 2),  # inside aten::linear: the outer one names the gap
        _x("user_annotation", "tandem.loss", 40, 10),
        _x("cpu_op", "aten::mul", 44, 3),
        # the autograd thread: its node's name, without the engine's prefix
        _x("cpu_op", "autograd::engine::evaluate_function: MmBackward0", 85, 4, tid=2),
        *_kernel(10, 10, 1, 5),  # head gap 10, launched inside forward / aten::linear
        *_kernel(20, 10, 2, 8),  # queued behind kernel 1: no gap
        *_kernel(50, 10, 3, 45),  # gap 20, launched during the loss
        *_kernel(70, 10, 4, 40),  # gap 10, but queued before the gap opened
        *_kernel(88, 2, 5, 87, tid=2),  # gap 8, launched by the autograd thread
        _x("gpu_user_annotation", "tandem.loss", 50, 10, tid=7),  # not device work
    ]
    report = H.analyse({"traceEvents": events})
    assert report.wall_us == 100 and report.busy_us == 42 and report.kernels == 5
    assert dict(report.gaps) == {
        "tandem.forward / aten::linear": [10.0],
        "tandem.loss / aten::mul": [20.0],
        H.QUEUED: [10.0],
        "- / MmBackward0": [8.0],
        H.TAIL: [10.0],
    }
    assert report.host_bound_us == 38 and report.idle_us == 58
    table = H.markdown(report, top=3)
    assert "tandem.loss / aten::mul | 1 | 0.02" in table and "MmBackward0" not in table


def test_overlapping_kernels_count_once():
    events = [
        _x("user_annotation", H.WINDOW, 0, 30),
        *_kernel(0, 20, 1, 0),
        *_kernel(5, 10, 2, 1),  # another stream, inside kernel 1's span
        *_kernel(15, 15, 3, 2),
    ]
    report = H.analyse({"traceEvents": events})
    assert report.busy_us == 30 and report.idle_us == 0 and not report.gaps
