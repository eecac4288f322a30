"""Trainer side of weight sync: export HF-named tensors from the TP/PP shards and push them (the
pushes themselves, to servers or an in-process engine, are :mod:`megatron_opd.rollout.weight_push`).

Collective: every rank iterates the export (the gather needs them); only global rank 0 writes and
talks to servers.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import torch
import torch.distributed as dist

from megatron_opd.model import ModelBundle, export_hf_weights
from megatron_opd.model.forward import run_pipeline, student_token_logprobs
from megatron_opd.records import TokenBatch
from megatron_opd.rollout.weight_push import DistributedPusher, SyncReport, push_in_process, push_to_servers_via_disk

if TYPE_CHECKING:
    from megatron_opd.rollout.embedded import EmbeddedEngine
    from megatron_opd.wire.failover import Failover
    from megatron_opd.wire.client import SGLangClient


def _rank0_stream(bundle: ModelBundle) -> Iterator[tuple[str, torch.Tensor]]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    seen: set[str] = set()
    for name, tensor in export_hf_weights(bundle):
        # tied embeddings at PP>1 come out twice (embedding + output layer): send them once
        if rank == 0 and name not in seen:
            seen.add(name)
            yield name, tensor


def _sync(bundle: ModelBundle, push: Callable[[Iterator[tuple[str, torch.Tensor]]], SyncReport]) -> SyncReport | None:
    """Run the collective export on every rank; rank 0 feeds it to ``push``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    report = None
    stream = _rank0_stream(bundle) if rank == 0 else export_hf_weights(bundle)
    try:
        if rank == 0:
            report = push(stream)
    finally:
        for _ in stream:  # finish the collective gather even if rank 0's push failed
            pass
    if dist.is_initialized():
        dist.barrier()
    return report


class WeightSink(Protocol):
    """Where the student's weights go after an update. ``push`` is collective (every trainer rank
    takes part in the export); only global rank 0 talks to the engine."""

    def push(self, bundle: ModelBundle, version: str) -> SyncReport | None: ...

    def close(self) -> None: ...


class InProcessSink:
    """Copy into an engine living in rank 0's own process."""

    def __init__(self, engine: EmbeddedEngine | None) -> None:
        self.engine = engine

    def push(self, bundle: ModelBundle, version: str) -> SyncReport | None:
        return _sync(bundle, lambda stream: push_in_process(self.engine, stream, version))

    def close(self) -> None:
        pass


class DiskSink:
    """Safetensors buckets in ``work_dir`` + a reload from them on every server. Given the pool's ``failover``,
    only the servers in rotation take the weights, and one that cannot be reached leaves the pool for good (its
    weights would be stale), as long as another took them."""

    def __init__(self, clients: list[SGLangClient], work_dir: Path, bucket_bytes: int = 64 << 20,
                 failover: Failover | None = None) -> None:
        self.clients, self.work_dir, self.bucket_bytes, self.failover = clients, Path(work_dir), bucket_bytes, failover

    def push(self, bundle: ModelBundle, version: str) -> SyncReport | None:
        return _sync(bundle, lambda stream: self._push(stream, version))

    def _push(self, stream: Iterator[tuple[str, torch.Tensor]], version: str) -> SyncReport:
        live = self.failover.in_rotation() if self.failover is not None else list(range(len(self.clients)))
        report = push_to_servers_via_disk([self.clients[i] for i in live], stream, version, self.work_dir,
                                          self.bucket_bytes, tolerate_unreachable=self.failover is not None, indices=live)
        for index, why in report.failed.items():
            self.failover.retire(index, f"it missed the weight sync to {version} ({why})")
        return report

    def close(self) -> None:
        pass


