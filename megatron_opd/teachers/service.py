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

from megatron_opd.config.teachers import RoutingSpec, TeacherSpec
from megatron_opd.records import Sample, SampleScores, TokenScores
from megatron_opd.serve.process import ServerProcess, start_server
from megatron_opd.teachers.backends import OpenAIScorer, SGLangScorer
from megatron_opd.teachers.parity import check_parity
from megatron_opd.teachers.pool import TeacherPool
from megatron_opd.teachers.router import Router
from megatron_opd.teachers.types import TeacherError


class TeacherSet:
    def __init__(self, spec: RoutingSpec, pools: dict[str, TeacherPool], servers: list[ServerProcess] | None = None) -> None:
        self.spec = spec
        self.router = Router(spec)
        self.pools = pools
        self._lock = threading.Lock()  # one score() at a time: a pool's rotation and counters are not shared
        self.servers = servers or []

    @classmethod
    def start(cls, spec: RoutingSpec, student_dir: Path | None = None, log_dir: Path | None = None,
              threads: int | None = None) -> "TeacherSet":
        router = Router(spec)
        if student_dir is not None:
            check_parity(Path(student_dir), {unit: _tokenizer_of(spec.teachers[unit]) for unit in router.units},
                         spec.allow_tokenizer_mismatch)
        servers: list[ServerProcess] = []
        pools: dict[str, TeacherPool] = {}
        try:
            for unit in router.units:
                teacher = spec.teachers[unit]
                urls = list(teacher.urls)
                if not urls:
                    for r in range(teacher.replicas):
                        log = Path(log_dir) / f"teacher-{unit}-{r}.log" if log_dir else None
                        extra = ["--threads", str(threads)] if threads else []
                        servers.append(start_server(Path(teacher.model), role="teacher", log_path=log, extra_args=extra))
                        urls.append(servers[-1].url)
                pools[unit] = TeacherPool(unit, [_scorer(unit, teacher, url) for url in urls], teacher.batch_size,
                                          teacher.max_concurrency, teacher.max_retries)
                pools[unit].check_health()
        except BaseException:
            for server in servers:
                server.stop()
            raise
        return cls(spec, pools, servers)

    def score(self, samples: list[Sample], top_k: int = 0) -> list[SampleScores]:
        with self._lock:
            return self._score(samples, top_k)

    def _score(self, samples: list[Sample], top_k: int) -> list[SampleScores]:
        if self.spec.weighting == "confidence" and top_k < 1:
            raise ValueError("weighting 'confidence' needs top_k >= 1 (teacher entropies come from the top-k)")
        routes, work = self.router.plan([s.tag for s in samples])  # a missing route fails here, before any request

        def score_unit(unit: str) -> dict[int, TokenScores]:
            indices = work[unit]
            ids = [samples[i].score_ids for i in indices]
            scored = self.pools[unit].score([samples[i].token_ids for i in indices], [samples[i].start for i in indices],
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

    def counters(self) -> dict[str, dict[str, Any]]:
        return {unit: pool.counters.as_dict() for unit, pool in self.pools.items()}

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []

    def __enter__(self) -> "TeacherSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tokenizer_of(teacher: TeacherSpec) -> Path | None:
    return teacher.tokenizer or teacher.model


def _scorer(name: str, teacher: TeacherSpec, url: str):
    api_key = os.environ.get(teacher.api_key_env) if teacher.api_key_env else None
    if teacher.api_key_env and api_key is None:
        raise TeacherError(f"teacher {name!r}: environment variable {teacher.api_key_env} (its API key) is not set")
    if teacher.backend == "openai":
        return OpenAIScorer(url, teacher.served_model_name, name=name, api_key=api_key, timeout=teacher.timeout_s)
    return SGLangScorer(url, name=name, api_key=api_key, timeout=teacher.timeout_s, binary=teacher.binary)
