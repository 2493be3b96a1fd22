"""Owners for asyncio tasks and bounded thread pools for blocking work.

`TaskOwner` is the one place a group of long-lived tasks is started, supervised and stopped:
each task is named, a crash is logged (with the session id of the context that started it)
and reported to the owner's `on_crash`, and `close()` cancels and awaits every task and never
raises. `WorkerPool` is a small named thread pool: the loop's default executor belongs to
aiortc's encoders, so rendering, preparation and model work each get their own.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
CrashHandler = Callable[[str, BaseException], None]


class TaskOwner:
    def __init__(self, name: str, on_crash: CrashHandler | None = None) -> None:
        self.name = name
        self._on_crash = on_crash
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def start(self, work: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `work` as a task named `name`; a crash goes to `on_crash`."""
        if self._closed:
            work.close()
            raise RuntimeError(f"{self.name} is closed: cannot start {name}")
        task = asyncio.create_task(work, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    @property
    def running(self) -> list[asyncio.Task[Any]]:
        return [task for task in self._tasks if not task.done()]

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (error := task.exception()) is None:
            return
        logger.error("task %s crashed", task.get_name(), exc_info=error)
        if self._on_crash is not None and not self._closed:
            self._on_crash(task.get_name(), error)

    async def close(self) -> None:
        """Cancel every task and wait for all of them; never raises."""
        self._closed = True
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        # gather(return_exceptions=True) collects each task's end, crashes included; the
        # crashes were already logged by _finished.
        await asyncio.gather(*tasks, return_exceptions=True)


class WorkerPool:
    """A named, bounded thread pool; `run` awaits a blocking call on it from the loop."""

    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self.threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` on the pool, with the caller's context (its session id in logs)."""
        call = functools.partial(contextvars.copy_context().run, function, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def shutdown(self) -> None:
        """Stop accepting work; queued calls are cancelled, a running call finishes."""
        self._executor.shutdown(wait=False, cancel_futures=True)
