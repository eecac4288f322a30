"""Supervised fine-tuning stage (cold start): assistant-token NLL over chat data, TP x PP x DP.

Run with ``opd run recipes/tiny/sft.yaml``; the CLI starts torchrun when the recipe needs several
processes. Every rank runs :func:`run_sft`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_opd.config import SFTStageConfig, dump_config
from megatron_opd.data.chat import (
    DataError, TokenizedExample, collate, global_batch_indices, load_rows, tokenize_dataset,
)
from megatron_opd.model import build_model, load_hf_config, load_hf_weights, real_vocab_logprobs
from megatron_opd.model.bridge import save_hf_checkpoint
from megatron_opd.model.checkpoint import find_latest, load_checkpoint, save_checkpoint
from megatron_opd.model.forward import run_pipeline
from megatron_opd.platform import init_distributed
from megatron_opd.platform.faults import maybe_kill
from megatron_opd.train.common import capture_train_state, restore_train_state, sum_from_last_stage
from megatron_opd.train.metrics import MetricsLogger
from megatron_opd.train.optim import OptimSettings, optimizer_step, wrap_for_training


def sft_loss(vocab_size: int, logits_shard: torch.Tensor, batch: dict[str, torch.Tensor]):
    """Sum of next-token NLL over assistant tokens, and their count (megatron averages per token)."""
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].to(logits_shard.dtype)
    logprobs = real_vocab_logprobs(logits_shard[:, :-1], targets, vocab_size)
    nll_sum = -(logprobs * mask).sum()
    tokens = mask.sum()
    return nll_sum, tokens, {"nll_sum": nll_sum.detach(), "tokens": tokens.detach()}


def micro_batches(examples: list[TokenizedExample], indices: list[int], micro_batch_size: int, pad_id: int):
    return [
        collate([examples[i] for i in indices[s : s + micro_batch_size]], pad_id)
        for s in range(0, len(indices), micro_batch_size)
    ]


def evaluate_loss(chunks, examples, micro_batch_size: int, pad_id: int, vocab_size: int) -> float:
    """Mean assistant-token NLL on held-out examples (forward only)."""
    from functools import partial

    if not examples:
        return float("nan")
    # Every micro-batch must have the same batch size: fill the last one with fully masked rows.
    filler = TokenizedExample(examples[0].input_ids, [0] * len(examples[0].input_ids))
    padded = list(examples) + [filler] * (-len(examples) % micro_batch_size)
    batches = micro_batches(padded, list(range(len(padded))), micro_batch_size, pad_id)
    with torch.no_grad():
        results = run_pipeline(chunks, batches, partial(sft_loss, vocab_size), forward_only=True)
    totals = sum_from_last_stage(results, ("nll_sum", "tokens"))
    return totals["nll_sum"] / max(totals["tokens"], 1.0)


def data_report_source(cfg: SFTStageConfig) -> str:
    return cfg.data.train


@dataclass
class SFTResult:
    output_dir: Path
    eval_before: float | None
    eval_after: float | None
    final_step: int


def _load_data(cfg: SFTStageConfig, tokenizer: Any) -> tuple[list[TokenizedExample], list[TokenizedExample], dict]:
    data = cfg.data
    train, train_report = tokenize_dataset(load_rows(data.train), tokenizer, data.max_length, data.overlong, data.messages_field)
    if not train:
        raise DataError(f"{data.train}: no usable training rows ({train_report.summary()}; first problems: {train_report.first_errors})")
    held_out: list[TokenizedExample] = []
    report = {"train": train_report.summary(), "train_skipped": dict(train_report.skipped),
              "train_truncated": train_report.truncated, "train_problems": train_report.first_errors}
    if data.eval:
        held_out, eval_report = tokenize_dataset(load_rows(data.eval), tokenizer, data.max_length, data.overlong, data.messages_field)
        held_out = held_out[: data.eval_max_rows]
        report["eval"] = eval_report.summary()
    return train, held_out, report


def run_sft(cfg: SFTStageConfig) -> SFTResult:
    from transformers import AutoTokenizer

    info = init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp, cfg.train.seed)
    is_rank0 = info.rank == 0
    out = Path(cfg.run.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model.hf_path))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, held_out, data_report = _load_data(cfg, tokenizer)
    if is_rank0:
        print(f"[sft] data: {data_report['train']}" + (f"; eval: {data_report['eval']}" if "eval" in data_report else ""), flush=True)
        for problem in data_report["train_problems"]:
            print(f"[sft]   skipped {data_report_source(cfg)} {problem}", flush=True)

    hf_config = load_hf_config(cfg.model.hf_path)
    if len(tokenizer) > hf_config.vocab_size:
        raise DataError(f"{cfg.model.hf_path}: tokenizer has {len(tokenizer)} tokens but the model vocab_size is {hf_config.vocab_size}")
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    bundle = build_model(hf_config, dtype=dtype, vocab_divisible_by=cfg.model.vocab_divisible_by)
    optim = cfg.optim
    state = wrap_for_training(bundle, OptimSettings(
        lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay, adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps, clip_grad=optim.clip_grad,
        warmup_steps=optim.warmup_steps, decay_steps=cfg.train.steps, decay_style=optim.decay_style,
    ))
    ckpt_root = out / "checkpoints"
    latest = find_latest(ckpt_root) if cfg.train.resume and ckpt_root.exists() else None
    start_step = 0
    if latest is not None:
        saved = load_checkpoint(latest, bundle)
        start_step = restore_train_state(state, saved) if saved else 0
        if is_rank0:
            print(f"[sft] resumed from {latest} at step {start_step}", flush=True)
    else:
        load_hf_weights(bundle, cfg.model.hf_path)
    if is_rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
    metrics = MetricsLogger(out, is_rank0, resume_step=start_step)

    train_cfg = cfg.train
    per_rank = train_cfg.global_batch_size // cfg.parallel.dp
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    eval_loss = lambda: evaluate_loss(state.chunks, held_out, train_cfg.micro_batch_size, pad_id, bundle.vocab_size)  # noqa: E731
    from functools import partial

    loss_fn = partial(sft_loss, bundle.vocab_size)
    if start_step == 0 and held_out:
        metrics.log(0, {"eval/loss": eval_loss()})
    for step in range(start_step, train_cfg.steps):
        maybe_kill("step", step + 1, info.rank)
        indices = global_batch_indices(len(train), train_cfg.seed, step, train_cfg.global_batch_size)
        mine = indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        results = run_pipeline(state.chunks, micro_batches(train, mine, train_cfg.micro_batch_size, pad_id), loss_fn, forward_only=False)
        result = optimizer_step(state)
        totals = sum_from_last_stage(results, ("nll_sum", "tokens"))
        done = step + 1
        record = {"train/loss": totals["nll_sum"] / max(totals["tokens"], 1.0), "train/tokens": totals["tokens"],
                  "train/grad_norm": result.grad_norm, "train/lr": result.lr}
        if train_cfg.eval_interval and done % train_cfg.eval_interval == 0 and done != train_cfg.steps and held_out:
            record["eval/loss"] = eval_loss()
        if done % train_cfg.log_interval == 0 or done == train_cfg.steps:
            metrics.log(done, record)
            if is_rank0:
                print(f"[sft] step {done}/{train_cfg.steps} loss {record['train/loss']:.4f} "
                      f"grad_norm {result.grad_norm:.4f} lr {result.lr:.2e}", flush=True)
        if (train_cfg.save_interval and done % train_cfg.save_interval == 0) or done == train_cfg.steps:
            save_checkpoint(ckpt_root, done, bundle, capture_train_state(state, done, done * train_cfg.global_batch_size),
                            keep_last=train_cfg.keep_last, tokenizer_src=cfg.model.hf_path)

    after = eval_loss() if held_out else None
    if after is not None:
        metrics.log(train_cfg.steps, {"eval/loss": after})
    save_hf_checkpoint(bundle, out / "hf", tokenizer_src=cfg.model.hf_path)
    before = next((r["eval/loss"] for r in metrics.records() if r["step"] == 0 and "eval/loss" in r), None)
    if is_rank0:
        summary = {"eval_loss_before": before, "eval_loss_after": after, "steps": train_cfg.steps, "data": data_report}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if before is not None and after is not None:
            print(f"[sft] held-out loss: before {before:.4f} -> after {after:.4f} ({after / before:.1%} of start)", flush=True)
        print(f"[sft] HF checkpoint: {out / 'hf'}", flush=True)
    metrics.close()
    sys.stdout.flush()
    return SFTResult(out, before, after, train_cfg.steps)
