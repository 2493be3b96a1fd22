"""HTTP routes: health, Prometheus metrics, avatars and the public client configuration."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from gpuserver import __version__
from gpuserver.engines.base import AvatarSourceError
from gpuserver.protocol import PROTOCOL_VERSION
from gpuserver.services import Services
from gpuserver.session_registry import SessionRegistry

logger = logging.getLogger(__name__)
router = APIRouter()


def _services(request: Request) -> Services:
    return request.app.state.services


def _sessions(request: Request) -> SessionRegistry:
    return request.app.state.sessions


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    services = _services(request)
    sessions = _sessions(request)
    settings = services.settings
    readiness = services.readiness.info()
    backends = {
        name: {**status.model_dump(exclude_none=True), "ready": status.state == "ready"}
        for name, status in (("llm", readiness.llm), ("tts", readiness.tts))
    }
    # Always 200 while serving (liveness); `ready` says whether a chat can be answered now.
    body = {
        "status": "shutting_down" if sessions.shutting_down else "ok",
        "ready": readiness.ready,
        "version": __version__,
        "sessions": len(sessions),
        "max_sessions": settings.limits.max_sessions,
        "engine": {"name": services.avatars.engine.name, "ready": True},
        **backends,
    }
    return JSONResponse(body, status_code=503 if sessions.shutting_down else 200)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> str:
    services = _services(request)
    sessions = _sessions(request)
    media = [services.streamer.get(s.id) for s in sessions if services.streamer.has_media(s.id)]
    stats = [m.clock.stats for m in media]
    lines = [
        "# HELP gpuserver_sessions Open WebSocket sessions.",
        "# TYPE gpuserver_sessions gauge",
        f"gpuserver_sessions {len(sessions)}",
        "# HELP gpuserver_peer_connections Sessions with a WebRTC peer connection.",
        "# TYPE gpuserver_peer_connections gauge",
        f"gpuserver_peer_connections {sum(m.peer is not None for m in media)}",
        "# HELP gpuserver_speaking_sessions Sessions whose avatar is speaking now.",
        "# TYPE gpuserver_speaking_sessions gauge",
        f"gpuserver_speaking_sessions {sum(m.clock.speaking_turn is not None for m in media)}",
        "# HELP gpuserver_media_ticks Ticks sent by the open sessions' media clocks.",
        "# TYPE gpuserver_media_ticks gauge",
        f'gpuserver_media_ticks{{kind="speech"}} {sum(s.speech_ticks for s in stats)}',
        f'gpuserver_media_ticks{{kind="idle"}} {sum(s.idle_ticks for s in stats)}',
        f'gpuserver_media_ticks{{kind="skipped"}} {sum(s.skipped_ticks for s in stats)}',
    ]
    return "\n".join(lines) + "\n"


@router.get("/api/config")
async def client_config(request: Request) -> dict:
    settings = _services(request).settings
    return {
        "protocol": PROTOCOL_VERSION,
        "server_version": __version__,
        "ice_servers": [s.model_dump(exclude_none=True) for s in settings.webrtc.ice_servers],
        "default_avatar": settings.avatars.default,
        "max_message_bytes": settings.limits.max_message_bytes,
        "auth_required": settings.server.token is not None,
    }


def _require_operator(request: Request) -> None:
    """Operator routes: the server token when one is set, else loopback clients only."""
    token = _services(request).settings.server.token
    if token is not None:
        offered = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(offered.encode(), token.get_secret_value().encode()):
            raise HTTPException(401, "operator routes need 'Authorization: Bearer <token>'")
    elif request.client is None or request.client.host not in ("127.0.0.1", "::1"):
        raise HTTPException(403, "operator routes are only open to loopback without a token")


@router.get("/api/sessions")
async def list_sessions(request: Request) -> dict:
    _require_operator(request)
    return {
        "sessions": [
            {
                "id": session.id,
                "avatar_id": session.avatar_id,
                "peer": session.peer_state,
                "speaking": session.speaking_turn is not None,
                "turns": len(session.turns),
            }
            for session in _sessions(request)
        ]
    }


@router.delete("/api/sessions/{session_id}/peer")
async def close_peer(request: Request, session_id: str) -> dict:
    """Close a session's peer connection (a stuck peer); its client renegotiates."""
    _require_operator(request)
    session = _sessions(request).get(session_id)
    if session is None:
        raise HTTPException(404, f"no session {session_id}")
    await session.close_peer()
    return {"closed": True}


@router.get("/api/avatars")
async def list_avatars(request: Request) -> dict:
    services = _services(request)
    await services.avatars.rescan()  # avatars added while the server runs show up
    return {
        "default": services.settings.avatars.default,
        "avatars": [{"id": e.id, "name": e.name} for e in services.avatars.entries()],
    }


@router.get("/api/voices")
async def list_voices(request: Request) -> dict:
    """The TTS voices a session can pick with `set_voice`; `default` null = chosen by text."""
    services = _services(request)
    voices = await services.ai.tts.voices()
    return {
        "backend": services.ai.tts.name,
        "default": services.settings.tts.voice,
        "voices": [{"id": v.id, "name": v.name, "language": v.language} for v in voices],
    }


@router.post("/api/avatars")
async def upload_avatar(
    request: Request,
    file: UploadFile,
    id: str | None = Form(None),
    name: str | None = Form(None),
) -> StreamingResponse:
    """Upload an image or video; the response streams progress lines (NDJSON), then the avatar."""
    services = _services(request)
    limit = services.settings.avatars.max_upload_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload larger than {limit} bytes")
    updates: asyncio.Queue[dict | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def progress(stage: str, fraction: float) -> None:
        update = {"stage": stage, "progress": round(fraction, 3)}
        loop.call_soon_threadsafe(updates.put_nowait, update)

    async def prepare() -> None:
        try:
            entry = await services.avatars.add(data, file.filename or "", id, name, progress)
            updates.put_nowait({"stage": "done", "avatar": {"id": entry.id, "name": entry.name}})
        except AvatarSourceError as exc:
            updates.put_nowait({"stage": "error", "error": str(exc)})
        except Exception:
            logger.exception("avatar preparation failed")
            updates.put_nowait({"stage": "error", "error": "avatar preparation failed"})
        finally:
            updates.put_nowait(None)

    task = asyncio.create_task(prepare())

    async def lines() -> AsyncIterator[str]:
        try:
            while (update := await updates.get()) is not None:
                yield json.dumps(update) + "\n"
        finally:
            await task

    return StreamingResponse(lines(), media_type="application/x-ndjson")
