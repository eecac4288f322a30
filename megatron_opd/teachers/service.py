"""All the teachers of a run: endpoints up, parity checked, samples routed, scored and weighted.

``TeacherSet.start(spec, student_dir)`` launches embedded teacher servers for teachers given as a
checkpoint, connects to the others, checks tokenizer parity and health, and stops before anything
is scored if something is wrong. ``score(samples, top_k)`` returns, per sample, every routed
unit's :class:`TokenScores` and its per-token weights.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from megatron_opd.config.teachers import RoutingSpec, TeacherSpec
from megatron_opd.records import Sample, SampleScores, TokenScores
from megatron_opd.wire.process import ServerProcess, start_server
from megatron_opd.teachers.backends import OpenAIScorer, SGLangScorer
from megatron_opd.teachers.cross_tokenizer import CrossTokenizer, topk_to_student
from megatron_opd.teachers.parity import check_parity
from megatron_opd.teachers.teacher_pool import TeacherPool
from megatron_opd.teachers.router import Router
from megatron_opd.teachers.scorer import TeacherError
from megatron_opd.wire.client import ServerError


class TeacherSet:
    def __init__(self, spec: RoutingSpec, pools: dict[str, TeacherPool], servers: list[ServerProcess] | None = None,
                 cross: dict[str, CrossTokenizer] | None = None) -> None:
        self.spec = spec
        self.router = Router(spec)
        self.pools = pools
        self._lock = threading.Lock()  # one score() at a time: a pool's rotation and counters are not shared
        self.servers = servers or []
        self.cross = cross or {}  # unit -> its re-tokenizer (teachers with their own tokenizer)
        self.aligned = {unit: [0, 0] for unit in self.cross}  # unit -> [exactly mapped, all] student tokens

    @classmethod
    def start(cls, spec: RoutingSpec, student_dir: Path | None = None, log_dir: Path | None = None,
              threads: int | None = None, live_urls: list[str] | None = None,
              live_api_key: str | None = None) -> "TeacherSet":
        """``live_urls``: the rollout servers, which score for teachers of ``model: live``."""
        router = Router(spec)
        crossing = [unit for unit in router.units if spec.teachers[unit].cross_tokenizer]
        cross: dict[str, CrossTokenizer] = {}
        if crossing:
            from transformers import AutoTokenizer

            if student_dir is None:
                raise TeacherError(f"teachers {crossing} have their own tokenizer (cross_tokenizer): the student's is needed")
            student_tok = AutoTokenizer.from_pretrained(str(student_dir))
            for unit in crossing:
                cross[unit] = CrossTokenizer(student_tok, AutoTokenizer.from_pretrained(str(_tokenizer_of(spec.teachers[unit]))))
                print(f"[teachers] {unit!r}: cross-tokenizer (its own tokenizer and chat template; log-probs mapped onto "
                      "the student's tokens by character offsets)", flush=True)
        if student_dir is not None:
            check_parity(Path(student_dir), {unit: _tokenizer_of(spec.teachers[unit]) for unit in router.units
                                             if unit not in cross and not spec.teachers[unit].live},
                         spec.allow_tokenizer_mismatch)
        servers: list[ServerProcess] = []
        pools: dict[str, TeacherPool] = {}
        try:
            for unit in router.units:
                teacher = spec.teachers[unit]
                urls = list(teacher.urls)
                if teacher.live:  # the student's current weights, in the rollout servers
                    if not live_urls:
                        raise TeacherError(f"teacher {unit!r} (model: live) needs the rollout servers' URLs")
                    urls = list(live_urls)
                elif not urls and teacher.engine == "vllm":
                    from megatron_opd.wire.vllm import start_vllm_servers, vllm_python

                    python = vllm_python(teacher.vllm_python, f"teachers.teachers.{unit}.vllm_python")
                    started = start_vllm_servers(Path(teacher.model), python, teacher.served_model_name, teacher.replicas,
                                                 f"vLLM ({python}) serving teacher {unit!r}", log_dir,
                                                 f"teacher-{unit}-vllm", threads or 1)
                    servers += started
                    urls += [s.url for s in started]
                    print(f"[teachers] {unit!r}: {len(urls)} vLLM server(s) at {', '.join(urls)}", flush=True)
                elif not urls:
                    for r in range(teacher.replicas):
                        log = Path(log_dir) / f"teacher-{unit}-{r}.log" if log_dir else None
                        extra = ["--device", teacher.device] + (["--threads", str(threads)] if threads else [])
                        servers.append(start_server(Path(teacher.model), role="teacher", log_path=log, extra_args=extra))
                        urls.append(servers[-1].url)
                    print(f"[teachers] {unit!r}: {len(urls)} embedded server(s) at {', '.join(urls)}", flush=True)
                key = live_api_key if teacher.live else None
                pools[unit] = TeacherPool(unit, [_scorer(unit, teacher, url, key) for url in urls], teacher.batch_size,
                                          teacher.max_concurrency, teacher.max_retries)
                if teacher.urls:  # a running endpoint: is it the model the recipe names?
                    for scorer in pools[unit].replicas:
                        check_endpoint(unit, teacher, scorer)
                pools[unit].check_health()
        except BaseException:
            for server in servers:
                server.stop()
            raise
        return cls(spec, pools, servers, cross)

    def score(self, samples: list[Sample], top_k: int = 0) -> list[SampleScores]:
        with self._lock:
            return self._score(samples, top_k)

    def _score(self, samples: list[Sample], top_k: int) -> list[SampleScores]:
        if self.spec.weighting == "confidence" and top_k < 1:
            raise ValueError("weighting 'confidence' needs top_k >= 1 (teacher entropies come from the top-k)")
        routes, work = self.router.plan([s.tag for s in samples])  # a missing route fails here, before any request

        def score_unit(unit: str) -> dict[int, TokenScores]:
            indices = work[unit]
            if unit in self.cross:
                return dict(zip(indices, self._score_across(unit, [samples[i] for i in indices], top_k)))
            ids = [samples[i].score_ids for i in indices]
            shown = [samples[i].for_teacher(unit) for i in indices]  # after the teacher's own context, if it has one
            scored = self.pools[unit].score([seq for seq, _ in shown], [start for _, start in shown],
                                            top_k, ids if any(x is not None for x in ids) else None)
            return dict(zip(indices, scored))

        # every teacher of the step at once: each is its own server (or pool), waiting on none of the others
        with ThreadPoolExecutor(max_workers=max(1, len(work))) as executor:
            per_unit = dict(zip(work, executor.map(score_unit, work)))
        out = []
        for i, weights in enumerate(routes):
            scores = {unit: per_unit[unit][i] for unit in weights}
            expected = len(samples[i].token_ids) - samples[i].start
            for unit, sc in scores.items():
                if len(sc) != expected:
                    raise TeacherError(f"teacher {unit!r}: sample {i}: {len(sc)} scores for {expected} completion tokens")
            out.append(SampleScores(scores, self.router.token_weights(weights, scores)))
        return out

    def _score_across(self, unit: str, samples: list[Sample], top_k: int = 0) -> list[TokenScores]:
        """A cross-tokenizer teacher: each completion re-tokenized after the teacher's own prompt,
        scored, and its log-probs (and top-k, over the shared vocabulary) mapped back onto the
        student's tokens."""
        cross = self.cross[unit]
        encoded = []
        for sample in samples:
            prompt = (sample.contexts or {}).get(unit)
            if prompt is None:
                raise TeacherError(f"teacher {unit!r} has its own tokenizer but the sample carries no prompt in its ids")
            encoded.append(cross.encode(prompt, sample.token_ids[sample.start:]))
        scored = self.pools[unit].score([e.teacher_ids for e in encoded], [e.start for e in encoded], top_k, None)
        out = []
        for sample, e, sc in zip(samples, encoded, scored):
            valid = sc.valid.tolist() if sc.valid is not None else None
            mapped, student_valid = cross.to_student(e, sc.logprobs.tolist(), valid)
            self.aligned[unit][0] += sum(mapped.aligned)
            self.aligned[unit][1] += len(mapped.aligned)
            top_ids = top_logprobs = None
            if top_k:
                top_ids, top_logprobs = topk_to_student(e, sc.top_ids, sc.top_logprobs, sc.logprobs, cross.vocab_map(),
                                                        sample.token_ids[sample.start:])
            out.append(TokenScores(torch.tensor(mapped.logprobs, dtype=torch.float32), top_ids, top_logprobs,
                                   computed_tokens=sc.computed_tokens, cached_tokens=sc.cached_tokens,
                                   valid=None if all(student_valid) else torch.tensor(student_valid)))
        return out

    def check_finite(self, scored: list[SampleScores], step: int) -> dict[str, float]:
        """Per teacher, the step's tokens scored NaN/Inf (already masked out of the loss by the pool);
        past ``max_nonfinite_fraction`` of a teacher's tokens the run stops naming the teacher."""
        bad: dict[str, int] = {}
        total: dict[str, int] = {}
        for sample in scored:
            for unit, sc in sample.scores.items():
                total[unit] = total.get(unit, 0) + len(sc)
                bad[unit] = bad.get(unit, 0) + (int((~sc.valid).sum()) if sc.valid is not None else 0)
        for unit, n in bad.items():
            if n > self.spec.max_nonfinite_fraction * total[unit]:
                raise TeacherError(f"teacher {unit!r}: step {step}: {n} of its {total[unit]} scored tokens were NaN/Inf "
                                   f"(more than teachers.max_nonfinite_fraction={self.spec.max_nonfinite_fraction}); "
                                   "is its checkpoint or server broken?")
        out = {f"teachers/{unit}/nonfinite_tokens_step": float(n) for unit, n in bad.items()}
        for unit, (exact, total) in self.aligned.items():  # cross-tokenizer: share of tokens mapped exactly, so far
            out[f"teachers/{unit}/aligned_fraction"] = exact / total if total else 1.0
        return out

    def counters(self) -> dict[str, dict[str, Any]]:
        return {unit: pool.counters.as_dict() for unit, pool in self.pools.items()}

    def restore_counters(self, saved: dict[str, dict[str, Any]]) -> None:
        for unit, values in saved.items():
            if unit in self.pools:
                self.pools[unit].counters.restore(values)

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []

    def __enter__(self) -> "TeacherSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_endpoint(name: str, teacher: TeacherSpec, scorer: Any) -> None:
    """Before anything is scored: the endpoint takes the key and serves the recipe's model —
    ``served_model_name`` among vLLM's ``/v1/models``, or SGLang's ``/model_info`` ``model_path``
    naming ``model`` (the same path, or the same final directory name: hosts mount checkpoints at
    different places). Without ``model`` / ``served_model_name`` there is nothing to compare."""
    try:
        served = scorer.served_models()
    except ServerError as exc:
        if exc.status in (401, 403):
            raise TeacherError(f"teacher {name!r}: {scorer.url} refused the API key (HTTP {exc.status}): check "
                               f"teachers.teachers.{name}.api_key_env ({teacher.api_key_env or 'not set'})") from None
        raise TeacherError(f"teacher {name!r}: {scorer.url} does not say which model it serves ({exc})") from None
    if teacher.backend == "openai":
        expected = teacher.served_model_name
        ok = expected in served
    elif teacher.model is not None:
        expected = str(teacher.model)
        given = [s.rstrip("/") for s in served]
        ok = any(s == expected.rstrip("/") or Path(s).name == Path(expected).name
                 or Path(s).resolve() == Path(expected).resolve() for s in given)
    else:
        return
    if not ok:
        raise TeacherError(f"teacher {name!r}: {scorer.url} serves {served}, the recipe expects {expected!r} "
                           f"(teachers.teachers.{name}.{'served_model_name' if teacher.backend == 'openai' else 'model'}); "
                           "is the URL the right teacher's?")


