"""The glue between a micro-batch and ``algo/``: the OPD loss run on the last pipeline stage.

``opd_loss(cfg, vocab, with_entropy, logits_shard, micro)`` returns (sum of per-token losses over
completion tokens, their count, metric sums), megatron's per-token loss convention. The math is in
``algo/`` (pure functions); here only the shifting, masking and weighting.
"""

from __future__ import annotations

import torch

from megatron_opd.algo.advantages import sampled_token_advantage
from megatron_opd.algo.divergences import generalized_jsd, topk_forward_kl_with_tail, topk_reverse_kl_support_matched
from megatron_opd.algo.policy_loss import policy_gradient_loss
from megatron_opd.config import LossConfig
from megatron_opd.model import gather_logits, real_vocab_logprobs


def student_token_logprobs(vocab_size: int, logits_shard: torch.Tensor, batch: dict[str, torch.Tensor]):
    """Forward-only collector: the student's log p(token_t) at every position t >= 1 ([B, L-1])."""
    lp = real_vocab_logprobs(logits_shard[:, :-1], batch["input_ids"][:, 1:], vocab_size)
    return lp.sum() * 0, torch.tensor(1), {"logprobs": lp.detach()}


def opd_loss(cfg: LossConfig, vocab_size: int, with_entropy: bool, logits_shard: torch.Tensor,
             batch: dict[str, torch.Tensor]):
    """Per-token OPD loss on a micro-batch (``sampled_token``: PPO-clipped policy gradient on the
    teacher's advantage; the others: a divergence to the routed teachers' top-k, summed over them
    with their per-token weights). ``batch["old_lp"]`` holds the log-probs of the weights before
    this step's first update when ``loss.epochs`` > 1; with one epoch they are the current ones,
    taken here without a second forward."""
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:]
    teacher, sampler = batch["teacher_lp"][:, 1:], batch["sampler_lp"][:, 1:]
    full = None
    if cfg.kind != "sampled_token" or with_entropy:
        full = torch.log_softmax(gather_logits(logits_shard[:, :-1], vocab_size).float(), -1)
    if cfg.kind == "sampled_token":
        logprobs = real_vocab_logprobs(logits_shard[:, :-1], targets, vocab_size)
    else:
        logprobs = full.gather(-1, targets[..., None])[..., 0]
    old = batch["old_lp"][:, 1:] if "old_lp" in batch else logprobs.detach()
    opd = sampled_token_advantage(teacher, old, mask, cfg.kl_discount, cfg.logratio_clamp)
    # A = A_task + lambda * A_opd (OPD: A_task = 0, lambda = 1; GRPO: lambda = 0 without teachers)
    advantage = (batch["task_adv"][:, None] * mask + batch["opd_weight"][:, None] * opd).detach()
    metrics: dict[str, torch.Tensor] = {}
    if cfg.kind == "sampled_token":
        per_token, pg = policy_gradient_loss(logprobs, old, advantage, mask, cfg.clip_low, cfg.clip_high,
                                             cfg.dual_clip, sampler, cfg.tis_cap)
        metrics["clipped_tokens"] = pg["clipped_tokens"]
    else:
        per_token = _divergence(cfg, full, batch) * mask
        if cfg.tis_cap is not None:  # samples from older weights (rollout.max_staleness > 0): truncated IS
            per_token = per_token * torch.exp(old - sampler).clamp(max=cfg.tis_cap).detach()
        metrics["topk_overlap_sum"] = (_topk_overlap(full.detach(), batch["top_ids"][:, 1:, 0]) * mask).sum()
    if full is not None:
        metrics["entropy_sum"] = (-(full.exp() * full).sum(-1) * mask).sum().detach()
    per_token = per_token * batch["loss_w"][:, None]
    metrics.update({
        "loss_sum": per_token.sum().detach(), "tokens": mask.sum().detach(),
        "adv_sum": advantage.sum(), "adv_abs_sum": advantage.abs().sum(), "adv_sq_sum": (advantage ** 2).sum(),
        "kl_sum": ((old - teacher) * mask).sum(), "mismatch_abs_sum": ((old - sampler).abs() * mask).sum(),
    })
    return per_token.sum(), mask.sum(), metrics


def _topk_overlap(student_log: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """Share of the first teacher's top-k ids [B, L, k] that are in the student's top-k: [B, L]
    (a membership mask over the vocabulary, not a k x k comparison; 1 when k covers it)."""
    k, vocab = teacher_ids.shape[-1], student_log.shape[-1]
    if k >= vocab:
        return torch.ones(teacher_ids.shape[:-1])
    student_top = torch.topk(student_log, k, -1).indices
    member = torch.zeros(student_log.shape, dtype=torch.bool).scatter_(-1, student_top, True)
    return member.gather(-1, teacher_ids).float().mean(-1)


def _divergence(cfg: LossConfig, full: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over top-k slots of weight x divergence to that slot's teacher: [B, L-1]."""
    top_ids, top_lp, top_w = batch["top_ids"][:, 1:], batch["top_lp"][:, 1:], batch["top_w"][:, 1:]
    total = torch.zeros(full.shape[:-1])
    for s in range(top_ids.shape[2]):
        ids, lps = top_ids[:, :, s], top_lp[:, :, s]
        if cfg.kind == "topk_forward_kl":
            d = topk_forward_kl_with_tail(full, ids, lps)
        elif cfg.kind == "topk_reverse_kl":
            d = topk_reverse_kl_support_matched(full, ids, lps)
        else:  # jsd over the teacher's top-k support (both renormalised there)
            d = generalized_jsd(torch.log_softmax(full.gather(-1, ids), -1), torch.log_softmax(lps, -1), cfg.jsd_beta)
        total = total + top_w[:, :, s] * d
    return total
