"""Conformance worker: one backend, one engine, every check of the rollout contract.

argv: <backend> <rollout tp> <hf checkpoint dir>. Run under torchrun; each rank asserts, rank 0
writes the numbers. The reference is plain transformers in fp32: a greedy loop over the
unpadded prompt (no cache) and a full-sequence forward for log-probs.
"""

from __future__ import annotations

import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
import torch.distributed as dist
from _common import exit_now, write_result

from rollout import build_rollout
from rollout.assemble import cut_at_eos
from rollout.sampling import SamplingSettings
from tandem_core.config import RolloutConfig
from tandem_core.distributed import init_distributed
from tandem_core.protocol import Batch

R = 10  # response_length
MAX_LEN = 48  # engine max_model_len
# fp32 on CPU. On GPUs vLLM's Triton attention computes fp32 dots in TF32 (seen 6.9e-4 on an
# H100 with vLLM 0.24), so GPU runs pass a looser bound through the environment.
LOGP_TOL = float(os.environ.get("ROLLOUT_LOGP_TOL", "1e-4"))


def left_pad(token_lists: list[list[int]], pad: int, meta=None, non_tensors=None) -> Batch:
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(token_lists):
        ids[i, width - len(t) :] = torch.tensor(t)
        mask[i, width - len(t) :] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return Batch.from_dict(
        {"input_ids": ids, "attention_mask": mask, "position_ids": pos}, non_tensors, meta
    )


@torch.no_grad()
def ref_greedy(model, prompt: list[int], steps: int) -> list[int]:
    x = torch.tensor([prompt])
    for _ in range(steps):
        x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(prompt) :].tolist()


@torch.no_grad()
def ref_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    x = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(x).logits[0].float(), dim=-1)
    idx = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
    return logp[idx, torch.tensor(response)]


def expect_error(fn, *words: str) -> str:
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        assert all(w in msg for w in words), f"error {msg!r} should name {words}"
        return msg
    raise AssertionError(f"no ValueError (expected one naming {words})")


