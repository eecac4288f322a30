"""On-policy distillation (OPD, one teacher), MOPD (several, routed by domain tag), and GRPO
(verifier rewards, group-normalised; optionally plus a teacher's per-token advantage).

Each step: rank 0 samples prompts (deterministic in (seed, step)), the rollout engine samples n
completions per prompt, the teachers score every completion token, and the record is broadcast.
Every rank then recomputes the student's log-probs (forward only), takes ``loss.epochs`` optimizer
steps on the OPD loss over TP x PP x DP, and the new weights are synced to the engine.
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from megatron_opd.config import OPDStageConfig, dump_config
from megatron_opd.data.chat import check_tokenizer_fits, global_batch_indices
from megatron_opd.model import load_hf_config
from megatron_opd.model.bridge import save_hf_checkpoint
from megatron_opd.model.forward import run_pipeline
from megatron_opd.platform.faults import maybe_kill
from megatron_opd.algo.advantages import grpo_advantages
from megatron_opd.rollout.types import SamplingParams
from megatron_opd.teachers.service import Sample, TeacherSet
from megatron_opd.train.common import sum_from_last_stage
from megatron_opd.train.opd_batch import (StepRecord, collate, equal_share_weights, load_prompts, opd_loss,
                                         student_token_logprobs)
from megatron_opd.train.optim import optimizer_step
from megatron_opd.train.progress import StepProgress
from megatron_opd.train.rollout_engine import RolloutEngine
from megatron_opd.train.session import open_student, save_step



class Evaluator(Protocol):
    """Injected by the caller (train never imports eval): ``evaluate(complete)`` with
    ``complete(prompt_ids, temperature) -> completion ids`` gives ``{domain: {"accuracy", ...}}``."""

    def evaluate(self, complete: Callable[[list[list[int]], float], list[list[int]]]) -> dict[str, dict[str, Any]]: ...

    def format(self, table: dict[str, dict[str, Any]], title: str) -> str: ...


def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _repetition(ids: list[int], n: int = 4) -> bool:
    """A completion that repeats one n-gram 3+ times (a StableOPD-style degeneration signal)."""
    counts: dict[tuple[int, ...], int] = {}
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= 3:
            return True
    return False


def verifier_rewards(reward_cfg: Any, prompts: list[Any], completions: list[list[int]],
                     decode: Callable[[list[int]], str]) -> list[float]:
    """GRPO's verifiable reward per completion: correct (1/0) + format_weight * format score."""
    from megatron_opd.data.domains import get_domain

    rewards = []
    for prompt, completion in zip(prompts, completions):
        if prompt.domain is None or prompt.meta is None:
            raise ValueError("reward 'verifier' needs every prompt row to carry `domain` and `meta`")
        verdict = get_domain(prompt.domain).verify(prompt.meta, decode(completion))
        rewards.append(float(verdict.correct) + reward_cfg.format_weight * verdict.format_score)
    return rewards


