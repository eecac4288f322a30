"""One entry point for running the sharded student over micro-batches (forward or forward+backward).

Wraps megatron-core's ``get_forward_backward_func`` so every caller (SFT, OPD, evaluation,
parity tests) goes through the same TP/PP pipeline schedule; :func:`student_token_logprobs` is the
forward-only collector of the student's own token log-probs.
"""

from __future__ import annotations

from dataclasses import fields, replace
from functools import partial
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from megatron_opd.model.logits import real_vocab_logprobs
from megatron_opd.model.moe import replay_routing
from megatron_opd.platform.cpu_compat import cpu_compat
from megatron_opd.records import TokenBatch

Batch = TypeVar("Batch", bound=TokenBatch)
# loss_fn(logits_shard [b, s, V_pad/tp], micro_batch) -> (loss_sum, num_tokens, metrics)
LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]


def causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 1, s, s] boolean mask, True where attention is *forbidden* (megatron's convention)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def _forward_step(loss_fn: LossFn, data_iterator: Iterator[TokenBatch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    from megatron.core.utils import get_model_config

    batch = next(data_iterator).to(next(model.parameters()).device)  # no-op on CPU
    input_ids = batch.input_ids
    seq_len = input_ids.shape[1]
    position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    if get_model_config(model).moe_enable_routing_replay:
        replay_routing(model, getattr(batch, "routed", None))
    output = model(input_ids, position_ids, causal_mask(seq_len, input_ids.device))
    return output, partial(_reduce, loss_fn, batch)


def _reduce(loss_fn: LossFn, batch: TokenBatch, output: torch.Tensor) -> tuple:
    loss_sum, num_tokens, metrics = loss_fn(output, batch)
    return loss_sum, num_tokens.to(torch.int), metrics


def run_pipeline(
    chunks: list[torch.nn.Module],
    micro_batches: Sequence[Batch],
    loss_fn: LossFn[Batch],
    forward_only: bool,
) -> list[dict[str, Any]]:
    """Run ``micro_batches`` through the pipeline; returns the metrics dicts of the last stage
    (an empty list on other stages). Every micro-batch is a :class:`~megatron_opd.records.TokenBatch`
    (``input_ids`` [b, s], and whatever ``loss_fn`` reads); they may differ in rows and length (the
    stages then exchange shapes first)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        raise ValueError("run_pipeline needs at least one micro-batch")
    from megatron.core.utils import get_model_config

    micro_batches = even_for_experts(micro_batches, get_model_config(chunks[0]).sequence_parallel)
    micro_batch_size, seq_length = micro_batches[0].input_ids.shape
    # pipeline stages exchange activations of a fixed shape unless told shapes vary (rows or lengths)
    get_model_config(chunks[0]).variable_seq_lengths = len({tuple(b.input_ids.shape) for b in micro_batches}) > 1
    forward_backward = get_forward_backward_func()
    with cpu_compat():
        return forward_backward(
            forward_step_func=partial(_forward_step, loss_fn),
            data_iterator=iter(micro_batches),
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )


def even_for_experts(micro_batches: Sequence[Batch], sequence_parallel: bool = False) -> list[Batch]:
    """Collective over the data-parallel group when experts are split over ranks (EP > 1): megatron-core's
    all-gather token dispatcher gathers every EP rank's tokens at each MoE layer, so every rank must run as
    many micro-batches as the others, all of one shape. Rows and columns of zeros (zero loss masks and weights:
    nothing to learn, and causal attention keeps them out of the real tokens) and all-zero micro-batches make
    up the difference. Under sequence parallelism (an MoE student at TP > 1) every width is also made a
    multiple of TP (the sequence splits over the TP ranks). Unchanged otherwise."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return list(micro_batches)
    multiple = ps.get_tensor_model_parallel_world_size() if sequence_parallel else 1
    if ps.get_expert_model_parallel_world_size() == 1:
        return [_zero_padded(b, b.input_ids.shape[0], -(-b.input_ids.shape[1] // multiple) * multiple)
                if b.input_ids.shape[1] % multiple else b for b in micro_batches]
    import torch.distributed as dist

    from megatron_opd.platform.dist import comm_device

    sizes = torch.tensor([len(micro_batches), max(b.input_ids.shape[0] for b in micro_batches),
                          max(b.input_ids.shape[1] for b in micro_batches)], dtype=torch.int64, device=comm_device())
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    count, rows, width = sizes.tolist()
    width = -(-width // multiple) * multiple
    padded = [_zero_padded(b, rows, width) for b in micro_batches]
    filler = _zero_padded(_zero_padded(micro_batches[0], 0, 0), rows, width)
    return padded + [filler] * (count - len(padded))


def _zero_padded(batch: Batch, rows: int, width: int) -> Batch:
    """``batch`` with its per-row tensors ([b, ...]) and per-position ones ([b, s, ...]) cut or zero-padded to
    ``rows`` rows and ``width`` positions."""
    b, s = batch.input_ids.shape
    changed = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != b:
            continue
        per_position = value.dim() >= 2 and value.shape[1] == s
        shape = (rows, width, *value.shape[2:]) if per_position else (rows, *value.shape[1:])
        out = value.new_zeros(shape)
        keep_rows, keep_cols = min(b, rows), min(s, width)
        if per_position:
            out[:keep_rows, :keep_cols] = value[:keep_rows, :keep_cols]
        else:
            out[:keep_rows] = value[:keep_rows]
        changed[f.name] = out
    return replace(batch, **changed)


def student_token_logprobs(vocab_size: int, logits_shard: torch.Tensor, batch: TokenBatch):
    """Forward-only collector: the student's log p(token_t) at every position t >= 1 ([B, L-1]): PPO's
    old log-probs (``loss.epochs`` > 1, ``train/opd/update.py``) and the mismatch probe after a weight
    sync (``train/weight_export.py``)."""
    lp = real_vocab_logprobs(logits_shard[:, :-1], batch.input_ids[:, 1:], vocab_size)
    return lp.sum() * 0, torch.tensor(1), {"logprobs": lp.detach()}
