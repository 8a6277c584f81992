"""The reference policy: the actor's model without an optimizer, optionally kept in host memory
between uses (`ref.offload_params`).

The reference is used once per iteration (its log-probs for the KL term), so on GPU its
weights need not occupy device memory while rollouts and updates run. Offloading moves each
parameter's storage into pinned host memory (`param.data` swap, so every module keeps its
Parameter objects); reloading moves it back. The same code runs on CPU, where the "device" is
the host: offload still copies into fresh host storage and reload is then a no-op move.
"""

from __future__ import annotations

import contextlib

import torch

from tandem_core import cpu_compat
from tandem_core.config import ActorConfig, RefConfig
from tandem_core.protocol import Batch
from trainer.workers.actor import PolicyActor
from trainer.workers.model import ModelWorker


def _unique_params(worker: ModelWorker) -> list[torch.nn.Parameter]:
    # Tied weights are one Parameter seen from two modules: move it once.
    seen, params = set(), []
    for chunk in worker.chunks:
        for p in chunk.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


@torch.no_grad()
def offload_params(worker: ModelWorker) -> None:
    """Parameters' storage → host memory (pinned where CUDA is present, for fast copies back)."""
    if worker.offloaded:
        return
    pin = cpu_compat.cuda_available()
    for p in _unique_params(worker):
        host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
        host.copy_(p.data, non_blocking=pin)
        p.data = host
    if pin:
        torch.cuda.synchronize()  # the device copies are freed; the host ones must be complete
    worker.offloaded = True


@torch.no_grad()
def reload_params(worker: ModelWorker) -> None:
    """Parameters' storage → the compute device."""
    if not worker.offloaded:
        return
    device = cpu_compat.device()
    for p in _unique_params(worker):
        p.data = p.data.to(device, non_blocking=True)
    worker.offloaded = False


@contextlib.contextmanager
def params_on_device(worker: ModelWorker):
    """Within the block the parameters are on the device; an offloaded worker goes back after."""
    was_offloaded = worker.offloaded
    reload_params(worker)
    try:
        yield worker
    finally:
        if was_offloaded:
            offload_params(worker)


class ReferencePolicy:
    """Reference log-probs from a frozen copy of the initial policy."""

    def __init__(
        self,
        worker: ModelWorker,
        actor_cfg: ActorConfig,
        ref_cfg: RefConfig,
        temperature: float = 1.0,
    ):
        if worker.optimizer is not None:
            raise ValueError("the reference model is built without an optimizer")
        self.worker = worker
        # The actor's micro-batching and log-prob code, on a model that never trains.
        self._policy = PolicyActor(worker, actor_cfg, temperature)
        if ref_cfg.offload_params:
            offload_params(worker)

    def compute_ref_log_prob(self, batch: Batch) -> Batch:
        """Batch with `ref_log_probs` [B, R]."""
        with params_on_device(self.worker):
            out = self._policy.compute_log_prob(batch)
        return Batch.from_dict({"ref_log_probs": out["log_probs"]})