def build_record(cfg: OPDStageConfig, prompts, engine: RolloutEngine, teachers: TeacherSet | None, step: int,
                 eos_id: int, decode: Callable[[list[int]], str]) -> tuple[StepRecord, dict[str, float]]:
    """Rank 0: sample, score, route (and verify, for GRPO); returns the record and its metrics."""
    tcfg, rcfg = cfg.train, cfg.rollout
    chosen = [prompts[i] for i in global_batch_indices(len(prompts), tcfg.seed, step, tcfg.prompts_per_step)]
    sampling = SamplingParams(temperature=rcfg.temperature, top_p=rcfg.top_p, top_k=rcfg.top_k,
                              max_new_tokens=rcfg.max_new_tokens, stop_token_ids=(eos_id,), n=rcfg.n,
                              seed=tcfg.seed * 100_003 + step)
    began = time.perf_counter()
    rollouts = engine.generate([p.ids for p in chosen], sampling)
    t_rollout = time.perf_counter() - began
    samples = [Sample(r.prompt_ids + r.completion_ids, len(r.prompt_ids), chosen[r.prompt_index].domain) for r in rollouts]
    began = time.perf_counter()
    scored = teachers.score(samples, cfg.loss.top_k) if teachers else None
    t_score = time.perf_counter() - began
    teacher_lps = [sc.teacher_logprobs().tolist() for sc in scored] if scored else [list(r.logprobs) for r in rollouts]
    record = StepRecord([s.token_ids for s in samples], [s.start for s in samples], [list(r.logprobs) for r in rollouts],
                        teacher_lps, [s.tag for s in samples])
    if cfg.loss.normalize != "token":  # equal shares per domain, or per sample (each its own group)
        groups = record.domains if cfg.loss.normalize == "domain" else list(range(len(rollouts)))
        record.loss_weights = equal_share_weights(groups, [len(r.completion_ids) for r in rollouts])
    if scored and cfg.loss.kind != "sampled_token":
        record.tops = [[(sc.weights[u].tolist(), sc.scores[u].top_ids.tolist(), sc.scores[u].top_logprobs.tolist())
                        for u in sc.scores] for sc in scored]
    reward_metrics: dict[str, float] = {}
    if cfg.reward is not None:
        rewards = verifier_rewards(cfg.reward, [chosen[r.prompt_index] for r in rollouts], [r.completion_ids for r in rollouts], decode)
        grouped = torch.tensor(rewards).view(len(chosen), rcfg.n)
        record.task_advantages = grpo_advantages(grouped, cfg.reward.normalize_std).view(-1).tolist()
        record.opd_weight = cfg.reward.lambda_opd if teachers else 0.0
        reward_metrics = {"rollout/reward_mean": sum(rewards) / len(rewards),
                          "rollout/groups_without_signal": float((grouped.std(-1) == 0).float().mean())}
    lengths = [len(r.completion_ids) for r in rollouts]
    metrics = {**reward_metrics, "rollout/response_length": sum(lengths) / len(lengths),
               "rollout/truncation_rate": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
               "rollout/repetition_rate": sum(_repetition(r.completion_ids) for r in rollouts) / len(rollouts),
               "time/rollout_s": t_rollout, "time/scoring_s": t_score,
               "throughput/rollout_tokens_per_s": sum(lengths) / max(t_rollout, 1e-9)}
    for unit in (teachers.pools if teachers else []):  # per-teacher reverse KL, the sampler's log-probs as the student's
        gaps = [(torch.tensor(r.logprobs) - sc.scores[unit].logprobs).sum().item() for r, sc in zip(rollouts, scored) if unit in sc.scores]
        tokens = sum(len(sc.scores[unit]) for sc in scored if unit in sc.scores)
        if tokens:
            metrics[f"teacher/{unit}/reverse_kl"] = sum(gaps) / tokens
    return record, metrics


def run_opd(cfg: OPDStageConfig, evaluator: Evaluator | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    out = Path(cfg.run.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model.hf_path))
    check_tokenizer_fits(tokenizer, load_hf_config(cfg.model.hf_path).vocab_size, str(cfg.model.hf_path))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts, skipped, problems = load_prompts(cfg.data.train, tokenizer, cfg.data.messages_field, cfg.data.domain_field,
                                              cfg.data.max_prompt_length)
    session = open_student(cfg.model, cfg.parallel, cfg.optim, cfg.train, out, "opd",  # type: ignore[arg-type]
                           optimizer_steps=cfg.train.steps * cfg.loss.epochs)
    rank0 = session.is_rank0
    teachers = engine = None
    wall = time.perf_counter()
    try:
        if rank0:
            print(f"[opd] {len(prompts)} prompts" + (f"; skipped {skipped} (first: {problems})" if skipped else ""), flush=True)
            (out / "config.yaml").write_text(dump_config(cfg))
            if cfg.teachers is not None:
                teachers = TeacherSet.start(cfg.teachers, student_dir=cfg.model.hf_path, log_dir=out)
            engine = RolloutEngine.start(cfg.rollout, cfg.model.hf_path)
        version = f"step-{session.start_step}"
        sync = RolloutEngine.syncer(cfg.rollout, session.bundle, engine, out)
        sync(version)  # the engine serves exactly the trainer's weights (fresh or resumed)
        tables: dict[str, Any] = {}
        before = out / "eval_before.json"  # kept across a resume, so results.json always has both tables
        if evaluator and session.start_step == 0:
            tables["before"] = _evaluate(evaluator, engine, cfg, rank0)
            if rank0:
                before.write_text(json.dumps(tables["before"]))
        elif evaluator and rank0 and before.is_file():
            tables["before"] = json.loads(before.read_text())
        decode = partial(tokenizer.decode, skip_special_tokens=True)
        result = _train(cfg, session, prompts, engine, teachers, sync, pad_id, tokenizer.eos_token_id, decode, evaluator, tables)
        if evaluator:
            tables["after"] = _evaluate(evaluator, engine, cfg, rank0)
        save_hf_checkpoint(session.bundle, out / "hf", tokenizer_src=cfg.model.hf_path)
        if rank0:
            result.update({"wall_time_s": time.perf_counter() - wall, "eval": tables,
                           "teacher_counters": teachers.counters() if teachers else {}, "skipped_prompts": skipped})
            (out / "results.json").write_text(json.dumps(result, indent=1))
            _print_summary(result, out, evaluator)
        return result
    finally:
        if teachers:
            teachers.close()
        if engine:
            engine.close()
        session.metrics.close()


