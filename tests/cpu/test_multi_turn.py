"""The multi-turn agent loop (rollout/multi_turn/) driven by a scripted engine: the
conversation's tokens, its loss mask, its turn boundaries and its log-probs are exactly what
the script, the tools and the chat template make, for no, one and several tool calls,
malformed calls, a timeout, the budget running out and a turn cut by the engine's length."""

from __future__ import annotations

import json
import time

import pytest
import torch

from archs.checkpoints import build_char_tokenizer
from rollout.assemble import build_output, prompt_token_lists
from rollout.base import BaseRollout
from rollout.multi_turn import AgentLoop, build_tools, conversation_metrics, render_prompt
from rollout.multi_turn.chat import ToolTurnRenderer, parse_hermes_calls
from rollout.multi_turn.tools import Tool
from rollout.sampling import resolve_sampling
from tandem_core.config import MultiTurnConfig, RolloutConfig
from tandem_core.protocol import Batch

TOK = build_char_tokenizer()
EOS = TOK.convert_tokens_to_ids("<|im_end|>")
PAD = TOK.convert_tokens_to_ids("<pad>")


def enc(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


class ScriptedEngine(BaseRollout):
    """Answers each sample (told apart by its prompt) with its script's turns, in order; a call
    asking for fewer tokens than the turn has left gets a piece, the rest comes next call. The
    log-prob of a sample's k-th token is -k/1000, so where each lands can be checked."""

    def __init__(self, scripts: dict[str, list[str]], response_length: int = 200):
        self.cfg = RolloutConfig(name="scripted", response_length=response_length)
        self.scripts = {
            tuple(enc(p)): [enc(t) + [EOS] for t in turns] for p, turns in scripts.items()
        }
        self.left: dict[tuple, list[int]] = {}
        self.emitted: dict[tuple, int] = {}
        self.calls: list[int] = []  # rows per engine call

    def generate_sequences(self, prompts: Batch) -> Batch:
        s = resolve_sampling(self.cfg, prompts.meta_info, eos_token_ids=(EOS,), pad_token_id=PAD)
        contexts = prompt_token_lists(prompts, max_model_len=10_000, response_length=1)
        self.calls.append(len(contexts))
        responses, log_probs = [], []
        for ctx in contexts:
            key = next(k for k in self.scripts if tuple(ctx[: len(k)]) == k)
            if not self.left.get(key):
                self.left[key] = self.scripts[key].pop(0)
            piece, self.left[key] = (
                self.left[key][: s.response_length],
                self.left[key][s.response_length :],
            )
            start = self.emitted.get(key, 0)
            self.emitted[key] = start + len(piece)
            responses.append(piece)
            log_probs.append([-(start + j + 1) / 1000 for j in range(len(piece))])
        return build_output(prompts, responses, log_probs, s)


def slow_tool() -> Tool:
    schema = {"type": "object", "properties": {}, "required": []}
    return Tool("slow", "sleeps", schema, lambda a: time.sleep(5) or "late", timeout_s=0.2)


def agent(engine, budget=200, max_turns=4, tools=("calculator",), extra=None, max_len=10_000):
    cfg = RolloutConfig(name="scripted", response_length=budget)
    cfg.multi_turn = MultiTurnConfig(enable=True, tools=list(tools), max_turns=max_turns)
    found = build_tools(cfg.multi_turn) | (extra or {})
    return AgentLoop(
        engine, cfg, TOK, found, eos_token_ids=(EOS,), pad_token_id=PAD, max_model_len=max_len
    )


def prompts(*texts: str) -> Batch:
    width = max(len(enc(t)) for t in texts)
    ids = torch.full((len(texts), width), PAD)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for row, t in enumerate(texts):
        ids[row, width - len(enc(t)) :] = torch.tensor(enc(t))
        mask[row, width - len(enc(t)) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = Batch.from_dict({"input_ids": ids, "attention_mask": mask, "position_ids": pos})
    batch["uid"] = [f"u{i}" for i in range(len(texts))]
    batch.meta_info["sampling"] = {"n": 1}
    return batch


def tool_turn(*contents: str) -> list[int]:
    """What the ChatML template adds after a model turn that called tools."""
    turns = "".join(f"<|im_start|>tool\n{c}<|im_end|>\n" for c in contents)
    return enc("\n" + turns + "<|im_start|>assistant\n")


def response(out: Batch, row: int) -> tuple[list[int], list[int], list[float]]:
    n = int(out["attention_mask"][row, out["prompts"].shape[1] :].sum())
    return (
        out["responses"][row, :n].tolist(),
        out["response_mask"][row, :n].tolist(),
        out["rollout_log_probs"][row, :n].tolist(),
    )


def test_answer_without_tools_is_one_turn():
    engine = ScriptedEngine({"Q1": ["42"]})
    out = agent(engine).generate_sequences(prompts("Q1"))
    toks, mask, lps = response(out, 0)
    assert toks == enc("42") + [EOS] and mask == [1, 1, 1]
    assert lps == pytest.approx([-0.001, -0.002, -0.003])
    assert out["num_turns"].tolist() == [1.0] and out["num_tool_calls"].tolist() == [0.0]
    assert list(out["final_response"]) == ["42"]


def test_one_tool_call_then_the_answer():
    first = "let me see " + call("calculator", expression="6*7")
    engine = ScriptedEngine({"Q1": [first, "it is 42"]})
    out = agent(engine).generate_sequences(prompts("Q1"))
    toks, mask, lps = response(out, 0)
    turn1, tool, turn2 = enc(first) + [EOS], tool_turn("42"), enc("it is 42") + [EOS]
    assert toks == turn1 + tool + turn2
    assert mask == [1] * len(turn1) + [0] * len(tool) + [1] * len(turn2)
    # log-probs: the engine's, on model tokens only (the k-th model token's is -k/1000)
    model_lps = [lp for lp, m in zip(lps, mask, strict=True) if m]
    assert model_lps == pytest.approx([-(k + 1) / 1000 for k in range(len(turn1 + turn2))])
    assert all(lp == 0 for lp, m in zip(lps, mask, strict=True) if not m)
    # attention covers the tool tokens, the loss does not; positions run on through them
    prompt_len = out["prompts"].shape[1]
    assert out["attention_mask"][0, prompt_len:].sum() == len(toks)
    assert out["position_ids"][0, -1] - out["position_ids"][0, prompt_len - 1] == 200
    assert out["num_turns"].tolist() == [2.0] and out["num_tool_calls"].tolist() == [1.0]
    conv = out["conversation"][0]
    assert [m["role"] for m in conv] == ["assistant", "tool", "assistant"]
    assert conv[0]["tool_calls"] == [{"name": "calculator", "arguments": {"expression": "6*7"}}]
    assert conv[1]["content"] == "42" and out["final_response"][0] == "it is 42"
    assert engine.calls == [1, 1]


def test_several_calls_over_several_turns_and_samples_batched():
    a1 = call("calculator", expression="1+1") + call("calculator", expression="2*3")
    a2 = call("calculator", expression="10/4")
    engine = ScriptedEngine({"QA": [a1, a2, "done"], "QB": ["no tools"]}, response_length=400)
    out = agent(engine, budget=400).generate_sequences(prompts("QA", "QB"))
    toks, mask, _ = response(out, 0)
    expected = (
        (enc(a1) + [EOS] + tool_turn("2", "6") + enc(a2) + [EOS] + tool_turn("2.5"))
        + enc("done")
        + [EOS]
    )
    assert toks == expected
    assert sum(mask) == len(enc(a1) + enc(a2) + enc("done")) + 3
    assert out["num_turns"].tolist() == [3.0, 1.0]
    assert out["num_tool_calls"].tolist() == [3.0, 0.0]
    # every round is one engine call over the samples still going
    assert engine.calls == [2, 1, 1]
    metrics = conversation_metrics(out)
    assert metrics["multi_turn/turns"] == 2.0 and metrics["multi_turn/tool_calls"] == 1.5
    tool_tokens = len(tool_turn("2", "6") + tool_turn("2.5"))
    assert metrics["multi_turn/tool_token_share"] == pytest.approx(tool_tokens / 2 / 400)


def test_malformed_calls_and_unknown_tools_are_answered_with_errors():
    bad = "<tool_call>{not json</tool_call>"
    unknown = call("search", query="x")
    engine = ScriptedEngine({"Q1": [bad, unknown, "<tool_call>open", "ok"]}, response_length=600)
    out = agent(engine, budget=600, max_turns=5).generate_sequences(prompts("Q1"))
    conv = out["conversation"][0]
    results = [m["content"] for m in conv if m["role"] == "tool"]
    assert results[0].startswith("error: the call is not JSON")
    assert results[1] == "error: unknown tool 'search'; available: calculator"
    assert results[2] == "error: <tool_call> without </tool_call>"
    assert out["num_tool_errors"].tolist() == [3.0] and out["final_response"][0] == "ok"
    toks, _, _ = response(out, 0)
    assert toks[-3:] == enc("ok") + [EOS]


def test_a_tool_past_its_time_is_a_timeout_not_a_hang():
    engine = ScriptedEngine({"Q1": [call("slow"), "fine"]})
    start = time.monotonic()
    out = agent(engine, extra={"slow": slow_tool()}).generate_sequences(prompts("Q1"))
    assert time.monotonic() - start < 3
    assert out["num_tool_timeouts"].tolist() == [1.0]
    assert out["conversation"][0][1]["content"].startswith("error: ")
    assert "timed out" in out["conversation"][0][1]["content"]


def test_budget_ends_the_conversation():
    first = call("calculator", expression="1+2")
    # The budget ends inside the first turn: cut there, no tool runs.
    engine = ScriptedEngine({"Q1": [first, "3"]})
    out = agent(engine, budget=10).generate_sequences(prompts("Q1"))
    toks, mask, _ = response(out, 0)
    assert toks == enc(first)[:10] and mask == [1] * 10
    assert out["num_tool_calls"].tolist() == [0.0] and out["num_turns"].tolist() == [1.0]
    # The turn fits but its tool turn leaves no room for an answer: it ends after the turn.
    room = len(enc(first)) + 1 + len(tool_turn("3"))
    engine = ScriptedEngine({"Q1": [first, "3"]})
    out = agent(engine, budget=room).generate_sequences(prompts("Q1"))
    toks, _, _ = response(out, 0)
    assert toks == enc(first) + [EOS] and out["num_tool_calls"].tolist() == [1.0]
    # max_turns: the last turn's call is not run
    engine = ScriptedEngine({"Q1": [first, first, "3"]})
    out = agent(engine, max_turns=2).generate_sequences(prompts("Q1"))
    assert out["num_turns"].tolist() == [2.0] and out["num_tool_calls"].tolist() == [1.0]


def test_a_turn_cut_by_the_engine_length_goes_on_in_the_next_call():
    """A round asks only for what the longest context leaves of max_model_len: sample B, whose
    tool result was short, is cut there and its turn goes on in the next round, token for
    token as if it had not been cut."""
    call_a, call_b = call("calculator", expression="2**99"), call("calculator", expression="1+1")
    used_a = len(enc(call_a)) + 1 + len(tool_turn(str(2**99)))
    used_b = len(enc(call_b)) + 1 + len(tool_turn("2"))
    budget, answer = used_a + 10, "the answer is two, or 2!"
    assert 10 < len(enc(answer)) + 1 <= budget - used_b  # B's answer must be cut once
    engine = ScriptedEngine({"QA": [call_a, "ok"], "QB": [call_b, answer]}, budget)
    out = agent(engine, budget=budget, max_len=2 + budget).generate_sequences(prompts("QA", "QB"))
    toks, mask, lps = response(out, 1)
    assert toks == enc(call_b) + [EOS] + tool_turn("2") + enc(answer) + [EOS]
    model_lps = [lp for lp, m in zip(lps, mask, strict=True) if m]
    assert model_lps == pytest.approx([-(k + 1) / 1000 for k in range(len(model_lps))])
    assert out["num_turns"].tolist() == [2.0, 2.0]
    assert engine.calls == [2, 2, 1]  # the third round: B's cut turn alone


def test_qwen_style_template_renders_tools_its_own_way():
    tok = build_char_tokenizer()
    tok.chat_template = (
        "{% if tools %}<|im_start|>system\n# Tools\n<tools>"
        "{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}"
        "{{ '<|im_start|>user' }}{% endif %}"
        "{{ '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' }}"
        "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}"
        "{{ '<|im_end|>\\n' }}{% endif %}"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tools = build_tools(MultiTurnConfig(tools=["calculator"]))
    schema = [t.schema() for t in tools.values()]
    prompt = render_prompt(tok, [{"role": "user", "content": "hi"}], schema)
    assert prompt.startswith("<|im_start|>system\n# Tools\n<tools>") and '"calculator"' in prompt
    assert "You may call tools" not in prompt  # the template's own way, not the fallback
    from rollout.multi_turn.tools import ToolResult

    ids = ToolTurnRenderer(tok).tool_turn_ids(
        [ToolResult("calculator", "7", "ok", 0.0), ToolResult("calculator", "8", "ok", 0.0)], 100
    )
    assert tok.decode(ids) == (
        "\n<|im_start|>user\n<tool_response>\n7\n</tool_response>\n<tool_response>\n8\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_template_without_tools_gets_them_in_a_system_message():
    tools = build_tools(MultiTurnConfig(tools=["calculator"]))
    schema = [t.schema() for t in tools.values()]
    prompt = render_prompt(TOK, [{"role": "user", "content": "hi"}], schema)
    assert prompt.startswith("<|im_start|>system\nYou may call tools.")
    assert json.dumps(schema[0]) in prompt and prompt.endswith("<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert render_prompt(TOK, with_system, schema).startswith(
        "<|im_start|>system\nBe brief.\n\nYou may call tools."
    )


def test_hermes_parser():
    assert parse_hermes_calls("no call") == []
    [c] = parse_hermes_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert (c.name, c.arguments, c.error) == ("f", {"x": 1}, None)
    [c] = parse_hermes_calls('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')
    assert c.error == "arguments must be a JSON object"
    [c] = parse_hermes_calls("<tool_call>[1, 2]</tool_call>")
    assert c.error.startswith("a call is")


@pytest.mark.parametrize(
    "backend,rollout_tp",
    # the slow set: test_trainer_e2e's GRPO with tools checks every sync on conversations
    [
        pytest.param("vllm", 1, marks=pytest.mark.slow),
        pytest.param("hf", 1, marks=pytest.mark.slow),
        pytest.param("vllm", 2, marks=pytest.mark.slow),
    ],
)
def test_engine_log_probs_equal_the_actors_on_conversations(backend, rollout_tp, torchrun):
    """Real engines, two ranks: conversations with tool turns (the calculator after every
    turn), the model tokens' engine log-probs equal the actor's on the whole conversation;
    at rollout TP 2 the tools run on the engine's first rank and both ranks agree."""
    result = torchrun("multi_turn_check.py", 2, backend, str(rollout_tp), timeout=900)
    assert result["err"] <= 1e-4 and result["tool_tokens"] > 0 and result["max_turns"] >= 2
