"""The app factory and the `gpuserver` command line.

`create_app(settings)` wires the long-lived services in its lifespan: the lip-sync engine and
the default avatar are loaded once at start-up, and every peer connection is closed on
shutdown. `main()` is the console script (also `python -m gpuserver`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from gpuserver import __version__
from gpuserver.ai_models import AIModels, create_listening, create_llm, create_tts
from gpuserver.api import http, websocket_server
from gpuserver.avatar_manager import AvatarEntry, AvatarManager
from gpuserver.config import Settings, load_settings
from gpuserver.engines import ENGINE_NAMES, create_engine
from gpuserver.engines.base import AvatarSourceError
from gpuserver.logging_setup import configure_logging
from gpuserver.protocol import Error
from gpuserver.readiness import ConsoleReport, ReadinessMonitor, describe_waiting
from gpuserver.services import Services
from gpuserver.session_registry import SessionRegistry
from gpuserver.telemetry import Levels, MediaLevels, Telemetry
from gpuserver.tts.base import Voice
from gpuserver.user_errors import EXIT_USER_ERROR, UserError, bind_listener, describe
from gpuserver.video_encoder import observe_video_encodes
from gpuserver.webrtc_streamer import WebRTCStreamer

logger = logging.getLogger(__name__)

FRONTEND_DIR = Path(__file__).resolve().parent.parent / "frontend"
# uvicorn's WebSocket options: frames up to 1 MiB are read and answered `too_large`, larger
# ones close the socket (1009); no permessage-deflate — our messages are small, and 1 KB of
# deflated frame can inflate to 1 MiB before any of our checks sees it.
WEBSOCKET_OPTIONS: dict[str, Any] = {
    "ws_max_size": 1024 * 1024 + 1024,
    "ws_per_message_deflate": False,
}


async def build_services(settings: Settings) -> Services:
    """The long-lived services. A mistake in the settings raises, closing what was built.

    The quick checks come first (engine weights, the default avatar, the TTS voice) and the
    LLM last: the embedded one starts loading in the background when it is created.
    """
    logger.info(
        "starting gpuserver %s: engine=%s llm=%s tts=%s",
        __version__,
        settings.engine.name,
        settings.llm.backend,
        settings.tts.backend,
    )
    async with contextlib.AsyncExitStack() as built:
        engine = create_engine(settings.engine.name, settings=settings.engine)
        built.push_async_callback(engine.aclose)
        avatars = AvatarManager(engine, settings.avatars)
        await avatars.rescan()
        await avatars.prepared(settings.avatars.default)
        tts = create_tts(settings)
        built.push_async_callback(tts.aclose)
        listening = create_listening(settings)
        if listening is not None:
            built.push_async_callback(listening.aclose)
        llm = create_llm(settings)
        built.push_async_callback(llm.aclose)
        readiness = ReadinessMonitor(
            llm,
            tts,
            interval_s=settings.server.health_check_interval_s,
            load_estimate_s=llm.load_estimate_s,
        )
        await readiness.start()
        built.push_async_callback(readiness.aclose)
        streamer = WebRTCStreamer(settings.webrtc)
        telemetry = Telemetry()
        observe_video_encodes(telemetry.video_encode.observe)
        ai = AIModels(llm, tts, avatars, streamer, listening)
        built.pop_all()  # from here on the app closes them
    return Services(settings, avatars, streamer, ai, telemetry, readiness)


def watch_levels(services: Services, sessions: SessionRegistry) -> None:
    """Let /metrics read the live sessions, their media and the engine at each scrape."""

    def media() -> Iterator[MediaLevels]:
        retired = services.streamer.retired
        yield MediaLevels(
            False, False, 0, retired.speech_ticks, retired.idle_ticks, retired.skipped_ticks
        )
        for m in services.streamer:
            stats = m.clock.stats
            yield MediaLevels(
                speaking=m.clock.speaking_turn is not None,
                peer_connected=m.peer_state == "connected",
                queued_ticks=m.queue.ticks,
                ticks_speech=stats.speech_ticks,
                ticks_idle=stats.idle_ticks,
                ticks_skipped=stats.skipped_ticks,
            )

    engine = services.avatars.engine
    services.telemetry.watch(
        Levels(
            sessions=lambda: len(sessions), media=media, engine_batch=lambda: engine.latest_batch
        )
    )


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
    await sessions.close()
    await services.readiness.aclose()
    await services.ai.aclose()
    await services.avatars.engine.aclose()
    await services.avatars.aclose()
    observe_video_encodes(None)


def create_app(settings: Settings | None = None, prebuilt: Services | None = None) -> FastAPI:
    """The app; its lifespan builds the services, or takes `prebuilt` services (the
    command line does, so that start-up mistakes fail before the port is served), and closes
    them at shutdown."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        built = prebuilt or await build_services(settings)
        limits = settings.limits
        sessions = SessionRegistry(limits.max_sessions, limits.max_sessions_per_address)
        app.state.services, app.state.sessions = built, sessions
        watch_levels(built, sessions)
        try:
            yield
        finally:
            logger.info("shutting down: closing every session and peer connection")
            await close_services(built, sessions)

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
    _add_serving(serve)

    cluster = commands.add_parser(
        "cluster", help="serve on a Ray cluster, one replica per GPU (needs the ray extra)"
    )
    _add_common(cluster)
    _add_serving(cluster)
    where = cluster.add_mutually_exclusive_group()
    where.add_argument("--address", help="existing Ray cluster, e.g. ray://HEAD:10001")
    where.add_argument(
        "--local-nodes", type=int, metavar="N", help="start a local cluster of N nodes (default 1)"
    )
    cluster.add_argument("--gpus-per-node", type=int, metavar="G", help="pretend GPUs per node")
    cluster.add_argument(
        "--sessions-per-gpu", dest="max_sessions", type=int, metavar="S", help="= --max-sessions"
    )
    cluster.add_argument("--replicas", type=int, help="replicas (default: one per GPU)")
    cluster.add_argument("--max-replicas", type=int, help="autoscale from --replicas up to this")

    prepare = commands.add_parser("prepare-avatar", help="prepare an avatar from an image/video")
    _add_common(prepare)
    prepare.add_argument("source", type=Path, help="portrait image or talking-head video")
    prepare.add_argument("--id", help="avatar id (default: the file name)")
    prepare.add_argument("--name", help="display name")

    voices = commands.add_parser("voices", help="list the TTS voices (values of tts.voice)")
    voices.add_argument("--config", type=Path, help="TOML settings file")
    voices.add_argument("--tts", choices=["espeak", "openai"], help="TTS backend")
    voices.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")

    download = commands.add_parser(
        "download-models", help="fetch model weights into models/ (needs internet)"
    )
    _add_common(download)
    download.add_argument(
        "targets",
        nargs="*",
        type=_download_target,  # not choices=: argparse rejects an empty list against them
        default=["musetalk"],
        metavar="{musetalk,llm,asr}",
        help="musetalk: the MuseTalk 1.5 weights (default); llm: a real instruct model for "
        "--llm local (llm.local_model_repo into llm.local_model_dir); asr: Whisper for "
        "--asr whisper (whisper-tiny; on a CUDA box also whisper-large-v3-turbo)",
    )
    return parser


