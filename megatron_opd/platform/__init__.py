"""Process-level platform concerns: distributed init and the CPU layer for megatron-core
(``platform.cpu_compat``).

The names below load on first use (PEP 562), so a process that needs only ``platform.net`` (the
CLI before it starts any worker) does not import torch."""

import importlib

_HOMES = {
    "cuda_available": "megatron_opd.platform.cpu_compat",
    "install_cpu_patches": "megatron_opd.platform.cpu_compat",
    "DistInfo": "megatron_opd.platform.dist",
    "destroy": "megatron_opd.platform.dist",
    "init_distributed": "megatron_opd.platform.dist",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
