"""Student-side quantities and top-k losses computed on vocabulary shards.

With tensor parallelism each rank holds the logits of ``V_pad / TP`` vocabulary ids (megatron's
``ColumnParallelLinear`` output layer). Everything here works on that shard plus a few all-reduces of
per-position scalars over the TP group (a max, sums), the way megatron's own vocab-parallel cross
entropy does (Shoeybi et al. 2019, sec. 3): no rank ever holds the full vocabulary.

Memory is bounded by ``chunk`` positions, not by the response length: ``chunked_features``
runs its function over chunks of positions without keeping any chunk's intermediates, and recomputes
one chunk at a time in the backward pass (what recomputation / gradient checkpointing does for
layers, here for the loss head). The extra memory is the gradient of the logits shard plus one
chunk's temporaries.

The top-k math is the one of ``algo/divergences.py`` applied to the k gathered student values, so the
full-vocabulary functions there are the reference these must equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from megatron_opd.algo.divergences import generalized_jsd, kl, topk_forward_kl_from_parts

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class VocabShard:
    """Where a rank's logits columns sit in the vocabulary, and the TP group's collectives.

    ``all_reduce_sum`` must be differentiable with an identity backward (every TP rank computes the
    same loss from the reduced value, so each shard's gradient is the local one: megatron's
    ``reduce_from_tensor_model_parallel_region``); ``all_reduce_max`` and ``all_gather_last``
    (concatenate along the last dimension in rank order) carry no gradient."""

    start: int  # global id of this shard's first column
    vocab_size: int  # the real vocabulary: columns at or past it are padding and hold no probability
    all_reduce_sum: Reduce = _same
    all_reduce_max: Reduce = _same
    all_gather_last: Reduce = _same

    @staticmethod
    def whole(vocab_size: int) -> "VocabShard":
        """The single-rank case: the shard is the whole (possibly padded) vocabulary."""
        return VocabShard(0, vocab_size)

    def real_columns(self, width: int) -> int:
        """How many of this shard's ``width`` columns are real vocabulary ids."""
        return max(0, min(width, self.vocab_size - self.start))


def _masked_fp32(logits: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The chunk in (at least) fp32 with padded columns at the dtype's minimum (exp gives exactly 0,
    and 0 * z stays finite, unlike -inf)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    real = shard.real_columns(z.shape[-1])
    if real < z.shape[-1]:
        z = torch.cat([z[..., :real], z.new_full((*z.shape[:-1], z.shape[-1] - real), torch.finfo(z.dtype).min)], -1)
    return z


