"""A tool-call format for tests with tiny random models, which never write a real call: every
model turn that ends calls the calculator, so conversations get tool turns (importable as
`rollout.multi_turn.format=mt_formats:every_turn_calls_the_calculator` with this folder on
sys.path)."""

from rollout.multi_turn.tools import ToolCall


def every_turn_calls_the_calculator(text: str) -> list[ToolCall]:
    return [ToolCall("calculator", {"expression": f"{len(text)}*3"})]
