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

from rollout import ROLLOUTS


def _cases():
    for name, builder in sorted(ROLLOUTS.items()):
        tps = (1, 2) if getattr(builder, "supports_tensor_parallel", False) else (1,)
        for tp in tps:
            # vLLM at TP 2 also runs in the fast set's swap and GRPO tests.
            slow = [pytest.mark.slow] if tp > 1 else []
            yield pytest.param(name, tp, id=f"{name}-tp{tp}", marks=slow)


@pytest.mark.parametrize("backend,tp", list(_cases()))
def test_rollout_conformance(backend, tp, tiny_ckpt, torchrun):
    # tiny_qwen2: qkv bias and tied embeddings, the less forgiving layout.
    result = torchrun("rollout_conformance.py", 2, backend, str(tp), str(tiny_ckpt("tiny_qwen2")))
    for key in ("greedy_logp_maxdiff", "sampled_logp_maxdiff", "updated_logp_maxdiff"):
        assert result[key] <= 1e-4, (key, result[key])
    assert result["eos_step"] >= 1  # EOS was checked mid-response, not only at step 0
