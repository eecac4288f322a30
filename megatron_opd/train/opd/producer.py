"""Trainer rank 0's rollout producer: step batches sampled, scored and tensorized ahead of the
trainer, within a bound on how old the weights behind a sample may be.

Batch j is sampled with the weights of step ``v(j) = max(j - S, first)``, S = ``rollout.max_staleness``
(0: strictly on-policy, every batch from the weights it trains; 1: one step off-policy, as the async
modes of slime / AReaL / NeMo-RL). With S > 0 two threads run ahead of the trainer: one generates
(waiting for ``v(j)`` to be synced), one scores and tensorizes (waiting on nothing but its input).
The trainer syncs version v only after every batch that must use v - 1 is generated, so which
weights sample which batch is fixed by (S, first step) alone: runs are deterministic for a seed
whatever the timing. Each sample carries the version that produced it; a batch with a sample
older than the bound (a server that missed a sync) is sampled again, and if the engine still
serves old weights the run stops naming the version.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from megatron_opd.records import Generated, Produced, version_number


class StaleWeightsError(RuntimeError):
    pass


def oldest_allowed(step: int, first: int, max_staleness: int) -> int:
    """The oldest weight version batch ``step`` may be sampled with."""
    return max(step - max_staleness, first)


class RolloutProducer:
    """``generate(step) -> Generated`` samples a step's prompts on the engine (whatever weights it
    serves); ``finish(generated) -> Produced`` scores and tensorizes it. ``get(step)`` hands the
    trainer batch ``step``; around each weight sync it calls ``before_sync(v)`` / ``after_sync(v)``."""

    def __init__(self, generate: Callable[[int], Generated], finish: Callable[[Generated], Produced], first: int,
                 end: int, max_staleness: int) -> None:
        self._generate, self._finish = generate, finish
        self.first, self.end, self.max_staleness = first, end, max_staleness
        self.synced = first  # the engine serves the trainer's weights at the first step (synced before)
        self.generated = first - 1  # every batch up to this one has been sampled
        self._ready: dict[int, Produced] = {}
        self._queue: list[Generated] = []
        self._error: BaseException | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        if max_staleness > 0:
            for target in (self._generate_loop, self._finish_loop):
                thread = threading.Thread(target=self._guard, args=(target,), daemon=True, name=target.__name__)
                thread.start()
                self._threads.append(thread)

    # -- trainer side -----------------------------------------------------------------------------
    def get(self, step: int) -> Produced:
        if not self._threads:  # on-policy: produce it now, in this thread
            produced = self._finish(self._checked(step))
            self.generated = step
        else:
            with self._cond:
                self._cond.wait_for(lambda: step in self._ready or self._error is not None)
                self._raise()
                produced = self._ready.pop(step)
        behind = step - produced.batch.weight_versions.min().item()
        if behind > self.max_staleness:  # never train on a sample older than the bound
            raise StaleWeightsError(f"step {step + 1}: a sample from weights step-{step - behind} is {behind} steps "
                                    f"old (rollout.max_staleness={self.max_staleness})")
        return produced

    def before_sync(self, version: int) -> float:
        """Block until every batch that must be sampled with weights older than ``version`` is;
        returns the seconds waited."""
        began = time.perf_counter()
        last_old = min(version + self.max_staleness - 1, self.end - 1)
        with self._cond:
            self._cond.wait_for(lambda: self.generated >= last_old or self._error is not None)
            self._raise()
        return time.perf_counter() - began

    def after_sync(self, version: int) -> None:
        with self._cond:
            self.synced = version
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=60)

    # -- producer threads ---------------------------------------------------------------------------
    def _checked(self, step: int) -> Generated:
        """Sample batch ``step``; again once if the engine served weights older than the bound."""
        need = oldest_allowed(step, self.first, self.max_staleness)
        for attempt in range(2):
            generated = self._generate(step)
            versions = [version_number(r.weight_version) for r in generated.rollouts]
            if min(versions) >= need:
                generated.resampled = attempt
                return generated
            if generated.scorer is not None:  # its scores are of samples that will not be trained
                generated.scorer.close()
        raise StaleWeightsError(f"step {step + 1}: the rollout engine serves weights step-{min(versions)}, older than "
                                f"step-{need} (rollout.max_staleness={self.max_staleness}): did a weight sync fail?")

    def _generate_loop(self) -> None:
        for step in range(self.first, self.end):
            need = oldest_allowed(step, self.first, self.max_staleness)
            with self._cond:
                self._cond.wait_for(lambda: self.synced >= need or self._closed)
                if self._closed:
                    return
            generated = self._checked(step)
            with self._cond:
                self.generated = step
                self._queue.append(generated)
                self._cond.notify_all()

    def _finish_loop(self) -> None:
        for _ in range(self.first, self.end):
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                generated = self._queue.pop(0)
            produced = self._finish(generated)
            with self._cond:
                self._ready[produced.step] = produced
                self._cond.notify_all()

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # handed to the trainer at its next get / before_sync
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error  # the original error (a TeacherError stays one), raised in the trainer