def _evaluate(evaluator: Evaluator, engine: RolloutEngine | None, cfg: OPDStageConfig, rank0: bool) -> dict[str, Any]:
    table = evaluator.evaluate(partial(engine.complete, max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.train.seed)) if rank0 else {}
    if dist.is_initialized():
        dist.barrier()
    return table


def _train(cfg, session, prompts, engine, teachers, sync, pad_id, eos_id, decode, evaluator, tables) -> dict[str, Any]:
    from megatron.core import parallel_state

    tcfg, lcfg = cfg.train, cfg.loss
    chunks, vocab = session.state.chunks, session.bundle.vocab_size
    samples_per_step = tcfg.prompts_per_step * cfg.rollout.n
    per_rank = samples_per_step // cfg.parallel.dp
    dp_rank = parallel_state.get_data_parallel_rank()
    with_entropy = vocab <= 32768  # the entropy metric gathers the full vocabulary: small ones only
    loss_fn = partial(opd_loss, lcfg, vocab, with_entropy)
    progress = StepProgress("opd", tcfg.steps, session.start_step, session.is_rank0)
    quiet = truncated = 0
    times: dict[str, float] = {}
    step_began = time.perf_counter()
    for step in range(session.start_step, tcfg.steps):
        maybe_kill("step", step + 1, session.info.rank)
        record, metrics = build_record(cfg, prompts, engine, teachers, step, eos_id, decode) if session.is_rank0 else (None, {})
        record = _broadcast(record)
        mine = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        width = max(len(s) for s in record.sequences)
        # every micro-batch padded to the step's width: one activation shape through the pipeline
        batches = [_pad_to(collate(record, mine[i:i + tcfg.micro_batch_size], pad_id, lcfg.top_k), width)
                   for i in range(0, per_rank, tcfg.micro_batch_size)]
        began = time.perf_counter()
        with torch.no_grad():
            old = run_pipeline(chunks, batches, partial(student_token_logprobs, vocab), forward_only=True)
        for batch, result in zip(batches, old):  # last stage only: the loss runs there
            batch["old_lp"][:, 1:] = result["logprobs"]
        for _ in range(lcfg.epochs):
            results = run_pipeline(chunks, batches, loss_fn, forward_only=False)
            step_result = optimizer_step(session.state)
            if not math.isfinite(step_result.grad_norm):  # stop before bad weights reach the engine or a checkpoint
                raise FloatingPointError(f"step {step + 1}: non-finite gradient norm ({step_result.grad_norm}); "
                                         f"loss.kind={lcfg.kind}, lr={step_result.lr:g} — lower optim.lr or check the loss inputs")
        t_train = time.perf_counter() - began
        began = time.perf_counter()
        sync(f"step-{step + 1}")
        t_sync = time.perf_counter() - began
        keys = ("loss_sum", "tokens", "adv_sum", "adv_abs_sum", "adv_sq_sum", "kl_sum", "mismatch_abs_sum")
        # the optional sums opd_loss produces for this configuration (known on every rank)
        optional = (("clipped_tokens",) if lcfg.kind == "sampled_token" else ("topk_overlap_sum",)) + \
            (("entropy_sum",) if with_entropy or lcfg.kind != "sampled_token" else ())
        totals = sum_from_last_stage(results, keys + optional)
        n = max(totals["tokens"], 1.0)
        mean_adv = totals["adv_sum"] / n
        metrics.update({"train/loss": totals["loss_sum"] / n, "train/grad_norm": step_result.grad_norm, "train/lr": step_result.lr,
                        "opd/advantage_mean": mean_adv, "opd/advantage_abs_mean": totals["adv_abs_sum"] / n,
                        "opd/advantage_std": max(totals["adv_sq_sum"] / n - mean_adv ** 2, 0.0) ** 0.5,
                        "opd/reverse_kl": totals["kl_sum"] / n, "opd/train_inference_mismatch": totals["mismatch_abs_sum"] / n,
                        "time/train_s": t_train, "time/sync_s": t_sync, "train/tokens": totals["tokens"],
                        "throughput/train_tokens_per_s": totals["tokens"] / max(t_train, 1e-9)})
        for key, name in (("clipped_tokens", "opd/clip_fraction"), ("entropy_sum", "opd/student_entropy"),
                          ("topk_overlap_sum", "opd/topk_overlap")):
            if key in totals:
                metrics[name] = totals[key] / n
        for phase in ("rollout", "scoring", "train", "sync"):
            times[phase] = times.get(phase, 0.0) + metrics.get(f"time/{phase}_s", 0.0)
        quiet = quiet + 1 if metrics["opd/advantage_abs_mean"] < cfg.guard.min_abs_advantage else 0
        truncated = truncated + 1 if metrics.get("rollout/truncation_rate", 0.0) > cfg.guard.max_truncation_rate else 0
        _guards(cfg, session.is_rank0, quiet, truncated, step + 1)
        done = step + 1
        metrics["time/step_s"] = time.perf_counter() - step_began  # wall clock of the whole step, waits included
        if evaluator and tcfg.eval_interval and done % tcfg.eval_interval == 0 and done != tcfg.steps:
            table = _evaluate(evaluator, engine, cfg, session.is_rank0)
            metrics.update({f"eval/{d}/accuracy": r["accuracy"] for d, r in table.items()})
            tables[f"step-{done}"] = table
        if done % tcfg.log_interval == 0 or done == tcfg.steps:
            session.metrics.log(done, metrics)
            progress.update(done, f"kl {metrics['opd/reverse_kl']:.4f} |A| {metrics['opd/advantage_abs_mean']:.4f} "
                                  f"loss {metrics['train/loss']:.4f} " + " ".join(
                                      f"{p} {metrics.get(f'time/{p}_s', 0.0):.1f}s" for p in ("rollout", "scoring", "train", "sync")))
        if (tcfg.save_interval and done % tcfg.save_interval == 0) or done == tcfg.steps:
            save_step(session, done, done * samples_per_step, tcfg.keep_last, tcfg.hf_snapshots)
        step_began = time.perf_counter()
    progress.close()
    return {"steps": tcfg.steps, "time_by_phase_s": times}


