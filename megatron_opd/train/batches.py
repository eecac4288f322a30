"""A step's samples on their way into the forward pass, shared by the training loops.

:func:`distribute` (OPD): the step batch from trainer rank 0 to every rank, as tensors: each
data-parallel replica gets only its own share (rank 0 sends it to the replica's first rank), which
hands it to the replica's TP x PP peers through their model-parallel group. A JSON header (names,
shapes, dtypes) travels first, as a uint8 tensor; nothing is pickled.

:func:`micro_batches` (OPD): a share collated into padded micro-batches, sorted by length so padding
stays small; :func:`group_rows` (OPD and SFT): which rows go together, by row count or token budget.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.platform.dist import comm_device
from megatron_opd.records import MicroBatch, StepBatch, decode_header, encode_header


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


# Under NCCL the tensors travel through the GPU (comm_device); the batch itself stays on the CPU.

def _send(batch: StepBatch, dst: int) -> None:
    device = comm_device()
    header, tensors = batch.to_wire()
    raw = encode_header(header)
    dist.send(torch.tensor([raw.numel()], dtype=torch.int64, device=device), dst)
    dist.send(raw.to(device), dst)
    for tensor in tensors:
        dist.send(tensor.to(device), dst)


def _recv(src: int) -> StepBatch:
    device = comm_device()
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src)
    raw = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.recv(raw, src)
    header = decode_header(raw.cpu())
    tensors = [_empty(shape, dtype).to(device) for shape, dtype in zip(header["shapes"], header["dtypes"])]
    for tensor in tensors:
        dist.recv(tensor, src)
    return StepBatch.from_wire(header, [t.cpu() for t in tensors])


def _broadcast(batch: StepBatch | None, src: int, group) -> StepBatch:
    device = comm_device()
    if batch is not None:
        header, tensors = batch.to_wire()
        raw = encode_header(header).to(device)
        size = torch.tensor([raw.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, src, group=group)
    if batch is None:
        raw = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(raw, src, group=group)
    if batch is None:
        header = decode_header(raw.cpu())
        tensors = [_empty(shape, dtype) for shape, dtype in zip(header["shapes"], header["dtypes"])]
    moved = [t.to(device) for t in tensors]
    for tensor in moved:
        dist.broadcast(tensor, src, group=group)
    return batch if batch is not None else StepBatch.from_wire(header, [t.cpu() for t in moved])


_DTYPES = {str(d): d for d in (torch.int32, torch.int64, torch.float32, torch.float16, torch.bfloat16, torch.uint8)}


def _empty(shape: list[int], dtype: str) -> torch.Tensor:
    if dtype not in _DTYPES:
        raise ValueError(f"step batch: unexpected tensor dtype {dtype!r}")
    return torch.empty(shape, dtype=_DTYPES[dtype])


def micro_batches(batch: StepBatch, micro_batch_size: int, pad_id: int,
                  max_tokens: int | None = None) -> list[MicroBatch]:
    """The share's samples, longest first, in micro-batches of ``micro_batch_size`` rows — or, with
    ``max_tokens``, as many rows as fit ``rows x longest row <= max_tokens`` — each padded to its own
    longest sample. Per-token values sit at the token's own position (the loss shifts); ``seq_len``
    holds each row's real length (the rest is padding)."""
    order = torch.argsort(batch.sample_lens, descending=True, stable=True).tolist()
    seq_start = _offsets(batch.sample_lens)
    comp_start = _offsets(batch.completion_lens)
    out = []
    for rows in group_rows(order, batch.sample_lens.tolist(), micro_batch_size, max_tokens):
        width = int(batch.sample_lens[rows].max())
        b = len(rows)
        input_ids = torch.full((b, width), pad_id, dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : int(batch.sample_lens[i])] = batch.tokens[seq_start[i]: seq_start[i + 1]]
        positions = torch.arange(width)[None]
        mask = (positions >= batch.prompt_lens[rows, None]) & (positions < batch.sample_lens[rows, None])
        # completion values of these rows, in the row-major order of `mask`'s True entries
        take = torch.cat([torch.arange(comp_start[i], comp_start[i + 1]) for i in rows])
        topk = batch.topk
        routed = None
        if batch.routed_experts is not None:  # padding holds experts 0..k-1, as each sample's last token does
            layers, k = batch.routed_experts.shape[1:]
            routed = torch.arange(k, dtype=batch.routed_experts.dtype).expand(b, width, layers, k).clone()
            for r, i in enumerate(rows):
                routed[r, : int(batch.sample_lens[i])] = batch.routed_experts[seq_start[i]: seq_start[i + 1]]
        out.append(MicroBatch(
            input_ids, loss_mask=_scatter(mask, batch.token_mask[take]),
            sampler_lp=_scatter(mask, batch.sampler_logprobs[take]), teacher_lp=_scatter(mask, batch.teacher_logprobs[take]),
            task_adv=batch.task_advantages[rows], loss_w=batch.loss_weights[rows],
            opd_weight=torch.full((b,), batch.opd_weight), seq_len=batch.sample_lens[rows].long(),
            on_policy=batch.on_policy[rows],
            top_ids=_scatter(mask, topk.ids[take].long()) if topk is not None else None,
            top_lp=_scatter(mask, topk.logprobs[take]) if topk is not None else None,
            top_w=_scatter(mask, topk.weights[take]) if topk is not None else None, routed=routed))
    return out


def group_rows(order: list[int], lengths: "list[int] | dict[int, int]", rows: int, max_tokens: int | None) -> list[list[int]]:
    """Consecutive groups of ``order``: ``rows`` each, or (``order`` longest first) as many as fit
    ``group size x its first (longest) length <= max_tokens``; ``lengths`` is indexed by the entries."""
    if max_tokens is None:
        return [order[lo:lo + rows] for lo in range(0, len(order), rows)]
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _offsets(lengths: torch.Tensor) -> list[int]:
    return [0] + lengths.long().cumsum(0).tolist()


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[b, L, ...] zeros with ``values`` [n, ...] written where ``mask`` [b, L] is True."""
    out = torch.zeros(*mask.shape, *values.shape[1:], dtype=values.dtype)
    out[mask] = values
    return out
