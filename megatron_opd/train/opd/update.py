"""The step's update, on every rank: ``loss.epochs`` optimizer steps over this rank's micro-batches
(forward/backward over TP x PP x DP), with the OPD loss run on the last pipeline stage.

``opd_loss(cfg, vocab, logits_shard, micro)`` returns (sum of per-token losses over completion
tokens, their count, metric sums), megatron's per-token loss convention. The OPD advantage (the
routed teachers' mixed log-prob minus the student's) is formed here, against the student's own
log-probs, and added to the batch's task advantage (GRPO). The math is in ``algo/`` (pure
functions, on this rank's vocabulary shard); here only the shifting, masking and weighting.
"""

from __future__ import annotations

import math
import time
from functools import partial

import torch
import torch.distributed as dist

from megatron_opd.algo.advantages import combined_advantage, sampled_token_advantage
from megatron_opd.algo.policy_loss import policy_gradient_loss
from megatron_opd.algo.vocab_parallel import VocabShard, chunked_features, positions_per_chunk
from megatron_opd.config import LossConfig
from megatron_opd.model.forward import LossFn, run_pipeline, student_token_logprobs
from megatron_opd.model.moe import router_losses
from megatron_opd.records import MicroBatch, Update
from megatron_opd.train.optim import optimizer_step
from megatron_opd.train.session import StudentSession


def update_student(session: StudentSession, micro: list[MicroBatch], loss_fn: LossFn[MicroBatch], epochs: int,
                   step: int) -> Update:
    """``epochs`` optimizer steps on the micro-batches.
    With several epochs the log-probs before the first update are recomputed (PPO's old policy);
    with one, the loss takes the current ones, detached, from its own forward."""
    began = time.perf_counter()
    chunks, vocab = session.state.chunks, session.bundle.vocab_size
    if epochs > 1:
        with torch.no_grad():
            old = run_pipeline(chunks, micro, partial(student_token_logprobs, vocab), forward_only=True)
        for batch, result in zip(micro, old):  # last stage only: the loss runs there
            batch.old_lp = torch.zeros_like(batch.loss_mask)
            rows, width = batch.loss_mask.shape  # less any rows / columns run_pipeline padded for experts
            batch.old_lp[:, 1:] = result["logprobs"][:rows, : width - 1]
    for _ in range(epochs):
        results = run_pipeline(chunks, micro, loss_fn, forward_only=False)
        router = router_losses(len(micro))
        result = optimizer_step(session.state)
        if not math.isfinite(result.grad_norm):  # stop before bad weights reach the engine or a checkpoint
            raise FloatingPointError(f"step {step + 1}: non-finite gradient norm ({result.grad_norm}); "
                                     f"lr={result.lr:g} — lower optim.lr or check the loss inputs")
    return Update(results, result.grad_norm, result.lr, time.perf_counter() - began, router)


