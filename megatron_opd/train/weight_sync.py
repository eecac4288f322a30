"""Trainer side of weight sync: export HF-named tensors from the TP/PP shards and push them.

Collective: every rank iterates the export (the gather needs them); only global rank 0 writes and
talks to servers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from megatron_opd.model import ModelBundle, export_hf_weights
from megatron_opd.rollout.weight_sync import DistributedPusher, SyncReport, push_in_process, push_to_servers_via_disk


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


def sync_weights_via_disk(bundle: ModelBundle, clients: list[Any], version: str, work_dir: Path,
                          bucket_bytes: int = 64 << 20) -> SyncReport | None:
    """Push the student's current weights to every server through disk; the report on rank 0."""
    return _sync(bundle, lambda stream: push_to_servers_via_disk(clients, stream, version, work_dir, bucket_bytes))


def sync_weights_distributed(bundle: ModelBundle, pusher: DistributedPusher | None, version: str,
                             bucket_bytes: int = 64 << 20) -> SyncReport | None:
    """Broadcast the student's weights to the servers in ``pusher``'s group (rank 0 holds it)."""
    return _sync(bundle, lambda stream: pusher.push(stream, version, bucket_bytes))


def sync_weights_in_process(bundle: ModelBundle, engine: Any | None, version: str) -> SyncReport | None:
    """Copy the student's weights into an engine living in rank 0's process."""
    return _sync(bundle, lambda stream: push_in_process(engine, stream, version))


def student_logprobs(bundle: ModelBundle, input_ids: torch.Tensor) -> torch.Tensor:
    """The megatron student's log p(token_t | <t) for t >= 1, [b, s-1], on every rank (collective)."""
    from megatron.core import parallel_state as ps

    from megatron_opd.model import real_vocab_logprobs
    from megatron_opd.model.forward import run_pipeline

    def collect(logits_shard, batch):
        lp = real_vocab_logprobs(logits_shard[:, :-1], batch["input_ids"][:, 1:], bundle.vocab_size)
        return lp.sum() * 0, torch.tensor(1), {"logprobs": lp.detach()}

    with torch.no_grad():
        results = run_pipeline(bundle.chunks, [{"input_ids": input_ids}], collect, forward_only=True)
    out = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float64)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        out += results[0]["logprobs"].double().cpu()
    if dist.is_initialized():
        dist.all_reduce(out)
    return out


def mismatch_probe(bundle: ModelBundle, client: Any | None, input_ids: torch.Tensor) -> dict[str, float] | None:
    """After a sync: engine log-probs vs the student's recomputed ones on a fixed batch (rank 0 reports)."""
    ours = student_logprobs(bundle, input_ids)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        return None
    served = torch.tensor(client.score(input_ids.tolist(), start=1), dtype=torch.float64)
    diff = (served - ours).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
