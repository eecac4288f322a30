"""Supervised fine-tuning stage (cold start): assistant-token NLL over chat data, TP x PP x DP.

Run with ``opd run recipes/tiny/sft.yaml``; the CLI starts torchrun when the recipe needs several
processes. Every rank runs :func:`run_sft`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from megatron_opd.config import SFTStageConfig, dump_config
from megatron_opd.data.chat import (
    DataError, TokenizedExample, check_tokenizer_fits, collate, global_batch_indices, load_rows, tokenize_dataset,
)
from megatron_opd.model import load_hf_config, real_vocab_logprobs
from megatron_opd.model.bridge import save_hf_checkpoint
from megatron_opd.model.forward import run_pipeline
from megatron_opd.model.moe import router_losses
from megatron_opd.platform.faults import maybe_kill, maybe_wait_for_signal
from megatron_opd.platform.signals import clear_stopped, stop_agreed, write_stopped
from megatron_opd.records import SFTMicroBatch
from megatron_opd.train.common import sum_from_last_stage
from megatron_opd.train.optim import optimizer_step
from megatron_opd.train.progress import StepProgress
from megatron_opd.train.session import StudentSession, open_student, save_step
from megatron_opd.train.batches import group_rows


def sft_loss(vocab_size: int, logits_shard: torch.Tensor, batch: SFTMicroBatch):
    """Sum of next-token NLL over assistant tokens, and their count (megatron averages per token)."""
    targets = batch.input_ids[:, 1:]
    mask = batch.loss_mask[:, 1:].to(logits_shard.dtype)
    logprobs = real_vocab_logprobs(logits_shard[:, :-1], targets, vocab_size)
    nll_sum = -(logprobs * mask).sum()
    tokens = mask.sum()
    return nll_sum, tokens, {"nll_sum": nll_sum.detach(), "tokens": tokens.detach()}


def sft_micro_batches(examples: list[TokenizedExample], indices: list[int], micro_batch_size: int, pad_id: int,
                      max_tokens: int | None = None) -> list[SFTMicroBatch]:
    """``micro_batch_size`` examples each in draw order, or, with ``max_tokens``, longest first by
    token budget (:func:`~megatron_opd.train.batches.group_rows`, shared with OPD); each padded to its own longest example."""
    if max_tokens is not None:
        indices = sorted(indices, key=lambda i: -len(examples[i].input_ids))
    lengths = {i: len(examples[i].input_ids) for i in indices}
    groups = group_rows(indices, lengths, micro_batch_size, max_tokens)
    return [collate([examples[i] for i in group], pad_id) for group in groups]


def evaluate_loss(chunks, examples, micro_batch_size: int, pad_id: int, vocab_size: int) -> float:
    """Mean assistant-token NLL on held-out examples (forward only)."""
    if not examples:
        return float("nan")
    # Every micro-batch must have the same batch size: fill the last one with fully masked rows.
    filler = TokenizedExample(examples[0].input_ids, [0] * len(examples[0].input_ids))
    padded = list(examples) + [filler] * (-len(examples) % micro_batch_size)
    batches = sft_micro_batches(padded, list(range(len(padded))), micro_batch_size, pad_id)
    with torch.no_grad():
        results = run_pipeline(chunks, batches, partial(sft_loss, vocab_size), forward_only=True)
    totals = sum_from_last_stage(results, ("nll_sum", "tokens"))
    return totals["nll_sum"] / max(totals["tokens"], 1.0)


@dataclass
class SFTResult:
    output_dir: Path
    eval_before: float | None
    eval_after: float | None
    final_step: int
    stopped: bool = False  # on a signal, with a checkpoint at final_step (the same command resumes)


def _load_data(cfg: SFTStageConfig, tokenizer: Any) -> tuple[list[TokenizedExample], list[TokenizedExample], dict]:
    data = cfg.data
    sources = [data.train] if isinstance(data.train, str) else list(data.train)
    train: list[TokenizedExample] = []
    report = {"train": [], "train_skipped": {}, "train_truncated": 0, "train_problems": []}
    for source in sources:
        examples, rep = tokenize_dataset(load_rows(source), tokenizer, data.max_length, data.overlong, data.messages_field)
        train += examples
        report["train"].append(f"{source}: {rep.summary()}")
        for reason, n in rep.skipped.items():
            report["train_skipped"][reason] = report["train_skipped"].get(reason, 0) + n
        report["train_truncated"] += rep.truncated
        report["train_problems"] += [f"{source} {p}" for p in rep.first_errors]
        if not examples:
            raise DataError(f"{source}: no usable training rows ({rep.summary()}; first problems: {rep.first_errors})")
    report["train"] = "; ".join(report["train"])
    held_out: list[TokenizedExample] = []
    if data.eval:
        held_out, eval_report = tokenize_dataset(load_rows(data.eval), tokenizer, data.max_length, data.overlong, data.messages_field)
        held_out = held_out[: data.eval_max_rows]
        report["eval"] = eval_report.summary()
    return train, held_out, report


def run_sft(cfg: SFTStageConfig) -> SFTResult:
    from megatron.core import parallel_state
    from transformers import AutoTokenizer

    out = Path(cfg.run.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model.hf_path))
    check_tokenizer_fits(tokenizer, load_hf_config(cfg.model.hf_path).vocab_size, str(cfg.model.hf_path))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, held_out, data_report = _load_data(cfg, tokenizer)
    session = open_student(cfg.model, cfg.parallel, cfg.optim, cfg.train, out, "sft", run=cfg.run,
                           recipe=cfg.model_dump(mode="json"))
    if session.is_rank0:
        clear_stopped(out)
        print(f"[sft] data: {data_report['train']}" + (f"; eval: {data_report['eval']}" if "eval" in data_report else ""), flush=True)
        for problem in data_report["train_problems"]:
            print(f"[sft]   skipped {problem}", flush=True)
        (out / "config.yaml").write_text(dump_config(cfg))

    tcfg, chunks, vocab_size = cfg.train, session.state.chunks, session.bundle.vocab_size
    per_rank = tcfg.global_batch_size // cfg.parallel.dp
    dp_rank = parallel_state.get_data_parallel_rank()
    loss_fn = partial(sft_loss, vocab_size)
    eval_loss = partial(evaluate_loss, chunks, held_out, tcfg.micro_batch_size, pad_id, vocab_size)
    if session.start_step == 0 and held_out:
        session.metrics.log(0, {"eval/loss": eval_loss()})
    progress = StepProgress("sft", tcfg.steps, session.start_step, session.is_rank0)
    for step in range(session.start_step, tcfg.steps):
        maybe_kill("step", step + 1, session.info.rank)
        maybe_wait_for_signal(step + 1, session.info.rank)
        indices = global_batch_indices(len(train), tcfg.seed, step, tcfg.global_batch_size)
        mine = indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        micro = sft_micro_batches(train, mine, tcfg.micro_batch_size, pad_id, tcfg.max_tokens_per_micro_batch)
        results = run_pipeline(chunks, micro, loss_fn, forward_only=False)
        router = router_losses(len(micro))  # an MoE student's auxiliary losses (model.moe), if on
        result = optimizer_step(session.state)
        totals = sum_from_last_stage(results, ("nll_sum", "tokens"))
        done = step + 1
        lengths = [len(train[i].input_ids) for i in indices]  # the whole global batch's (what its compute is counted by)
        record = {"train/loss": totals["nll_sum"] / max(totals["tokens"], 1.0), "train/tokens": totals["tokens"],
                  "train/positions": sum(lengths), "train/positions_sq": sum(n * n for n in lengths),
                  "data/new_rows": max(0, min(len(indices), len(train) - step * tcfg.global_batch_size)),  # first epoch
                  "train/grad_norm": result.grad_norm, "train/lr": result.lr, **router}
        if tcfg.eval_interval and done % tcfg.eval_interval == 0 and done != tcfg.steps and held_out:
            record["eval/loss"] = eval_loss()
        if done % tcfg.log_interval == 0 or done == tcfg.steps:
            session.metrics.log(done, record)
            progress.update(done, f"loss {record['train/loss']:.4f} grad_norm {result.grad_norm:.4f} lr {result.lr:.2e}")
        stopping = stop_agreed()  # collective: a signal on any rank stops every rank after this step
        if (tcfg.save_interval and done % tcfg.save_interval == 0) or done == tcfg.steps or stopping:
            saved = save_step(session, done, done * tcfg.global_batch_size, tcfg.keep_last, tcfg.hf_snapshots)
            if stopping:
                progress.close()
                if session.is_rank0:
                    write_stopped(out, done, saved, "sft")
                session.metrics.close()
                return SFTResult(out, None, None, done, stopped=True)
    progress.close()
    return _finish(session, cfg, eval_loss() if held_out else None, data_report)


def _finish(session: StudentSession, cfg: SFTStageConfig, after: float | None, data_report: dict) -> SFTResult:
    out = session.out_dir
    if after is not None:
        session.metrics.log(cfg.train.steps, {"eval/loss": after})
    save_hf_checkpoint(session.bundle, out / "hf", tokenizer_src=cfg.model.hf_path)
    before = next((r["eval/loss"] for r in session.metrics.records() if r["step"] == 0 and "eval/loss" in r), None)
    if session.is_rank0:
        summary = {"eval_loss_before": before, "eval_loss_after": after, "steps": cfg.train.steps, "data": data_report}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if before is not None and after is not None:
            print(f"[sft] held-out loss: before {before:.4f} -> after {after:.4f} ({after / before:.1%} of start)", flush=True)
        print(f"[sft] HF checkpoint: {out / 'hf'}", flush=True)
    session.metrics.close()
    return SFTResult(out, before, after, cfg.train.steps)
