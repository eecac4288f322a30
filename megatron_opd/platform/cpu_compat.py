"""Run megatron-core 0.16 on a machine without CUDA.

megatron-core hard-codes CUDA in a few places: ``torch.cuda.current_device()`` allocations,
``device="cuda"`` literals in the pipeline schedules, ``.cuda()`` calls, and an RNG tracker that
stores CUDA generator states. On a CPU-only machine we

* map the CUDA RNG helpers onto the CPU generator (the tracker then forks CPU RNG states), and make
  ``torch.cuda.manual_seed``/``synchronize``/``current_device`` harmless, once per process
  (:func:`install_cpu_patches`);
* rewrite CUDA devices to CPU for tensor factories, ``Tensor.cuda`` and ``Tensor.to`` (and report
  CPU tensors' ``Tensor.type()`` under its CUDA name, which megatron's grad clipping asserts) inside
  :func:`cpu_compat`, a ``TorchFunctionMode``. A mode costs a Python call per torch op, so callers
  enter it only around megatron calls (model build, forward/backward, optimizer step), never around
  token-by-token generation.

Nothing here is active when CUDA is available: both functions are then no-ops.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

_PATCHED = False
_CPU = torch.device("cpu")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _is_cuda(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare index means a CUDA ordinal to torch factories
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrite every CUDA device argument to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron asserts grads are 'torch.cuda.FloatTensor' before clipping
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_compat() -> Iterator[None]:
    """Context in which megatron-core's CUDA allocations land on the CPU (no-op with CUDA)."""
    if cuda_available():
        yield
        return
    install_cpu_patches()
    with _CudaToCpu():
        yield


def _noop() -> Any:
    # A fresh function per patched name: torch.compile's rule table rejects one object
    # registered under several torch names.
    def noop(*_args: Any, **_kwargs: Any) -> None:
        return None

    return noop


def import_megatron_core() -> None:
    """Import megatron-core; on CPU with ``torch.compile`` deferred while it imports.

    megatron-core wraps its fused kernels (bias-GeLU/SwiGLU, RoPE, ...) in ``torch.compile`` when its
    modules load, which pulls in TorchDynamo and Inductor: ~2.5 of the ~7 s a process spends
    importing megatron-core and mbridge. The fusions are off on CPU (model/bridge.py), so those
    functions never run here; deferred, a wrapped function is compiled on its first call, as
    ``torch.compile`` itself would compile it. With CUDA nothing changes."""
    if "megatron.core" in sys.modules or cuda_available():
        import megatron.core  # noqa: F401
        return
    real = torch.compile

    def deferred(model: Any = None, **options: Any) -> Any:
        if model is None:  # used as @torch.compile(...)
            return lambda fn: deferred(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)

        return call

    torch.compile = deferred
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = real


def install_cpu_patches() -> None:
    """Patch the process-wide CUDA entry points megatron-core calls (idempotent, CPU only)."""
    global _PATCHED
    if _PATCHED or cuda_available():
        return
    import_megatron_core()
    from megatron.core.tensor_parallel import random as mcore_random

    def get_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
        torch.set_rng_state(new_state)

    mcore_random._get_cuda_rng_state = get_state
    mcore_random._set_cuda_rng_state = set_state
    # The tracker seeds a named state with torch.cuda.manual_seed and reads it back with
    # torch.cuda.get_rng_state; on CPU both act on the CPU generator, which the tracker restores.
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = _noop()
    torch.cuda.synchronize = _noop()
    torch.cuda.empty_cache = _noop()
    torch.cuda.current_device = lambda: 0  # an ordinal; cpu_compat() maps it to the CPU
    _gathers_in_the_mode()
    _torch_norm_with_sequence_parallel()
    _PATCHED = True


def _torch_norm_with_sequence_parallel() -> None:
    """megatron-core's torch norm (its CPU path: no transformer-engine or apex) refuses sequence parallelism,
    which an MoE layer at TP > 1 needs in training. A norm is per token, so it runs on a sequence shard as on
    the whole; its weight then has a partial gradient on each TP rank, which ``sequence_parallel=True`` has
    megatron-core sum over the TP group (finalize_model_grads), as for transformer-engine's norms."""
    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__

    def build(cls: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
        if not config.sequence_parallel:
            return original(cls, config, *args, **kwargs)
        config.sequence_parallel = False
        try:
            norm = original(cls, config, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = build


def _gathers_in_the_mode() -> None:
    """The backward pass runs inside the mode's own handler (``torch.autograd.backward`` is a torch function),
    where a mode is off: megatron-core's sequence gathers and scatters, which allocate their output on
    ``torch.cuda.current_device()``, run in a mode of their own (an MoE layer's token dispatcher calls them
    in its backward), as does the TP linear layer's backward (sequence parallelism)."""
    from megatron.core.tensor_parallel import mappings

    def in_mode(fn: Any) -> Any:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            with _CudaToCpu():
                return fn(*args, **kwargs)

        return call

    for name in ("_gather_along_first_dim", "_reduce_scatter_along_first_dim", "_gather_along_last_dim",
                 "_reduce_scatter_along_last_dim"):
        if hasattr(mappings, name):
            setattr(mappings, name, in_mode(getattr(mappings, name)))
    # under sequence parallelism a linear layer's backward gathers its input into a buffer it allocates there too
    from megatron.core.tensor_parallel import layers

    linear = layers.LinearWithGradAccumulationAndAsyncCommunication
    linear.backward = staticmethod(in_mode(linear.backward))
