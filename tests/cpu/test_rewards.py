"""Reward functions, user functions by import path, and the process-isolated scorer."""

from __future__ import annotations

import textwrap
import time

import pytest
import torch

from archs.checkpoints import build_char_tokenizer
from tandem_core.protocol import Batch
from trainer import rewards as rw


def test_exact_match():
    assert rw.REWARDS["exact_match"]("  20\n", "20") == 1.0
    assert rw.REWARDS["exact_match"]("20.", "20") == 0.0


@pytest.mark.parametrize(
    "response,truth,expect",
    [
        ("The answer is 20", "20", 1.0),
        ("13 + 7 = 20", "20", 1.0),  # the last integer counts
        ("20 is not it, 21", "20", 0.0),
        ("-4", "-4", 1.0),
        ("0020", "20", 1.0),
        ("no number here", "20", 0.0),
        ("", "20", 0.0),
    ],
)
def test_arith(response, truth, expect):
    assert rw.REWARDS["arith"](response, truth, "arith") == expect


def test_math_verify():
    math = rw.REWARDS["math"]
    assert math("So the result is $\\boxed{\\frac{1}{2}}$.", "0.5") == 1.0
    assert math("The answer is \\boxed{3}", "\\frac{6}{2}") == 1.0
    assert math("The answer is \\boxed{4}", "3") == 0.0
    with pytest.raises(ValueError, match="cannot parse the ground truth"):
        math("\\boxed{4}", "")


def test_format():
    fmt = rw.REWARDS["format"]
    assert fmt("think...\n<answer>20</answer>", "20") == 1.0
    assert fmt("<answer></answer>", "20") == 0.0
    assert fmt("20", "20") == 0.0
    custom = {"format_pattern": r"^\d+$"}
    assert fmt("20", "20", extra_info=custom) == 1.0
    assert fmt("x20", "20", extra_info=custom) == 0.0


def test_registry():
    assert {"exact_match", "arith", "math", "format"} <= set(rw.REWARDS)
    with pytest.raises(KeyError, match="unknown reward 'nope'.*arith"):
        rw.resolve_reward_fn("nope")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user reward module on sys.path: ok / raises / hangs in C / exits its process."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            import re
            import sys

            NOT_A_FUNCTION = 3

            def score(solution_str, ground_truth, data_source=None, extra_info=None):
                if ground_truth == "raise":
                    raise RuntimeError("bad sample")
                if ground_truth == "hang":
                    # Catastrophic backtracking: hangs inside the C regex engine, where
                    # neither a thread nor a signal handler can stop it.
                    re.match(r"(a+)+$", "a" * 64 + "b")
                if ground_truth == "exit":
                    sys.exit(3)
                if ground_truth == "nan":
                    return float("nan")
                return float(len(solution_str)) + (0.5 if data_source == "src" else 0.0)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_load_reward_fn_errors(user_module):
    assert rw.load_reward_fn(f"{user_module}:score")("abc", "x") == 3.0
    with pytest.raises(
        ImportError, match="'no_such_pkg.mod' of reward function 'no_such_pkg.mod:f'"
    ):
        rw.load_reward_fn("no_such_pkg.mod:f")
    with pytest.raises(AttributeError, match="'my_rewards:missing'.*has no 'missing'"):
        rw.load_reward_fn(f"{user_module}:missing")
    with pytest.raises(TypeError, match="'my_rewards:NOT_A_FUNCTION' is not callable"):
        rw.load_reward_fn(f"{user_module}:NOT_A_FUNCTION")
    with pytest.raises(ValueError, match="must be written 'package.module:function'"):
        rw.load_reward_fn("my_rewards:")
    # The scorer fails at construction, in the trainer, not later in a worker.
    with pytest.raises(ImportError, match="no_such_pkg"):
        rw.RewardScorer(fn="no_such_pkg.mod:f")


def test_scorer_survives_hangs_errors_and_dead_workers(user_module):
    items = [
        ("abcd", "ok", "src"),
        ("x", "hang"),
        ("x", "raise"),
        ("abc", "ok"),
        ("x", "exit"),
        ("x", "nan"),
        rw.RewardItem("ab", "ok"),
    ]
    with rw.RewardScorer(fn=f"{user_module}:score", timeout_s=1.0, num_workers=2) as scorer:
        start = time.monotonic()
        scores, metrics = scorer.score(items)
        elapsed = time.monotonic() - start
        assert scores == [4.5, 0.0, 0.0, 3.0, 0.0, 0.0, 2.0]
        assert metrics["reward/num_timeouts"] == 1.0
        assert metrics["reward/num_errors"] == 3.0  # raise, exit, nan
        assert metrics["reward/mean"] == pytest.approx(9.5 / 7)
        assert elapsed < 10.0, elapsed
        # The restarted workers go on scoring.
        scores, metrics = scorer.score([("hello", "ok")] * 5)
        assert scores == [5.0] * 5 and metrics["reward/num_errors"] == 0.0


def test_scorer_from_config_builtin():
    from tandem_core.config import RewardConfig

    with rw.RewardScorer.from_config(RewardConfig(name="arith"), num_workers=1) as scorer:
        scores, metrics = scorer.score([("13 + 7 = 20", "20"), ("19", "20"), ("-3", "-3")])
    assert scores == [1.0, 0.0, 1.0]
    assert metrics["reward/num_errors"] == 0.0 and metrics["reward/num_timeouts"] == 0.0


def test_score_batch_places_score_on_last_token():
    tok = build_char_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    texts = ["20", "x=7", "", "-5"]
    R = 5
    rows, masks = [], []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False) + [eos]
        rows.append(ids + [pad] * (R - len(ids)))
        masks.append([1] * len(ids) + [0] * (R - len(ids)))
    # Row 2 has no tokens at all (not even EOS): it must carry no score.
    rows[2], masks[2] = [pad] * R, [0] * R
    batch = Batch.from_dict(
        {"responses": torch.tensor(rows), "response_mask": torch.tensor(masks)},
        {"ground_truth": ["20", "7", "1", "5"], "data_source": ["arith"] * 4},
    )
    with rw.RewardScorer("arith", num_workers=1) as scorer:
        scores, metrics = scorer.score_batch(batch, tok)
    expect = torch.zeros(4, R)
    expect[0, 2] = 1.0  # "2","0",EOS -> last real token index 2
    expect[1, 3] = 1.0  # "x","=","7",EOS
    # row 3: "-5" vs "5" is wrong -> 0 at index 2
    torch.testing.assert_close(scores, expect)
    assert metrics["reward/mean"] == pytest.approx(0.5)


def test_arith_dense_partial_credit_for_digits():
    from trainer.rewards import REWARDS

    fn = REWARDS["arith_dense"]
    assert fn("20", "20") == 1.0
    assert fn("the answer is 20", "20") == 1.0
    assert fn("19", "20") == 0.5
    assert fn("ab12", "20") == 0.25
    assert fn("abc", "20") == 0.0
    assert fn("", "20") == 0.0
