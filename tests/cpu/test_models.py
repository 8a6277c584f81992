"""Layers Tandem adds to megatron's specs (tandem_core/models.py), against megatron's own."""

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from tandem_core.models import RotaryQK


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot_dim", [16, 8])  # 8 of 16: a partial rotary dim
def test_rotary_qk_backward_is_the_rotation_by_minus_theta(interleaved, rot_dim):
    torch.manual_seed(0)
    s, b, heads, groups, dim = 7, 2, 4, 2, 16
    angles = torch.outer(torch.arange(s, dtype=torch.float32), torch.rand(rot_dim // 2) + 0.1)
    if interleaved:  # megatron repeats each angle over its rotated pair
        freqs = torch.stack([angles, angles], dim=-1).flatten(-2)
    else:
        freqs = torch.cat([angles, angles], dim=-1)
    freqs = freqs[:, None, None, :].double()
    q = torch.randn(s, b, heads, dim, dtype=torch.float64)
    k = torch.randn(s, b, groups, dim, dtype=torch.float64)
    weights = torch.randn_like(q), torch.randn_like(k)

    def run(rotate):
        x, y = q.clone().requires_grad_(), k.clone().requires_grad_()
        out = rotate(x, y)
        sum((o * w).sum() for o, w in zip(out, weights, strict=True)).backward()
        return [*out, x.grad, y.grad]

    got = run(lambda x, y: RotaryQK.apply(x, y, freqs, freqs, interleaved))
    want = run(lambda x, y: [_apply_rotary_pos_emb_bshd(t, freqs, interleaved) for t in (x, y)])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert not torch.equal(got[2], weights[0])  # the rotation did act on the gradient
