"""A weight-update process group between a trainer rank and rollout servers.

It is a standalone group (its own TCPStore), separate from the trainer's default group, like
SGLang's ``/init_weights_update_group``: trainer rank 0 is rank 0 and broadcasts; each server joins
at ``rank_offset``. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_opd.platform.dist import bound_store, gloo_device_for

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


FLATTENED_BUCKET = "flattened_bucket"  # SGLang's load_format: one uint8 buffer per bucket


def flatten_bucket(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate the raw bytes of ``tensors`` in order (SGLang's ``flattened_bucket`` layout)."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def bucket_nbytes(dtypes: list[str], shapes: list[list[int]]) -> list[int]:
    sizes = []
    for dtype, shape in zip(dtypes, shapes):
        numel = 1
        for dim in shape:
            numel *= dim
        sizes.append(numel * torch.empty((), dtype=parse_dtype(dtype)).element_size())
    return sizes


def parse_dtype(name: str) -> torch.dtype:
    key = name.replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[key]


class WeightUpdateGroup:
    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 backend: str = "gloo", timeout_s: float = 300.0) -> None:
        if backend not in ("gloo", "nccl"):  # before the store: a bad backend fails at once, not after a wait
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA; use backend 'gloo' on CPU")
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world_size = rank, world_size
        # the store and gloo's pairs listen on the address given (loopback for a local job), never on all
        self._store = bound_store(master_address, master_port, world_size, rank == 0, timeout)
        if backend == "gloo":
            device = gloo_device_for(master_address)
            if device is None:
                self._pg = dist.ProcessGroupGloo(self._store, rank, world_size, timeout)
            else:
                options = dist.ProcessGroupGloo._Options()
                options._devices, options._timeout = [device], timeout
                self._pg = dist.ProcessGroupGloo(self._store, rank, world_size, options)
        else:
            self._pg = dist.ProcessGroupNCCL(self._store, rank, world_size)

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        self._pg.broadcast([tensor], opts).wait()
        return tensor

    def close(self) -> None:
        """Leave the group (the store and the gloo/NCCL pairs are released)."""
        shutdown = getattr(self._pg, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except RuntimeError:
                pass
        self._pg = None
        self._store = None