class DistributedSink:
    """Broadcast over a weight-update group that rank 0 forms with every server at the first push."""

    def __init__(self, clients: list[SGLangClient], bucket_bytes: int = 64 << 20, flattened: bool = False) -> None:
        self.clients, self.bucket_bytes, self.flattened = clients, bucket_bytes, flattened
        self.pusher: DistributedPusher | None = None

    def push(self, bundle: ModelBundle, version: str) -> SyncReport | None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0 and self.pusher is None:
            from megatron_opd.platform.net import free_port

            self.pusher = DistributedPusher(self.clients, master_port=free_port(), flattened=self.flattened,
                                            master_address=_address_for(self.clients))
        return _sync(bundle, lambda stream: self.pusher.push(stream, version, self.bucket_bytes))

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()
            self.pusher = None


def _address_for(clients: list[SGLangClient]) -> str:
    """Where the servers reach this process's weight-update store: loopback when every server is on
    this machine, else this host's name (Slurm nodes resolve each other's names)."""
    import socket
    from urllib.parse import urlparse

    from megatron_opd.platform.net import is_loopback

    on_this_machine = all(is_loopback(urlparse(getattr(c, "base_url", "")).hostname or "") for c in clients)
    return "127.0.0.1" if on_this_machine else socket.gethostname()


def student_logprobs(bundle: ModelBundle, input_ids: torch.Tensor) -> torch.Tensor:
    """The megatron student's log p(token_t | <t) for t >= 1, [b, s-1], on every rank (collective)."""
    from megatron.core import parallel_state as ps

    collect = partial(student_token_logprobs, bundle.vocab_size)
    with torch.no_grad():
        results = run_pipeline(bundle.chunks, [TokenBatch(input_ids)], collect, forward_only=True)
    out = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float64)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        out += results[0]["logprobs"][: out.shape[0], : out.shape[1]].double().cpu()  # less any padding for experts
    if dist.is_initialized():
        from megatron_opd.platform.dist import comm_device

        out = out.to(comm_device())
        dist.all_reduce(out)
    return out.cpu()


def mismatch_probe(bundle: ModelBundle, client: SGLangClient | None, input_ids: torch.Tensor) -> dict[str, float] | None:
    """After a sync: engine log-probs vs the student's recomputed ones on a fixed batch (rank 0 reports)."""
    ours = student_logprobs(bundle, input_ids)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        return None
    served = torch.tensor(client.score(input_ids.tolist(), start=1), dtype=torch.float64)
    diff = (served - ours).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}


class ReloadCheckFailed(RuntimeError):
    """A server's weights after a sync are not the trainer's: its reload did not take effect."""


class CheckedSink:
    """A sink whose every push is verified (the engine's reload check): each server's log-probs of a fixed
    probe sequence must equal the trainer's within ``tol``, else the run stops naming the server and the version.
    Catches a reload that silently did nothing, which a checksum cannot on engines that repack weights."""

    PROBE_TOKENS = 32

    def __init__(self, inner: WeightSink, clients: list, tol: float, failover: Failover | None = None) -> None:
        self.inner, self.clients, self.tol, self.failover = inner, clients, tol, failover
        self.last_check: dict[str, float] = {}

    def push(self, bundle: ModelBundle, version: str) -> SyncReport | None:
        report = self.inner.push(bundle, version)
        generator = torch.Generator().manual_seed(0)  # the same probe on every rank, at every sync
        probe = torch.randint(0, bundle.vocab_size, (1, self.PROBE_TOKENS), generator=generator)
        ours = student_logprobs(bundle, probe)[0]
        if (dist.get_rank() if dist.is_initialized() else 0) != 0:
            return report
        worst = 0.0
        live = self.failover.in_rotation() if self.failover is not None else range(len(self.clients))
        for client in [self.clients[i] for i in live]:
            served = torch.tensor(client.score(probe.tolist(), start=1)[0], dtype=torch.float64)
            diff = float((served - ours).abs().max())
            worst = max(worst, diff)
            if not diff <= self.tol:
                raise ReloadCheckFailed(
                    f"rollout server {client.base_url}: after the weight sync to {version} its log-probs of the probe "
                    f"sequence differ from the trainer's by up to {diff:.3g} (rollout.reload_check_tol {self.tol:g}): "
                    "its reload did not take effect")
        self.last_check = {"sync/reload_max_abs_diff": worst}
        return report

    def close(self) -> None:
        self.inner.close()
