"""The rollout conformance suite: the definition of done for a generation backend.

Parametrised over every backend in the registry (a backend that registers itself is picked up
with no change here), at rollout TP=1 and, where the backend supports it, TP=2; always two
ranks, so TP=1 also runs two independent engines on different prompts (rollout DP=2).
The checks themselves live in workers/rollout_conformance.py (one engine start per case):
shapes/dtypes, left/right padding, masks and positions, EOS, n>1 ordering, greedy equal to
transformers, log-probs equal to transformers (<=1e-4, fp32), mixed lengths, the max-tokens
boundary, bad input, sleep/wake and in-place weight loading.
"""

from __future__ import annotations

import pytest
from conftest import run_cases

from rollout import ROLLOUTS

# tiny_qwen2: qkv bias and tied embeddings, the less forgiving layout.
MODEL = "tiny_qwen2"


def _cases():
    # vLLM last in the shared launch: its engine changes process-wide state the others need not
    # see (test_hybrid_engine orders its cases the same way).
    for name, builder in sorted(ROLLOUTS.items(), key=lambda kv: (kv[0] == "vllm", kv[0])):
        tps = (1, 2) if getattr(builder, "supports_tensor_parallel", False) else (1,)
        for tp in tps:
            # vLLM at TP 2 also runs in the fast set's swap and GRPO tests.
            slow = [pytest.mark.slow] if tp > 1 else []
            yield pytest.param(name, tp, id=f"{name}-tp{tp}", marks=slow)


FAST = [c.values for c in _cases() if not c.marks]


@pytest.fixture(scope="module")
def fast_results(tiny_ckpt) -> dict:
    """The fast set's cases in one torchrun launch (conftest.run_cases): each starts its own
    engine, but the launch's imports are paid once."""
    path = str(tiny_ckpt(MODEL))
    return run_cases(
        "rollout_conformance.py",
        {f"{name}-tp{tp}": (2, [name, tp, path], {}) for name, tp in FAST},
    )


@pytest.mark.parametrize("backend,tp", list(_cases()))
def test_rollout_conformance(backend, tp, tiny_ckpt, torchrun, request):
    if (backend, tp) in FAST:
        result = request.getfixturevalue("fast_results")[f"{backend}-tp{tp}"]
    else:
        result = torchrun("rollout_conformance.py", 2, backend, str(tp), str(tiny_ckpt(MODEL)))
    for key in ("greedy_logp_maxdiff", "sampled_logp_maxdiff", "updated_logp_maxdiff"):
        assert result[key] <= 1e-4, (key, result[key])
    assert result["eos_step"] >= 1  # EOS was checked mid-response, not only at step 0
