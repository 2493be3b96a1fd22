"""The shared inference worker: batching, deadlines, fairness, order, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gpuserver.engines.musetalk.batcher import BatchKind, BatchWorker


class Recorder:
    """A batch runner that records its batches and can be held to let jobs queue up."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, payloads: list[Any]) -> list[Any]:
        self.entered.set()
        self.gate.wait(5)
        self.batches.append(payloads)
        if any(p == "boom" for p in payloads):
            raise ValueError("boom")
        return [f"done:{p}" for p in payloads]

    @property
    def computed(self) -> list[Any]:
        return [p for batch in self.batches for p in batch]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def worker(recorder: Recorder) -> Iterator[BatchWorker]:
    audio = Recorder()
    worker = BatchWorker([BatchKind("audio", audio, 8, 0.0), BatchKind("frame", recorder, 4, 0.05)])
    yield worker
    recorder.gate.set()
    worker.close()


async def test_results_come_back_per_job(worker: BatchWorker) -> None:
    futures = [worker.submit(1, "frame", i) for i in range(6)]
    assert await asyncio.gather(*futures) == [f"done:{i}" for i in range(6)]


async def test_a_full_batch_runs_at_once_and_a_partial_one_after_the_deadline(
    worker: BatchWorker, recorder: Recorder
) -> None:
    recorder.gate.clear()
    blocker = worker.submit(0, "frame", "first")
    assert await asyncio.to_thread(recorder.entered.wait, 5)
    futures = [worker.submit(1, "frame", i) for i in range(5)]
    recorder.gate.set()
    await asyncio.gather(blocker, *futures)
    # Held up behind the first batch: 4 of the 5 went together, the fifth after the wait.
    assert [len(b) for b in recorder.batches] == [1, 4, 1]

    started = time.monotonic()
    await worker.submit(1, "frame", "alone")
    waited = time.monotonic() - started
    assert 0.04 <= waited < 1.0  # max_wait_s = 0.05 for a lone job


async def test_batches_take_sessions_in_turn_and_keep_each_ones_order(
    worker: BatchWorker, recorder: Recorder
) -> None:
    recorder.gate.clear()
    blocker = worker.submit(0, "frame", "first")
    assert await asyncio.to_thread(recorder.entered.wait, 5)
    a = [worker.submit(1, "frame", f"a{i}") for i in range(6)]
    b = [worker.submit(2, "frame", f"b{i}") for i in range(2)]
    recorder.gate.set()
    await asyncio.gather(blocker, *a, *b)
    # Session 1 queued 6 before session 2's 2, yet the first batch shares the worker.
    assert recorder.batches[1] == ["a0", "b0", "a1", "b1"]
    assert [p for p in recorder.computed if p.startswith("a")] == [f"a{i}" for i in range(6)]


async def test_cancelled_sessions_jobs_are_dropped_and_never_computed(
    worker: BatchWorker, recorder: Recorder
) -> None:
    recorder.gate.clear()
    running = [worker.submit(1, "frame", f"a{i}") for i in range(4)]
    assert await asyncio.to_thread(recorder.entered.wait, 5)
    queued = [worker.submit(1, "frame", f"a{i}") for i in range(4, 10)]
    other = worker.submit(2, "frame", "b0")
    assert worker.cancel(1) == 6
    recorder.gate.set()
    assert await other == "done:b0"
    await asyncio.gather(*running)  # the batch already running finishes
    assert all(f.cancelled() for f in queued)
    assert [p for p in recorder.computed if p.startswith("a")] == ["a0", "a1", "a2", "a3"]
    assert worker.stats.dropped == 6


async def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on(
    worker: BatchWorker,
) -> None:
    failing = worker.submit(1, "frame", "boom")
    with pytest.raises(ValueError, match="boom"):
        await failing
    assert await worker.submit(1, "frame", "fine") == "done:fine"


async def test_audio_jobs_are_served_before_waiting_frames(
    worker: BatchWorker, recorder: Recorder
) -> None:
    frame = worker.submit(1, "frame", "f")  # waits up to 50 ms for company
    audio = worker.submit(1, "audio", "a")
    assert await audio == "done:a"
    assert not frame.done()
    assert await frame == "done:f"


async def test_close_cancels_what_is_queued(recorder: Recorder) -> None:
    worker = BatchWorker([BatchKind("frame", recorder, 4, 10.0)])
    pending = worker.submit(1, "frame", "never")
    await asyncio.to_thread(worker.close)
    await asyncio.sleep(0)
    assert pending.cancelled()
    with pytest.raises(RuntimeError):
        worker.submit(1, "frame", "late")
