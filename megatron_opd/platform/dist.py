"""torch.distributed + megatron-core parallel-state initialisation (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_opd.platform.cpu_compat import cuda_available, import_megatron_core, install_cpu_patches
from megatron_opd.platform.net import free_port, is_loopback


class ParallelLayoutError(ValueError):
    """The requested TP x PP x DP layout does not fit the processes that were started."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    backend: str


def bound_store(host: str, port: int, world_size: int, is_master: bool, timeout: timedelta) -> "dist.TCPStore":
    """A TCPStore whose server listens on ``host`` only: torch's own binds every interface, so the
    master binds the socket itself and hands it over (``master_listen_fd``)."""
    if not is_master:
        return dist.TCPStore(host, port, world_size, False, timeout=timeout)
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port} for the rendezvous store: {exc}") from None
    return dist.TCPStore(host, port, world_size, True, timeout=timeout, use_libuv=True,
                         master_listen_fd=sock.detach())  # the store owns the socket from here


def gloo_device_for(host: str):
    """A gloo device on loopback when every peer is on this machine (``host`` is loopback); None (the
    default device: the interface of this host's name, or GLOO_SOCKET_IFNAME) otherwise."""
    return dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if is_loopback(host) else None


def check_layout(world_size: int, tp: int, pp: int, dp: int = 1, ep: int = 1) -> None:
    if tp < 1 or pp < 1 or dp < 1 or ep < 1:
        raise ParallelLayoutError(f"parallel sizes must be >= 1, got tp={tp} pp={pp} dp={dp} ep={ep}")
    if tp * pp * dp != world_size:
        raise ParallelLayoutError(
            f"tp({tp}) x pp({pp}) x dp({dp}) = {tp * pp * dp} does not match the "
            f"{world_size} process(es) started; launch exactly tp*pp*dp processes"
        )
    if dp % ep:  # megatron-core carves the expert-parallel groups out of the data-parallel ranks
        raise ParallelLayoutError(f"ep({ep}) must divide dp({dp}): expert-parallel ranks are data-parallel ranks "
                                  "for the attention")


def init_distributed(tp: int = 1, pp: int = 1, dp: int = 1, seed: int = 1234, ep: int = 1) -> DistInfo:
    """Join (or create, for a lone process) the process group and build megatron's groups.

    RANK/WORLD_SIZE/MASTER_* come from the launcher; a plain single process gets a private
    rendezvous on 127.0.0.1. Rank 0 serves the rendezvous store on MASTER_ADDR only — except under
    torchrun (Slurm), whose agent already serves it on every interface of the node.
    """
    import_megatron_core()
    from megatron.core import parallel_state, tensor_parallel

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(world_size, tp, pp, dp, ep)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if cuda_available() else "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        timeout = timedelta(minutes=10)
        if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: its agent's store, env:// rendezvous
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        else:
            store = bound_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, rank == 0, timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    if not cuda_available():
        install_cpu_patches()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return DistInfo(rank, world_size, local_rank, tp, pp, dp, backend)


def comm_device() -> torch.device:
    """Where a tensor must be to pass through the default process group: the rank's GPU under NCCL,
    else the CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy() -> None:
    """Leave the process groups cleanly (a process that exits with live gloo threads can abort)."""
    from megatron.core import parallel_state

    if dist.is_initialized():
        dist.barrier()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
