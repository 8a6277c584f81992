"""Critic, reference offload, and the actor's dynamic batching and bad-input handling.

The layouts run workers/critic_check.py (megatron-core on gloo vs transformers/PyTorch); the
offload mechanism is also tested alone on a plain module, on CPU and (when present) on CUDA.
"""

import pytest
import torch
from conftest import run_cases, some_slow

from tandem_core.config import RefConfig
from trainer.workers.model import ModelWorker
from trainer.workers.reference import offload_params, params_on_device, reload_params

TOL = 1e-5
LAYOUTS = {  # name: (processes, arch, TP, PP, SP, checks)
    "tp1_tied": (1, "tiny_llama_tied", 1, 1, 0, "critic,ref,dynamic"),
    "tp2": (2, "tiny_llama", 2, 1, 0, "critic,ref,dynamic"),
    "pp2": (2, "tiny_qwen2", 1, 2, 0, "critic,ref,dynamic"),
    "dp2": (2, "tiny_llama", 1, 1, 0, "critic,ref,dynamic,bad"),
}


def _check_numbers(res: dict, checks: str) -> None:
    if "critic" in checks:
        assert res["values_err"] < TOL and res["critic_param_err"] < TOL, res
        m = res["critic_metrics"]
        assert set(m) == {
            f"critic/{k}"
            for k in ("vf_loss", "vf_clipfrac", "vpred_mean", "grad_norm", "skipped_steps", "lr")
        }, m
    if "ref" in checks:
        assert res["ref_logprob_err"] < TOL, res
    if "dynamic" in checks:
        assert res["dynamic_vs_fixed_err"] < TOL, res
    if "bad" in checks:
        assert "520 tokens" in res["too_long_message"], res
        assert "max length 512" in res["too_long_message"], res
        assert "2 consecutive" in res["nan_message"], res


@pytest.fixture(scope="module")
def two_rank_results(tiny_ckpt) -> dict:
    """The fast set's 2-rank checks in one torchrun launch (conftest.run_cases): a launch's
    imports cost more than these checks."""
    tiny_ckpt("tiny_llama")  # built once here, not by every rank at once
    nproc, *dp2 = LAYOUTS["dp2"]
    return run_cases(
        "critic_check.py",
        {
            "dp2": (nproc, dp2, {}),
            "pp2_vpp2": (2, ["tiny_llama", 1, 2, 0, "critic,ref", 2], {}),
            "tp2_sp": (2, ["tiny_llama", 2, 1, 1, "critic"], {}),
        },
    )


# tied embeddings: the actor's case (test_actor.py) is in the fast set
@pytest.mark.parametrize("layout", some_slow(LAYOUTS, {"tp2", "pp2", "tp1_tied"}))
def test_critic_reference_and_batching(layout, request, torchrun, tiny_ckpt):
    nproc, arch, tp, pp, sp, checks = LAYOUTS[layout]
    if layout == "dp2":
        res = request.getfixturevalue("two_rank_results")["dp2"]
    else:
        tiny_ckpt(arch)  # built once here, not by every rank at once
        res = torchrun("critic_check.py", nproc, arch, str(tp), str(pp), str(sp), checks)
    _check_numbers(res, checks)


@pytest.mark.parametrize("nproc", some_slow([1, 2], {2}))
def test_fsdp2_critic_and_dynamic_batching(nproc, torchrun, tiny_ckpt):
    """critic.strategy=fsdp2 (value head on the transformers backbone): values and one update
    equal plain PyTorch; the FSDP2 actor's token-budget micro-batches equal fixed ones."""
    tiny_ckpt("tiny_llama")
    checks = "critic,dynamic"
    env = {"STRATEGY": "fsdp2"}
    res = torchrun("critic_check.py", nproc, "tiny_llama", "1", "1", "0", checks, env=env)
    _check_numbers(res, checks)


