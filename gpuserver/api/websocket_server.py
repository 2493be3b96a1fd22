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
import logging
import time
import uuid
from collections import deque
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from gpuserver import __version__
from gpuserver.api.auth import client_token, origin_allowed, quoted, token_matches
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
    SetVoice,
    Speak,
    VoiceInputInfo,
    WebRTCIceCandidate,
    WebRTCOffer,
    encode,
    parse_client_message,
)
from gpuserver.sdp import SdpError
from gpuserver.services import Services
from gpuserver.session import Session
from gpuserver.session_registry import SessionRegistry
from gpuserver.tasks import TaskOwner
from gpuserver.tts.base import VoiceNotFoundError
from gpuserver.webrtc_streamer import NoPeerError

logger = logging.getLogger(__name__)
router = APIRouter()

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_REASON_BYTES = 123  # the protocol's limit for a close frame's reason
CONTROL_QUEUE_LIMIT = 64  # messages waiting for the dispatcher (behind an offer, say)
CLOSE_TIMEOUT_S = 1.0
INVALID_WINDOW_S = 10.0
# Errors caused by what the client sent; they spend its error budget.
CLIENT_FAULTS = frozenset(
    {"invalid_json", "invalid_message", "unknown_type", "too_large", "bad_sdp"}
)
RATE_NOTICE_S = 1.0  # a client over the frame rate is told so at most this often


def close_reason(text: str) -> str:
    """`text` cut to what a close frame can carry."""
    return text.encode()[:CLOSE_REASON_BYTES].decode(errors="ignore")


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
    """None if the client may connect, else why not (short: it becomes the close reason)."""
    server = settings.server
    origin = websocket.headers.get("origin")
    if not origin_allowed(origin, websocket.headers.get("host"), server.allowed_origins):
        return f"origin {quoted(origin or '')} is not allowed"
    if server.token is None:
        return None
    if not token_matches(client_token(websocket.headers, websocket.query_params), server.token):
        return "missing or wrong token"
    return None


