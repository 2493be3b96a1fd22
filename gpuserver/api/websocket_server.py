"""The /ws endpoint: admission (auth, origin, capacity), limits, validation, ordered dispatch.

Every bad input is answered with an `error` message and the socket keeps working. A
`Connection` owns three tasks: the reader (frames -> validated messages), the dispatcher
(applies control messages one at a time, in arrival order) and the writer (the outbox -> the
socket, so any part of the session can send without awaiting the network). `ping` is
answered and `interrupt` applied as soon as they are read; an interrupt also takes its place
in the order, so it cuts a turn that a message read before it starts afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from gpuserver import __version__
from gpuserver.avatar_manager import AvatarNotFoundError
from gpuserver.config import Settings
from gpuserver.logging_setup import session_context
from gpuserver.protocol import (
    AvatarInfo,
    Chat,
    ClientMessage,
    Error,
    Interrupt,
    Ping,
    Pong,
    ProtocolError,
    ServerMessage,
    SessionInfo,
    SetAvatar,
    Speak,
    WebRTCIceCandidate,
    WebRTCOffer,
    encode,
    parse_client_message,
)
from gpuserver.sdp import SdpError
from gpuserver.services import Services
from gpuserver.session import Session
from gpuserver.session_registry import Refusal, SessionRegistry
from gpuserver.tasks import TaskOwner
from gpuserver.webrtc_streamer import NoPeerError

logger = logging.getLogger(__name__)
router = APIRouter()

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
OUTBOX_LIMIT = 1000  # messages a client may leave unread before it is dropped
CONTROL_QUEUE_LIMIT = 64  # messages waiting for the dispatcher (behind an offer, say)
REFUSALS: dict[Refusal, str] = {
    "busy": "the server is at capacity; try again later",
    "shutting_down": "the server is shutting down",
}


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self._tokens = burst
        self._stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def authorized(websocket: WebSocket, settings: Settings) -> str | None:
    """None if the client may connect, else why not."""
    origins = settings.server.allowed_origins
    origin = websocket.headers.get("origin")
    if "*" not in origins and origin is not None and origin not in origins:
        return f"origin {origin} is not allowed"
    token = settings.server.token
    if token is None:
        return None
    offered = websocket.query_params.get("token", "")
    bearer = websocket.headers.get("authorization", "")
    if bearer.lower().startswith("bearer "):
        offered = offered or bearer[7:]
    if not hmac.compare_digest(offered.encode(), token.get_secret_value().encode()):
        return "missing or wrong token"
    return None


class Connection:
    """One accepted WebSocket: its outbox, its limits, its tasks and its session."""

    def __init__(self, websocket: WebSocket, services: Services) -> None:
        self.websocket = websocket
        self.services = services
        limits = services.settings.limits
        self.max_bytes = limits.max_message_bytes
        self.max_text = limits.max_text_chars
        self._messages = TokenBucket(limits.messages_per_second, limits.messages_per_second * 2)
        self._turns = TokenBucket(limits.chat_per_minute / 60, limits.chat_per_minute)
        self._outbox: asyncio.Queue[ServerMessage | None] = asyncio.Queue()
        self._control: asyncio.Queue[Any] = asyncio.Queue(CONTROL_QUEUE_LIMIT)
        self._tasks = TaskOwner("connection", on_crash=self._crashed)
        self._ended = asyncio.Event()
        self._close_code: int | None = None
        self.session: Session | None = None

    # --- outgoing ------------------------------------------------------------------------

    def send(self, message: ServerMessage) -> None:
        """Queue `message` for the client; never waits."""
        if self._close_code is not None:
            return
        if isinstance(message, Error):
            self.services.telemetry.errors.labels(message.code).inc()
        if self._outbox.qsize() >= OUTBOX_LIMIT:
            logger.warning("client leaves %d messages unread: dropping it", OUTBOX_LIMIT)
            self.end(CLOSE_POLICY_VIOLATION, flush=False)
            return
        self._outbox.put_nowait(message)

    def end(self, code: int, *, flush: bool = True) -> None:
        """End the connection with close `code`, after writing what is queued if `flush`."""
        if self._close_code is not None:
            return
        self._close_code = code
        if flush:
            self._outbox.put_nowait(None)  # the writer stops after the rest
        else:
            self._ended.set()

    def _crashed(self, task_name: str, error: BaseException) -> None:
        self.send(Error(code="internal", message="internal server error; the session ends"))
        self.end(CLOSE_INTERNAL_ERROR)

    async def _write(self) -> None:
        try:
            # A client that went away makes sending fail: nothing more can be written.
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                while (message := await self._outbox.get()) is not None:
                    await self.websocket.send_text(encode(message))
        finally:
            self._ended.set()

    # --- incoming ------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.websocket.receive()
                if frame["type"] == "websocket.disconnect":
                    break
                text = frame.get("text")
                if text is None:
                    try:
                        text = (frame.get("bytes") or b"").decode("utf-8")
                    except UnicodeDecodeError:
                        self.send(
                            Error(code="invalid_json", message="binary frame is not UTF-8 JSON")
                        )
                        continue
                self.handle_frame(text)
        except WebSocketDisconnect:
            pass
        self.end(CLOSE_GOING_AWAY, flush=False)

    def handle_frame(self, text: str) -> None:
        size = len(text.encode("utf-8"))
        if size > self.max_bytes:
            self.send(
                Error(
                    code="too_large",
                    message=f"message is {size} bytes; the limit is {self.max_bytes}",
                )
            )
            return
        try:
            message = parse_client_message(text)
            self._admit(message)
        except ProtocolError as exc:
            self.send(exc.to_message())

    def _admit(self, message: ClientMessage) -> None:
        """Apply limits, answer what never waits, and queue the rest in arrival order."""
        ref = message.id or message.type
        if not self._messages.take():
            raise ProtocolError("rate_limited", "too many messages; slow down", ref)
        match message:
            case Ping(t=t):
                self.send(Pong(t=t))
                return
            case Interrupt():
                self._session.interrupt()  # at once; again in its place below
            case Chat(text=text) | Speak(text=text) if len(text) > self.max_text:
                raise ProtocolError(
                    "invalid_message", f"field 'text' is longer than {self.max_text} chars", ref
                )
            case Chat() | Speak() if not self._turns.take():
                raise ProtocolError("rate_limited", "too many chat/speak messages; slow down", ref)
        try:
            self._control.put_nowait(message)
        except asyncio.QueueFull:
            raise ProtocolError(
                "rate_limited", "too many messages waiting to be applied; slow down", ref
            ) from None

    # --- dispatch ------------------------------------------------------------------------

    @property
    def _session(self) -> Session:
        assert self.session is not None
        return self.session

    async def _dispatch_in_order(self) -> None:
        while True:
            message = await self._control.get()
            ref = message.id or message.type
            try:
                await self.dispatch(message)
            except ProtocolError as exc:
                exc.ref = exc.ref or ref
                self.send(exc.to_message())
            except SdpError as exc:
                self.send(Error(code="bad_sdp", message=str(exc), ref=ref))
            except NoPeerError as exc:
                self.send(Error(code="no_peer", message=str(exc), ref=ref))
            except AvatarNotFoundError as exc:
                self.send(Error(code="avatar_not_found", message=str(exc.args[0]), ref=ref))

    async def dispatch(self, message: ClientMessage) -> None:
        session = self._session
        match message:
            case WebRTCOffer():
                await session.accept_offer(message)
            case WebRTCIceCandidate():
                await session.add_ice_candidate(message)
            case Chat():
                session.chat(message)
            case Speak():
                session.speak(message)
            case Interrupt():
                session.interrupt()
            case SetAvatar(avatar_id=avatar_id):
                await session.set_avatar(avatar_id)

    # --- lifecycle -----------------------------------------------------------------------

    async def serve(self, session: Session) -> None:
        """Run the connection until the client leaves or it is ended."""
        self.session = session
        self._tasks.start(self._write(), "writer")
        self._tasks.start(self._read(), "reader")
        self._tasks.start(self._dispatch_in_order(), "dispatcher")
        await self._ended.wait()

    async def close(self) -> None:
        """Close session, tasks and socket (with the code `end` chose); never raises."""
        if self.session is not None:
            await self.session.close()
        await self._tasks.close()
        if self.websocket.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(RuntimeError, OSError):  # it broke meanwhile
                await self.websocket.close(self._close_code or CLOSE_GOING_AWAY)


@router.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    sessions: SessionRegistry = websocket.app.state.sessions
    settings = services.settings
    await websocket.accept()
    if (reason := authorized(websocket, settings)) is not None:
        logger.warning("rejected a WebSocket: %s", reason)
        await websocket.send_text(encode(Error(code="unauthorized", message=reason)))
        await websocket.close(CLOSE_POLICY_VIOLATION, reason=reason)
        return
    if (refusal := sessions.refusal()) is not None:
        await websocket.send_text(encode(Error(code=refusal, message=REFUSALS[refusal])))
        await websocket.close(CLOSE_TRY_AGAIN_LATER)
        return

    session_id = uuid.uuid4().hex[:12]
    session_context.set(session_id)  # every task started from here logs the session id
    connection = Connection(websocket, services)
    avatar = await services.avatars.prepared(settings.avatars.default)
    session = Session(
        session_id,
        services,
        connection.send,
        avatar,
        on_fatal=lambda: connection.end(CLOSE_INTERNAL_ERROR),
    )
    sessions.add(session)
    logger.info("session opened (%d active)", len(sessions))
    connection.send(
        SessionInfo(
            session_id=session_id,
            avatar_id=session.avatar_id,
            avatars=[AvatarInfo(id=e.id, name=e.name) for e in services.avatars.entries()],
            ice_servers=session.ice_servers(),
            server_version=__version__,
        )
    )
    try:
        await connection.serve(session)
    finally:
        sessions.discard(session)
        await connection.close()
        logger.info("session closed (%d active)", len(sessions))
