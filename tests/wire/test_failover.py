"""The one failover policy of every server pool (wire/failover.py): which errors are retried, how often,
cooldown and revival through /health, the final error naming pool and server, counters round-tripped.
The servers here are in-process stand-ins with a scripted sequence of answers; the pools over real
`opd serve` processes (a replica SIGKILLed mid-batch) are tested in rollout/test_rollout_pool.py / teachers/test_teacher_pool.py."""
import threading
import time

import pytest

from megatron_opd.rollout.rollout_pool import RolloutPool
from megatron_opd.teachers.teacher_pool import TeacherCounters, TeacherPool
from megatron_opd.wire.client import ServerError
from megatron_opd.wire.failover import Failover, PoolCounters, PoolError


class _Server:
    def __init__(self, url: str, failures: list[ServerError] | None = None, healthy: bool = True) -> None:
        self.url, self.failures, self.healthy, self.calls = url, list(failures or []), healthy, 0
        self.lock = threading.Lock()

    def handle(self, piece):
        with self.lock:
            self.calls += 1
            if self.failures:
                raise self.failures.pop(0)
        return (self.url, piece)

    def health(self) -> bool:
        return self.healthy


def test_retryable_errors_move_the_piece_and_every_piece_is_done_once():
    a = _Server("http://a", [ServerError("connection refused"), ServerError("HTTP 503", 503)], healthy=False)
    b = _Server("http://b")
    pool = Failover("rollout", [a, b], max_retries=3, backoff_s=0.0, cooldown_s=60.0, log=lambda _: None)
    out = pool.run(list(range(6)), lambda s, p: pool.servers[s].handle(p))
    assert [piece for _, piece in out] == list(range(6))
    # the six pieces went out in rotation (b, a, b, a, b, a); a's two failures cooled it down for 60 s,
    # so both retries went to b
    assert pool.counters.failures == 2 and pool.counters.retries == 2 and pool.counters.requests == 8
    assert pool.cooling_down == {0} and a.calls == 3 and b.calls == 5


def test_a_refused_request_is_not_retried_and_the_budget_ends_naming_the_server():
    bad = _Server("http://a", [ServerError("HTTP 400: token ids must be in [0, 128)", 400)])
    pool = Failover("teacher 'math'", [bad], backoff_s=0.0, log=lambda _: None)
    with pytest.raises(PoolError, match=r"teacher 'math': .*token ids must be in"):
        pool.run([0], lambda s, p: pool.servers[s].handle(p))
    assert pool.counters.retries == 0 and pool.counters.failures == 1 and pool.cooling_down == set()

    flaky = _Server("http://flaky:1", [ServerError("HTTP 502", 502)] * 10)
    pool = Failover("teacher 'math'", [flaky], max_retries=2, backoff_s=0.01, log=lambda _: None)
    began = time.perf_counter()
    with pytest.raises(PoolError, match=r"failed 3 times; last error, from http://flaky:1: HTTP 502"):
        pool.run([0], lambda s, p: pool.servers[s].handle(p))
    # backoff 0.01 * (1 + 2) s, and the single replica answers /health so it is taken back each time
    assert time.perf_counter() - began >= 0.03 and flaky.calls == 3 and pool.counters.retries == 2


def test_no_server_answering_stops_naming_every_server():
    pool = Failover("rollout", [_Server("http://a", healthy=False), _Server("http://b", healthy=False)])
    with pytest.raises(PoolError, match=r"rollout: none of its 2 servers answers /health \(http://a: no answer to GET /health; "
                                         r"http://b: no answer to GET /health\)"):
        pool.check_health()
    with pytest.raises(PoolError, match="none of its 2 servers answers"):
        pool.run([0], lambda s, p: None)


def test_the_last_server_failing_is_named_with_what_it_last_said():
    """A lone replica whose request failed and which then did not answer /health: the error says both."""
    lone = _Server("http://a", [ServerError("ReadTimeout: no answer in 600s")], healthy=False)
    pool = Failover("rollout", [lone], max_retries=3, backoff_s=0.0, log=lambda _: None)
    with pytest.raises(PoolError) as raised:
        pool.run([0], lambda s, p: pool.servers[s].handle(p))
    said = "rollout: none of its 1 servers answers (http://a: no answer to GET /health after: ReadTimeout: no answer in 600s)"
    assert str(raised.value) == said
    with pytest.raises(PoolError) as again:  # probed again: the request's error is still named
        pool.check_health()
    assert str(again.value) == said.replace("servers answers (", "servers answers /health (")


def test_both_pools_use_the_one_policy_and_counters_round_trip():
    rollout = RolloutPool([_Server("http://a")])
    teacher = TeacherPool("math", [_Server("http://b")])
    assert isinstance(rollout.failover, Failover) and isinstance(teacher.failover, Failover)
    assert teacher.failover.counters is teacher.counters and isinstance(teacher.counters, PoolCounters)
    saved = TeacherCounters(requests=7, retries=2, failures=3, wait_s=1.5, samples=40, tokens=900).as_dict()
    restored = TeacherCounters()
    restored.restore({**saved, "from_a_newer_version": 1})
    assert restored.as_dict() == saved
