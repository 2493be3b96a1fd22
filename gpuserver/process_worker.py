"""A CPU-heavy, GIL-holding service (an embedded LLM, CPU speech recognition) in a child process.

Why: torch work that holds the GIL for long stretches (loading and de-quantizing weights,
generating) starves the event loop and aiortc's encoders when it shares their interpreter
(a speaking session's video fell to fps p5 ~17 while the embedded LLM loaded in-process).
In a child process, at a lower OS priority, it only takes CPU the media path leaves over.

Parent side (one event loop; every method is called from it)::

    worker = ProcessWorker(functools.partial(MyService, size=3), name="my-service")
    worker.start()                      # spawns the child, which builds the service; returns
    await worker.wait_ready()           # raises what building the service raised
    async for item in worker.submit(request, key=session_id, on_queued=tell_user):
        ...                             # items the service sends for this request
    await worker.aclose()               # stops the child; no process, thread or fd is left

- One request runs at a time. Waiting requests are served in turns by `key` (e.g. the
  session id): next comes the key served least recently, so one caller's burst does not hold
  everyone else back (FairQueue). `on_queued(n)` is called (on the loop) when a request has
  to wait behind n others (the running one included), again whenever n changes (it grows
  when another key's first request goes ahead), and with 0 when it starts.
- Leaving the iteration (break, aclose, cancellation) stops the request: a queued one is
  dropped without reaching the child, a running one sees `reply.stopped` turn true.
- A service exception is raised from the iteration (the same exception when it pickles);
  a child that dies (killed, segfault) raises WorkerCrashed in the running request, and a
  new child is started for the requests after it. `ready` is false until the service is built.
- The child's log records are handled by the parent's loggers (same files, same format).
- `aclose()` ends waiting and running requests with WorkerClosed; `niceness` (default 10)
  is added to the child's OS priority; `ready`, `busy` and `pid` are for health checks.

Child side: `factory` is a picklable callable (a module-level class, or functools.partial of
one) returning a `Service`; it runs in a fresh interpreter (multiprocessing "spawn"), so
everything it needs must be importable there.

    class MyService:
        def handle(self, request, reply: Reply) -> None:
            for item in work(request):
                if reply.stopped:       # check often (e.g. per token): stops within one item
                    return
                reply.send(item)        # anything picklable
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")
_NO_REQUEST = -1  # the stop flag's value when no request is to stop
# Seconds the child gets to leave on its own at close before it is terminated, then killed.
_CLOSE_GRACE_S = 3.0


class WorkerError(RuntimeError):
    """The worker process could not serve a request."""


class WorkerCrashed(WorkerError):
    """The child process died while the request was running (or before it was ready)."""


class WorkerClosed(WorkerError):
    """The worker was closed before the request ran."""


class Reply:
    """A running request's channel back to its caller (child side)."""

    def __init__(self, job_id: int, send: Callable[[Any], None], stop: Any) -> None:
        self._job_id = job_id
        self._send = send
        self._stop = stop

    @property
    def stopped(self) -> bool:
        """True once the caller left: stop working on this request."""
        return bool(self._stop.value == self._job_id)

    def send(self, item: Any) -> None:
        self._send(("item", self._job_id, item))


class Service(Protocol):
    def handle(self, request: Any, reply: Reply) -> None:
        """Work on one request, sending results with `reply.send`, until done or stopped."""


ServiceFactory = Callable[[], Service]
OnQueued = Callable[[int], None]


# --- the parent side ------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    id: int
    key: str
    request: Any
    on_queued: OnQueued | None
    results: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    reported: int = 0  # the last position told to on_queued
    finished: bool = False  # its end (done or an error) is delivered; later messages are dropped

    def deliver(self, kind: str, value: Any = None) -> None:
        if not self.finished:
            self.results.put_nowait((kind, value))
            self.finished = kind != "item"

    def fail_now(self, error: BaseException) -> None:
        """End with `error`, ahead of any results not yet read."""
        while not self.results.empty():
            self.results.get_nowait()
        self.deliver("error", error)