class Connection:
    """One accepted WebSocket: its outbox, its budgets, its tasks and its session.

    Budgets are spent before work is done: every frame takes a token from the rate bucket
    before it is decoded, rejected messages spend an error budget that closes the socket
    when exhausted, a silent socket is closed after the idle timeout, and a client that
    leaves more than `max_unread_bytes` unread is dropped instead of growing the server.
    """

    def __init__(self, websocket: WebSocket, services: Services) -> None:
        self.websocket = websocket
        self.services = services
        limits = services.settings.limits
        self.limits = limits
        self._frames = TokenBucket(limits.messages_per_second, limits.messages_per_second * 2)
        self._turns = TokenBucket(limits.chat_per_minute / 60, limits.chat_per_minute)
        self._faults: deque[float] = deque()  # when recent rejected messages arrived
        self._rate_noticed = -RATE_NOTICE_S
        self._outbox: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue()
        self._unread_bytes = 0
        self._drop = False  # the client reads nothing: no close frame can reach it
        self._control: asyncio.Queue[Any] = asyncio.Queue(CONTROL_QUEUE_LIMIT)
        self._tasks = TaskOwner("connection", on_crash=self._crashed)
        self._ended = asyncio.Event()
        self._close: tuple[int, str] | None = None
        self.resumable = True
        self.handed_over = False
        self.session: Session | None = None

    # --- outgoing ------------------------------------------------------------------------

    def send(self, message: ServerMessage) -> None:
        """Queue `message` for the client; never waits."""
        if self._close is not None:
            return
        if isinstance(message, Error):
            self.services.telemetry.errors.labels(message.code).inc()
        text = encode(message)
        size = len(text.encode())
        if self._unread_bytes + size > self.limits.max_unread_bytes:
            logger.warning("client leaves over %d bytes unread: dropping it", self._unread_bytes)
            self.end(
                CLOSE_POLICY_VIOLATION, "too many unread messages", flush=False, resumable=False
            )
            self._drop = True
            return
        self._unread_bytes += size
        self._outbox.put_nowait((text, size))

    def reject(self, error: Error) -> None:
        """Send an error about the client's input; too many in a row close the socket."""
        if self._close is not None:
            return  # already closing: no more words for this client
        self.send(error)
        if error.code not in CLIENT_FAULTS:
            return
        now = time.monotonic()
        self._faults.append(now)
        while self._faults[0] < now - INVALID_WINDOW_S:
            self._faults.popleft()
        if len(self._faults) > self.limits.invalid_messages_per_10s:
            reason = f"over {self.limits.invalid_messages_per_10s} rejected messages in 10 s"
            logger.warning("closing a socket: %s", reason)
            self.send(Error(code="rate_limited", message=f"{reason}; closing"))
            self.end(CLOSE_POLICY_VIOLATION, reason, resumable=False)

    def end(
        self, code: int, reason: str = "", *, flush: bool = True, resumable: bool = True
    ) -> None:
        """End the connection with close `code`, after writing what is queued if `flush`.
        A connection ended for a fault or abuse (`resumable` false) ends its session too."""
        if self._close is not None:
            return
        self._close = (code, close_reason(reason))
        self.resumable = resumable
        if flush:
            self._outbox.put_nowait(None)  # the writer stops after the rest
        else:
            self._ended.set()

    def hand_over(self) -> None:
        """Another connection resumed this one's session: end, leaving the session to it."""
        self.handed_over = True
        self.end(CLOSE_NORMAL, "the session was resumed on another connection", flush=False)

    def _crashed(self, task_name: str, error: BaseException) -> None:
        self.send(Error(code="internal", message="internal server error; the session ends"))
        self.end(CLOSE_INTERNAL_ERROR, "internal error", resumable=False)

    async def _write(self) -> None:
        try:
            # A client that went away makes sending fail: nothing more can be written.
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                while (item := await self._outbox.get()) is not None:
                    text, size = item
                    await self.websocket.send_text(text)
                    self._unread_bytes -= size
        finally:
            self._ended.set()

    # --- incoming ------------------------------------------------------------------------

    async def _read(self) -> None:
        idle = self.limits.idle_timeout_s
        try:
            while True:
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                    # cancellation that lands while a frame is ready, and close() would wait.
                    async with asyncio.timeout(idle):
                        frame = await self.websocket.receive()
                except TimeoutError:
                    logger.info("closing a socket silent for %.0f s", idle)
                    self.end(CLOSE_GOING_AWAY, f"idle for {idle:.0f} s; ping to stay connected")
                    return
                if frame["type"] == "websocket.disconnect":
                    # A client that said goodbye (1000, 1001) is gone; one whose connection
                    # dropped may come back for its session.
                    gone = frame.get("code") in (CLOSE_NORMAL, CLOSE_GOING_AWAY)
                    self.end(CLOSE_GOING_AWAY, flush=False, resumable=not gone)
                    return
                self.handle_frame(frame)
        except WebSocketDisconnect:
            pass
        self.end(CLOSE_GOING_AWAY, flush=False)

    def handle_frame(self, frame: dict[str, Any]) -> None:
        """Take one received frame through the budgets, then parse and admit it."""
        if not self._frames.take():  # dropped unread; said once a second, not per frame
            if (now := time.monotonic()) - self._rate_noticed >= RATE_NOTICE_S:
                self._rate_noticed = now
                self.send(Error(code="rate_limited", message="too many messages; slow down"))
            return
        text = frame.get("text")
        if text is None:
            data: bytes = frame.get("bytes") or b""
            if len(data) > self.limits.max_message_bytes:
                self.reject(self._too_large(len(data)))
                return
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self.reject(Error(code="invalid_json", message="binary frame is not UTF-8 JSON"))
                return
        if (size := len(text.encode())) > self.limits.max_message_bytes:
            self.reject(self._too_large(size))
            return
        try:
            self._admit(parse_client_message(text))
        except ProtocolError as exc:
            self.reject(exc.to_message())

    def _too_large(self, size: int) -> Error:
        limit = self.limits.max_message_bytes
        return Error(code="too_large", message=f"message is {size} bytes; the limit is {limit}")

    def _admit(self, message: ClientMessage) -> None:
        """Apply limits, answer what never waits, and queue the rest in arrival order."""
        ref = message.id or message.type
        match message:
            case Ping(t=t):
                self.send(Pong(t=t))
                return
            case Interrupt():
                self._session.interrupt()  # at once; again in its place below
            case Chat(text=text) | Speak(text=text) if len(text) > self.limits.max_text_chars:
                limit = self.limits.max_text_chars
                raise ProtocolError(
                    "invalid_message", f"field 'text' is longer than {limit} chars", ref
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
                self.reject(exc.to_message())
            except SdpError as exc:
                self.reject(Error(code="bad_sdp", message=str(exc), ref=ref))
            except NoPeerError as exc:
                self.reject(Error(code="no_peer", message=str(exc), ref=ref))
            except AvatarNotFoundError as exc:
                self.reject(Error(code="avatar_not_found", message=str(exc.args[0]), ref=ref))
            except VoiceNotFoundError as exc:
                self.reject(Error(code="voice_not_found", message=str(exc), ref=ref))

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
            case SetVoice(voice=voice):
                await session.set_voice(voice)

    # --- lifecycle -----------------------------------------------------------------------

    async def serve(self, session: Session) -> None:
        """Run the connection until the client leaves or it is ended."""
        self.session = session
        self._tasks.start(self._write(), "writer")
        self._tasks.start(self._read(), "reader")
        self._tasks.start(self._dispatch_in_order(), "dispatcher")
        await self._ended.wait()

    async def close(self) -> None:
        """Stop the tasks and close the socket (with the code `end` chose); never raises.
        The session outlives its connection: the endpoint closes it or keeps it to resume."""
        await self._tasks.close()
        if self.websocket.client_state != WebSocketState.CONNECTED:
            return
        code, reason = self._close or (CLOSE_GOING_AWAY, "")
        try:
            # Bounded: a client that does not read cannot take a close frame either.
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.websocket.close(code, reason)
        except (TimeoutError, RuntimeError, OSError):
            self._drop = True
        if self._drop:  # else uvicorn would keep its socket until its own close timeout
            _abort(self.websocket)


def _transport(websocket: WebSocket) -> asyncio.BaseTransport | None:
    """uvicorn's transport under `websocket` (Starlette wraps `send`, not `receive`)."""
    protocol = getattr(websocket._receive, "__self__", None)  # uvicorn's protocol object
    return getattr(protocol, "transport", None)


def _abort(websocket: WebSocket) -> None:
    """Drop the TCP connection at once (asyncio would keep it to flush unread data)."""
    if (transport := _transport(websocket)) is not None:
        transport.abort()


@router.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    sessions: SessionRegistry = websocket.app.state.sessions
    settings = services.settings
    await websocket.accept()
    if (reason := authorized(websocket, settings)) is not None:
        logger.warning("rejected a WebSocket: %r", reason)
        await websocket.send_text(encode(Error(code="unauthorized", message=reason)))
        await websocket.close(CLOSE_POLICY_VIOLATION, reason=close_reason(reason))
        return
    address = websocket.client.host if websocket.client else "unknown"
    connection = Connection(websocket, services)
    fatal = lambda: connection.end(CLOSE_INTERNAL_ERROR, "internal error", resumable=False)  # noqa: E731
    session = sessions.resume(
        websocket.query_params.get("session_id", ""),
        websocket.query_params.get("resume_key", ""),
        address,
        connection.hand_over,
    )
    resumed = session is not None
    if session is not None:
        session.attach(connection.send, fatal)
    elif (refusal := sessions.refusal(address)) is not None:
        code, reason = refusal
        await websocket.send_text(encode(Error(code=code, message=reason)))
        await websocket.close(CLOSE_TRY_AGAIN_LATER, reason=close_reason(reason))
        return
    else:
        await services.avatars.rescan()  # avatars added while the server runs show up
        avatar = await services.avatars.prepared(settings.avatars.default)
        session = Session(uuid.uuid4().hex[:12], services, connection.send, avatar, fatal)
        sessions.add(session, address, connection.hand_over)
    session_context.set(session.id)  # every task started from here logs the session id
    logger.info("session %s (%d active)", "resumed" if resumed else "opened", len(sessions))
    connection.send(
        SessionInfo(
            session_id=session.id,
            avatar_id=session.avatar_id,
            avatars=[AvatarInfo(id=e.id, name=e.name) for e in services.avatars.entries()],
            ice_servers=session.ice_servers(),
            server_version=__version__,
            resume_key=session.resume_key,
            resume_grace_s=settings.limits.resume_grace_s,
            resumed=resumed,
            readiness=services.readiness.info(),
            tts_voice=session.voice,
            voice=VoiceInputInfo(
                asr=listening.asr.name if (listening := services.ai.listening) else None,
                barge_in=settings.asr.barge_in,
            ),
        )
    )
    stop_readiness = services.readiness.subscribe(connection.send)  # `readiness` on changes
    try:
        await connection.serve(session)
    finally:
        stop_readiness()
        await connection.close()
        if connection.handed_over:
            return  # noqa: B012 - the session lives on with its new connection
        grace = settings.limits.resume_grace_s
        if connection.resumable and grace > 0 and not sessions.shutting_down:
            session.detach()
            sessions.detach(session, grace)
            logger.info("socket closed: the session waits %.0f s to be resumed", grace)
        else:
            sessions.discard(session)
            await session.close()
            logger.info("session closed (%d active)", len(sessions))
