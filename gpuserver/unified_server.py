"""The app factory and the `gpuserver` command line.

`create_app(settings)` wires the long-lived services in its lifespan: the lip-sync engine and
the default avatar are loaded once at start-up, and every peer connection is closed on
shutdown. `main()` is the console script (also `python -m gpuserver`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from gpuserver import __version__
from gpuserver.ai_models import AIModels, create_llm, create_tts
from gpuserver.api import http, websocket_server
from gpuserver.avatar_manager import AvatarEntry, AvatarManager
from gpuserver.config import Settings, load_settings
from gpuserver.engines import create_engine
from gpuserver.logging_setup import configure_logging
from gpuserver.protocol import Error
from gpuserver.services import Services
from gpuserver.session_registry import SessionRegistry
from gpuserver.webrtc_streamer import WebRTCStreamer

logger = logging.getLogger(__name__)

FRONTEND_DIR = Path(__file__).resolve().parent.parent / "frontend"
# Frames up to 1 MiB are read and answered `too_large`; larger ones close the socket (1009).
WS_MAX_FRAME_BYTES = 1024 * 1024 + 1024


async def build_services(settings: Settings) -> Services:
    engine = create_engine(settings.engine.name, settings=settings.engine)
    avatars = AvatarManager(engine, settings.avatars)
    await avatars.rescan()
    await avatars.prepared(settings.avatars.default)
    streamer = WebRTCStreamer(settings.webrtc)
    ai = AIModels(create_llm(settings), create_tts(settings), avatars, streamer)
    return Services(settings, avatars, streamer, ai)


async def announce_shutdown(sessions: SessionRegistry) -> None:
    """Tell every client before the sockets close, and refuse new sessions from now on."""
    if sessions.shutting_down:
        return
    sessions.shutting_down = True
    for session in sessions:
        session.notify(Error(code="shutting_down", message="the server is shutting down"))
    await asyncio.sleep(0.2)  # let the socket writers flush the notice


async def close_services(services: Services, sessions: SessionRegistry) -> None:
    await announce_shutdown(sessions)
    await asyncio.gather(*(session.close() for session in sessions))
    await services.streamer.close_all()
    await services.ai.llm.aclose()
    await services.ai.tts.aclose()
    await services.avatars.engine.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "starting gpuserver %s: engine=%s llm=%s tts=%s",
            __version__,
            settings.engine.name,
            settings.llm.backend,
            settings.tts.backend,
        )
        app.state.services = await build_services(settings)
        app.state.sessions = SessionRegistry(settings.limits.max_sessions)
        logger.info("ready on http://%s:%d", settings.server.host, settings.server.port)
        try:
            yield
        finally:
            logger.info("shutting down: closing every session and peer connection")
            await close_services(app.state.services, app.state.sessions)

    app = FastAPI(title="gpuserver", version=__version__, lifespan=lifespan)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.server.allowed_origins,
        allow_methods=["GET", "POST"],
        allow_headers=["*"],
    )
    app.include_router(websocket_server.router)
    app.include_router(http.router)
    if FRONTEND_DIR.is_dir():
        app.mount("/", StaticFiles(directory=FRONTEND_DIR, html=True), name="frontend")
    return app


# --- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuserver",
        description="Real-time talking-avatar server (LLM, TTS, lip-sync, WebRTC).",
    )
    parser.add_argument("--version", action="version", version=f"gpuserver {__version__}")
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="run the server (the default command)")
    _add_common(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--llm", choices=["local", "openai", "echo"], help="LLM backend")
    serve.add_argument("--tts", choices=["espeak", "openai"], help="TTS backend")
    serve.add_argument("--avatar", help="default avatar id")
    serve.add_argument("--max-sessions", type=int, help="concurrent sessions before 'busy'")
    serve.add_argument("--token", help="require ?token=TOKEN on /ws")
    serve.add_argument(
        "--ice-host",
        action="append",
        metavar="ADDR",
        help="only gather ICE host candidates on ADDR (repeatable), e.g. 127.0.0.1",
    )

    prepare = commands.add_parser("prepare-avatar", help="prepare an avatar from an image/video")
    _add_common(prepare)
    prepare.add_argument("source", type=Path, help="portrait image or talking-head video")
    prepare.add_argument("--id", help="avatar id (default: the file name)")
    prepare.add_argument("--name", help="display name")

    download = commands.add_parser(
        "download-models", help="fetch model weights into models/ (needs internet)"
    )
    _add_common(download)
    download.add_argument(
        "targets",
        nargs="*",
        type=_download_target,  # not choices=: argparse rejects an empty list against them
        default=["musetalk"],
        metavar="{musetalk,llm}",
        help="musetalk: the MuseTalk 1.5 weights (default); llm: a real instruct model for "
        "--llm local (llm.local_model_repo into llm.local_model_dir)",
    )
    return parser


def _download_target(name: str) -> str:
    if name not in ("musetalk", "llm"):
        raise argparse.ArgumentTypeError(f"{name!r} is not one of musetalk, llm")
    return name


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--engine", choices=["warp", "musetalk"], help="lip-sync engine")
    parser.add_argument("--log-dir", type=Path, help="directory of unified_server.log")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, dict[str, Any]] = {}

    def put(group: str, key: str, value: Any) -> None:
        if value is not None:
            overrides.setdefault(group, {})[key] = value

    get = lambda name: getattr(args, name, None)  # noqa: E731 - flags differ per command
    put("server", "host", get("host"))
    put("server", "port", get("port"))
    put("server", "token", get("token"))
    put("llm", "backend", get("llm"))
    put("tts", "backend", get("tts"))
    put("engine", "name", get("engine"))
    put("avatars", "default", get("avatar"))
    put("limits", "max_sessions", get("max_sessions"))
    put("webrtc", "host_addresses", get("ice_host"))
    put("logging", "dir", get("log_dir"))
    put("logging", "level", get("log_level"))
    return load_settings(get("config"), **overrides)


def serve(settings: Settings) -> None:
    import uvicorn

    app = create_app(settings)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # uvicorn closes WebSockets (1012) before the lifespan ends: announce first.
            sessions = getattr(app.state, "sessions", None)
            if sessions is not None:
                await announce_shutdown(sessions)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        ssl_certfile=settings.server.ssl_certfile,
        ssl_keyfile=settings.server.ssl_keyfile,
        ws_max_size=WS_MAX_FRAME_BYTES,
        log_config=None,  # keep our handlers: one format, one file
        timeout_graceful_shutdown=5,
    )
    Server(config).run()


def prepare_avatar(
    settings: Settings, source: Path, avatar_id: str | None, name: str | None
) -> int:
    from tqdm import tqdm

    if not source.is_file():
        logger.error("no such file: %s", source)
        return 2
    engine = create_engine(settings.engine.name, settings=settings.engine)
    avatars = AvatarManager(engine, settings.avatars)
    with tqdm(total=100, unit="%", desc="preparing") as bar:

        def progress(stage: str, fraction: float) -> None:
            bar.set_description(stage)
            bar.n = round(fraction * 100)
            bar.refresh()

        data = source.read_bytes()

        async def add() -> AvatarEntry:
            try:
                return await avatars.add(data, source.name, avatar_id, name, progress)
            finally:
                await engine.aclose()

        entry = asyncio.run(add())
    logger.info("avatar %r ready (%s); use it with --avatar %s", entry.id, entry.source, entry.id)
    return 0


COMMANDS = ("serve", "prepare-avatar", "download-models")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] not in (*COMMANDS, "-h", "--help", "--version"):
        words.insert(0, "serve")  # `gpuserver --port 9000` means `gpuserver serve --port 9000`
    parser = build_parser()
    args = parser.parse_args(words)
    try:
        settings = settings_from_args(args)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    configure_logging(settings.logging.level, settings.logging.dir)
    command = args.command
    if command == "serve":
        serve(settings)
        return 0
    if command == "prepare-avatar":
        return prepare_avatar(settings, args.source, args.id, args.name)
    return run_downloads(settings, args.targets)


def run_downloads(settings: Settings, targets: Sequence[str]) -> int:
    for target in dict.fromkeys(targets):
        if target == "llm":
            from gpuserver.llm.download import download_llm

            code = download_llm(settings.llm.local_model_repo, settings.llm.local_model_dir)
        else:
            from gpuserver.engines.download import download_models

            code = download_models(settings.engine.models_dir)
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
