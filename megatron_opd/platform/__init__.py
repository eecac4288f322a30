"""Process-level platform concerns: distributed init and the CPU layer for megatron-core."""

from megatron_opd.platform.cpu_compat import cpu_compat, cuda_available, install_cpu_patches
from megatron_opd.platform.dist import DistInfo, destroy, init_distributed

__all__ = ["DistInfo", "cpu_compat", "cuda_available", "destroy", "init_distributed", "install_cpu_patches"]
