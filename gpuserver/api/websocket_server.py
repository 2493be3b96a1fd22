"""The /ws endpoint: admission (auth, origin, capacity), limits, validation and dispatch.

Every bad input is answered with an `error` message and the socket keeps working. Outgoing
messages go through one writer task per socket, so any part of the session (turn tasks, the
media clock's callbacks) can send without awaiting the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import Coroutine
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
    WebRTCIceCandidate,
    WebRTCOffer,
    encode,
    parse_client_message,
)
from gpuserver.sdp import SdpError
from gpuserver.services import Services
from gpuserver.session import Session
from gpuserver.session_registry import Refusal, SessionRegistry
from gpuserver.tts.base import VoiceNotFoundError
from gpuserver.webrtc_streamer import NoPeerError

logger = logging.getLogger(__name__)
router = APIRouter()

CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_GOING_AWAY = 1001
OUTBOX_LIMIT = 1000  # messages a client may leave unread before it is dropped
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
    """One accepted WebSocket: its outbox, its limits and its session's message handlers."""

    def __init__(self, websocket: WebSocket, services: Services) -> None:
        self.websocket = websocket
        self.services = services
        limits = services.settings.limits
        self.max_bytes = limits.max_message_bytes
        self.max_text = limits.max_text_chars
        self._messages = TokenBucket(limits.messages_per_second, limits.messages_per_second * 2)
        self._turns = TokenBucket(limits.chat_per_minute / 60, limits.chat_per_minute)
        self._outbox: asyncio.Queue[ServerMessage | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self.session: Session | None = None

    def send(self, message: ServerMessage) -> None:
        if self._outbox.qsize() >= OUTBOX_LIMIT:
            logger.warning("client does not read its messages: dropping the connection")
            self._outbox.put_nowait(None)
            return
        self._outbox.put_nowait(message)

    async def write_loop(self) -> None:
        while (message := await self._outbox.get()) is not None:
            await self.websocket.send_text(encode(message))
        await self.websocket.close(CLOSE_GOING_AWAY)

    def spawn(self, work: Coroutine[Any, Any, None], ref: str | None) -> None:
        """Run a handler in the background; its errors become `error` messages."""
        task = asyncio.create_task(self._guarded(work, ref))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, work: Coroutine[Any, Any, None], ref: str | None) -> None:
        try:
            await work
        except ProtocolError as exc:
            exc.ref = exc.ref or ref
            self.send(exc.to_message())
        except SdpError as exc:
            self.send(Error(code="bad_sdp", message=str(exc), ref=ref))
        except NoPeerError as exc:
            self.send(Error(code="no_peer", message=str(exc), ref=ref))
        except AvatarNotFoundError as exc:
            self.send(Error(code="avatar_not_found", message=str(exc.args[0]), ref=ref))
        except VoiceNotFoundError as exc:
            self.send(Error(code="voice_not_found", message=str(exc), ref=ref))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("handler failed")
            self.send(Error(code="internal", message="internal server error", ref=ref))

    async def receive_loop(self) -> None:
        while True:
            frame = await self.websocket.receive()
            if frame["type"] == "websocket.disconnect":
                return
            text = frame.get("text")
            if text is None:
                try:
                    text = (frame.get("bytes") or b"").decode("utf-8")
                except UnicodeDecodeError:
                    self.send(Error(code="invalid_json", message="binary frame is not UTF-8 JSON"))
                    continue
            self.handle_frame(text)

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
        except ProtocolError as exc:
            self.send(exc.to_message())
            return
        ref = message.id or message.type
        if not self._messages.take():
            self.send(Error(code="rate_limited", message="too many messages; slow down", ref=ref))
            return
        self.spawn(self.dispatch(message), ref)

    async def dispatch(self, message: Any) -> None:
        session = self.session
        assert session is not None
        ref = message.id or message.type
        match message:
            case Ping(t=t):
                self.send(Pong(t=t))
            case WebRTCOffer():
                session.expect_peer()
                await session.accept_offer(message)
            case WebRTCIceCandidate():
                if not session.has_peer:
                    raise NoPeerError("no peer connection: send webrtc_offer before candidates")
                await session.add_ice_candidate(message)
            case Chat(text=text) | Speak(text=text) if len(text) > self.max_text:
                raise ProtocolError(
                    "invalid_message", f"field 'text' is longer than {self.max_text} chars", ref
                )
            case Chat() | Speak() if not self._turns.take():
                raise ProtocolError("rate_limited", "too many chat/speak messages; slow down", ref)
            case Chat():
                session.chat(message)
            case Speak():
                if not session.has_peer:
                    raise NoPeerError("no peer connection: send webrtc_offer before speak")
                session.speak(message)
            case Interrupt():
                session.interrupt()
            case SetAvatar(avatar_id=avatar_id):
                await session.set_avatar(avatar_id)
            case SetVoice(voice=voice):
                await session.set_voice(voice)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.session is not None:
            await self.session.close()


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
    connection = Connection(websocket, services)
    if (refusal := sessions.refusal()) is not None:
        await websocket.send_text(encode(Error(code=refusal, message=REFUSALS[refusal])))
        await websocket.close(CLOSE_TRY_AGAIN_LATER)
        return

    session_id = uuid.uuid4().hex[:12]
    session_context.set(session_id)
    await services.avatars.rescan()  # avatars added while the server runs show up
    avatar = await services.avatars.prepared(settings.avatars.default)
    session = Session(session_id, services, connection.send, avatar)
    connection.session = session
    sessions.add(session)
    logger.info("session opened (%d active)", len(sessions))
    connection.send(
        SessionInfo(
            session_id=session_id,
            avatar_id=session.avatar_id,
            avatars=[AvatarInfo(id=e.id, name=e.name) for e in services.avatars.entries()],
            ice_servers=session.ice_servers(),
            server_version=__version__,
            readiness=services.readiness.info(),
            tts_voice=session.voice,
        )
    )
    stop_readiness = services.readiness.subscribe(connection.send)  # `readiness` on changes
    writer = asyncio.create_task(connection.write_loop(), name=f"ws-writer-{session_id}")
    try:
        reader = asyncio.create_task(connection.receive_loop(), name=f"ws-reader-{session_id}")
        await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        reader.cancel()
    except WebSocketDisconnect:
        pass
    finally:
        stop_readiness()
        sessions.discard(session)
        await connection.close()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        if websocket.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await websocket.close()
        logger.info("session closed (%d active)", len(sessions))
