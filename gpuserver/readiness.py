"""Whether the server can answer now: the LLM's and the TTS's readiness, watched over time.

A backend is `loading` while its `ready` property is false (the embedded LLM loads for ~25 s
in the background), `unavailable` while its `probe()` names a problem (an OpenAI-compatible
server that cannot be reached), else `ready`. The monitor asks every backend once at start,
then polls loading ones every half second (reading a property) and probes the others every
`interval_s` (an HTTP request for remote ones). Subscribers (each WebSocket, the console) hear
of every change of state or message, not of the countdown in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Literal, Protocol

from gpuserver.protocol import BackendReadiness, Readiness, ReadinessInfo

logger = logging.getLogger(__name__)

State = Literal["ready", "loading", "unavailable"]
LOADING_POLL_S = 0.5
COMPONENTS = ("llm", "tts")


class Backend(Protocol):
    """What the monitor needs of an LLM or TTS backend (both bases provide it)."""

    name: str

    @property
    def ready(self) -> bool: ...

    async def probe(self) -> str | None: ...


Listener = Callable[[Readiness], None]


class ReadinessMonitor:
    """Watches the LLM and the TTS; `info()` is their state now, `subscribe` hears changes.

    `load_estimate_s` (the LLM's typical load time) turns into `eta_s` while it loads.
    `interval_s` = 0 probes only at start.
    """

    def __init__(
        self,
        llm: Backend,
        tts: Backend,
        *,
        interval_s: float = 30.0,
        load_estimate_s: float | None = None,
    ) -> None:
        self._backends: dict[str, Backend] = {"llm": llm, "tts": tts}
        self._interval_s = interval_s
        self._load_estimate_s = load_estimate_s
        self._started = time.monotonic()
        self._status: dict[str, tuple[State, str | None]] = {
            name: ("ready", None) if backend.ready else ("loading", None)
            for name, backend in self._backends.items()
        }
        self._listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Probe every backend once (so the first greeting is accurate), then keep watching."""
        await asyncio.gather(*(self._check(name) for name in self._backends))
        self._tasks = [
            asyncio.create_task(self._watch(name), name=f"readiness-{name}")
            for name in self._backends
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    @property
    def ready(self) -> bool:
        return all(state == "ready" for state, _ in self._status.values())

    def state(self, component: str) -> State:
        return self._status[component][0]

    def info(self) -> ReadinessInfo:
        return ReadinessInfo(ready=self.ready, **self._components())

    def message(self) -> Readiness:
        return Readiness(ready=self.ready, **self._components())

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with a `readiness` message on every change; returns unsubscribe."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def eta_s(self) -> float | None:
        """Seconds the LLM is expected to load still; None when unknown or overdue (a busy
        machine loads slower than the estimate)."""
        if self._load_estimate_s is None or self.state("llm") != "loading":
            return None
        left = self._load_estimate_s - (time.monotonic() - self._started)
        return round(left, 1) if left >= 1 else None

    def _components(self) -> dict[str, BackendReadiness]:
        return {
            name: BackendReadiness(
                backend=self._backends[name].name,
                state=state,
                message=message,
                eta_s=self.eta_s() if name == "llm" else None,
            )
            for name, (state, message) in self._status.items()
        }

    async def _watch(self, name: str) -> None:
        while True:
            if self.state(name) == "loading":
                await asyncio.sleep(LOADING_POLL_S)
            elif self._interval_s > 0:
                await asyncio.sleep(self._interval_s)
            else:
                return
            await self._check(name)

    async def _check(self, name: str) -> None:
        backend = self._backends[name]
        status: tuple[State, str | None]
        if not backend.ready:
            status = ("loading", None)
        else:
            try:
                problem = await backend.probe()
            except Exception as exc:  # a probe bug must not stop the watching
                logger.exception("checking the %s failed", name.upper())
                problem = f"health check failed: {exc}"
            status = ("ready", None) if problem is None else ("unavailable", problem)
        if status != self._status[name]:
            self._status[name] = status
            message = self.message()
            for listener in list(self._listeners):
                listener(message)


class ConsoleReport:
    """Logs what a person at the console needs to know: a backend that became ready or
    unavailable, and the moment the server can answer. Subscribe it to the monitor."""

    def __init__(self, url: str, now: ReadinessInfo) -> None:
        self._url = url
        self._last = now

    def __call__(self, readiness: Readiness) -> None:
        for name in COMPONENTS:
            before: BackendReadiness = getattr(self._last, name)
            after: BackendReadiness = getattr(readiness, name)
            if (before.state, before.message) == (after.state, after.message):
                continue
            if after.state == "unavailable":
                logger.warning("%s not ready: %s", name.upper(), after.message)
            elif after.state == "ready" and not readiness.ready:
                logger.info("%s ready", name.upper())
        if readiness.ready and not self._last.ready:
            logger.info("ready: open %s", self._url)
        self._last = readiness


def describe_waiting(info: ReadinessInfo) -> str:
    """A short clause saying what the server waits for, e.g. "LLM loading, ~25 s"."""
    parts = []
    for name in COMPONENTS:
        component: BackendReadiness = getattr(info, name)
        if component.state == "loading":
            eta = f", ~{component.eta_s:.0f} s" if component.eta_s is not None else ""
            parts.append(f"{name.upper()} loading{eta}")
        elif component.state == "unavailable":
            parts.append(f"{name.upper()} unavailable: {component.message}")
    return "; ".join(parts)