def _tokenizer_of(teacher: TeacherSpec) -> Path | None:
    return teacher.tokenizer or teacher.model


def _scorer(name: str, teacher: TeacherSpec, url: str, api_key: str | None = None):
    """``api_key``: given (a live teacher: the rollout servers' key), else from ``api_key_env``."""
    if api_key is None and teacher.api_key_env:
        api_key = os.environ.get(teacher.api_key_env)
    if teacher.api_key_env and api_key is None:
        raise TeacherError(f"teacher {name!r}: environment variable {teacher.api_key_env} (its API key) is not set")
    if teacher.backend == "openai":
        return OpenAIScorer(url, teacher.served_model_name, name=name, api_key=api_key, timeout=teacher.timeout_s)
    return SGLangScorer(url, name=name, api_key=api_key, timeout=teacher.timeout_s, binary=teacher.binary)


def context_windows(teachers: dict[str, TeacherSpec], student_dir: Path) -> dict[str, int]:
    """Each teacher's context window where it is known: ``context_window``, else its local checkpoint's
    ``max_position_embeddings`` (``self`` / ``live``: the student's); a teacher behind ``urls`` with neither is
    left out (its server refuses an over-long request itself)."""
    import json

    windows = {}
    for name, teacher in teachers.items():
        if teacher.context_window:
            windows[name] = teacher.context_window
            continue
        if teacher.model is None:
            continue
        model = Path(student_dir) if str(teacher.model) in ("self", "live") else Path(teacher.model)
        config = model / "config.json"
        if config.is_file():
            window = json.loads(config.read_text()).get("max_position_embeddings")
            if isinstance(window, int) and window > 0:
                windows[name] = window
    return windows