def log_normalizer(z: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """log sum_v exp z_v over the whole vocabulary [n] (shifted by the global max)."""
    top = shard.all_reduce_max(z.detach().amax(-1))
    return top + shard.all_reduce_sum((z - top[:, None]).exp().sum(-1)).log()


def logits_at(z: torch.Tensor, ids: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Raw logits at global ``ids`` [n, k], each taken on the rank that holds it: [n, k]."""
    local = ids - shard.start
    here = (local >= 0) & (local < z.shape[-1])
    picked = z.gather(-1, local.clamp(0, z.shape[-1] - 1))
    return shard.all_reduce_sum(torch.where(here, picked, torch.zeros_like(picked)))


def _membership(z: torch.Tensor, ids: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """[n, width] bool: which of this shard's columns are among ``ids`` [n, k] (ids held by other
    ranks land in a spare column, dropped)."""
    width = z.shape[-1]
    local = ids - shard.start
    local = torch.where((local >= 0) & (local < width), local, width)
    member = torch.zeros((*z.shape[:-1], width + 1), dtype=torch.bool, device=z.device)
    return member.scatter_(-1, local, True)[..., :width]


def log_mass_outside(z: torch.Tensor, ids: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """log sum_{v not in ids} exp z_v over the whole vocabulary [n] (summed directly, not as
    1 - top-k mass, so a top-k that holds almost everything leaves no cancellation error; shifted by
    the largest logit outside ``ids``, so the sum is >= 1 and its log finite however far below the
    top-k the rest lies). Needs at least one real id outside ``ids``."""
    outside = z.masked_fill(_membership(z, ids, shard), torch.finfo(z.dtype).min)  # before exp: no inf * 0 in backward
    top = shard.all_reduce_max(outside.detach().amax(-1))
    return top + shard.all_reduce_sum((outside - top[:, None]).exp().sum(-1)).log()


def entropy(z: torch.Tensor, lse: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """H(p) = sum_v p_v (log Z - z_v) over the whole vocabulary: [n]."""
    gap = lse[:, None] - z
    return shard.all_reduce_sum((gap.neg().exp() * gap).sum(-1))


def student_top_ids(z: torch.Tensor, k: int, shard: VocabShard) -> torch.Tensor:
    """The global ids of the student's k largest logits [n, k]: each rank's local top-k, gathered,
    then the top-k of the candidates (k x TP values per position, never the vocabulary)."""
    local = torch.topk(z.detach(), min(k, z.shape[-1]), -1)
    values = shard.all_gather_last(local.values)
    ids = shard.all_gather_last(local.indices + shard.start)
    return ids.gather(-1, torch.topk(values, k, -1).indices)


def per_position_losses(logits: torch.Tensor, targets: torch.Tensor, top_ids: torch.Tensor | None,
                        top_teacher_log: torch.Tensor | None, kind: str, shard: VocabShard,
                        jsd_beta: float = 0.5, metrics: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For one chunk of positions: ``logits`` [n, width] (a vocabulary shard), ``targets`` [n],
    ``top_ids`` / ``top_teacher_log`` [n, S, k] (S teachers' log-probs on a token set of k ids — their
    top-k, the student's top-k, or the union, ``algo/token_sets.py`` — for the divergence kinds; a
    slot with teacher log-prob -inf is left out of the set).

    Returns features [n, 1 + S]: column 0 the student's log p(target), column 1 + s the divergence
    ``kind`` to slot s's teacher (``topk_forward_kl``: forward KL with the tail bucket;
    ``topk_reverse_kl``: support-matched reverse KL, both renormalised over the set (Fu et al. 2026): a
    loss on the logits, not an advantage, since a top-k "reward" that does not depend on the sampled
    token has zero expected policy gradient (miles #2362); ``jsd``: generalised JSD on the top-k support);
    and, when ``metrics``, [n, 2]: the student's entropy and the share of the first slot's set (its
    present ids) in the student's own top-k of the set's width."""
    z = _masked_fp32(logits, shard)
    lse = log_normalizer(z, shard)
    columns = [logits_at(z, targets[:, None], shard)[:, 0] - lse]
    if kind != "sampled_token":
        k = top_ids.shape[-1]
        covers = k >= shard.vocab_size
        low = torch.finfo(z.dtype).min
        for s in range(top_ids.shape[1]):
            ids, t_log = top_ids[:, s], top_teacher_log[:, s].to(z.dtype)
            # a slot whose teacher log-prob is -inf is not in the set (a duplicate of another slot's id in
            # a union of token sets): finite stand-ins keep 0 * (difference) finite in the backward pass
            absent = torch.isneginf(t_log)
            t_log = t_log.masked_fill(absent, low)
            raw = logits_at(z, ids, shard)
            if kind == "topk_forward_kl":
                tail = None if covers and not absent.any() else log_mass_outside(z, ids, shard) - lse
                columns.append(topk_forward_kl_from_parts(raw - lse[:, None], tail, t_log))
            elif kind == "topk_reverse_kl":  # renormalised over the set: log Z cancels
                columns.append(kl(torch.log_softmax(raw.masked_fill(absent, low), -1), torch.log_softmax(t_log, -1)))
            elif kind == "jsd":
                columns.append(generalized_jsd(torch.log_softmax(raw.masked_fill(absent, low), -1),
                                               torch.log_softmax(t_log, -1), jsd_beta))
            else:
                raise ValueError(f"unknown loss kind {kind!r}")
    features = torch.stack(columns, -1)
    if not metrics:
        return features, None
    if top_ids is None or top_ids.shape[-1] >= shard.vocab_size:
        overlap = torch.ones_like(lse)
    else:
        first, present = top_ids[:, 0], ~torch.isneginf(top_teacher_log[:, 0])
        mine = student_top_ids(z, first.shape[-1], shard)
        hits = (first[:, :, None] == mine[:, None, :]).any(-1) & present
        overlap = hits.to(z.dtype).sum(-1) / present.sum(-1).clamp_min(1).to(z.dtype)
    return features, torch.stack([entropy(z, lse, shard).detach(), overlap], -1)


class _Chunked(torch.autograd.Function):
    """Runs ``fn`` over chunks of positions; keeps no intermediates; recomputes chunk by chunk in
    the backward pass, writing each chunk's gradient into one buffer the size of the logits."""

    @staticmethod
    def forward(ctx, fn, chunk, logits, *aux):
        ctx.fn, ctx.chunk = fn, chunk
        ctx.save_for_backward(logits, *aux)
        features_out = metrics_out = None
        for i in range(0, logits.shape[0], chunk):
            f, m = fn(logits[i:i + chunk], *(a[i:i + chunk] for a in aux), metrics=True)
            if features_out is None:  # outputs written in place: a small result kept per chunk would split the
                # large freed temporaries in the allocator's heap, which then grows with the chunk count
                features_out = f.new_empty(logits.shape[0], *f.shape[1:])
                metrics_out = m.new_empty(logits.shape[0], *m.shape[1:])
            features_out[i:i + chunk], metrics_out[i:i + chunk] = f, m
            del f, m
        ctx.mark_non_differentiable(metrics_out)
        return features_out, metrics_out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_features, _grad_metrics):
        logits, *aux = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ctx.chunk):
            piece = logits[i:i + ctx.chunk].detach().requires_grad_(True)
            with torch.enable_grad():
                f, _ = ctx.fn(piece, *(a[i:i + ctx.chunk] for a in aux), metrics=False)
            grad[i:i + ctx.chunk] = torch.autograd.grad(f, piece, grad_features[i:i + ctx.chunk])[0]
        return (None, None, grad, *(None for _ in aux))


def positions_per_chunk(width: int, chunk_mib: float) -> int:
    """How many positions of a ``width``-column fp32 shard fit in ``chunk_mib`` MiB (at least 1)."""
    return max(1, int(chunk_mib * 2**20) // (4 * width))


def chunked_features(logits: torch.Tensor, targets: torch.Tensor, top_ids: torch.Tensor | None,
                     top_teacher_log: torch.Tensor | None, kind: str, shard: VocabShard, chunk: int,
                     jsd_beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_position_losses`` over all positions (``logits`` [N, width], the rest as there), in
    chunks of ``chunk`` positions: (features [N, 1 + S] differentiable, metrics [N, 2])."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    def fn(z, t, ids, t_log, metrics):
        top = (None, None) if kind == "sampled_token" else (ids, t_log)
        return per_position_losses(z, t, *top, kind, shard, jsd_beta, metrics)

    if top_ids is None:  # autograd.Function takes tensors: empty placeholders for the unused top-k inputs
        top_ids = targets.new_zeros(targets.shape[0], 0, 0)
        top_teacher_log = logits.new_zeros(targets.shape[0], 0, 0)
    return _Chunked.apply(fn, chunk, logits, targets, top_ids, top_teacher_log)

