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


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot_dim", [16, 8])  # 8 of 16: a partial rotary dim
def test_rope_kernel_equals_megatron_rope(monkeypatch, interleaved, rot_dim):
    """RotaryQK's CUDA kernel (tandem_core/rope_kernel.py), run by Triton's interpreter: q and
    k as the QKV split leaves them (strided views), forward and transpose (sign −1), equal to
    megatron's eager RoPE; a bf16 input rounds once."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from tandem_core import rope_kernel

    rope_kernel._kernel.cache_clear()
    try:
        torch.manual_seed(0)
        s, b, heads, groups, dim = 5, 3, 4, 2, 16
        angles = torch.outer(torch.arange(s, dtype=torch.float32), torch.rand(rot_dim // 2) + 0.1)
        if interleaved:
            freqs = torch.stack([angles, angles], dim=-1).flatten(-2)
        else:
            freqs = torch.cat([angles, angles], dim=-1)
        freqs = freqs[:, None, None, :]
        mixed = torch.randn(s, b, groups, (heads // groups + 2) * dim)  # megatron's QKV output
        q, k, _ = mixed.split([heads // groups * dim, dim, dim], dim=-1)
        q = q.reshape(s, b, heads, dim)  # as megatron reshapes it
        q = q.transpose(0, 1).contiguous().transpose(0, 1)  # and s, b strides swapped
        assert not k.is_contiguous() and not q.is_contiguous()
        for x in (q, k):
            for sign in (1.0, -1.0):
                got = rope_kernel.rotate(x, freqs, interleaved, sign)
                want = _apply_rotary_pos_emb_bshd(x, freqs * sign, interleaved)
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
                assert got.is_contiguous()
            back = rope_kernel.rotate(
                rope_kernel.rotate(x, freqs, interleaved, 1.0), freqs, interleaved, -1.0
            )
            torch.testing.assert_close(back, x.contiguous(), rtol=1e-5, atol=1e-5)
        half = rope_kernel.rotate(k.bfloat16(), freqs, interleaved, 1.0)
        assert half.dtype == torch.bfloat16
        want = _apply_rotary_pos_emb_bshd(k.double(), freqs.double(), interleaved)
        torch.testing.assert_close(half.double(), want, rtol=8e-3, atol=8e-3)
    finally:
        rope_kernel._kernel.cache_clear()
    with pytest.raises(ValueError, match="freqs"):
        rope_kernel.rotate(k, freqs[:, :, :, :3], interleaved, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_equals_autograd_of_silu_gate(monkeypatch, dtype):
    """The Triton SwiGLU handed to megatron (tandem_core/swiglu_kernel.py), run by Triton's
    interpreter: forward silu(y₁)·y₂ and backward equal torch's autograd of the same math
    (float64), with widths that do and do not fill a block; megatron's SwiGLUFunction calls
    it only for contiguous CUDA tensors."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from megatron.core.fusions import fused_bias_swiglu as fused

    from tandem_core import swiglu_kernel

    swiglu_kernel._kernels.cache_clear()
    monkeypatch.setattr(swiglu_kernel, "BLOCK", 32)
    try:
        torch.manual_seed(0)
        for width in (32, 40):
            y = (torch.randn(3, 2, 2 * width) * 3).to(dtype)
            g = torch.randn(3, 2, width).to(dtype)
            ref = y.double().requires_grad_()
            out = torch.nn.functional.silu(ref[..., :width]) * ref[..., width:]
            out.backward(g.double())
            tol = (
                {"rtol": 1e-5, "atol": 1e-5}
                if dtype == torch.float32
                else {"rtol": 1e-2, "atol": 2e-2}
            )
            got = swiglu_kernel.swiglu(y)
            assert got.dtype == dtype and got.shape == g.shape
            torch.testing.assert_close(got.double(), out.detach(), **tol)
            torch.testing.assert_close(swiglu_kernel.swiglu_back(g, y).double(), ref.grad, **tol)
    finally:
        swiglu_kernel._kernels.cache_clear()
    swiglu_kernel.install()
    assert fused.swiglu.tandem_kernel and fused.swiglu_back.tandem_kernel
    assert not swiglu_kernel._takes(y)  # a CPU tensor: megatron's own function


def test_multi_tensor_standins_equal_megatrons_fallbacks_without_a_sync_per_tensor():
    """tandem_core/multi_tensor.py against megatron's own no-apex fallbacks: the same L2 norm
    and scaled copies (a cast, in place), and the norm asks the host for no value at all
    (megatron's asks once per tensor)."""
    from megatron.core import utils
    from torch.utils._python_dispatch import TorchDispatchMode

    from tandem_core import cpu_compat, multi_tensor

    class CountSyncs(TorchDispatchMode):
        syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountSyncs.syncs += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    grads = [torch.randn(n) * (i + 1) for i, n in enumerate((7, 300, 1, 64))]
    with CountSyncs():
        got, each = multi_tensor.l2_norm(2048, None, [grads], True)
    assert CountSyncs.syncs == 0
    with cpu_compat.megatron_device_scope():  # megatron's fallback names "cuda"
        want, _ = utils.local_multi_tensor_applier(
            utils.local_multi_tensor_l2_norm, None, [grads], False
        )
    torch.testing.assert_close(got, want.to(got.device), rtol=1e-6, atol=0)
    torch.testing.assert_close(each, torch.stack([g.norm() for g in grads]))

    halves = [torch.empty(g.shape, dtype=torch.bfloat16) for g in grads]
    multi_tensor.scale(2048, None, [grads, halves], 1.0)  # fp32 main params -> bf16 model params
    assert all(torch.equal(h, g.bfloat16()) for h, g in zip(halves, grads, strict=True))
    scaled = [torch.empty_like(g) for g in grads]
    multi_tensor.scale(2048, None, [grads, scaled], 0.25)
    assert all(torch.equal(s, g * 0.25) for s, g in zip(scaled, grads, strict=True))
    before = [g.clone() for g in grads]
    multi_tensor.scale(2048, None, [grads, grads], 0.5)  # clipping: in place
    assert all(torch.equal(g, b * 0.5) for g, b in zip(grads, before, strict=True))


def test_stand_ins_install_and_uninstall_in_megatrons_modules():
    """What build_transformer_config hands megatron, and plain megatron-core's benchmark row
    takes back: megatron's own functions again after uninstall, ours after install."""
    from megatron.core import utils
    from megatron.core.fusions import fused_bias_swiglu as fused
    from megatron.core.optimizer import clip_grads, optimizer

    from tandem_core import multi_tensor, swiglu_kernel

    swiglu_kernel.install()
    multi_tensor.install()
    own = fused.swiglu.megatron_own
    try:
        assert clip_grads.l2_norm_impl is multi_tensor.l2_norm
        assert clip_grads.multi_tensor_scale_impl is optimizer.multi_tensor_scale_impl
        assert optimizer.multi_tensor_scale_impl is multi_tensor.scale
        swiglu_kernel.uninstall()
        multi_tensor.uninstall()
        assert fused.swiglu is own and not hasattr(fused.swiglu_back, "tandem_kernel")
        assert clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm
        assert optimizer.multi_tensor_scale_impl is utils.local_multi_tensor_scale
    finally:
        swiglu_kernel.install()
        multi_tensor.install()
    assert fused.swiglu.tandem_kernel and clip_grads.l2_norm_impl is multi_tensor.l2_norm
