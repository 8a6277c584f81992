"""Vocab-parallel log-prob/entropy against torch's log_softmax, values and gradients."""

import pytest
import torch

from trainer.workers.logprobs import vocab_parallel_logprobs


def reference(logits, labels, vocab_size, temperature):
    x = logits[..., :vocab_size] / temperature
    logp_all = torch.log_softmax(x.float(), -1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [3, 4096])
def test_values_and_grads_match_log_softmax(temperature, chunk):
    torch.manual_seed(0)
    vocab, padded = 50, 64  # padded columns must not leak into the softmax
    logits = torch.randn(2, 5, padded, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (2, 5))
    w_lp, w_h = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)

    a = logits.clone().requires_grad_()
    lp, h = vocab_parallel_logprobs(a, labels, vocab, temperature=temperature, chunk_tokens=chunk)
    ((lp * w_lp).sum() + (h * w_h).sum()).backward()

    b = logits.clone().requires_grad_()
    rlp, rh = reference(b, labels, vocab, temperature)
    ((rlp * w_lp).sum() + (rh * w_h).sum()).backward()

    torch.testing.assert_close(lp, rlp.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, rh.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert a.grad[..., vocab:].abs().max() == 0


def test_fp32_logits_are_not_modified():
    """Padded-vocab masking must not write -inf into the model's own (fp32) logits."""
    torch.manual_seed(1)
    logits = torch.randn(3, 64)
    before = logits.clone()
    vocab_parallel_logprobs(logits, torch.randint(0, 50, (3,)), vocab_size=50)
    assert torch.equal(logits, before)


def test_without_entropy_gives_the_same_logprobs_and_grads():
    """with_entropy=False skips H's sum: same log-probs and log-prob gradient, no entropy."""
    torch.manual_seed(2)
    logits = torch.randn(4, 7, 64, dtype=torch.float64) * 2
    labels = torch.randint(0, 50, (4, 7))
    w = torch.randn(4, 7, dtype=torch.float64)
    grads, logps = [], []
    for with_entropy in (True, False):
        a = logits.clone().requires_grad_()
        lp, h = vocab_parallel_logprobs(a, labels, 50, chunk_tokens=5, with_entropy=with_entropy)
        assert (h is None) == (not with_entropy)
        (lp * w).sum().backward()
        grads.append(a.grad)
        logps.append(lp)
    torch.testing.assert_close(logps[0], logps[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


def test_three_tp_ranks_match_the_whole_vocabulary(torchrun):
    """Each rank's sums are rebased on the global max, also when a rank holds padding only."""
    errors = torchrun("logprob_tp.py", 3)
    assert set(errors) == {"40", "30"} and max(errors.values()) < 1e-5, errors
