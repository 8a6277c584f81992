"""The memory planner: will this layout fit the GPUs? Answered before anything is built.
planner.py has the overview and the entry points; `python -m trainer.plan` the CLI."""

from trainer.plan.planner import (
    H100_80GB_GIB,
    PlanError,
    compare_with_run,
    detect_gpu_memory_gb,
    plan_memory,
    plan_or_raise,
)

__all__ = [
    "H100_80GB_GIB",
    "PlanError",
    "compare_with_run",
    "detect_gpu_memory_gb",
    "plan_memory",
    "plan_or_raise",
]
