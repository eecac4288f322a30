"""The step batch from trainer rank 0 to every rank, as tensors: each data-parallel replica gets only
its own share (rank 0 sends it to the replica's first rank), which hands it to the replica's TP x PP
peers through their model-parallel group. A JSON header (names, shapes, dtypes) travels first, as a
uint8 tensor; nothing is pickled.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.records import StepBatch, decode_header, encode_header


def share_bounds(samples: int, dp: int, dp_rank: int) -> tuple[int, int]:
    per_rank = samples // dp
    return dp_rank * per_rank, (dp_rank + 1) * per_rank


def distribute(batch: StepBatch | None, dp: int) -> StepBatch:
    """Collective: global rank 0 passes the whole batch, every other rank None; each rank returns
    its data-parallel replica's share."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return batch
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    model_group = ps.get_model_parallel_group()
    leader = dist.get_global_rank(model_group, 0)  # this replica's tp0/pp0 rank
    share = None
    if rank == 0:
        leaders = dist.get_process_group_ranks(ps.get_data_parallel_group())  # rank 0's DP group: every leader
        for dp_rank, dst in enumerate(leaders):
            part = batch.select(*share_bounds(len(batch), dp, dp_rank))
            if dst == 0:
                share = part
            else:
                _send(part, dst)
    elif rank == leader:
        share = _recv(src=0)
    if dist.get_world_size(model_group) > 1:
        share = _broadcast(share, leader, model_group)
    return share


def _send(batch: StepBatch, dst: int) -> None:
    header, tensors = batch.to_wire()
    raw = encode_header(header)
    dist.send(torch.tensor([raw.numel()], dtype=torch.int64), dst)
    dist.send(raw, dst)
    for tensor in tensors:
        dist.send(tensor, dst)


def _recv(src: int) -> StepBatch:
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, src)
    raw = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(raw, src)
    header = decode_header(raw)
    tensors = [_empty(shape, dtype) for shape, dtype in zip(header["shapes"], header["dtypes"])]
    for tensor in tensors:
        dist.recv(tensor, src)
    return StepBatch.from_wire(header, tensors)


def _broadcast(batch: StepBatch | None, src: int, group) -> StepBatch:
    if batch is not None:
        header, tensors = batch.to_wire()
        raw = encode_header(header)
        size = torch.tensor([raw.numel()], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src, group=group)
    if batch is None:
        raw = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(raw, src, group=group)
    if batch is None:
        header = decode_header(raw)
        tensors = [_empty(shape, dtype) for shape, dtype in zip(header["shapes"], header["dtypes"])]
    for tensor in tensors:
        dist.broadcast(tensor, src, group=group)
    return batch if batch is not None else StepBatch.from_wire(header, tensors)


_DTYPES = {str(d): d for d in (torch.int32, torch.int64, torch.float32, torch.float16, torch.bfloat16, torch.uint8)}


def _empty(shape: list[int], dtype: str) -> torch.Tensor:
    if dtype not in _DTYPES:
        raise ValueError(f"step batch: unexpected tensor dtype {dtype!r}")
    return torch.empty(shape, dtype=_DTYPES[dtype])