def _add_serving(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--llm", choices=["local", "openai", "echo"], help="LLM backend")
    parser.add_argument("--tts", choices=["espeak", "openai"], help="TTS backend")
    parser.add_argument(
        "--asr", choices=["openai", "whisper", "none"], help="speech recognition (voice input)"
    )
    parser.add_argument("--avatar", help="default avatar id")
    parser.add_argument("--max-sessions", type=int, help="concurrent sessions before 'busy'")
    parser.add_argument("--token", help="require this token on /ws and uploads")
    parser.add_argument(
        "--ice-host",
        action="append",
        metavar="ADDR",
        help="only gather ICE host candidates on ADDR (repeatable), e.g. 127.0.0.1",
    )


DOWNLOAD_TARGETS = ("musetalk", "llm", "asr")


def _download_target(name: str) -> str:
    if name not in DOWNLOAD_TARGETS:
        raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(DOWNLOAD_TARGETS)}")
    return name


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--engine", choices=ENGINE_NAMES, help="lip-sync engine")
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
    put("asr", "backend", get("asr"))
    put("engine", "name", get("engine"))
    put("avatars", "default", get("avatar"))
    put("limits", "max_sessions", get("max_sessions"))
    put("webrtc", "host_addresses", get("ice_host"))
    put("logging", "dir", get("log_dir"))
    put("logging", "level", get("log_level"))
    put("cluster", "address", get("address"))
    put("cluster", "local_nodes", get("local_nodes"))
    put("cluster", "gpus_per_node", get("gpus_per_node"))
    put("cluster", "replicas", get("replicas"))
    put("cluster", "max_replicas", get("max_replicas"))
    return load_settings(get("config"), **overrides)


