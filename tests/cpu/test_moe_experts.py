"""TorchGroupedMLP (tandem_core/moe.py): megatron's MoE experts through `torch._grouped_mm`
equal megatron's SequentialMLP on the same weights (fp32, CPU): the experts alone for several
activations and token counts (zeros, T = 0), a full MoELayer (softmax top-2 router, alltoall
dispatcher) at expert parallelism 1 and 2, and dist checkpoints either way; and Tandem's
DeviceIndexDispatcher equals megatron's all-to-all dispatcher bitwise at EP 1 and 2.

Everything megatron runs in torchrun workers (tests/cpu/workers/moe_experts_ep.py): megatron
on CPU patches torch.cuda process-wide, which the rest of the suite must not see.
"""

import pytest
import torch

OUT_ATOL = 1e-6  # outputs, absolute (values ~1)
GRAD_RTOL = 1e-6  # gradients, relative to the largest reference entry (sums over tokens)


def assert_close(diffs: dict, where: str) -> None:
    """diffs: name -> [max |grouped - sequential|, max |sequential|]."""
    for name, (diff, scale) in diffs.items():
        tol = OUT_ATOL if name == "out" else GRAD_RTOL * max(1.0, scale)
        assert diff <= tol, f"{where} {name}: max diff {diff:.3g} > {tol:.3g} (scale {scale:.3g})"


@pytest.fixture(scope="module")
def ep1(tmp_path_factory):
    from conftest import run_torchrun

    out = tmp_path_factory.mktemp("moe_ep1")
    return out, run_torchrun("moe_experts_ep.py", 1, str(out))


def test_experts_match_sequential(ep1):
    units = ep1[1]["units"]
    assert set(units) == {
        "swiglu",
        "swiglu_recompute",
        "gelu",
        "swiglu_clamp_offset",
        "unaligned_loop",
    }
    for config, r in units.items():
        assert_close(r["diffs"], config)
        assert r["weight_grads_present"], config  # T = 0 too: zero, not missing, gradients
        assert r["weight_grads_contiguous"], config
        # Rows of 6 fp32 (24 bytes) are not 16-byte aligned: the per-expert loop runs.
        assert r["use_grouped_mm"] == (config != "unaligned_loop"), config


def test_sequential_grouped_roundtrip_is_bitwise(ep1):
    for config, r in ep1[1]["units"].items():
        assert r["roundtrip_exact"], config


def test_weights_carry_grouped_mlp_attributes(ep1):
    """GroupedMLP's tensor attributes, the expert-TP axis turned with the layout: weight1
    [E·2f, h] is split along its rows, weight2 [E·h, f] along its columns."""
    attrs = ep1[1]["attrs"]
    assert attrs["weight1"] == dict(
        allreduce=True, tensor_model_parallel=True, partition_dim=0, partition_stride=1
    )
    assert attrs["weight2"] == dict(
        allreduce=True, tensor_model_parallel=True, partition_dim=1, partition_stride=1
    )


def test_moe_layer_ep1(ep1):
    r = ep1[1]
    assert r["experts_class"] == "TorchGroupedMLP" and r["use_grouped_mm"]
    assert r["num_local_experts"] == 8
    assert_close(r["layer"], "MoELayer EP1")


def assert_dispatch(r: dict, ep: int) -> None:
    """DeviceIndexDispatcher = megatron's all-to-all dispatcher, bitwise, for both experts
    modules; at EP 1 it never synchronises, at EP 2 once (the all-to-all's split sizes), and
    the received chunks are sorted by local expert on the device."""
    assert r["chunk_index_equal"]
    assert r["short_map_raises"]
    for experts in ("grouped", "sequential"):
        d = r[experts]
        assert d["bitwise_equal"], (experts, ep)
        assert d["counts_are_tensors"], experts
        assert d["tokens"] > 0, experts
        assert d["sorts_chunks"] == (ep > 1), (experts, ep)
        assert d["sync_point"] == ("before_ep_alltoall" if ep > 1 else "no_sync"), (experts, ep)


def test_device_index_dispatcher_ep1(ep1):
    assert_dispatch(ep1[1]["dispatch"], 1)


def test_dist_checkpoint_compat_ep1(ep1):
    assert ep1[1]["ckpt"] == {
        "same_ep": {"seq_to_grouped_exact": True, "grouped_to_seq_exact": True}
    }


def test_moe_layer_ep2(ep1, torchrun, tmp_path):
    """EP 2 over gloo: grouped = sequential on each rank, the full output and gradients equal
    EP 1's, and EP 1's SequentialMLP checkpoint loads into the EP 2 TorchGroupedMLP layer."""
    ep1_dir, _ = ep1
    r = torchrun("moe_experts_ep.py", 2, str(tmp_path), str(ep1_dir / "ckpt_seq_ep1"))
    assert r["world"] == 2 and r["num_local_experts"] == 4
    assert r["experts_class"] == "TorchGroupedMLP" and r["use_grouped_mm"]
    assert r["allreduce"] == [False, False]  # expert-parallel weights skip the DP all-reduce
    assert_close(r["layer"], "MoELayer EP2")
    assert_dispatch(r["dispatch"], 2)
    for label in ("same_ep", "other_ep"):
        assert r["ckpt"][label] == {"seq_to_grouped_exact": True, "grouped_to_seq_exact": True}
    ref, got = torch.load(ep1_dir / "moe_ep1.pt"), torch.load(tmp_path / "moe_ep2.pt")
    assert ref.keys() == got.keys()
    for name, t in ref.items():
        tol = OUT_ATOL if name == "out" else GRAD_RTOL * max(1.0, t.abs().max().item())
        torch.testing.assert_close(got[name], t, rtol=0, atol=tol, msg=name)
