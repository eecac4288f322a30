"""One failover policy for every pool of servers: the rollout replicas and each teacher's replicas.

Work is handed out in pieces (a rollout share, a scoring batch), each to a server in rotation. A
server that cannot be reached, times out, rate-limits or fails server-side
(:attr:`ServerError.retryable`) leaves the rotation for ``cooldown_s`` and its piece goes to another
server after a backoff of ``backoff_s * 2**attempt``. With every server cooling down, the ones that
answer ``/health`` come back. A piece that failed ``max_retries + 1`` times, or a pool with no server
answering, stops the work with the pool's error naming the pool, the server and its last error. A
request the server refused (a 4xx) fails at once: it would fail the same on every server.

The pool's counters (requests, retries, failures, wait) live in one dataclass the run logs every
step and checkpoints, so an outage before a resume stays on record.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Sequence, TypeVar

from megatron_opd.wire.client import ServerError

Piece = TypeVar("Piece")


class PoolError(RuntimeError):
    """A pool could not do its work: no server answers, or a piece failed on every retry."""


@dataclass
class PoolCounters:
    requests: int = 0  # requests sent (a retry is one more)
    retries: int = 0
    failures: int = 0  # failed requests (each one retried or fatal)
    wait_s: float = 0.0  # wall time callers waited on the pool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from a checkpoint's counters (keys this version does not know are ignored)."""
        for f in fields(self):
            if f.name in saved:
                setattr(self, f.name, type(getattr(self, f.name))(saved[f.name]))


def server_label(server: Any, index: int) -> str:
    return str(getattr(server, "url", None) or getattr(server, "base_url", None) or f"server {index}")


class Failover:
    def __init__(self, name: str, servers: Sequence[Any], *, max_retries: int = 3, backoff_s: float = 0.5,
                 cooldown_s: float = 30.0, max_concurrency: int | None = None,
                 error: type[Exception] = PoolError, counters: PoolCounters | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        if not servers:
            raise ValueError(f"{name}: a pool needs at least one server")
        self.name = name
        self.servers = list(servers)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.cooldown_s = cooldown_s
        self.max_concurrency = max_concurrency or len(self.servers)
        self.error = error
        self.counters = counters if counters is not None else PoolCounters()
        self.log = log or (lambda line: print(line, flush=True))
        self.cooling_until: dict[int, float] = {}  # server -> end of its cooldown
        self.retired: dict[int, str] = {}  # server -> why it left for good (it missed a weight sync)
        self.last_error: dict[int, str] = {}  # server -> its last failed request's error, for the final error
        self.silent: set[int] = set()  # servers whose last /health probe got no answer
        self._next = 0
        self._lock = threading.Lock()

    def label(self, server: int) -> str:
        return server_label(self.servers[server], server)

    @property
    def cooling_down(self) -> set[int]:
        now = time.monotonic()
        return {i for i, until in self.cooling_until.items() if until > now}

    def _cool(self, server: int) -> None:
        self.cooling_until[server] = time.monotonic() + self.cooldown_s

    def retire(self, server: int, why: str) -> None:
        """Out of the pool for good (its weights are no longer the trainer's): never picked or probed again."""
        with self._lock:
            self.retired[server] = why
        self.log(f"[{self.name}] {self.label(server)} leaves the pool: {why}")

    def _probe(self) -> list[int]:
        answering = []
        for i, server in enumerate(self.servers):
            if i in self.retired:
                continue
            if server.health():
                self.cooling_until.pop(i, None)
                self.silent.discard(i)
                answering.append(i)
            else:
                self._cool(i)
                self.silent.add(i)
        return answering

    def _no_server(self, what: str) -> Exception:
        def said(i: int) -> str:
            failed = self.last_error.get(i)
            if i in self.retired:
                why = self.retired[i]
            elif i in self.silent:
                why = "no answer to GET /health" + (f" after: {failed}" if failed else "")
            else:
                why = failed
            return f"{self.label(i)}: {why}" if why else self.label(i)

        return self.error(f"{self.name}: none of its {len(self.servers)} servers {what} "
                          f"({'; '.join(said(i) for i in range(len(self.servers)))})")

    def check_health(self) -> None:
        """Probe every server: those not answering ``/health`` cool down; none answering stops."""
        if not self._probe():
            raise self._no_server("answers /health")

    def in_rotation(self) -> list[int]:
        """Servers not cooling down; with none left, the ones that answer ``/health`` now."""
        with self._lock:
            cooling = self.cooling_down
            alive = [i for i in range(len(self.servers)) if i not in cooling and i not in self.retired]
            if not alive:
                alive = self._probe()
            if not alive:
                raise self._no_server("answers")
            return alive

    def pick(self) -> int:
        alive = self.in_rotation()
        with self._lock:
            self._next += 1
            return alive[self._next % len(alive)]

    def run(self, work: Sequence[Piece], call: Callable[[int, Piece], Any]) -> list[Any]:
        """``call(server, piece)`` for every piece until it succeeds once; results in ``work`` order.
        Only the calling thread picks servers and decides retries."""
        began = time.perf_counter()
        results: list[Any] = [None] * len(work)
        executor = ThreadPoolExecutor(max_workers=self.max_concurrency)
        try:
            futures = {self._submit(executor, call, piece): (k, 0) for k, piece in enumerate(work)}
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    k, attempt = futures.pop(future)
                    error = future.exception()
                    if error is None:
                        results[k] = future.result()
                        continue
                    self._failed(future.server, error, attempt)
                    futures[self._submit(executor, call, work[k])] = (k, attempt + 1)
        finally:  # on an error, do not wait for the queued pieces
            executor.shutdown(wait=False, cancel_futures=True)
            self.counters.wait_s += time.perf_counter() - began
        return results

    def _submit(self, executor: ThreadPoolExecutor, call: Callable[[int, Piece], Any], piece: Piece):
        server = self.pick()
        self.counters.requests += 1
        future = executor.submit(call, server, piece)
        future.server = server
        return future

    def _failed(self, server: int, error: BaseException, attempt: int) -> None:
        """Account for one failed request; raise when it must not (or may no more) be retried."""
        self.counters.failures += 1
        self.last_error[server] = str(error)
        if not isinstance(error, ServerError) or not error.retryable:
            if isinstance(error, self.error):
                raise error
            raise self.error(f"{self.name}: {error}") from error
        self._cool(server)
        if attempt >= self.max_retries:
            raise self.error(f"{self.name}: a request failed {attempt + 1} times; last error, from "
                             f"{self.label(server)}: {error}") from error
        self.log(f"[{self.name}] {self.label(server)} failed ({error}); retrying elsewhere "
                 f"(attempt {attempt + 2} of {self.max_retries + 1}), it rests {self.cooldown_s:.0f}s")
        time.sleep(self.backoff_s * 2 ** attempt)
        self.counters.retries += 1