def serve(settings: Settings) -> None:
    """Serve until interrupted. Start-up mistakes raise before anything is served: the port
    is bound first, then the services are built, then uvicorn starts on that socket."""
    server = settings.server
    listener = bind_listener(server.host, server.port)
    with listener, asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(settings, listener))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # what uvicorn would pick (uvicorn[standard] installs it)
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(settings: Settings, listener: socket.socket) -> None:
    import uvicorn

    services = await build_services(settings)
    app = create_app(settings, services)
    scheme = "https" if settings.server.ssl_certfile else "http"
    url = f"{scheme}://{settings.server.host}:{settings.server.port}"
    drain_s = settings.server.drain_timeout_s

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # listening: now the ready line is true
                announce_readiness(services.readiness, url)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            try:
                async with asyncio.timeout(drain_s):
                    # uvicorn closes WebSockets (1012) before the lifespan ends: announce first.
                    sessions = getattr(app.state, "sessions", None)
                    if sessions is not None:
                        await announce_shutdown(sessions)
                    await super().shutdown(sockets)
            except TimeoutError:
                logger.warning("shutdown took over %g s (server.drain_timeout_s): exiting", drain_s)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # uvicorn records the signal and raises it again after shutting down, so the
            # process died by it (status -15 for SIGTERM). A drained stop is a clean exit.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    trusted = settings.server.trusted_proxies
    config = uvicorn.Config(
        app,
        ssl_certfile=settings.server.ssl_certfile,
        ssl_keyfile=settings.server.ssl_keyfile,
        **WEBSOCKET_OPTIONS,
        log_config=None,  # keep our handlers: one format, one file
        timeout_graceful_shutdown=drain_s,
        # X-Forwarded-For rewrites the client address only when it comes from a trusted proxy.
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
    )
    await Server(config).serve(sockets=[listener])


def announce_readiness(readiness: ReadinessMonitor, url: str) -> None:
    """The console's ready line, or what the server still waits for; then every change."""
    info = readiness.info()
    if info.ready:
        logger.info("ready on %s", url)
    else:
        logger.info(
            "serving on %s - %s (the page shows when it is ready)", url, describe_waiting(info)
        )
    readiness.subscribe(ConsoleReport(url, info))


def prepare_avatar(
    settings: Settings, source: Path, avatar_id: str | None, name: str | None
) -> int:
    from tqdm import tqdm

    if not source.is_file():
        raise UserError(f"no such file: {source}")
    engine = create_engine(settings.engine.name, settings=settings.engine)
    avatars = AvatarManager(engine, settings.avatars)
    with tqdm(total=100, unit="%", desc="preparing", leave=False) as bar:

        def progress(stage: str, fraction: float) -> None:
            bar.set_description(stage)
            bar.n = round(fraction * 100)
            bar.refresh()

        data = source.read_bytes()

        async def add() -> AvatarEntry:
            try:
                return await avatars.add(data, source.name, avatar_id, name, progress, replace=True)
            finally:
                await engine.aclose()
                await avatars.aclose()

        try:
            entry = asyncio.run(add())
        except AvatarSourceError as exc:
            raise UserError(f"cannot make an avatar of {source}: {exc}") from exc
    logger.info("avatar %r ready (%s); use it with --avatar %s", entry.id, entry.source, entry.id)
    return 0


def list_voices(settings: Settings) -> int:
    """Print the TTS backend's voices: the values `tts.voice` and the page's picker take."""
    # Listing must work even when the configured voice is the mistake being fixed.
    tts_settings = settings.tts.model_copy(update={"voice": None})
    tts = create_tts(settings.model_copy(update={"tts": tts_settings}))

    async def voices() -> list[Voice]:
        try:
            return await tts.voices()
        finally:
            await tts.aclose()

    found = asyncio.run(voices())
    width = max((len(voice.id) for voice in found), default=0)
    lines = [f"{voice.id:<{width}}  {voice.name}" for voice in found]
    current = settings.tts.voice or "(not set: chosen by the text's language)"
    lines += ["", f"{len(found)} voices of the {tts.name} TTS; tts.voice = {current}"]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


COMMANDS = ("serve", "cluster", "prepare-avatar", "voices", "download-models")


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
    try:
        return run_command(args, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        line = describe(exc)
        if line is None:
            raise
        logger.error("%s", line)
        logger.debug("the error above in detail", exc_info=exc)
        return EXIT_USER_ERROR


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    command = args.command
    if command == "serve":
        serve(settings)
        return 0
    if command == "cluster":
        from gpuserver.cluster.runner import run_cluster

        return run_cluster(settings)
    if command == "prepare-avatar":
        return prepare_avatar(settings, args.source, args.id, args.name)
    if command == "voices":
        return list_voices(settings)
    return run_downloads(settings, args.targets)


def run_downloads(settings: Settings, targets: Sequence[str]) -> int:
    for target in dict.fromkeys(targets):
        if target == "llm":
            from gpuserver.llm.download import download_llm

            code = download_llm(settings.llm.local_model_repo, settings.llm.local_model_dir)
        elif target == "asr":
            code = download_recognisers(settings)
        else:
            from gpuserver.engines.download import download_models

            code = download_models(settings.engine.models_dir)
        if code != 0:
            return code
    return 0


def download_recognisers(settings: Settings) -> int:
    """whisper-tiny (its tokenizer completes the MuseTalk folder); on a CUDA box also a
    larger recogniser worth its GPU time."""
    import torch

    from gpuserver.asr.download import DEFAULT_ASR_MODELS, GPU_ASR_MODELS, download_asr_models

    names = GPU_ASR_MODELS if torch.cuda.is_available() else DEFAULT_ASR_MODELS
    return download_asr_models(settings.asr.model_dir.parent, names)


if __name__ == "__main__":
    sys.exit(main())