def opd_loss(cfg: LossConfig, vocab_size: int, logits_shard: torch.Tensor, batch: MicroBatch):
    """Per-token OPD loss on a micro-batch (``sampled_token``: PPO-clipped policy gradient on the
    teacher's advantage; the others: a divergence to the routed teachers' top-k, summed over them
    with their per-token weights). ``batch.old_lp`` holds the log-probs of the weights before
    this step's first update when ``loss.epochs`` > 1; with one epoch they are the current ones,
    taken here without a second forward.

    Position t's logits predict token t + 1: every position's features are computed on the
    [B * L, V_pad / TP] view of the shard (no copy) and the last position's are dropped."""
    b, length, width = logits_shard.shape
    targets = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, :1]], 1)  # the last column is unused
    top_ids = top_lp = None
    if cfg.kind != "sampled_token":
        top_ids = torch.cat([batch.top_ids[:, 1:], batch.top_ids[:, :1]], 1).flatten(0, 1)
        top_lp = torch.cat([batch.top_lp[:, 1:], batch.top_lp[:, :1]], 1).flatten(0, 1)
    features, extra = chunked_features(logits_shard.reshape(b * length, width), targets.reshape(-1), top_ids, top_lp,
                                       cfg.kind, tp_vocab_shard(width, vocab_size),
                                       positions_per_chunk(width, cfg.chunk_mib), cfg.jsd_beta)
    features = features.view(b, length, -1)[:, :-1]
    entropy, overlap = extra.view(b, length, 2)[:, :-1].unbind(-1)
    logprobs = features[..., 0]
    mask = batch.loss_mask[:, 1:]
    teacher, sampler = batch.teacher_lp[:, 1:], batch.sampler_lp[:, 1:]
    old = batch.old_lp[:, 1:] if batch.old_lp is not None else logprobs.detach()
    # the tokens the student drew (the KL estimate and the mismatch are over these): a dataset
    # trajectory (GKD mixing) has no sampler: no IS correction, no mismatch
    sampler = torch.where(batch.on_policy.bool()[:, None], sampler, old)
    sampled = mask * batch.on_policy[:, None].to(mask.dtype)
    opd = sampled_token_advantage(teacher, old, mask, cfg.kl_discount, cfg.logratio_clamp)
    # A = A_task + lambda * A_opd (OPD: A_task = 0, lambda = 1; GRPO: lambda = 0 without teachers)
    advantage = combined_advantage(batch.task_adv[:, None] * mask, opd, batch.opd_weight[:, None]).detach()
    metrics: dict[str, torch.Tensor] = {}
    if cfg.kind == "sampled_token":
        per_token, pg = policy_gradient_loss(logprobs, old, advantage, mask, cfg.clip_low, cfg.clip_high,
                                             cfg.dual_clip, sampler, cfg.tis_cap)
        metrics["clipped_tokens"] = pg["clipped_tokens"]
    else:  # sum over top-k slots of weight x divergence to that slot's teacher
        per_token = (features[..., 1:] * batch.top_w[:, 1:]).sum(-1) * mask
        if cfg.tis_cap is not None:  # truncated IS against the sampler (older weights, or only other numerics)
            per_token = per_token * torch.exp(old - sampler).clamp(max=cfg.tis_cap).detach()
        metrics["topk_overlap_sum"] = (overlap * mask).sum()
        present = (~torch.isneginf(batch.top_lp[:, 1:, 0])).sum(-1)  # ids in the first slot's token set
        metrics["token_set_size_sum"] = (present * mask).sum()
    metrics["entropy_sum"] = (entropy * mask).sum()
    per_token = per_token * batch.loss_w[:, None]
    metrics.update({
        "loss_sum": per_token.sum().detach(), "tokens": mask.sum().detach(),
        "adv_sum": advantage.sum(), "adv_abs_sum": advantage.abs().sum(), "adv_sq_sum": (advantage ** 2).sum(),
        "sampled_tokens": sampled.sum().detach(),
        "kl_sum": ((old - teacher) * sampled).sum(), "mismatch_abs_sum": ((old - sampler).abs() * sampled).sum(),
        "positions_sum": torch.tensor(float(b * length)),  # what the forward computed, padding included
        "real_positions_sum": batch.seq_len.sum().float(),
        # sum of squared sequence lengths: what causal attention's cost grows with (benchmarks count FLOPs with it)
        "real_positions_sq_sum": (batch.seq_len.double() ** 2).sum(),
    })
    return per_token.sum(), mask.sum(), metrics


def tp_vocab_shard(shard_width: int, vocab_size: int) -> VocabShard:
    """This rank's vocabulary shard: its first global id and the tensor-parallel group's collectives
    (megatron's differentiable all-reduce, identity backward)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    size = parallel_state.get_tensor_model_parallel_world_size()
    start = parallel_state.get_tensor_model_parallel_rank() * shard_width
    if size == 1:
        return VocabShard(start, vocab_size)
    group = parallel_state.get_tensor_model_parallel_group()

    def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
        return x

    def all_gather_last(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.detach().contiguous(), group=group)
        return torch.cat(parts, -1)

    return VocabShard(start, vocab_size, reduce_from_tensor_model_parallel_region, all_reduce_max, all_gather_last)
