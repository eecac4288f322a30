"""Trainer side of weight sync: export HF-named tensors from the TP/PP shards and push them.

Collective: every rank iterates the export (the gather needs them); only global rank 0 writes and
talks to servers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megatron_opd.model import ModelBundle, export_hf_weights
from megatron_opd.rollout.weight_sync import SyncReport, push_to_servers_via_disk


def _rank0_stream(bundle: ModelBundle) -> Iterator[tuple[str, torch.Tensor]]:
    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, tensor in export_hf_weights(bundle):
        if rank == 0:
            yield name, tensor


def sync_weights_via_disk(bundle: ModelBundle, clients: list[Any], version: str, work_dir: Path,
                          bucket_bytes: int = 64 << 20) -> SyncReport | None:
    """Push the student's current weights to every server; returns the report on rank 0."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        report = push_to_servers_via_disk(clients, _rank0_stream(bundle), version, work_dir, bucket_bytes)
    else:
        for _ in export_hf_weights(bundle):
            pass
        report = None
    if dist.is_initialized():
        dist.barrier()
    return report