class FairQueue:
    """Waiting jobs, FIFO within a key. The next job comes from the key served least recently
    (keys not served lately first, by arrival), so a burst from one key waits behind one job
    of every other key, including keys that arrive later.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, deque[_Job]] = {}
        self._served: list[str] = []  # keys served lately, least recent first

    def __len__(self) -> int:
        return sum(len(jobs) for jobs in self._waiting.values())

    def push(self, job: _Job) -> None:
        self._waiting.setdefault(job.key, deque()).append(job)

    def pop(self) -> _Job | None:
        return _take_next(self._waiting, self._served)

    def remove(self, job: _Job) -> bool:
        jobs = self._waiting.get(job.key)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        if not jobs:
            del self._waiting[job.key]
        return True

    def in_order(self) -> Iterator[_Job]:
        """The jobs in the order they will be served if nothing else arrives."""
        waiting = {key: deque(jobs) for key, jobs in self._waiting.items()}
        served = list(self._served)
        while (job := _take_next(waiting, served)) is not None:
            yield job

    def drain(self) -> list[_Job]:
        jobs = list(self.in_order())
        self._waiting.clear()
        return jobs


def _take_next(waiting: dict[str, deque[_Job]], served: list[str]) -> _Job | None:
    if not waiting:
        return None

    def rank(key: str) -> tuple[int, int]:
        return (served.index(key) if key in served else -1, waiting[key][0].id)

    key = min(waiting, key=rank)
    jobs = waiting[key]
    job = jobs.popleft()
    if not jobs:
        del waiting[key]
    # Remember the keys that still wait and the one just served; forget the rest.
    served[:] = [k for k in served if k in waiting and k != key] + [key]
    return job


class _Child:
    """One incarnation of the child process, its pipes and the parent's reader thread."""

    def __init__(
        self,
        worker: ProcessWorker,
        factory: ServiceFactory,
        stop: Any,
        niceness: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.ready.add_done_callback(_retrieve)  # nobody may be waiting
        self.exited: asyncio.Future[int | None] = loop.create_future()
        child_requests, self.requests = _SPAWN.Pipe(duplex=False)
        self._results, child_results = _SPAWN.Pipe(duplex=False)
        level = logging.getLogger().getEffectiveLevel()
        self.process = _SPAWN.Process(
            target=_child_main,
            args=(factory, child_requests, child_results, stop, niceness, level),
            name=worker.name,
            daemon=True,  # a safety net only: aclose() stops it
        )
        self.process.start()
        child_requests.close()  # the child holds its own copies; ours would hide its exit
        child_results.close()
        self._reader = threading.Thread(
            target=self._read,
            args=(loop, worker),
            name=f"{worker.name}-reader",
            daemon=True,  # joined by finish(); daemon so a leaked worker cannot hang exit
        )
        self._reader.start()

    def send(self, message: Any) -> None:
        """Write to the child; it is idle, reading, whenever we write."""
        with contextlib.suppress(OSError):  # the child died: the reader thread reports it
            self.requests.send(message)

    def finish(self) -> int | None:
        """After the reader saw the child exit: reap it and release the pipes and thread."""
        self._reader.join()
        self.process.join()
        self.requests.close()
        self._results.close()
        code = self.process.exitcode
        self.process.close()
        return code

    def _read(self, loop: asyncio.AbstractEventLoop, worker: ProcessWorker) -> None:
        """Reader thread: forward child messages to the loop until the child exits."""
        sentinel = self.process.sentinel
        while True:
            ready = wait([self._results, sentinel])
            if self._results not in ready:
                break  # exited, and nothing more to read
            try:
                message = self._results.recv()
            except (EOFError, OSError):
                break
            if message[0] == "log":
                _handle_record(message[1])
            else:
                _call_soon(loop, worker._on_message, self, message)
        wait([sentinel])  # the pipe closes before the interpreter has finished exiting
        _call_soon(loop, worker._on_exit, self)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
        loop.call_soon_threadsafe(callback, *args)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _handle_record(record: logging.LogRecord) -> None:
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


class ProcessWorker:
    """A service object in a child process; see the module docstring."""

    def __init__(self, factory: ServiceFactory, *, name: str, niceness: int = 10) -> None:
        self.name = name
        self._factory = factory
        self._niceness = niceness
        self._stop = _SPAWN.RawValue("q", _NO_REQUEST)  # the running request to stop
        self._ids = count()
        self._queue = FairQueue()
        self._child: _Child | None = None
        self._running: _Job | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def ready(self) -> bool:
        """The child is up and its service built."""
        child = self._child
        return child is not None and child.ready.done() and child.ready.exception() is None

    @property
    def busy(self) -> bool:
        """A request is running in the child (until it has finished there, even if abandoned)."""
        return self._running is not None

    @property
    def pid(self) -> int | None:
        child = self._child
        return None if child is None else child.process.pid

    def start(self) -> None:
        """Start the child (once; again after it died). Returns at once."""
        self._ensure_child()

    async def wait_ready(self) -> None:
        """Start if needed and wait until the service is built; raises why it could not be."""
        # Shielded: a cancelled waiter must not cancel the shared start.
        await asyncio.shield(self._ensure_child().ready)

    async def submit(
        self, request: Any, *, key: str = "", on_queued: OnQueued | None = None
    ) -> AsyncIterator[Any]:
        """Run `request`, yielding what the service sends for it; see the module docstring."""
        self._ensure_child()
        job = _Job(next(self._ids), key, request, on_queued)
        self._queue.push(job)
        try:
            self._dispatch()
            while True:
                kind, value = await job.results.get()
                if kind == "item":
                    yield value
                elif kind == "done":
                    return
                else:
                    raise value
        finally:
            self._abandon(job)

    async def aclose(self) -> None:
        """Fail queued requests, stop the running one and the child; idempotent."""
        self._closed = True
        closed = WorkerClosed(f"the {self.name} worker is closed")
        self._fail_waiting(closed)
        if self._running is not None:
            self._stop.value = self._running.id
            self._running.fail_now(closed)
        child = self._child
        if child is None:
            return
        if child.ready.done():
            child.send(None)  # leave after the running request
        else:
            child.process.terminate()  # still building the service: nothing to finish
        for step in (child.process.terminate, child.process.kill, None):
            try:
                await asyncio.wait_for(asyncio.shield(child.exited), _CLOSE_GRACE_S)
                return
            except TimeoutError:
                if step is None:
                    log.error("%s worker did not exit even when killed", self.name)
                    return
                log.warning("%s worker did not exit: %s", self.name, step.__name__)
                step()

    # Loop-side bookkeeping.

    def _ensure_child(self) -> _Child:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(f"the {self.name} worker belongs to another event loop")
        if self._closed:
            raise WorkerClosed(f"the {self.name} worker is closed")
        if self._child is None:
            self._child = _Child(self, self._factory, self._stop, self._niceness)
            log.info("%s worker: started process %d", self.name, self._child.process.pid)
        return self._child

    def _dispatch(self) -> None:
        """Send the next waiting job to the child if it is idle; tell the others their place."""
        child = self._child
        if self._running is None and self.ready:
            assert child is not None
            job = self._queue.pop()
            if job is not None:
                self._running = job
                self._tell(job, 0)
                child.send(("run", job.id, job.request))
        ahead = 0 if self._running is None else 1
        for position, job in enumerate(self._queue.in_order(), ahead):
            self._tell(job, position)

    def _tell(self, job: _Job, position: int) -> None:
        if job.on_queued is not None and position != job.reported:
            job.reported = position
            asyncio.get_running_loop().call_soon(job.on_queued, position)

    def _abandon(self, job: _Job) -> None:
        if self._queue.remove(job):
            self._dispatch()  # the others move up
        elif job is self._running:
            self._stop.value = job.id  # finishes within an item; "done" then frees the child

    def _on_message(self, child: _Child, message: tuple[Any, ...]) -> None:
        if child is not self._child:
            return
        kind = message[0]
        if kind == "ready":
            child.ready.set_result(None)
            log.info("%s worker: ready", self.name)
        elif kind == "failed":
            log.error("%s worker: could not start: %s", self.name, message[1])
            child.ready.set_exception(message[1])
            self._fail_waiting(message[1])
        elif self._running is not None and message[1] == self._running.id:
            if kind == "item":
                self._running.deliver("item", message[2])
                return
            error = message[2]
            self._running.deliver("done" if error is None else "error", error)
            self._running = None
        self._dispatch()

    def _on_exit(self, child: _Child) -> None:
        code = child.finish()
        child.exited.set_result(code)
        if child is not self._child:
            return
        self._child = None
        if self._closed:
            log.info("%s worker: process exited (code %s)", self.name, code)
            return
        if not (child.ready.done() and child.ready.exception() is not None):  # else reported
            crashed = WorkerCrashed(
                f"the {self.name} worker process exited unexpectedly (code {code})"
            )
            log.error("%s", crashed)
            if not child.ready.done():  # died while building the service: do not retry in a loop
                child.ready.set_exception(crashed)
                self._fail_waiting(crashed)
            if self._running is not None:
                self._running.deliver("error", crashed)
                self._running = None
        if len(self._queue):
            self._ensure_child()  # the waiting requests are the "next request"

    def _fail_waiting(self, error: BaseException) -> None:
        for job in self._queue.drain():
            job.deliver("error", error)


# --- the child side -------------------------------------------------------------------------


class _PipeLogHandler(logging.Handler):
    """Ships log records to the parent, formatted as QueueHandler does (picklable)."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.msg = record.getMessage()
            if record.exc_info:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.args, record.exc_info = None, None
            self._send(("log", record))
        except Exception:
            self.handleError(record)


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a WorkerError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return WorkerError(f"{type(exc).__name__}: {exc}")
    return exc


def _child_main(
    factory: ServiceFactory,
    requests: Connection,
    results: Connection,
    stop: Any,
    niceness: int,
    log_level: int,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the group: the parent decides
    os.nice(niceness)
    lock = threading.Lock()  # the service's threads may log while the main thread sends

    def send(message: Any) -> None:
        with lock:
            results.send(message)

    root = logging.getLogger()
    root.handlers.clear()
    root.addHandler(_PipeLogHandler(send))
    root.setLevel(log_level)
    logging.captureWarnings(True)
    with contextlib.suppress(EOFError, BrokenPipeError):  # the parent is gone
        _serve(factory, requests, send, stop)
    os._exit(0)  # skip the interpreter's teardown: freeing a big model can take seconds


def _serve(
    factory: ServiceFactory, requests: Connection, send: Callable[[Any], None], stop: Any
) -> None:
    try:
        service = factory()
    except Exception as exc:
        send(("failed", _portable(exc)))
        return
    send(("ready",))
    while (message := requests.recv()) is not None:
        _, job_id, request = message
        error: BaseException | None = None
        try:
            service.handle(request, Reply(job_id, send, stop))
        except BrokenPipeError:
            raise
        except Exception as exc:
            error = _portable(exc)
        send(("done", job_id, error))
