"""ProcessWorker: a service in a child process, streamed results, fairness, stop, crash, close."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpuserver.process_worker import (
    FairQueue,
    ProcessWorker,
    Reply,
    WorkerClosed,
    WorkerCrashed,
    WorkerError,
    _Job,
)

log = logging.getLogger("tests.fake_service")


class Unpicklable(Exception):
    def __init__(self, message: str, extra: int) -> None:  # pickling passes only `message`
        super().__init__(message)
        self.extra = extra


class FakeService:
    """Runs in the child. Requests are (op, *args) tuples; it remembers what it ran."""

    def __init__(self, start_delay: float = 0.0, fail_start: bool = False) -> None:
        time.sleep(start_delay)
        if fail_start:
            raise ValueError("no model here")
        self.ran: list[str] = []

    def handle(self, request: tuple[Any, ...], reply: Reply) -> None:
        op, *args = request
        if op == "history":
            reply.send(list(self.ran))
            return
        self.ran.append(str(args[0]) if args else op)
        if op == "count":  # ("count", tag, n): sends tag-0 .. tag-(n-1)
            tag, n = args
            for i in range(n):
                reply.send(f"{tag}-{i}")
        elif op == "until_stopped":  # ("until_stopped", tag): ticks until the caller leaves
            for i in range(3000):
                if reply.stopped:
                    self.ran.append(f"{args[0]} stopped after {i}")
                    return
                reply.send(i)
                time.sleep(0.01)
        elif op == "raise":
            raise ValueError(args[0])
        elif op == "raise_unpicklable":
            raise Unpicklable(args[0], 1)
        elif op == "log":
            log.warning("from the child: %s", args[0])
        elif op == "nice":
            reply.send(os.nice(0))
        elif op == "die":
            os.kill(os.getpid(), signal.SIGKILL)


def make_worker(**options: Any) -> ProcessWorker:
    return ProcessWorker(functools.partial(FakeService, **options), name="fake")


@pytest.fixture
async def worker() -> AsyncIterator[ProcessWorker]:
    running = make_worker()
    await running.wait_ready()
    yield running
    await running.aclose()


async def collect(worker: ProcessWorker, request: tuple[Any, ...], key: str = "") -> list[Any]:
    return [item async for item in worker.submit(request, key=key)]


async def history(worker: ProcessWorker) -> list[str]:
    (ran,) = await collect(worker, ("history",))
    return ran


async def start_blocker(worker: ProcessWorker, tag: str = "blocker") -> AsyncIterator[Any]:
    """A running request that holds the child until closed."""
    stream = worker.submit(("until_stopped", tag), key=tag)
    await anext(stream)
    return stream


async def wait_until_idle(worker: ProcessWorker) -> None:
    for _ in range(500):
        if not worker.busy:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the worker is still busy")


async def test_items_stream_back_in_order(worker: ProcessWorker) -> None:
    assert worker.ready
    assert await collect(worker, ("count", "a", 5)) == ["a-0", "a-1", "a-2", "a-3", "a-4"]


async def test_service_exception_is_raised_to_the_caller(worker: ProcessWorker) -> None:
    with pytest.raises(ValueError, match="bad request"):
        await collect(worker, ("raise", "bad request"))
    assert await collect(worker, ("count", "next", 1)) == ["next-0"]  # the child lives on


async def test_an_exception_that_cannot_be_pickled_arrives_as_worker_error(
    worker: ProcessWorker,
) -> None:
    with pytest.raises(WorkerError, match="Unpicklable: odd"):
        await collect(worker, ("raise_unpicklable", "odd"))


async def test_leaving_the_iteration_stops_the_running_request(worker: ProcessWorker) -> None:
    async with contextlib.aclosing(worker.submit(("until_stopped", "long"))) as stream:
        assert [await anext(stream) for _ in range(3)] == [0, 1, 2]
    await wait_until_idle(worker)
    (stopped,) = [line for line in await history(worker) if "stopped" in line]
    assert int(stopped.rsplit(" ", 1)[1]) < 100


async def test_cancelling_the_consumer_task_stops_the_running_request(
    worker: ProcessWorker,
) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in worker.submit(("until_stopped", "cancelled")):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until_idle(worker)
    assert any(line.startswith("cancelled stopped") for line in await history(worker))


async def test_a_queued_request_whose_consumer_left_never_runs(worker: ProcessWorker) -> None:
    blocker = await start_blocker(worker)
    queued = asyncio.create_task(collect(worker, ("count", "abandoned", 1)))
    await asyncio.sleep(0.1)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    await blocker.aclose()
    assert await collect(worker, ("count", "after", 1)) == ["after-0"]
    assert "abandoned" not in await history(worker)


async def test_waiting_requests_are_served_in_turns_by_key(worker: ProcessWorker) -> None:
    blocker = await start_blocker(worker)
    requests = [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("b", "b2")]
    tasks = [asyncio.create_task(collect(worker, ("count", tag, 1), key)) for key, tag in requests]
    await asyncio.sleep(0.1)  # all queued behind the blocker
    await blocker.aclose()
    await asyncio.gather(*tasks)
    ran = [tag for tag in await history(worker) if not tag.startswith("blocker")]
    assert ran == ["a1", "b1", "c1", "a2", "b2", "a3"]


async def test_a_waiting_request_is_told_its_place_as_it_moves_up(worker: ProcessWorker) -> None:
    blocker = await start_blocker(worker)
    first = asyncio.create_task(collect(worker, ("count", "first", 1), key="x"))
    places: list[int] = []

    async def second() -> list[Any]:
        stream = worker.submit(("count", "second", 1), key="y", on_queued=places.append)
        return [item async for item in stream]

    task = asyncio.create_task(second())
    await asyncio.sleep(0.1)
    assert places == [2]  # behind the blocker and `first`
    await blocker.aclose()
    assert await task == ["second-0"]
    await first
    assert places == [2, 1, 0]  # 0: it runs now


def test_fair_queue_serves_the_least_recently_served_key_first() -> None:
    queue = FairQueue()
    jobs = [_Job(i, key, None, None) for i, key in enumerate("aabac")]
    for job in jobs:
        queue.push(job)
    assert [job.id for job in queue.in_order()] == [0, 2, 4, 1, 3]
    assert queue.remove(jobs[2]) and not queue.remove(jobs[2])
    assert queue.pop() is jobs[0]
    queue.push(late := _Job(5, "d", None, None))  # a new key goes before a's second job
    assert list(iter(queue.pop, None)) == [jobs[4], late, jobs[1], jobs[3]]
    assert len(queue) == 0


async def test_the_child_runs_at_a_lower_priority(worker: ProcessWorker) -> None:
    assert await collect(worker, ("nice",)) == [min(19, os.nice(0) + 10)]


async def test_the_childs_log_records_reach_the_parents_logging(
    worker: ProcessWorker, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tests.fake_service"):
        await collect(worker, ("log", "hello"))
        for _ in range(100):  # records travel on the reader thread, beside the results
            if "from the child: hello" in caplog.text:
                break
            await asyncio.sleep(0.01)
    (record,) = [r for r in caplog.records if r.name == "tests.fake_service"]
    assert record.getMessage() == "from the child: hello" and record.process != os.getpid()


async def test_a_killed_child_fails_the_running_request_and_restarts_on_the_next(
    worker: ProcessWorker,
) -> None:
    old_pid = worker.pid
    with pytest.raises(WorkerCrashed, match="exited unexpectedly"):
        await collect(worker, ("die",))
    assert not worker.ready
    assert await collect(worker, ("count", "again", 2)) == ["again-0", "again-1"]
    assert worker.pid != old_pid
    assert old_pid not in [child.pid for child in multiprocessing.active_children()]


async def test_requests_waiting_behind_a_crash_run_in_the_new_child(worker: ProcessWorker) -> None:
    crash = asyncio.create_task(collect(worker, ("die",)))
    after = asyncio.create_task(collect(worker, ("count", "after", 1)))
    with pytest.raises(WorkerCrashed):
        await crash
    assert await after == ["after-0"]


async def test_a_failing_start_is_reported_to_waiters_and_requests() -> None:
    worker = make_worker(fail_start=True)
    try:
        with pytest.raises(ValueError, match="no model here"):
            await worker.wait_ready()
        with pytest.raises(ValueError, match="no model here"):
            await collect(worker, ("count", "x", 1))
        assert not worker.ready
    finally:
        await worker.aclose()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def process_exists(pid: int | None) -> bool:
    return os.path.exists(f"/proc/{pid}")


async def test_close_leaves_no_process_thread_or_descriptor_behind() -> None:
    for _ in range(2):  # the first run creates process-wide shared state
        fds, threads = open_fds(), set(threading.enumerate())
        worker = make_worker()
        await worker.wait_ready()
        blocker = await start_blocker(worker)  # closing with a request still running
        pid = worker.pid
        await worker.aclose()
        with pytest.raises(WorkerClosed):
            await anext(blocker)
        await blocker.aclose()
    assert multiprocessing.active_children() == []
    assert not process_exists(pid)  # reaped, not a zombie
    assert set(threading.enumerate()) == threads
    assert open_fds() == fds


async def test_close_while_the_service_is_still_starting_stops_the_child() -> None:
    worker = make_worker(start_delay=60)
    worker.start()
    pending = asyncio.create_task(collect(worker, ("count", "x", 1)))
    await asyncio.sleep(0.2)
    await worker.aclose()
    with pytest.raises(WorkerClosed):
        await pending
    assert multiprocessing.active_children() == []
    with pytest.raises(WorkerClosed):
        await collect(worker, ("count", "y", 1))