@pytest.mark.slow  # packing's fast case is the actor's (test_actor.py)
@pytest.mark.parametrize("layout", ["1x1", "tp2_sp", "pp2"])
def test_packed_critic_and_dynamic_batching(layout, torchrun, tiny_ckpt):
    """model.pack_sequences: values and one critic update equal plain PyTorch; packed
    token-budget micro-batches (a budget of real tokens) equal fixed ones."""
    nproc, tp, pp, sp = {"1x1": (1, 1, 1, 0), "tp2_sp": (2, 2, 1, 1), "pp2": (2, 1, 2, 0)}[layout]
    tiny_ckpt("tiny_llama")
    checks = "critic,dynamic"
    args = ("tiny_llama", str(tp), str(pp), str(sp), checks)
    res = torchrun("critic_check.py", nproc, *args, env={"PACK": "1"})
    _check_numbers(res, checks)


@pytest.mark.slow  # the actor at CP 2 is in the fast set (test_actor.py)
def test_context_parallel_critic_and_dynamic_batching(torchrun, tiny_ckpt):
    """parallel.context_parallel_size=2: values and one critic update equal plain PyTorch,
    token-budget micro-batches equal fixed ones."""
    tiny_ckpt("tiny_llama")
    checks = "critic,dynamic"
    res = torchrun("critic_check.py", 2, "tiny_llama", "1", "1", "0", checks, env={"CP": "2"})
    _check_numbers(res, checks)


def test_critic_and_reference_interleaved_vpp(two_rank_results):
    """PP 2 × 2 VPP chunks: the value head sits on the last chunk of the last stage."""
    _check_numbers(two_rank_results["pp2_vpp2"], "critic,ref")


def test_critic_tp2_sequence_parallel(two_rank_results):
    _check_numbers(two_rank_results["tp2_sp"], "critic")


# ---- the offload mechanism alone ---------------------------------------------------------------
def _tied_worker(device: str) -> ModelWorker:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(64, 16)
    head = torch.nn.Linear(16, 64, bias=False)
    head.weight = emb.weight  # one Parameter seen from two modules
    model = torch.nn.Sequential(emb, torch.nn.Linear(16, 16), head).to(device)
    return ModelWorker(args=None, config=None, chunks=[model])


def _params(worker):
    return list(dict.fromkeys(p for c in worker.chunks for p in c.parameters()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="reload goes to CUDA there: test below")
def test_offload_round_trip_cpu():
    worker = _tied_worker("cpu")
    model, ids = worker.chunks[0], torch.arange(10)[None]
    want = model(ids).detach()
    params = _params(worker)
    snapshot = [p.detach().clone() for p in params]
    ptrs = [p.data_ptr() for p in params]
    offload_params(worker)
    assert worker.offloaded
    assert all(p.data_ptr() != q for p, q in zip(params, ptrs, strict=True))
    assert all(torch.equal(p, s) for p, s in zip(params, snapshot, strict=True))
    assert model[2].weight is model[0].weight  # ties survive
    offload_params(worker)  # idempotent
    with params_on_device(worker):
        assert not worker.offloaded
        assert torch.equal(model(ids), want)
    assert worker.offloaded
    reload_params(worker)
    assert not worker.offloaded and torch.equal(model(ids), want)
    assert RefConfig().offload_params is False  # opt-in


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_moves_storage_to_pinned_host_memory_cuda():
    # Passed on an H200 (torch 2.11, megatron-core 0.16.1 carried as a wheel), 2026-11-26.
    worker = _tied_worker("cuda")
    model, ids = worker.chunks[0], torch.arange(10, device="cuda")[None]
    want = model(ids).detach()
    params = _params(worker)
    nbytes = sum(p.numel() * p.element_size() for p in params)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    offload_params(worker)
    assert all(p.device.type == "cpu" and p.is_pinned() for p in params)
    assert before - torch.cuda.memory_allocated() >= nbytes
    assert model[2].weight is model[0].weight
    with params_on_device(worker):
        assert all(p.device.type == "cuda" for p in params)
        assert torch.equal(model(ids), want)
    assert all(p.device.type == "cpu" and p.is_pinned() for p in params)
    reload_params(worker)
    assert all(p.device.type == "cuda" for p in params)
    assert torch.equal(model(ids), want)
