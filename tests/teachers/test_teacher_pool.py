"""A pool of teacher replicas: prompt groups stay together in a batch; a killed replica fails over, all dead stops."""
import signal
import threading

import pytest
from helpers import REPO, hf_token_scores

from megatron_opd.teachers.backends import SGLangScorer
from megatron_opd.teachers.scorer import TeacherError
from megatron_opd.teachers.teacher_pool import TeacherPool, prefix_batches
from megatron_opd.wire.process import ServerProcess

TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"


class _KillsItsServer:
    """A real replica whose server process is SIGKILLed right before its ``kill_on``-th request."""

    def __init__(self, server: ServerProcess, kill_on: int) -> None:
        self.scorer, self.server, self.kill_on, self.calls = SGLangScorer(server.url), server, kill_on, 0
        self.name, self.url = "replica", server.url
        self._lock = threading.Lock()

    def score(self, *args, **kwargs):
        with self._lock:
            self.calls += 1
            if self.calls == self.kill_on:
                self.server.proc.send_signal(signal.SIGKILL)
                self.server.proc.wait(timeout=30)
        return self.scorer.score(*args, **kwargs)

    def health(self):
        return self.scorer.health()


def test_prefix_batches_keep_prompt_groups_together():
    seqs = [[1, 2, 3, 9], [1, 2, 3, 8], [5, 6, 7], [1, 2, 3, 7], [5, 6, 1]]
    batches = prefix_batches(seqs, [3, 3, 2, 3, 2], batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert [0, 1, 3] in batches and [2, 4] in batches
    assert all(len(b) <= 2 for b in prefix_batches(seqs, [3, 3, 2, 3, 2], batch_size=2))


@pytest.mark.slow
def test_killed_replica_fails_over_and_all_dead_stops(rollouts):
    from megatron_opd.wire.process import start_server

    servers = [start_server(TEACHER, role="teacher") for _ in range(2)]
    try:
        seqs, starts = [s.token_ids for s in rollouts], [s.start for s in rollouts]
        reference = [lp for lp, _, _ in hf_token_scores(TEACHER, seqs, starts, 1)]
        pool = TeacherPool("arith", [_KillsItsServer(servers[0], kill_on=2), SGLangScorer(servers[1].url)],
                           batch_size=2, max_concurrency=2, backoff_s=0.05)
        got = pool.score(seqs, starts)
        assert len(got) == len(seqs)
        for g, ref in zip(got, reference):  # each sample scored once, in its place, correctly
            assert (g.logprobs - ref).abs().max() <= 1e-5
        assert pool.counters.retries >= 1 and pool.counters.failures >= 1 and 0 in pool.dead
        assert pool.counters.samples == len(seqs)
        servers[1].proc.send_signal(signal.SIGKILL)
        servers[1].proc.wait(timeout=30)
        with pytest.raises(TeacherError, match="arith"):
            pool.score(seqs, starts)
    finally:
        for s in servers:
            s.stop()

