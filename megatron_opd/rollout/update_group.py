"""A weight-update process group between a trainer rank and rollout servers.

It is a standalone group (its own TCPStore), separate from the trainer's default group, like
SGLang's ``/init_weights_update_group``: trainer rank 0 is rank 0 and broadcasts; each server joins
at ``rank_offset``. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import socket
import threading
import time
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


def _left(deadline: float) -> timedelta:
    return timedelta(seconds=max(1.0, deadline - time.monotonic()))


def _wait_for_listener(host: str, port: int, deadline: float) -> None:
    """Until ``deadline``: something accepts connections at ``host:port`` (the master's store), else RuntimeError."""
    while True:
        try:
            socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no weight-update master listening at {host}:{port} ({exc.strerror or exc}); "
                                   "gave up at the group timeout") from None
            time.sleep(0.2)


class WeightUpdateGroup:
    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 backend: str = "gloo", timeout_s: float = 300.0) -> None:
        if backend not in ("gloo", "nccl"):  # before the store: a bad backend fails at once, not after a wait
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA; use backend 'gloo' on CPU")
        deadline = time.monotonic() + timeout_s
        self.rank, self.world_size = rank, world_size
        if rank != 0:  # torch's store client takes about twice its timeout to give up: wait for the master here
            _wait_for_listener(master_address, master_port, deadline)
        # torch's store client waits forever for a listener that accepts and never answers (not a store): the
        # join runs in a thread bounded by the one budget
        joined: dict = {}
        joining = threading.Thread(target=self._join, args=(master_address, master_port, rank, world_size, backend,
                                                            deadline, joined), daemon=True)
        joining.start()
        joining.join(max(0.0, deadline - time.monotonic()) + 1.0)
        if joining.is_alive():
            raise RuntimeError(f"joining the weight-update group at {master_address}:{master_port} did not finish "
                               f"within {timeout_s:.0f} s (does a torch store of a trainer listen there?)")
        if "error" in joined:
            raise joined["error"]
        self._store, self._pg = joined["store"], joined["pg"]

    @staticmethod
    def _join(host: str, port: int, rank: int, world_size: int, backend: str, deadline: float, joined: dict) -> None:
        try:
            # the store and gloo's pairs listen on the address given (loopback for a local job), never on all
            store = bound_store(host, port, world_size, rank == 0, _left(deadline))
            timeout = _left(deadline)  # what is left of the one budget, for the group's own rendezvous
            if backend == "nccl":
                pg = dist.ProcessGroupNCCL(store, rank, world_size)
            elif (device := gloo_device_for(host)) is None:
                pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
            else:
                options = dist.ProcessGroupGloo._Options()
                options._devices, options._timeout = [device], timeout
                pg = dist.ProcessGroupGloo(store, rank, world_size, options)
            joined.update(store=store, pg=pg)
        except BaseException as exc:  # noqa: BLE001  (handed to the caller's thread)
            joined["error"] = exc

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
