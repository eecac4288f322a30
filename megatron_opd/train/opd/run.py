"""On-policy distillation (OPD, one teacher), MOPD (several, routed by domain tag), and GRPO
(verifier rewards, group-normalised; optionally plus a teacher's per-token advantage).

:func:`run_opd` sets a run up (prompts, the student, the rollout engine, the teachers, rank 0's
producer), runs the step loop :func:`_train` and tears it down. One step, on every rank, and the
file each phase lives in, in this order:

1. sample -> score (rank 0, ahead of time when ``rollout.max_staleness`` > 0): ``producer.py``
   decides when, ``step_maker.py`` samples the step's prompts on the engine (``engine.py``), scores
   or verifies every completion and packs the step into one ``StepBatch``;
2. distribute -> collate: ``train/batches.py`` sends each data-parallel rank its share as tensors
   and pads it into micro-batches;
3. update: ``update.py``, forward/backward over TP x PP x DP with the OPD loss, optimizer step;
4. sync: the new weights to the rollout engine (``engine.py``'s sink, ``train/weight_export.py``);
5. log: ``step_log.py``; then a checkpoint when one is due, or when a stop signal reached any rank
   (``platform/signals.py``: the run then exits with 75 and the same command resumes it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from megatron_opd.config import OPDStageConfig, dump_config
from megatron_opd.data.chat import check_tokenizer_fits
from megatron_opd.data.prompts import load_prompts
from megatron_opd.model import load_hf_config
from megatron_opd.model.bridge import save_hf_checkpoint
from megatron_opd.model.moe import routed_shape
from megatron_opd.platform.faults import maybe_kill, maybe_wait_for_signal
from megatron_opd.platform.signals import clear_stopped, stop_agreed, write_stopped
from megatron_opd.teachers.service import TeacherSet, context_windows
from megatron_opd.train.batches import distribute, micro_batches
from megatron_opd.train.memory import MemoryProbe
from megatron_opd.train.opd.engine import RolloutEngine, weight_sink
from megatron_opd.train.opd.producer import RolloutProducer
from megatron_opd.train.opd.step_log import StepLog
from megatron_opd.train.opd.step_maker import StepMaker, check_domain_weights
from megatron_opd.train.opd.update import opd_loss, update_student
from megatron_opd.train.session import StudentSession, open_student, save_step
from megatron_opd.train.weight_export import WeightSink


class Evaluator(Protocol):
    """Injected by the caller (train never imports eval): ``evaluate(complete)`` with
    ``complete(prompt_ids, temperature) -> completion ids`` gives ``{domain: {"accuracy", ...}}``."""

    def evaluate(self, complete: Callable[[list[list[int]], float], list[list[int]]]) -> dict[str, dict[str, Any]]: ...

    def format(self, table: dict[str, dict[str, Any]], title: str) -> str: ...


def run_opd(cfg: OPDStageConfig, evaluator: Evaluator | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    out = Path(cfg.run.output_dir)
    if cfg.run.cpu_threads:
        torch.set_num_threads(cfg.run.cpu_threads)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model.hf_path))
    check_tokenizer_fits(tokenizer, load_hf_config(cfg.model.hf_path).vocab_size, str(cfg.model.hf_path))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    specs = cfg.teachers.teachers if cfg.teachers else {}
    own = {name: AutoTokenizer.from_pretrained(str(t.tokenizer or t.model)) for name, t in specs.items() if t.cross_tokenizer}
    contexts = {name: t.context for name, t in specs.items() if t.context or name in own}  # a teacher's own prompt ids
    room = {name: window - cfg.rollout.max_new_tokens for name, window in context_windows(specs, cfg.model.hf_path).items()}
    prompts, skipped, problems = [], {}, []
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 samples; a bad file stops it, and it the job, here
        prompts, skipped, problems = load_prompts(cfg.data.train, tokenizer, cfg.data.messages_field, cfg.data.domain_field,
                                                  cfg.data.max_prompt_length, contexts, cfg.rollout.on_policy_fraction < 1, own,
                                                  room, cfg.data.over_teacher_window)
        check_domain_weights(cfg.loss.domain_weights, prompts)
    session = open_student(cfg.model, cfg.parallel, cfg.optim, cfg.train, out, "opd",  # type: ignore[arg-type]
                           optimizer_steps=cfg.train.steps * cfg.loss.epochs, run=cfg.run, recipe=cfg.model_dump(mode="json"))
    rank0 = session.is_rank0
    teachers = engine = producer = None
    sink = None
    wall = time.perf_counter()
    try:
        if rank0:
            clear_stopped(out)
            print(f"[opd] {len(prompts)} prompts" + (f"; skipped {skipped} (first: {problems})" if skipped else ""), flush=True)
            (out / "config.yaml").write_text(dump_config(cfg))
            engine = RolloutEngine.start(cfg.rollout, cfg.model.hf_path, tokenizer.eos_token_id, out, cfg.run.cpu_threads,
                                         routed_shape(session.bundle.hf_config) if cfg.train.routing_replay else None)
            if cfg.teachers is not None:  # after the engine: a `live` teacher is scored by its servers
                teachers = TeacherSet.start(cfg.teachers, student_dir=cfg.model.hf_path, log_dir=out, threads=cfg.run.cpu_threads,
                                            live_urls=[c.base_url for c in engine.clients], live_api_key=engine.api_key)
            restore_counters(session.resumed_counters, teachers, engine)  # an outage before a resume stays counted
        sink = weight_sink(cfg.rollout, engine, out)
        sink.push(session.bundle, f"step-{session.start_step}")  # the engine serves exactly the trainer's weights
        evaluate = partial(_evaluate, evaluator, engine, cfg, rank0) if evaluator else dict
        tables: dict[str, Any] = {}
        before = out / "eval_before.json"  # kept across a resume, so results.json always has both tables
        if evaluator and session.start_step == 0:
            tables["before"] = evaluate()
            if rank0:
                before.write_text(json.dumps(tables["before"]))
        elif evaluator and rank0 and before.is_file():
            tables["before"] = json.loads(before.read_text())
        if rank0:
            maker = StepMaker(cfg, prompts, engine, teachers, tokenizer.eos_token_id,
                              partial(tokenizer.decode, skip_special_tokens=True))
            producer = RolloutProducer(maker.generate, maker.finish, session.start_step, cfg.train.steps,
                                       cfg.rollout.max_staleness)
        loop = Loop(cfg, session, producer, partial(_sync, sink, session, producer), pad_id, evaluate,
                    partial(pool_counters, teachers, engine))
        result = _train(loop, tables)
        if "stopped" in result:  # a signal: the checkpoint is written; the evaluation and export wait for the resume
            if rank0:
                write_stopped(out, result["stopped"]["step"], Path(result["stopped"]["checkpoint"]), "opd")
            return result
        if evaluator:
            tables["after"] = evaluate()
        counters = pool_counters(teachers, engine)
        _close(producer, sink, teachers, engine)  # the servers' memory is free before rank 0 writes the export
        producer = sink = teachers = engine = None
        save_hf_checkpoint(session.bundle, out / "hf", tokenizer_src=cfg.model.hf_path)
        if rank0:
            result.update({"wall_time_s": time.perf_counter() - wall, "eval": tables, "skipped_prompts": skipped,
                           "teacher_counters": counters["teachers"], "rollout_counters": counters["rollout"]})
            (out / "results.json").write_text(json.dumps(result, indent=1))
            _print_summary(result, out, evaluator)
        return result
    finally:
        _close(producer, sink, teachers, engine)
        session.metrics.close()


@dataclass
class Loop:
    """What the step loop works with, set up once by :func:`run_opd`."""

    cfg: OPDStageConfig
    session: StudentSession
    producer: RolloutProducer | None  # rank 0 only
    sync: Callable[[int], tuple[float, float, dict]]  # collective: push step N's weights; (seconds waited, seconds
    #                                                   pushing, the sink's check: {} or sync/reload_max_abs_diff)
    pad_id: int
    evaluate: Callable[[], dict[str, Any]]  # collective; {} without an evaluator
    counters: Callable[[], dict[str, Any]]  # the server pools' counters (rank 0; {} elsewhere), checkpointed


def _train(loop: Loop, tables: dict[str, Any]) -> dict[str, Any]:
    cfg, session = loop.cfg, loop.session
    tcfg, lcfg = cfg.train, cfg.loss
    loss_fn = partial(opd_loss, lcfg, session.bundle.vocab_size)
    probe = MemoryProbe() if cfg.run.memory_probe else None
    if probe is not None:
        loss_fn = probe.wrap(loss_fn)
    log = StepLog(cfg, session)
    saves: list[float] = []
    began = time.perf_counter()
    for step in range(session.start_step, tcfg.steps):
        maybe_kill("step", step + 1, session.info.rank)
        maybe_wait_for_signal(step + 1, session.info.rank)
        produced = loop.producer.get(step) if loop.producer else None                    # sample -> score
        share = distribute(produced.batch if produced else None, cfg.parallel.dp)          # this rank's samples
        micro = micro_batches(share, tcfg.micro_batch_size, loop.pad_id, tcfg.max_tokens_per_micro_batch)  # collate
        waited = time.perf_counter() - began
        update = update_student(session, micro, loss_fn, lcfg.epochs, step)              # update
        sync_wait, sync, checked = loop.sync(step + 1)                                    # sync
        done = step + 1
        metrics = log.step(done, produced, update, {"wait": waited, "sync_wait": sync_wait, "sync": sync,  # log
                                                    "step": time.perf_counter() - began})
        metrics.update(checked)
        if probe is not None:
            metrics.update(probe.step_metrics())
        if tcfg.eval_interval and done % tcfg.eval_interval == 0 and done != tcfg.steps:
            tables[f"step-{done}"] = loop.evaluate()
            metrics.update({f"eval/{d}/accuracy": r["accuracy"] for d, r in tables[f"step-{done}"].items()})
        log.write(done, metrics)
        stopping = stop_agreed()  # collective: a signal on any rank stops every rank after this step
        if (tcfg.save_interval and done % tcfg.save_interval == 0) or done == tcfg.steps or stopping:
            saving = time.perf_counter()
            saved = save_step(session, done, done * tcfg.prompts_per_step * cfg.rollout.n, tcfg.keep_last,
                              tcfg.hf_snapshots, loop.counters())
            saves.append(time.perf_counter() - saving)
            if stopping:
                log.close()
                return {"steps": tcfg.steps, "stopped": {"step": done, "checkpoint": str(saved)}}
        began = time.perf_counter()
    log.close()
    return {"steps": tcfg.steps, "time_by_phase_s": log.times, "checkpoint_save_s": saves,
            "checkpoint_load_s": session.load_seconds}


def _sync(sink: WeightSink, session: StudentSession, producer: RolloutProducer | None,
          version: int) -> tuple[float, float, dict]:
    """Collective: wait until no batch still needs the old weights, then push version ``step-N``."""
    waited = producer.before_sync(version) if producer is not None else 0.0
    began = time.perf_counter()
    sink.push(session.bundle, f"step-{version}")
    if producer is not None:
        producer.after_sync(version)
    return waited, time.perf_counter() - began, dict(getattr(sink, "last_check", {}))


def _evaluate(evaluator: Evaluator, engine: RolloutEngine | None, cfg: OPDStageConfig, rank0: bool) -> dict[str, Any]:
    table = evaluator.evaluate(partial(engine.complete, max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.train.seed)) if rank0 else {}
    if dist.is_initialized():
        dist.barrier()
    return table


def pool_counters(teachers: TeacherSet | None, engine: RolloutEngine | None) -> dict[str, Any]:
    return {"teachers": teachers.counters() if teachers else {}, "rollout": engine.counters() if engine else {}}


def restore_counters(saved: dict[str, Any], teachers: TeacherSet | None, engine: RolloutEngine | None) -> None:
    if teachers is not None:
        teachers.restore_counters(saved.get("teachers", {}))
    if engine is not None:
        engine.restore_counters(saved.get("rollout", {}))


def _close(*closeables: Any) -> None:
    for closeable in closeables:
        if closeable is not None:
            closeable.close()


def _print_summary(result: dict[str, Any], out: Path, evaluator: Evaluator | None) -> None:
    for name in ("before", "after"):
        if evaluator and name in result["eval"]:
            print(evaluator.format(result["eval"][name], f"[opd] held-out accuracy {name} OPD:"), flush=True)
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in result["time_by_phase_s"].items())
    print(f"[opd] wall time {result['wall_time_s']:.0f}s ({phases}); results: {out / 'results.json'}", flush=True)
