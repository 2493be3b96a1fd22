"""One replica of the cluster: the gpuserver app (`create_app`) on one GPU, as a Serve ingress.

The replica holds its sessions' WebSockets (Serve's proxy relays their frames), their peer
connections (media goes straight from this box to the browser) and its engine's batcher.
Around the app sits `ReplicaIngress`, an ASGI layer that
- adds `node_id` and `replica` to the `session` greeting, and `x-gpuserver-replica` /
  `x-gpuserver-node` to every HTTP response (so `/healthz?replica=ID` shows who answered);
- keeps every open `/ws` so that a drain can end them (close 1012, "service restart").

`Drainer` notices that Serve is stopping the replica (downscale, redeploy, a drained node):
Serve has already stopped routing to it and waits up to `graceful_shutdown_timeout_s` for
its connections to end. The drainer tells every session `shutting_down`, lets the turns
that are speaking finish, then ends the sockets, so the replica goes as soon as it is
quiet instead of cutting sessions at Serve's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import ray
from fastapi import FastAPI
from pydantic import ValidationError
from ray import serve
from starlette.routing import Mount

from gpuserver.cluster import api
from gpuserver.cluster.router import PARKED_STAT, SESSIONS_STAT
from gpuserver.cluster.serve_state import ServeState
from gpuserver.config import ClusterSettings, Settings
from gpuserver.logging_setup import configure_logging
from gpuserver.protocol import SessionInfo, encode
from gpuserver.session_registry import SessionRegistry
from gpuserver.unified_server import announce_shutdown, create_app

logger = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]

CLOSE_SERVICE_RESTART = 1012
STOPPED_STATES = frozenset({"STOPPING", "STOPPED"})


@dataclass(frozen=True, slots=True)
class Placement:
    node_id: str
    replica: str


class ReplicaIngress:
    """The ASGI layer around one replica's app (see the module docstring)."""

    def __init__(self, app: ASGIApp, placement: Placement) -> None:
        self.app = app
        self.placement = placement
        self._endings: set[asyncio.Event] = set()
        self._headers = [
            (b"x-gpuserver-replica", placement.replica.encode()),
            (b"x-gpuserver-node", placement.node_id.encode()),
        ]

    @property
    def open_sockets(self) -> int:
        return len(self._endings)

    def end_sockets(self) -> None:
        for ending in self._endings:
            ending.set()

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.app(scope, receive, self._tag_response(send))
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _tag_response(self, send: Send) -> Send:
        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self._headers]}
            await send(message)

        return tagged

    def _placed(self, text: str) -> str:
        """The greeting with this replica's placement; any other first message unchanged."""
        try:
            greeting = SessionInfo.model_validate_json(text)
        except ValidationError:
            return text
        placement = {"node_id": self.placement.node_id, "replica": self.placement.replica}
        return encode(greeting.model_copy(update=placement))

    async def _websocket(self, scope: Message, receive: Receive, send: Send) -> None:
        ending = asyncio.Event()
        first_text = True
        closed = False

        async def placed_send(message: Message) -> None:
            nonlocal first_text, closed
            if message["type"] == "websocket.send" and first_text and message.get("text"):
                first_text = False
                message = {**message, "text": self._placed(message["text"])}
            elif message["type"] == "websocket.close":
                closed = True
                if ending.is_set():
                    message = {**message, "code": CLOSE_SERVICE_RESTART}
            await send(message)

        async def endable_receive() -> Message:
            receiving = asyncio.ensure_future(receive())
            ended = asyncio.ensure_future(ending.wait())
            try:
                done, _ = await asyncio.wait(
                    {receiving, ended}, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                ended.cancel()
                if not receiving.done():
                    receiving.cancel()
            if receiving in done:
                return receiving.result()
            return {"type": "websocket.disconnect", "code": CLOSE_SERVICE_RESTART}

        self._endings.add(ending)
        try:
            await self.app(scope, endable_receive, placed_send)
        finally:
            self._endings.discard(ending)
        if ending.is_set() and not closed:
            # The app saw a disconnect and closes nothing: close the client's socket here.
            await send({"type": "websocket.close", "code": CLOSE_SERVICE_RESTART})


class Drainer:
    """Drains the replica once Serve starts stopping it (see the module docstring)."""

    def __init__(self, replica: str, ingress: ReplicaIngress, settings: ClusterSettings) -> None:
        self.replica = replica
        self.ingress = ingress
        self.poll_s = settings.drain_poll_s
        # Leave Serve time to run the app's shutdown before its deadline kills the replica.
        self.turns_budget_s = max(0.0, settings.graceful_shutdown_timeout_s * 0.9 - self.poll_s)
        self._serve = ServeState()

    async def watch(self, sessions: SessionRegistry) -> None:
        # Serve tells a replica nothing when it starts stopping it: ask.
        while not await self._being_stopped():  # noqa: ASYNC110
            await asyncio.sleep(self.poll_s)
        try:
            await self.drain(sessions)
        except Exception:
            # Serve still ends the sessions at its deadline; the app's shutdown closes them.
            logger.exception("draining failed")

    async def _being_stopped(self) -> bool:
        try:
            app = await self._serve.app()
        except Exception:
            logger.warning("cannot reach Serve's controller; will ask again", exc_info=True)
            return False
        if app is None:
            return False  # no word on the app (its controller recovers): no reason to drain
        if app.status == "DELETING":
            return True
        if app.replicas is None:
            return False
        states = {info.replica: info.state for info in app.replicas}
        return states.get(self.replica, "STOPPED") in STOPPED_STATES

    async def drain(self, sessions: SessionRegistry) -> None:
        logger.info("Serve is stopping this replica: draining %d sessions", len(sessions))
        await announce_shutdown(sessions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.turns_budget_s
        while loop.time() < deadline:
            if all(session.speaking_turn is None for session in sessions):
                break
            await asyncio.sleep(0.2)
        self.ingress.end_sockets()


def _run_with(app: FastAPI, work: Callable[[], Awaitable[None]]) -> None:
    """Run `work` for as long as the app's lifespan, after its start-up."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with inner(app) as state:
            task = asyncio.create_task(work(), name="cluster-drainer")
            try:
                yield state
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app.router.lifespan_context = lifespan


@serve.deployment
@serve.ingress()
class GpuServerReplica:
    """The Serve deployment: `create_app(settings)` per replica, built on the replica."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gpuserver: FastAPI | None = None
        self.replica_ingress: ReplicaIngress | None = None

    async def __serve_build_asgi_app__(self) -> ReplicaIngress:
        replica = serve.get_replica_context().replica_id.unique_id
        placement = Placement(node_id=ray.get_runtime_context().get_node_id(), replica=replica)
        configure_logging(
            self.settings.logging.level,
            self.settings.logging.dir,
            file_name=f"replica-{replica}.log",
            tag=f"replica={replica}",
        )
        app = create_app(self.settings)
        app.state.placement = placement
        app.include_router(api.router)
        # The frontend is mounted at "/" and would shadow routes added after it.
        app.router.routes.sort(key=lambda route: isinstance(route, Mount))
        ingress = ReplicaIngress(app, placement)
        drainer = Drainer(replica, ingress, self.settings.cluster)
        _run_with(app, lambda: drainer.watch(app.state.sessions))
        self.gpuserver, self.replica_ingress = app, ingress
        logger.info("replica %s on node %s", replica, placement.node_id)
        return ingress

    def _sessions(self) -> SessionRegistry | None:
        return getattr(self.gpuserver.state, "sessions", None) if self.gpuserver else None

    def record_routing_stats(self) -> dict[str, Any]:
        """For the router: this replica's sessions (where a resuming reconnect goes) and how
        many wait for their client without a socket (load it cannot see)."""
        sessions = self._sessions()
        if sessions is None or self.replica_ingress is None:
            return {PARKED_STAT: 0, SESSIONS_STAT: []}
        return {
            PARKED_STAT: max(0, len(sessions) - self.replica_ingress.open_sockets),
            SESSIONS_STAT: [session.id for session in sessions],
        }

    async def report(self, replica: str) -> dict[str, Any]:
        """This replica's sessions for /api/cluster (`replica` routes the call here)."""
        assert self.gpuserver is not None
        return api.replica_report(self.gpuserver.state)
