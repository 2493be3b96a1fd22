"""One inference thread per model copy, batching the jobs of every session.

Sessions submit jobs from the event loop and await asyncio futures; the thread gathers
jobs of one kind into a batch (up to `max_batch`, waiting at most `max_wait_s` after the
oldest pending job for more), runs it and resolves the futures through
`loop.call_soon_threadsafe`. Kinds are served in priority order (audio encodes first:
they unblock frames). Within a kind, batches take one job per session in turn, so a
session with a long answer queued cannot starve the others; each session's jobs keep
their order. `cancel(owner)` drops a session's queued jobs: they are never computed.
Sessions bound their own in-flight jobs (see `stream`), so the queues are bounded by
sessions x that bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

BatchRunner = Callable[[list[Any]], Sequence[Any]]  # payloads -> one result per payload


@dataclass(frozen=True)
class BatchKind:
    name: str
    run: BatchRunner  # called on the inference thread
    max_batch: int
    max_wait_s: float


@dataclass(eq=False)
class _Job:
    payload: Any
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class WorkerStats:
    """Counters for tests, logs and benchmarks (updated on the inference thread)."""

    jobs: Counter[str] = field(default_factory=Counter)  # computed, per kind
    batches: Counter[str] = field(default_factory=Counter)
    dropped: int = 0  # queued jobs cancelled before they ran
    busy_s: float = 0.0
    last_batch: int = 0  # jobs in the latest batch


class BatchWorker:
    def __init__(self, kinds: Sequence[BatchKind], name: str = "inference") -> None:
        self._kinds = {kind.name: kind for kind in kinds}
        # kind -> owner -> that owner's queued jobs (insertion order = round-robin order)
        self._queues: dict[str, OrderedDict[int, deque[_Job]]] = {
            k.name: OrderedDict() for k in kinds
        }
        self._condition = threading.Condition()
        self._closed = False
        self.stats = WorkerStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, owner: int, kind: str, payload: Any) -> asyncio.Future[Any]:
        """Queue one job (from the event loop); its future resolves with the result."""
        loop = asyncio.get_running_loop()
        job = _Job(payload, loop.create_future(), loop)
        with self._condition:
            if self._closed:
                raise RuntimeError("the inference worker is closed")
            self._queues[kind].setdefault(owner, deque()).append(job)
            self._condition.notify()
        return job.future

    def cancel(self, owner: int) -> int:
        """Drop `owner`'s queued jobs (from the event loop); returns how many."""
        with self._condition:
            jobs = [job for queue in self._queues.values() for job in queue.pop(owner, ())]
            self.stats.dropped += len(jobs)
        for job in jobs:
            job.future.cancel()
        return len(jobs)

    def close(self) -> None:
        """Stop the thread after the running batch (blocking); queued jobs are cancelled."""
        with self._condition:
            self._closed = True
            jobs = [
                job
                for queue in self._queues.values()
                for queued in queue.values()
                for job in queued
            ]
            for queue in self._queues.values():
                queue.clear()
            self._condition.notify()
        for job in jobs:
            _settle(job, cancel=True)
        self._thread.join()

    # --- the inference thread -----------------------------------------------------------

    def _run(self) -> None:
        while (work := self._next_batch()) is not None:
            kind, jobs = work
            started = time.monotonic()
            try:
                results = kind.run([job.payload for job in jobs])
                if len(results) != len(jobs):
                    raise RuntimeError(f"{kind.name}: {len(results)} results for {len(jobs)} jobs")
            except Exception as exc:  # the jobs fail, the worker goes on
                logger.exception("%s batch of %d failed", kind.name, len(jobs))
                for job in jobs:
                    _settle(job, error=exc)
            else:
                for job, result in zip(jobs, results, strict=True):
                    _settle(job, result=result)
            elapsed = time.monotonic() - started
            self.stats.jobs[kind.name] += len(jobs)
            self.stats.batches[kind.name] += 1
            self.stats.last_batch = len(jobs)
            self.stats.busy_s += elapsed
            logger.debug("%s batch of %d in %.1f ms", kind.name, len(jobs), elapsed * 1000)

    def _next_batch(self) -> tuple[BatchKind, list[_Job]] | None:
        """Block until a batch is due (full, or its oldest job waited max_wait_s)."""
        with self._condition:
            while not self._closed:
                now = time.monotonic()
                next_due = None
                for kind in self._kinds.values():
                    owners = self._queues[kind.name]
                    if not owners:
                        continue
                    pending = sum(len(jobs) for jobs in owners.values())
                    due = min(jobs[0].submitted for jobs in owners.values()) + kind.max_wait_s
                    if pending >= kind.max_batch or due <= now:
                        return kind, self._take(owners, kind.max_batch)
                    next_due = due if next_due is None else min(next_due, due)
                self._condition.wait(None if next_due is None else next_due - now)
            return None

    @staticmethod
    def _take(owners: OrderedDict[int, deque[_Job]], limit: int) -> list[_Job]:
        """Up to `limit` jobs, one per owner in turn; served owners move to the back."""
        batch: list[_Job] = []
        while owners and len(batch) < limit:
            for owner in list(owners)[: limit - len(batch)]:
                jobs = owners[owner]
                batch.append(jobs.popleft())
                if jobs:
                    owners.move_to_end(owner)
                else:
                    del owners[owner]
        return batch


def _settle(
    job: _Job, result: Any = None, error: BaseException | None = None, cancel: bool = False
) -> None:
    """Resolve a job's future on its loop (a no-op if it was cancelled meanwhile)."""

    def settle() -> None:
        if job.future.done():
            return
        if cancel:
            job.future.cancel()
        elif error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
        job.loop.call_soon_threadsafe(settle)
