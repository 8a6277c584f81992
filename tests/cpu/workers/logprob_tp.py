"""Vocab-parallel log-probs over 3 gloo ranks equal torch's log_softmax of the whole vocabulary,
values and gradients, including a rank whose slice is padding only (its max is -inf).

Vocab 40 padded to 48: rank 0 holds columns 0-15, rank 1 16-31, rank 2 32-47 (8 real, 8 pad);
a second case with vocab 30 leaves rank 2 with padding only."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _common import exit_now, write_result  # noqa: E402

from trainer.workers.logprobs import vocab_parallel_logprobs  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
errors = {}
for vocab in (40, 30):
    torch.manual_seed(0)  # the same full logits on every rank
    padded, v_local = 48, 48 // world
    logits = torch.randn(6, padded, dtype=torch.float64) * 4
    labels = torch.randint(0, vocab, (6,))
    w_lp, w_h = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)

    full = logits[:, :vocab].clone().requires_grad_()
    ref_all = torch.log_softmax(full, -1)
    ref_lp = ref_all.gather(-1, labels[:, None]).squeeze(-1)
    ref_h = -(ref_all.exp() * ref_all).sum(-1)
    ((ref_lp * w_lp).sum() + (ref_h * w_h).sum()).backward()

    mine = logits[:, rank * v_local : (rank + 1) * v_local].clone().requires_grad_()
    lp, h = vocab_parallel_logprobs(mine, labels, vocab, tp_group=dist.group.WORLD, tp_rank=rank)
    ((lp * w_lp).sum() + (h * w_h).sum()).backward()

    want_grad = torch.zeros(6, padded, dtype=torch.float64)
    want_grad[:, :vocab] = full.grad
    want_grad = want_grad[:, rank * v_local : (rank + 1) * v_local]
    torch.testing.assert_close(lp, ref_lp.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, ref_h.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.grad, want_grad, rtol=1e-5, atol=1e-6)
    errors[vocab] = float((lp - ref_lp).detach().abs().max())
write_result(errors)
dist.barrier()
dist.destroy_process_group()
exit_now()
