"""Tandem's kernels on CUDA equal the eager math they replace: the fused log-prob/entropy
kernels (vs eager on CPU), the sdpa spec's RoPE (Triton, vs megatron's unfused RoPE) and the
Triton SwiGLU handed to megatron (vs its math in fp32)."""

import pytest
import torch

import tandem_core.models as M
import trainer.workers.logprobs as L

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _run(logits, labels, vocab, with_entropy):
    x = logits.clone().requires_grad_()
    lp, h = L.vocab_parallel_logprobs(
        x, labels, vocab, chunk_tokens=1024, with_entropy=with_entropy
    )
    loss = (lp * torch.linspace(-1, 1, lp.numel(), device=lp.device)).sum()
    if h is not None:
        loss = loss + 0.3 * h.sum()
    loss.backward()
    return lp.float().cpu(), None if h is None else h.float().cpu(), x.grad.float().cpu()


@pytest.mark.parametrize("with_entropy", [True, False])
def test_fused_kernels_match_eager(with_entropy):
    torch.manual_seed(0)
    vocab, padded = 32000, 32128  # padded columns must stay out of the softmax
    logits = (torch.randn(2500, padded) * 4).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (2500,))
    got = _run(logits.cuda(), labels.cuda(), vocab, with_entropy)  # compiled on CUDA
    want = _run(logits, labels, vocab, with_entropy)  # eager on CPU
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=2e-4)
    if with_entropy:
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=2e-4)
    # bf16 gradients: one ulp of the largest entries.
    torch.testing.assert_close(got[2], want[2], rtol=1e-2, atol=1e-3)
    assert got[2][:, vocab:].abs().max() == 0


def test_rope_kernel_matches_megatron_eager():
    """RotaryQK (the Triton kernel, backward = rotation by -θ) vs megatron's eager RoPE under
    autograd, on q and k with grouped heads."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    torch.manual_seed(0)
    s, b, heads, groups, dim = 300, 3, 8, 2, 64
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    freqs = torch.cat([angles, angles], dim=-1)[:, None, None, :].cuda()
    q = torch.randn(s, b, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(s, b, groups, dim, device="cuda", dtype=torch.bfloat16)
    weights = torch.randn_like(q), torch.randn_like(k)

    def run(rotate):
        x, y = q.clone().requires_grad_(), k.clone().requires_grad_()
        out = rotate(x, y)
        sum((o.float() * w).sum() for o, w in zip(out, weights, strict=True)).backward()
        return [t.float() for t in (*out, x.grad, y.grad)]

    got = run(lambda x, y: M.RotaryQK.apply(x, y, freqs, freqs, False))
    want = run(lambda x, y: [_apply_rotary_pos_emb_bshd(t, freqs, False) for t in (x, y)])
    # bf16: the kernel rounds once, megatron's eager ops after every step.
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_swiglu_kernel_matches_megatron(monkeypatch):
    """megatron's SwiGLUFunction with the Triton kernels installed vs the same math in fp32
    under autograd, bf16 inputs, a width that does not fill the last block."""
    from megatron.core.fusions import fused_bias_swiglu as fused

    from tandem_core import swiglu_kernel

    swiglu_kernel.install()
    calls = []
    for name in ("swiglu", "swiglu_back"):
        kernel = getattr(swiglu_kernel, name)
        monkeypatch.setattr(
            swiglu_kernel, name, lambda *a, k=kernel, n=name: calls.append(n) or k(*a)
        )
    torch.manual_seed(0)
    y = torch.randn(3, 700, 2 * 2900, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(3, 700, 2900, device="cuda", dtype=torch.bfloat16)
    x = y.clone().requires_grad_()
    out = fused.SwiGLUFunction.apply(x, False, False)
    out.backward(g)
    assert calls == ["swiglu", "swiglu_back"]  # megatron's function went through the kernels
    want_out = (torch.nn.functional.silu(y.float()[..., :2900]) * y.float()[..., 2900:]).bfloat16()
    ref = y.float().requires_grad_()
    (torch.nn.functional.silu(ref[..., :2900]) * ref[..., 2900:]).backward(g.float())
    torch.testing.assert_close(out, want_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad.float(), ref.grad, rtol=2e-2, atol=2e-2)