def main() -> None:
    backend, tp, ckpt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    init_distributed()
    rank = dist.get_rank()
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    cfg = RolloutConfig(name=backend, tensor_model_parallel_size=tp, response_length=R, seed=0)
    rng_before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    t0 = time.time()
    ro = build_rollout(cfg, ckpt, dtype="float32", max_model_len=MAX_LEN)
    start_s = time.time() - t0
    assert ro.tp_size == tp and ro.dp_size == dist.get_world_size() // tp
    assert ro.dp_rank == rank // tp
    eos_model, pad = ro.eos_ids, ro.pad_id

    # Mixed lengths; each rollout DP group gets its own prompts, TP ranks of a group the same.
    g = torch.Generator().manual_seed(1000 + ro.dp_rank)
    lengths = [3, 17, 9, 1, 12]
    prompts = [torch.randint(4, 120, (n,), generator=g).tolist() for n in lengths]
    uids = [f"d{ro.dp_rank}p{i}" for i in range(len(prompts))]
    out: dict = {"start_s": start_s}
    tp_group_ranks = list(range(ro.dp_rank * tp, ro.dp_rank * tp + tp))
    tp_group = None
    for d in range(dist.get_world_size() // tp):  # every rank must create every group
        grp = dist.new_group(list(range(d * tp, d * tp + tp)))
        if d == ro.dp_rank:
            tp_group = grp

    def same_on_tp_group(t: torch.Tensor) -> None:
        if tp == 1:
            return
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=tp_group)
        assert all(torch.equal(parts[0], p) for p in parts), f"TP ranks {tp_group_ranks} differ"

    def settings(**kw) -> SamplingSettings:
        base = dict(
            n=1,
            temperature=0.0,
            top_p=1.0,
            top_k=-1,
            response_length=R,
            eos_token_ids=eos_model,
            pad_token_id=pad,
            seed=None,
        )
        return SamplingSettings(**{**base, **kw})

    def check_layout(batch: Batch, src: Batch, n: int, rlen: int) -> None:
        b, p = src["input_ids"].shape
        assert batch["prompts"].shape == (b * n, p) and batch["responses"].shape == (b * n, rlen)
        for key in ("input_ids", "attention_mask", "position_ids"):
            assert batch[key].shape == (b * n, p + rlen), (key, batch[key].shape)
        assert batch["response_mask"].shape == (b * n, rlen)
        assert batch["rollout_log_probs"].shape == (b * n, rlen)
        for key in ("prompts", "responses", "input_ids", "position_ids"):
            assert batch[key].dtype == torch.long, (key, batch[key].dtype)
        assert batch["attention_mask"].dtype == src["attention_mask"].dtype
        assert batch["response_mask"].dtype == src["attention_mask"].dtype
        assert batch["rollout_log_probs"].dtype == torch.float32
        rep = torch.arange(b).repeat_interleave(n)  # samples of one prompt adjacent
        assert torch.equal(batch["prompts"], src["input_ids"][rep])
        assert torch.equal(batch["input_ids"][:, :p], src["input_ids"][rep])
        assert torch.equal(batch["input_ids"][:, p:], batch["responses"])
        assert torch.equal(batch["attention_mask"][:, :p], src["attention_mask"][rep])
        assert torch.equal(batch["attention_mask"][:, p:], batch["response_mask"])
        last = src["position_ids"][rep, -1:]
        assert torch.equal(batch["position_ids"][:, p:], last + torch.arange(1, rlen + 1))
        assert torch.equal(batch["position_ids"][:, :p], src["position_ids"][rep])
        for key, vals in src.non_tensors.items():
            assert list(batch[key]) == [vals[i] for i in rep.tolist()], key
        mask = batch["response_mask"]
        # Right padding: a mask of ones then zeros; pad id and log-prob 0 after.
        assert torch.equal(mask, mask.cummin(dim=1).values), "response mask not right-padded"
        assert bool((batch["responses"][mask == 0] == pad).all())
        assert bool((batch["rollout_log_probs"][mask == 0] == 0).all())

    def check_logprobs(batch: Batch, token_lists: list[list[int]], n: int) -> float:
        worst = 0.0
        for row in range(len(batch)):
            k = int(batch["response_mask"][row].sum())
            resp = batch["responses"][row, :k].tolist()
            want = ref_logprobs(ref, token_lists[row // n], resp)
            got = batch["rollout_log_probs"][row, :k]
            worst = max(worst, float((got - want).abs().max()))
        assert worst <= LOGP_TOL, f"log-prob mismatch {worst:.2e} > {LOGP_TOL}"
        return worst

    # 1. greedy vs the HF reference, full layout, log-probs
    refs = [ref_greedy(ref, p, R) for p in prompts]
    greedy_in = left_pad(prompts, pad, {"sampling": {"do_sample": False}}, {"uid": uids})
    t = time.time()
    greedy = ro.generate_sequences(greedy_in)
    out["greedy_s"] = time.time() - t
    check_layout(greedy, greedy_in, 1, R)
    s_greedy = settings()
    for i, r in enumerate(refs):
        k = cut_at_eos(r, s_greedy)
        assert greedy["responses"][i, :k].tolist() == r[:k], (i, greedy["responses"][i], r)
        assert int(greedy["response_mask"][i].sum()) == k
    out["greedy_logp_maxdiff"] = check_logprobs(greedy, prompts, 1)
    same_on_tp_group(greedy["responses"])

    # 2. EOS: stop on a token that greedy decoding really emits at step k >= 1 (when any).
    pick = next(
        ((i, k) for i, r in enumerate(refs) for k in range(1, R) if r[k] not in r[:k]), (0, 0)
    )
    stop = refs[pick[0]][pick[1]]
    s_eos = settings(eos_token_ids=tuple(dict.fromkeys(eos_model + (stop,))))
    eos_batch = ro.generate_sequences(
        left_pad(prompts, pad, {"sampling": {"do_sample": False, "stop_token_ids": [stop]}})
    )
    for i, r in enumerate(refs):
        k = cut_at_eos(r, s_eos)
        assert eos_batch["responses"][i, :k].tolist() == r[:k]
        assert eos_batch["response_mask"][i].tolist() == [1] * k + [0] * (R - k), (i, k)
        assert bool((eos_batch["responses"][i, k:] == pad).all())
    assert int(eos_batch["response_mask"][pick[0]].sum()) == pick[1] + 1  # EOS is masked in
    assert int(eos_batch["responses"][pick[0], pick[1]]) == stop
    out["eos_step"] = pick[1]

    # 3. n > 1 sampling at temperature 1: adjacency, log-probs, reproducibility, TP agreement
    n = 3
    samp_meta = {"sampling": {"n": n, "temperature": 1.0, "seed": 7}}
    samp_in = left_pad(prompts, pad, samp_meta, {"uid": uids})
    sampled = ro.generate_sequences(samp_in)
    check_layout(sampled, samp_in, n, R)
    out["sampled_logp_maxdiff"] = check_logprobs(sampled, prompts, n)
    groups = sampled["responses"].view(len(prompts), n, R)
    assert any(not torch.equal(grp[0], grp[j]) for grp in groups for j in range(1, n)), (
        "the n samples of every prompt are identical"
    )
    again = ro.generate_sequences(samp_in)
    assert torch.equal(again["responses"], sampled["responses"]), "same seed, different samples"
    same_on_tp_group(sampled["responses"])
    unseeded = ro.generate_sequences(left_pad(prompts, pad, {"sampling": {"n": 2}}))
    same_on_tp_group(unseeded["responses"])
    out["mean_sampled_len"] = float(sampled["response_mask"].sum(1).float().mean())
    # Engine start and sampling leave the trainer's RNG streams alone.
    assert torch.equal(torch.get_rng_state(), rng_before[0]), "torch RNG state changed"
    assert random.getstate() == rng_before[1], "python RNG state changed"
    assert np.array_equal(np.random.get_state()[1], rng_before[2]), "numpy RNG state changed"

    # top_k=-1 is really "no top-k" (transformers' default would be 50) and top_k=5 is 5:
    # many first tokens of one prompt at temperature 2 (vLLM allows at most 2).
    def first_tokens(**over) -> set[int]:
        meta = {"sampling": {"n": 200, "temperature": 2.0, "response_length": 1, "seed": 1, **over}}
        return set(
            ro.generate_sequences(left_pad(prompts[:1], pad, meta))["responses"][:, 0].tolist()
        )

    out["distinct_first_tokens"] = len(first_tokens())
    assert out["distinct_first_tokens"] > 60, out["distinct_first_tokens"]
    assert len(first_tokens(top_k=5)) <= 5

    # 4. max-tokens boundary: prompt + response_length == max_model_len is accepted
    edge_prompt = torch.randint(4, 120, (MAX_LEN - R,), generator=g).tolist()
    edge = ro.generate_sequences(
        left_pad([edge_prompt, [5, 6]], pad, {"sampling": {"do_sample": False}})
    )
    edge_ref = ref_greedy(ref, edge_prompt, R)
    k = cut_at_eos(edge_ref, s_greedy)
    assert edge["responses"][0, :k].tolist() == edge_ref[:k]
    full_rows = [i for i in range(len(greedy)) if cut_at_eos(refs[i], s_greedy) == R]
    for i in full_rows:  # rows without EOS fill all R slots, and stop there
        assert int(greedy["response_mask"][i].sum()) == R
    short = ro.generate_sequences(
        left_pad(prompts, pad, {"sampling": {"do_sample": False, "max_new_tokens": 4}})
    )
    assert short["responses"].shape == (len(prompts), 4)
    for i, r in enumerate(refs):
        kk = cut_at_eos(r, settings(response_length=4))
        assert short["responses"][i, :kk].tolist() == r[:kk]

    # 5. bad input: clear errors, nothing returned, the engine still works afterwards
    expect_error(
        lambda: ro.generate_sequences(
            left_pad([edge_prompt + [7]], pad, {"sampling": {"do_sample": False}})
        ),
        "too long",
        "max_model_len",
    )
    empty = left_pad(prompts[:2], pad)
    empty.tensors["attention_mask"][1] = 0
    expect_error(lambda: ro.generate_sequences(empty), "empty prompt", "row 1")
    expect_error(
        lambda: ro.generate_sequences(left_pad(prompts, pad, {"sampling": {"n": 0}})),
        "n must be >= 1",
    )
    expect_error(
        lambda: ro.generate_sequences(left_pad(prompts, pad, {"sampling": {"temprature": 0.5}})),
        "temprature",
    )
    expect_error(
        lambda: ro.generate_sequences(
            Batch.from_dict(
                {
                    "input_ids": torch.zeros(0, 4, dtype=torch.long),
                    "attention_mask": torch.zeros(0, 4, dtype=torch.long),
                    "position_ids": torch.zeros(0, 4, dtype=torch.long),
                }
            )
        ),
        "empty prompt batch",
    )
    after = ro.generate_sequences(greedy_in)
    assert torch.equal(after["responses"], greedy["responses"])

    # 6. hooks: sleep/wake keeps outputs; load_weights really changes the engine's weights
    ro.sleep(level=1)
    ro.wake_up()
    assert torch.equal(ro.generate_sequences(greedy_in)["responses"], greedy["responses"])
    original = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "mlp.down_proj" in name:
                p.mul_(3.0)
    t = time.time()
    ro.load_weights(list(ref.state_dict().items()))
    out["load_weights_s"] = time.time() - t
    changed = ro.generate_sequences(greedy_in)
    refs_new = [ref_greedy(ref, p, R) for p in prompts]
    assert refs_new != refs, "the perturbation did not change greedy outputs"
    for i, r in enumerate(refs_new):
        kk = cut_at_eos(r, s_greedy)
        assert changed["responses"][i, :kk].tolist() == r[:kk], (i, changed["responses"][i], r)
    out["updated_logp_maxdiff"] = check_logprobs(changed, prompts, 1)
    ro.load_weights(list(original.items()))
    restored = ro.generate_sequences(greedy_in)
    assert torch.equal(restored["responses"], greedy["responses"])

    dist.barrier()
    write_result(out)
    if rank == 0:
        print("conformance ok", backend, tp, out, flush=True)


if __name__ == "__main__":
    main()
    exit_now()