def _pad_to(batch: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """Right-pad every sequence-shaped tensor to ``width`` (pads carry mask 0)."""
    current = batch["input_ids"].shape[1]
    if current == width:
        return batch
    out = {}
    for key, value in batch.items():
        if value.dim() == 1:  # per-sample values
            out[key] = value
            continue
        dim = 2 if key.startswith("top_") else 1
        pad = [0, 0] * (value.dim() - dim - 1) + [0, width - current]
        out[key] = torch.nn.functional.pad(value, pad)
    return out


def _guards(cfg: OPDStageConfig, rank0: bool, quiet: int, truncated: int, step: int) -> None:
    guard = cfg.guard
    if quiet >= guard.patience and rank0:
        print(f"[opd] warning: mean |advantage| < {guard.min_abs_advantage} for {quiet} steps at step {step}: "
              "no learning signal (is the teacher the student? do all samples of a prompt get the same reward?)", flush=True)
    if truncated >= guard.patience:
        message = (f"[opd] guard: more than {guard.max_truncation_rate:.0%} of samples hit rollout.max_new_tokens "
                   f"for {truncated} steps (length inflation / repetition)")
        if guard.stop_on_guard:
            raise RuntimeError(message)
        if rank0:
            print(message, flush=True)


def _print_summary(result: dict[str, Any], out: Path, evaluator: Evaluator | None) -> None:
    for name in ("before", "after"):
        if evaluator and name in result["eval"]:
            print(evaluator.format(result["eval"][name], f"[opd] held-out accuracy {name} OPD:"), flush=True)
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in result["time_by_phase_s"].items())
    print(f"[opd] wall time {result['wall_time_s']:.0f}s ({phases}); results: {out / 'results.json'}", flush=True)
