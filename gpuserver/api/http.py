"""HTTP routes: health, Prometheus metrics, avatars and the public client configuration."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import FormData, UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import Message

from gpuserver import __version__
from gpuserver.api.auth import client_token, operator_refusal, origin_allowed, token_matches
from gpuserver.avatar_manager import AvatarConflictError, UploadsBusyError
from gpuserver.config import ServerSettings
from gpuserver.engines.base import AvatarSourceError
from gpuserver.protocol import PROTOCOL_VERSION
from gpuserver.services import Services
from gpuserver.session_registry import SessionRegistry

logger = logging.getLogger(__name__)
router = APIRouter()

# Room for the multipart framing and the small form fields around the uploaded file.
FORM_OVERHEAD_BYTES = 64 * 1024
UPLOAD_FIELDS = ("id", "name", "replace")


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


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    _require_operator(request)
    return Response(_services(request).telemetry.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/config")
async def client_config(request: Request) -> dict:
    settings = _services(request).settings
    # URLs only: credentials come with each session's greeting, to clients that passed auth.
    ice_servers = [{"urls": server.urls} for server in settings.webrtc.ice_servers]
    return {
        "protocol": PROTOCOL_VERSION,
        "server_version": __version__,
        "ice_servers": ice_servers,
        "default_avatar": settings.avatars.default,
        "max_message_bytes": settings.limits.max_message_bytes,
        "auth_required": settings.server.token is not None,
    }


def _require_operator(request: Request) -> None:
    """Operator routes: the operator token, or a loopback peer (see auth.is_loopback); from
    a browser, only on a page of an allowed origin (a loopback peer may be any web page)."""
    server = _services(request).settings.server
    _require_origin(request, server)
    peer = request.client.host if request.client is not None else None
    refusal = operator_refusal(peer, request.headers, server)
    if refusal is not None:
        raise HTTPException(*refusal)


def _require_origin(request: Request, server: ServerSettings) -> None:
    if not origin_allowed(
        request.headers.get("origin"), request.headers.get("host"), server.allowed_origins
    ):
        raise HTTPException(403, "this origin may not call the API (server.allowed_origins)")


def _require_client(request: Request, server: ServerSettings) -> None:
    """State-changing routes: an allowed origin and, when one is set, the client token."""
    _require_origin(request, server)
    if server.token is not None and not token_matches(
        client_token(request.headers, request.query_params), server.token
    ):
        raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>'")


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
async def upload_avatar(request: Request) -> StreamingResponse:
    """Upload an image or video (multipart: `file`, optional `id`, `name`, `replace=true`).

    Auth, origin and the declared size are checked before any of the body is read; the
    body is read with a hard cap. Problems found before preparing get a 4xx status;
    otherwise the response streams progress lines (NDJSON): `queued` with the number of
    preparations ahead, the preparation stages, then `done` with the avatar, or `error`.
    """
    services = _services(request)
    settings = services.settings
    _require_client(request, settings.server)
    limit = settings.avatars.max_upload_bytes
    form = await _read_form(request, limit + FORM_OVERHEAD_BYTES)
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise HTTPException(400, "the form needs the image or video as its 'file' part")
        fields: dict[str, str | None] = {}
        for key in UPLOAD_FIELDS:
            value = form.get(key)
            if value is not None and not isinstance(value, str):
                raise HTTPException(400, f"the form field {key!r} must be text")
            fields[key] = value
        filename, data = file.filename or "", await file.read(limit + 1)
    finally:
        await form.close()
    if len(data) > limit:
        raise HTTPException(413, f"upload larger than {limit} bytes")
    try:
        upload = await services.avatars.begin_upload(
            data,
            filename,
            fields["id"] or None,
            fields["name"],
            replace=(fields["replace"] or "").lower() in ("1", "true", "yes"),
        )
    except AvatarSourceError as exc:
        raise HTTPException(400, str(exc)) from None
    except AvatarConflictError as exc:
        raise HTTPException(409, str(exc)) from None
    except UploadsBusyError as exc:
        raise HTTPException(429, str(exc)) from None
    updates: asyncio.Queue[dict | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def progress(stage: str, fraction: float) -> None:
        update = {"stage": stage, "progress": round(fraction, 3)}
        loop.call_soon_threadsafe(updates.put_nowait, update)

    def queued(ahead: int) -> None:
        updates.put_nowait({"stage": "queued", "ahead": ahead})

    async def prepare() -> None:
        try:
            entry = await upload.finish(progress, queued)
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


class _TooLarge(Exception):
    pass


async def _read_form(request: Request, cap: int) -> FormData:
    """The multipart form, read with a hard cap: 413 as soon as the body passes `cap`."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > cap):
        raise HTTPException(413, f"upload larger than {cap} bytes")
    received = 0

    async def capped() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > cap:
            raise _TooLarge
        return message

    try:
        return await Request(request.scope, capped).form(max_files=1, max_fields=8)
    except _TooLarge:
        raise HTTPException(413, f"upload larger than {cap} bytes") from None
    except ClientDisconnect:
        raise HTTPException(400, "the upload was cut off") from None
